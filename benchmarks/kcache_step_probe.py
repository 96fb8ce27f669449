"""Where KCache's decode attention time goes, over all 32 layers of Llama-3.1-8B shapes.

One registered host V pool and one device K pool, laid out as the engine lays them out (`[layers, blocks, 16,
8, 128]`, bf16). Block tables are either contiguous per sequence (what the engine's free list hands out to
sequences admitted together) or a random permutation (a long-running, fragmented pool). Prints ms per step for
the K scan alone, scan + top-N selection, the whole op, and FullKV at the batch that fits on the device beside its V. (results/kcache_step_probe_h100.json also holds a sweep of the gather's program count, measured at
commit a118d4c with a persistent gather kernel: it made no difference, and the kernel went back to one program
per selection.)

    python benchmarks/kcache_step_probe.py [BATCH CONTEXT TOP_N]     # default 25 32768 64; JSON to $OUT
"""
from __future__ import annotations

import json
import os
import sys

import torch

from attention_microbench import time_graph  # same folder
from kcache.attention import triton_decode as td
from kcache.cache.kv import host_empty
from kcache.config import KCacheConfig

LAYERS, HQ, HKV, D, BS = 32, 32, 8, 128, 16


def per_step_ms(fn) -> float:
    return time_graph(fn, calls=1, replays=10) * 1e3


def tables_for(batch: int, blocks_per_seq: int, layout: str, dev) -> torch.Tensor:
    n = batch * blocks_per_seq
    ids = torch.arange(n, device=dev) if layout == "contiguous" else torch.randperm(n, device=dev)
    return ids.to(torch.int32).view(batch, blocks_per_seq)


def kcache_rows(batch: int, context: int, top_n: int) -> list[dict]:
    dev = torch.device("cuda")
    nb = batch * context // BS
    k = torch.randn(LAYERS, nb, BS, HKV, D, device=dev, dtype=torch.bfloat16)
    v = host_empty((LAYERS, nb, BS, HKV, D), torch.bfloat16, dev)
    v.view(torch.int16).fill_(0x3F80)  # 1.0: touches every page before the timing
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    cfg = KCacheConfig(top_n=top_n)
    scale = D ** -0.5
    v_bytes = batch * LAYERS * HKV * top_n * D * 2
    rows = []
    for layout in ("contiguous", "random"):
        tables = tables_for(batch, nb // batch, layout, dev)
        scan = per_step_ms(lambda: [td._scores(q, k[l], tables, lens, scale) for l in range(LAYERS)])
        select = per_step_ms(lambda: [td._select(*td._scores(q, k[l], tables, lens, scale), lens, cfg) for l in range(LAYERS)])
        total = per_step_ms(lambda: [td.kcache_decode(q, k[l], v[l], tables, lens, cfg) for l in range(LAYERS)])
        gather = total - select
        rows.append({"layout": layout, "batch": batch, "context": context, "top_n": top_n, "scan_ms": scan,
                     "select_ms": select - scan, "gather_ms": gather, "total_ms": total,
                     "gather_GBps": v_bytes / gather / 1e6 if gather > 0 else None})
        print(json.dumps(rows[-1]), flush=True)
    del k
    torch.cuda.cudart().cudaHostUnregister(v.data_ptr())
    return rows


def full_row(batch: int, context: int) -> dict:
    dev = torch.device("cuda")
    nb = batch * context // BS
    k = torch.randn(LAYERS, nb, BS, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    tables = tables_for(batch, nb // batch, "contiguous", dev)
    row = {"layout": "contiguous", "batch": batch, "context": context, "mode": "full",
           "total_ms": per_step_ms(lambda: [td.full_decode(q, k[l], v[l], tables, lens) for l in range(LAYERS)])}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    batch, context, top_n = map(int, sys.argv[1:4]) if len(sys.argv) > 1 else (25, 32768, 64)
    result = {"card": torch.cuda.get_device_name(), "kcache": kcache_rows(batch, context, top_n),
              "full": full_row(batch // 2, context)}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kcache_step_probe.json"), "w") as f:
            json.dump(result, f, indent=1)
