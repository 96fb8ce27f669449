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


def init(rank: int, world_size: int, port: int, device: torch.device) -> None:
    global _threads_before
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU ranks share the cores: oversubscribed, spinning threads would stall every collective
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def destroy() -> None:
    global _threads_before
    if dist.is_initialized():
        dist.destroy_process_group()
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial results of a row-parallel linear, in place."""
    dist.all_reduce(x)
    return x


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Each rank's vocab slice [n, V/tp] -> the full logits [n, V] on rank 0 (None elsewhere)."""
    if dist.get_rank() != 0:
        dist.gather(logits, dst=0)
        return None
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.gather(logits, parts, dst=0)
    return torch.cat(parts, dim=-1)[:, :vocab_size]


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's value: all ranks must size their pools alike (rank 0 hands out block ids)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
