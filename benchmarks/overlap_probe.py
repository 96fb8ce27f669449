"""Does splitting a decode batch in two, on two CUDA streams, hide KCache's host V reads behind the K scan?

Emulates one decode step of Llama-3.1-8B shapes over all 32 layers (each layer its own region of one large
registered host V pool, as in the engine), B sequences at context L, top-N group selection. Prints ms per step
for: FullKV (K and V in HBM), KCache on one stream, KCache with the batch halves on two streams.
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


def timed(fn) -> float:
    """Median ms of one fn() call, replayed as a CUDA graph."""
    return time_graph(fn, calls=1, replays=10) * 1e3


def main(batch: int, context: int, top_n: int) -> dict:
    dev = torch.device("cuda")
    blocks = batch * context // BS
    k = torch.randn(LAYERS, blocks, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    fits_full = 2 * k.numel() * k.element_size() < 70 * 2**30  # FullKV needs V on the device too
    v_dev = torch.randn_like(k) if fits_full else None
    v_host = host_empty((LAYERS, blocks, HKV, BS, D), torch.bfloat16, dev)
    v_host.view(torch.int16).fill_(7)
    tables = torch.randperm(blocks, device=dev, dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    cfg = KCacheConfig(top_n=top_n)
    half = batch // 2
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def full():
        for l in range(LAYERS):
            td.full_decode(q, k[l], v_dev[l], tables, lens)

    def one_stream():
        for l in range(LAYERS):
            td.kcache_decode(q, k[l], v_host[l], tables, lens, cfg)

    def two_streams():
        cur = torch.cuda.current_stream()
        for l in range(LAYERS):
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                td.kcache_decode(q[:half], k[l], v_host[l], tables[:half], lens[:half], cfg)
            with torch.cuda.stream(s2):
                td.kcache_decode(q[half:], k[l], v_host[l], tables[half:], lens[half:], cfg)
            cur.wait_stream(s1)
            cur.wait_stream(s2)

    res = {"batch": batch, "context": context, "top_n": top_n, "full_ms": timed(full) if fits_full else None,
           "kcache_one_stream_ms": timed(one_stream), "kcache_two_streams_ms": timed(two_streams)}
    print(json.dumps(res), flush=True)
    del k, v_dev
    torch.cuda.cudart().cudaHostUnregister(v_host.data_ptr())
    return res


if __name__ == "__main__":
    out = [main(*map(int, spec.split("x"))) for spec in (sys.argv[1:] or ["12x32768x64", "25x32768x64", "25x32768x32"])]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "overlap_probe.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "results": out}, f, indent=1)
