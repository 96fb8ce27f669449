"""Launch shapes of the decode kernels: the KCache scan (`chunk_scores`) and the full decode, bf16 and FP8 K.

Four layers of Llama-3.1-8B attention shapes at 32k tokens, block tables a random permutation; ms per layer and
TB/s of the bytes each kernel must read (K for the scan, K and V for the full decode, from separate pools). Swept:
tokens per tile and pipeline stages ("tiles"), and programs per SM, i.e. how finely the sequence is split
("programs"). The winners are `SCAN_TILE`, `FULL_TILE`, `SCAN_STAGES` / `FULL_STAGES` and `PROGRAMS_PER_SM` in
kcache/attention/triton_decode.py.

    python benchmarks/tile_probe.py [tiles] [programs]  # both by default; writes $OUT/tile_probe.json if OUT is set
"""
from __future__ import annotations

import json
import os
import sys

import torch

from attention_microbench import time_graph  # same folder
from kcache.attention import triton_decode as td

LAYERS, HQ, HKV, D, BS, CONTEXT = 4, 32, 8, 128, 16, 32768
TILES = (64, 128, 256)
STAGES = (2, 3, 4)  # swept at the default tiles
PROGRAMS = (2, 4, 8, 16)


def per_layer_ms(fn) -> float:
    return time_graph(lambda: [fn(l) for l in range(LAYERS)], calls=1, replays=10) * 1e3 / LAYERS


def pool(batch: int, fp8: bool):
    """(one pool [LAYERS, blocks, Hkv, BS, D], its scales | None) for `batch` sequences of CONTEXT tokens."""
    x = torch.randn(LAYERS, batch * CONTEXT // BS, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
    if not fp8:
        return x, None
    return x.to(torch.float8_e4m3fn), torch.ones(*x.shape[:-1], 1, device="cuda")


def kernels(batch: int, fp8: bool) -> dict:
    """name -> (fn(layer), bytes per layer it must read)."""
    (k, ks), (v, vs) = pool(batch, fp8), pool(batch, fp8)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), CONTEXT, device="cuda", dtype=torch.int32)
    tables = torch.randperm(k.shape[1], device="cuda").to(torch.int32).view(batch, -1)
    at = lambda scales, l: None if scales is None else scales[l]  # noqa: E731
    scale, k_bytes = D ** -0.5, k[0].numel() * k.element_size()
    return {
        "scan": (lambda l: td.chunk_scores(q, k[l], tables, lens, 8, scale, at(ks, l)), k_bytes),
        "full": (lambda l: td.full_decode(q, k[l], v[l], tables, lens, scale, at(ks, l), at(vs, l)), 2 * k_bytes),
    }


def measure(fns: dict, names, **row) -> list[dict]:
    rows = []
    for name in names:
        fn, nbytes = fns[name]
        ms = per_layer_ms(fn)
        rows.append({"kernel": name, **row, "ms_per_layer": ms, "TBps": nbytes / ms / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tiles(batch: int, fp8: bool) -> list[dict]:
    fns, rows, dtype = kernels(batch, fp8), [], "fp8" if fp8 else "bf16"
    default = td.SCAN_TILE, dict(td.FULL_TILE), td.SCAN_STAGES, td.FULL_STAGES
    for tile in TILES:
        td.SCAN_TILE, td.FULL_TILE = tile, {size: tile for size in td.FULL_TILE}
        rows += measure(fns, fns, k_dtype=dtype, batch=batch, tile=tile)
    td.SCAN_TILE, td.FULL_TILE = default[:2]
    for stages in STAGES:
        td.SCAN_STAGES = td.FULL_STAGES = stages
        rows += measure(fns, fns, k_dtype=dtype, batch=batch, stages=stages)
    td.SCAN_STAGES, td.FULL_STAGES = default[2:]
    return rows


def programs(batch: int, fp8: bool) -> list[dict]:
    fns, rows, dtype, default = kernels(batch, fp8), [], "fp8" if fp8 else "bf16", td.PROGRAMS_PER_SM
    for per_sm in PROGRAMS:
        td.PROGRAMS_PER_SM = per_sm
        rows += measure(fns, fns, k_dtype=dtype, batch=batch, programs_per_sm=per_sm)
    td.PROGRAMS_PER_SM = default
    return rows


SWEEPS = {"tiles": tiles, "programs": programs}


def main():
    rows = []
    for name in sys.argv[1:] or SWEEPS:
        for batch, fp8 in ((11, False), (23, False), (23, True), (46, True)):
            rows += SWEEPS[name](batch, fp8)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tile_probe.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "context": CONTEXT, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
