"""Two versions of the decode kernels side by side: the K scan (`chunk_scores`, chunks of 8) and the full decode,
an earlier kcache/attention/triton_decode.py against the working tree's; then the working tree's scan by launch
constants (tile, warps, pipeline stages) and with its block table in registers (SCAN_TABLE_IN_REGISTERS), and its
full decode by tile, warps and stages. Four layers of Llama-3.1-8B shapes at 32k tokens (the last tile ragged), block tables
a random permutation, bf16 queries; ms per layer. FP8 K at batch 46 and bf16 at 23 (the same bytes), the full decode
at FullKV's batches (FP8 K and V at 23, bf16 at 11).

    git show d83d8c5:kcache/attention/triton_decode.py > /tmp/old.py
    python benchmarks/kernel_ab.py /tmp/old.py   # writes $OUT/kernel_ab.json when OUT is set
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

from attention_microbench import time_graph  # same folder
from kcache.attention import triton_decode as td

LAYERS, HQ, HKV, D, BS, CONTEXT = 4, 32, 8, 128, 16, 32768
LAUNCHES = [(128, 4, 3), (128, 4, 2), (128, 4, 4), (256, 4, 3), (256, 8, 3), (128, 8, 3), (64, 4, 3), (64, 2, 3),
            (128, 2, 3), (32, 2, 3), (32, 1, 3), (64, 1, 3)]  # (SCAN_TILE, SCAN_WARPS, SCAN_STAGES)
TABLE_LAUNCHES = [(128, 4, 3), (128, 4, 4), (256, 4, 3), (64, 4, 4)]  # with SCAN_TABLE_IN_REGISTERS
FULL_LAUNCHES = [(128, 4, 3), (128, 8, 3), (64, 4, 3), (64, 8, 3), (128, 8, 4), (64, 4, 4), (64, 8, 4), (32, 4, 4),
                 (256, 8, 3)]  # (FULL_TILE, FULL_WARPS, FULL_STAGES) of the full decode


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("earlier_triton_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_layer_ms(fn) -> float:
    return time_graph(lambda: [fn(l) for l in range(LAYERS)], calls=1, replays=10) * 1e3 / LAYERS


def pools(batch: int, fp8: bool, with_v: bool):
    """(q, k, k scales, v, v scales, tables, lengths): pools [LAYERS, blocks, Hkv, BS, D], FP8 with per-head scales."""
    k = torch.randn(LAYERS, batch * CONTEXT // BS, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k) if with_v else None
    ks = vs = None
    if fp8:
        k, ks = k.to(torch.float8_e4m3fn), torch.full((LAYERS, HKV, 1), 0.05, device="cuda")
        if with_v:
            v, vs = v.to(torch.float8_e4m3fn), torch.full((LAYERS, HKV, 1), 0.05, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), CONTEXT - 77, device="cuda", dtype=torch.int32)
    tables = torch.randperm(k.shape[1], device="cuda").to(torch.int32).view(batch, -1)
    return q, k, ks, v, vs, tables, lens


def at(x, layer):
    return None if x is None else x[layer]


def main():
    earlier, rows, scale = load_module(sys.argv[1]), [], D ** -0.5

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for batch, fp8 in ((46, True), (23, False)):
        q, k, ks, _, _, tables, lens = pools(batch, fp8, False)
        dtype = "fp8" if fp8 else "bf16"
        for version, module in (("earlier", earlier), ("this", td)):
            emit(kernel="scan", k=dtype, batch=batch, version=version,
                 ms=per_layer_ms(lambda l: module.chunk_scores(q, k[l], tables, lens, 8, scale, at(ks, l))))
        default = td.SCAN_TILE, td.SCAN_WARPS, td.SCAN_STAGES, td.SCAN_TABLE_IN_REGISTERS
        td.SCAN_TABLE_IN_REGISTERS = False
        for tile, warps, stages in LAUNCHES:
            td.SCAN_TILE, td.SCAN_WARPS, td.SCAN_STAGES = tile, warps, stages
            emit(kernel="scan", k=dtype, batch=batch, version="this", table="per tile", tile=tile, warps=warps,
                 stages=stages, ms=per_layer_ms(lambda l: td.chunk_scores(q, k[l], tables, lens, 8, scale, at(ks, l))))
        td.SCAN_TABLE_IN_REGISTERS = True
        for tile, warps, stages in TABLE_LAUNCHES:
            td.SCAN_TILE, td.SCAN_WARPS, td.SCAN_STAGES = tile, warps, stages
            emit(kernel="scan", k=dtype, batch=batch, version="this", table="in registers", tile=tile, warps=warps,
                 stages=stages, ms=per_layer_ms(lambda l: td.chunk_scores(q, k[l], tables, lens, 8, scale, at(ks, l))))
        td.SCAN_TILE, td.SCAN_WARPS, td.SCAN_STAGES, td.SCAN_TABLE_IN_REGISTERS = default
        del q, k, ks
        torch.cuda.empty_cache()
    for batch, fp8 in ((23, True), (11, False)):
        q, k, ks, v, vs, tables, lens = pools(batch, fp8, True)

        def full(module, l):
            return module.full_decode(q, k[l], v[l], tables, lens, scale, at(ks, l), at(vs, l))

        for version, module in (("earlier", earlier), ("this", td)):
            emit(kernel="full", k="fp8" if fp8 else "bf16", batch=batch, version=version,
                 ms=per_layer_ms(lambda l: full(module, l)))
        default = dict(td.FULL_TILE), td.FULL_WARPS, td.FULL_STAGES
        for tile, warps, stages in FULL_LAUNCHES:
            td.FULL_TILE, td.FULL_WARPS, td.FULL_STAGES = {size: tile for size in td.FULL_TILE}, warps, stages
            emit(kernel="full", k="fp8" if fp8 else "bf16", batch=batch, version="this", tile=tile, warps=warps,
                 stages=stages, ms=per_layer_ms(lambda l: full(td, l)))
        td.FULL_TILE, td.FULL_WARPS, td.FULL_STAGES = default
        del q, k, ks, v, vs
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernel_ab.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "context": CONTEXT, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
