"""Which launch faults: with uneven batch slices (OVERLAP_SHARES (2, 1)) and the scan's table in registers, the step
probe hit an illegal memory access at 32k on the H100 (bf16 batch 23, FP8 batch 45). This runs the scan, selection,
copy and sum at 32k over batch sizes 1-23 and slice offsets 0, 7, 15 ("scan"), or kcache_decode at batch 23 in
shares (1,), (1, 1), (2, 1), (3, 1) ("shares"), stopping at the first fault; run it with CUDA_LAUNCH_BLOCKING=1.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/slices_fault_probe.py scan|shares regs|tile
"""
import argparse
import sys

import torch
from kcache.attention import triton_decode as td
from kcache.cache.kv import host_empty
from kcache.config import KCacheConfig

HKV, H, D, BS, L, B = 8, 32, 128, 16, 32768, 23


def pools(dev):
    nb = B * L // BS
    k = torch.randn(nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)  # [blocks, Hkv, BS, D]
    v = host_empty((nb, HKV, BS, D), torch.bfloat16, dev)              # pinned host
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(B, -1)  # [B, L/BS]
    return k, v, tables


def run_steps(q, k, v, tables, lens, cfg):
    """The decode's four launches one by one, synchronising after each so that a fault names its launch."""
    step = "scan"
    try:
        lse, m, l = td.chunk_scores(q, k, tables, lens, cfg.chunk_tokens, D ** -0.5)
        torch.cuda.synchronize(); step = "select"
        keys = td.select_chunks(lse, m, l, lens, cfg)
        torch.cuda.synchronize(); step = "stage"
        staged = td.stage_chunks(keys, v, tables, lens, cfg)
        torch.cuda.synchronize(); step = "sum"
        td.weighted_sum(keys, q, k, m, l, staged, tables, lens, cfg, D ** -0.5)
        torch.cuda.synchronize()
    except Exception as e:
        raise RuntimeError(f"at {step}: {e}") from e


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["scan", "shares"])
    p.add_argument("table", choices=["regs", "tile"])
    args = p.parse_args()
    td.SCAN_TABLE_IN_REGISTERS = args.table == "regs"
    dev = torch.device("cuda")
    k, v, tables = pools(dev)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((B,), L, device=dev, dtype=torch.int32)
    cfg = KCacheConfig(top_n=64, chunk_tokens=8)
    if args.mode == "scan":
        cases = [((lo, hi), None) for hi in range(1, B + 1) for lo in (0, 15, 7) if lo < hi]
    else:
        cases = [((0, B), shares) for shares in ((1,), (1, 1), (2, 1), (3, 1))]
    for (lo, hi), shares in cases:
        s = slice(lo, hi)
        try:
            if shares is None:
                run_steps(q[s], k, v, tables[s], lens[s], cfg)
            else:
                td.OVERLAP_SHARES = shares
                td.kcache_decode(q[s], k, v, tables[s], lens[s], cfg)
                torch.cuda.synchronize()
        except Exception as e:
            print(f"FAULT {args.mode} {args.table} lo={lo} hi={hi} shares={shares}: {str(e)[:160]}", flush=True)
            sys.exit(1)
    print(f"ok {args.mode} {args.table} {len(cases)} cases", flush=True)


if __name__ == "__main__":
    main()
