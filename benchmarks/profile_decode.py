"""Profile engine decode steps (random weights of a preset's shapes): where a step's time goes beyond the attention op.

python benchmarks/profile_decode.py kcache|full BATCH CONTEXT [PRESET]      # PRESET: llama-3.1-8b (default)
KV_DTYPE=fp8 profiles FP8 pools (kv_cache_dtype).
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kcache.config import EngineConfig, KCacheConfig, SamplingParams
from kcache.engine.llm_engine import LLMEngine
from kcache.models import loader


def main(mode: str, batch: int, context: int, preset: str) -> None:
    loaded = loader.load(preset, "dummy", "bfloat16")
    cfg = EngineConfig(model=preset, load_format="dummy", cache=mode, kcache=KCacheConfig(top_n=64),
                       max_model_len=context + 64, max_num_seqs=batch, max_num_batched_tokens=32768,
                       host_cache_bytes=96 << 30, kv_cache_dtype=os.environ.get("KV_DTYPE", "auto"))
    eng = LLMEngine(cfg, loaded)
    for i in range(batch):
        eng.add_request([100 + i] * context, SamplingParams(max_tokens=60, ignore_eos=True))
    while len(eng.scheduler.running) < batch:  # prefill everything first
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 10 * 1e3
    print(f"{mode} {cfg.kv_cache_dtype} batch {batch} context {context}: {step_ms:.1f} ms per decode step (profiled)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    host = cProfile.Profile()  # the Python side of the same steps, unprofiled by torch: where the wall time goes
    t0 = time.perf_counter()
    host.enable()
    for _ in range(10):
        eng.step()
    host.disable()
    print(f"{(time.perf_counter() - t0) / 10 * 1e3:.1f} ms per decode step (cProfile)")
    pstats.Stats(host).sort_stats("tottime").print_stats(15)
    eng.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "llama-3.1-8b")
