"""The process group: NCCL between GPUs, gloo on CPU; rendezvous on 127.0.0.1."""
from __future__ import annotations

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

    NCCL's orderly teardown (destroy_process_group) deadlocked on 2 H100s under torch 2.11, with every rank in it;
    so on GPUs the workers leave by exiting their process (`exit_worker`) and rank 0 aborts its communicators,
    a local operation. Gloo tears down cleanly."""
    global _threads_before
    if uses_nccl():
        torch.cuda.synchronize()
        getattr(dist.distributed_c10d, "_abort_process_group", dist.destroy_process_group)()  # private: torch >= 2.5
    elif dist.is_initialized():
        dist.destroy_process_group()
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None


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
