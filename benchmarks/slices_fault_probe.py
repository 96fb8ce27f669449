"""Which launch faults: with uneven batch slices (OVERLAP_SHARES (2, 1)) and the scan's table in registers, the step
probe hit an illegal memory access at 32k on the H100 (bf16 batch 23, FP8 batch 45). This runs the scan, selection,
copy and sum at 32k over batch sizes 1-23 and slice offsets 0, 7, 15 ("scan"), or kcache_decode at batch 23 in
shares (1,), (1, 1), (2, 1), (3, 1) ("shares"), stopping at the first fault; run it with CUDA_LAUNCH_BLOCKING=1.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/slices_fault_probe.py scan|shares regs|tile
"""
import sys

import torch
from kcache.attention import triton_decode as td
from kcache.cache.kv import host_empty
from kcache.config import KCacheConfig
mode, table = sys.argv[1], sys.argv[2]
td.SCAN_TABLE_IN_REGISTERS = table == "regs"
HKV, D, BS, L, B = 8, 128, 16, 32768, 23
nb = B * L // BS
dev = torch.device("cuda")
k = torch.randn(nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)
v = host_empty((nb, HKV, BS, D), torch.bfloat16, dev)
q = torch.randn(B, 32, D, device=dev, dtype=torch.bfloat16)
lens = torch.full((B,), L, device=dev, dtype=torch.int32)
tables = torch.randperm(nb, device=dev).to(torch.int32).view(B, -1)
cfg = KCacheConfig(top_n=64, chunk_tokens=8)
cases = [(lo, hi) for hi in range(1, B + 1) for lo in (0, 15, 7) if lo < hi] if mode != "shares" else [(0, B)]
for lo, hi in cases:
    step = "?"
    try:
        if mode == "scan":
            step = "scan"; lse, m, l = td.chunk_scores(q[lo:hi], k, tables[lo:hi], lens[lo:hi], 8, D ** -0.5)
            step = "select"; keys = td.select_chunks(lse, m, l, lens[lo:hi], cfg)
            step = "stage"; staged = td.stage_chunks(keys, v, tables[lo:hi], lens[lo:hi], cfg)
            step = "sum"; td.weighted_sum(keys, q[lo:hi], k, m, l, staged, tables[lo:hi], lens[lo:hi], cfg, D ** -0.5)
        else:
            for shares in ((1,), (1, 1), (2, 1), (3, 1)) if mode == "shares" else ((1, 1),):
                td.OVERLAP_SHARES = shares; step = f"decode {shares}"
                td.kcache_decode(q[lo:hi], k, v, tables[lo:hi], lens[lo:hi], cfg)
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    except Exception as e:
        print(f"FAULT {mode} {table} lo={lo} hi={hi} at {step}: {str(e)[:120]}", flush=True)
        sys.exit(1)
print(f"ok {mode} {table} {len(cases)} cases", flush=True)
