"""The process group: NCCL between GPUs, gloo on CPU; rendezvous on 127.0.0.1."""
from __future__ import annotations

import ctypes
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_threads_before: int | None = None
# torch 2.13 renamed all_gather_into_tensor (same arguments); the GPU machines run 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init(rank: int, world_size: int, port: int, device: torch.device) -> None:
    global _threads_before
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU ranks share the cores: oversubscribed, spinning threads would stall every collective
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def uses_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def destroy() -> None:
    """Leave the process group (rank 0: after the workers have exited).

    NCCL's teardown deadlocked on the lent 2-GPU machines under torch 2.11: destroy_process_group with every rank
    in it (H100), and rank 0's local abort after the workers had exited (H200). So on GPUs the workers leave by
    exiting their process (`exit_worker`), and rank 0 retires its group without calling into NCCL (`retire`).
    Gloo tears down cleanly."""
    global _threads_before
    if uses_nccl():
        torch.cuda.synchronize()
        retire(dist.distributed_c10d._get_default_group())
    elif dist.is_initialized():
        dist.destroy_process_group()
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None


def retire(group) -> None:
    """Forget the default group, as destroy_process_group's bookkeeping does, so that a later engine can start a
    new one; but keep the group object alive for the life of the process (one extra reference that nothing drops,
    not even interpreter exit), because its destructor would run the teardown that deadlocks. Its communicator's
    device buffers stay allocated until the process exits. Uses torch.distributed internals (checked on torch 2.11
    and 2.13)."""
    c10d = dist.distributed_c10d
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))
    world = c10d._world
    c10d._update_default_pg(None)
    for table in (world.pg_map, world.pg_names, world.pg_group_ranks, world.pg_backend_config, world.pg_to_tag,
                  world.tags_to_pg, world.pg_coalesce_state):
        table.clear()
    c10d._unregister_all_process_groups()
    world.group_count = 0


def exit_worker() -> None:
    """End a worker process: under NCCL without teardown (see destroy), the process exit releases the GPU."""
    if uses_nccl():
        torch.cuda.synchronize()
        os._exit(0)
    destroy()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial results of a row-parallel linear, in place."""
    dist.all_reduce(x)
    return x


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Each rank's vocab slice [n, V/tp] -> the full logits [n, V] on rank 0 (None elsewhere). An all-gather on the
    group's one communicator: NCCL runs a gather as point-to-point sends, which open more communicators."""
    n = logits.shape[0]
    parts = logits.new_empty(dist.get_world_size() * n, logits.shape[1])  # the ranks' slices stacked along rows
    _all_gather_single(parts, logits.contiguous())
    if dist.get_rank() != 0:
        return None
    return torch.cat(parts.split(n), dim=-1)[:, :vocab_size]


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's value: all ranks must size their pools alike (rank 0 hands out block ids)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
