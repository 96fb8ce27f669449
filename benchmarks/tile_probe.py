"""Tokens per K tile and pipeline stages of the decode kernels: the KCache scan (`chunk_scores`) and the full
decode, bf16 and FP8 K.

Four layers of Llama-3.1-8B attention shapes at 32k tokens, block tables a random permutation; ms per layer for
each tile size. An FP8 tile of 64 tokens moves half the bytes of a bf16 one, so fewer bytes are in flight per
program. The winners are `SCAN_TILE`, `FULL_TILE` and `K_STAGES` in kcache/attention/triton_decode.py.

    python benchmarks/tile_probe.py      # writes $OUT/tile_probe.json when OUT is set
"""
from __future__ import annotations

import json
import os

import torch

from attention_microbench import time_graph  # same folder
from kcache.attention import triton_decode as td

LAYERS, HQ, HKV, D, BS, CONTEXT = 4, 32, 8, 128, 16, 32768
TILES = (64, 128, 256)
STAGES = (2, 3, 4)  # swept at the default tiles


def per_layer_ms(fn) -> float:
    return time_graph(lambda: [fn(l) for l in range(LAYERS)], calls=1, replays=10) * 1e3 / LAYERS


def pools(batch: int, fp8: bool):
    """(q, k, k_scales | None, tables, lengths) for `batch` sequences of CONTEXT tokens."""
    nb = batch * CONTEXT // BS
    k = torch.randn(LAYERS, nb, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
    scales = None
    if fp8:
        k, scales = k.to(torch.float8_e4m3fn), torch.ones(LAYERS, nb, HKV, BS, 1, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), CONTEXT, device="cuda", dtype=torch.int32)
    tables = torch.randperm(nb, device="cuda").to(torch.int32).view(batch, -1)
    return q, k, scales, tables, lens


def sweep(batch: int, fp8: bool) -> list[dict]:
    q, k, ks, tables, lens = pools(batch, fp8)
    layer_scales = (lambda l: None) if ks is None else (lambda l: ks[l])  # noqa: E731
    scale = D ** -0.5
    kernels = {
        "scan": lambda l: td.chunk_scores(q, k[l], tables, lens, 8, scale, layer_scales(l)),
        # the K pool stands in for V: the same bytes, FP8 with the same scales
        "full": lambda l: td.full_decode(q, k[l], k[l], tables, lens, scale, layer_scales(l), layer_scales(l)),
    }
    rows = []
    default = td.SCAN_TILE, dict(td.FULL_TILE)
    for tile in TILES:
        td.SCAN_TILE, td.FULL_TILE = tile, {size: tile for size in td.FULL_TILE}
        for name, fn in kernels.items():
            rows.append({"kernel": name, "k_dtype": "fp8" if fp8 else "bf16", "batch": batch, "tile": tile,
                         "ms_per_layer": per_layer_ms(fn)})
            print(json.dumps(rows[-1]), flush=True)
    td.SCAN_TILE, td.FULL_TILE = default
    default_stages = td.K_STAGES
    for stages in STAGES:
        td.K_STAGES = stages
        for name, fn in kernels.items():
            rows.append({"kernel": name, "k_dtype": "fp8" if fp8 else "bf16", "batch": batch, "stages": stages,
                         "ms_per_layer": per_layer_ms(fn)})
            print(json.dumps(rows[-1]), flush=True)
        td.K_STAGES = default_stages
    return rows


def main():
    rows = sweep(11, fp8=False) + sweep(23, fp8=False) + sweep(23, fp8=True) + sweep(46, fp8=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tile_probe.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "context": CONTEXT, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
