"""Sizing the cache pools from the device and host memory budgets."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from kcache.cache.kv import FullKV, StepBatch, cache_spec
from kcache.config import EngineConfig
from kcache.distributed import comm
from kcache.models.config import ModelConfig

log = logging.getLogger("kcache")

CPU_DEVICE_POOL_BYTES = 2 << 30  # "device" pool on a CPU-only machine, unless given


class CacheTooSmallError(ValueError):
    """The memory budgets leave too few cache tokens for one sequence of max_model_len."""


class HostMemoryError(ValueError):
    """The pools that live in host memory (KCache's V; every pool on a CPU) need more than the machine has free."""


@dataclass(frozen=True)
class PoolPlan:
    num_blocks: int  # blocks the pools hold
    block_size: int
    device_bytes_per_block: int
    host_bytes_per_block: int
    scratch_block: int | None = None  # with CUDA graphs: the last block, where rows that pad a batch write

    @property
    def usable_blocks(self) -> int:
        """Blocks the block manager hands out: all but the scratch block."""
        return self.num_blocks - (self.scratch_block is not None)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def uses_graphs(cfg: EngineConfig, device: torch.device) -> bool:
    """Whether decode replays CUDA graphs (and so needs a scratch block)."""
    return device.type == "cuda" and not cfg.enforce_eager


def available_host_bytes() -> int:
    """Host memory a new allocation can get: Linux's MemAvailable (free pages and reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_memory(plan: PoolPlan, cfg: EngineConfig, device: torch.device) -> None:
    """Refuse pools the host cannot hold, before allocating them: under TP every rank on this machine holds its own
    heads' V (and, on a CPU, its device pool too), and a pinned pool that does not fit fails late or not clearly."""
    per_rank = plan.num_blocks * (plan.host_bytes_per_block + (plan.device_bytes_per_block if device.type == "cpu" else 0))
    need, free = per_rank * cfg.tensor_parallel_size, available_host_bytes()
    if need > free:
        ranks = f"{cfg.tensor_parallel_size} ranks x {per_rank / 2**30:.1f} GiB" if cfg.tensor_parallel_size > 1 else "one rank"
        raise HostMemoryError(
            f"the cache pools need {need / 2**30:.1f} GiB of host memory ({ranks}), and {free / 2**30:.1f} GiB is "
            "available: lower --host-cache-gb (per rank) or --device-cache-gb, or use a machine with more RAM"
        )


def device_budget(cfg: EngineConfig, device: torch.device, activation_peak: int) -> int:
    """Bytes the device pool may take: explicit, or a fraction of the device after weights and activations."""
    if cfg.device_cache_bytes is not None:
        return cfg.device_cache_bytes
    if device.type != "cuda":
        return CPU_DEVICE_POOL_BYTES
    torch.cuda.empty_cache()  # memory the caching allocator holds but does not use is free for the pools
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(cfg.device_memory_fraction * total) - used - activation_peak)


def activation_peak(model, cfg: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Peak device memory of the largest prefill step, measured once on CUDA (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    n = cfg.max_num_batched_tokens
    bs = cfg.block_size
    cache = FullKV(model.config, math.ceil(n / bs), bs, dtype, device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    batch = StepBatch(is_prefill=True, slot_mapping=torch.arange(n, device=device),
                      block_tables=torch.arange(cache.num_blocks, device=device, dtype=torch.int32)[None],
                      lengths=torch.tensor([n], device=device, dtype=torch.int32),
                      chunk_starts=(0,), chunk_lens=(n,), context_lens=(0,))
    with torch.inference_mode():
        hidden = model(torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device), cache, batch)
        model.logits(hidden[-1:])
    peak = torch.cuda.max_memory_allocated(device) - before
    del cache, hidden
    torch.cuda.empty_cache()
    return peak


def plan_pools(cfg: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device,
               activation_peak: int, max_model_len: int) -> PoolPlan:
    """Blocks both budgets allow. Host V blocks share the device K blocks' ids, so the smaller count wins; under
    TP `model` is one rank's shard, and every rank takes the smallest count of all ranks."""
    spec = cache_spec(model, dtype, cfg.kcache.dense_layers if cfg.cache == "kcache" else None, cfg.kv_cache_dtype,
                      cfg.host_v_dtype, cfg.k_exact_channels)
    dev_per_block, host_per_block = spec.device_bytes_per_block(cfg.block_size), spec.host_bytes_per_block(cfg.block_size)
    budget = device_budget(cfg, device, activation_peak)
    blocks = budget // dev_per_block
    if host_per_block:
        share = 2 * cfg.tensor_parallel_size  # half the free host memory, split among the ranks
        host = cfg.host_cache_bytes if cfg.host_cache_bytes is not None else available_host_bytes() // share
        blocks = min(blocks, host // host_per_block)
    if cfg.tensor_parallel_size > 1:
        blocks = comm.min_over_ranks(blocks, device)
    blocks = int(blocks)
    scratch = blocks - 1 if uses_graphs(cfg, device) else None
    plan = PoolPlan(blocks, cfg.block_size, dev_per_block, host_per_block, scratch)
    check_host_memory(plan, cfg, device)
    if plan.usable_blocks * plan.block_size < max_model_len:
        raise CacheTooSmallError(
            f"the cache budgets hold {plan.usable_blocks * plan.block_size} tokens, fewer than one sequence of "
            f"max_model_len={max_model_len}: raise the device/host cache budget or lower max_model_len"
        )
    log.info(
        "cache pools (%s): %d blocks x %d tokens = %d tokens; device %.2f GiB, host %.2f GiB", cfg.cache,
        plan.num_blocks, plan.block_size, plan.num_tokens, plan.num_blocks * dev_per_block / 2**30,
        plan.num_blocks * host_per_block / 2**30,
    )
    return plan
