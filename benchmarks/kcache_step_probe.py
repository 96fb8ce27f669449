"""Where KCache's decode attention time goes, over all 32 layers of Llama-3.1-8B shapes, against each part's floor.

One registered host V pool and one device K pool, laid out as the engine lays them out (`[layers, blocks, 8, 16,
128]`, bf16), block tables a random permutation (a long-running, fragmented pool). For each (chunk_tokens, top_n)
it prints ms per step for the K scan, the top-N selection, the gather and the whole op, the gather's host read rate,
and FullKV at the batch that fits on the device beside its V; then the whole op with the batch in slices of
several shares (OVERLAP_SHARES: host copies beside the next slice's scan), the copy spread over the GPU or on a few
looping programs (STAGE_PROGRAMS). Floors: the scan reads every K byte once from HBM; the
gather reads `budget` V rows per KV head from host memory at PCIe speed (47 GB/s measured on the lent H200).

    python benchmarks/kcache_step_probe.py [BATCH CONTEXT [parts|overlap|fp8|fp8v]]  # default 25 32768; parts: the
    gather's parts only; overlap: the slices sweep only; fp8: FP8 K (fp8_rows) and its slices sweep; fp8v: FP8 K
    with FP8 host V in chunks of 16 (2 KiB reads at head_dim 128), against bf16 host V in chunks of 8, and the slices
    sweep of a few shares for both
"""
from __future__ import annotations

import json
import os
import sys

import torch

from attention_microbench import hbm_read_bandwidth, time_graph  # same folder
from kcache.attention import triton_decode as td
from kcache.attention.reference import ExactChannels
from kcache.cache.kv import host_empty
from kcache.config import KCacheConfig

LAYERS, HQ, HKV, D, BS = 32, 32, 8, 128, 16
SETTINGS = [(1, 64), (8, 64), (16, 64), (8, 128), (8, 256), (16, 256)]  # (chunk_tokens, top_n)
PCIE = 47e9  # bytes/s: host reads of >= 2 KiB on the lent H200 (shared/research/gpu-limits.md)


def per_step_ms(fn) -> float:
    return time_graph(fn, calls=1, replays=10) * 1e3


def kcache_rows(batch: int, context: int, hbm: float, mode: str = "all") -> list[dict]:
    dev = torch.device("cuda")
    nb = batch * context // BS
    k = torch.randn(LAYERS, nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    v = host_empty((LAYERS, nb, HKV, BS, D), torch.bfloat16, dev)
    v.view(torch.int16).fill_(0x3F80)  # 1.0: touches every page before the timing
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(batch, nb // batch)
    scale = D ** -0.5
    k_bytes = batch * context * HKV * D * 2 * LAYERS
    rows = []
    for chunk, top_n in SETTINGS if mode == "all" else []:
        cfg = KCacheConfig(top_n=top_n, chunk_tokens=chunk)
        scores = lambda l: td.chunk_scores(q, k[l], tables, lens, chunk, scale)  # noqa: E731
        scan = per_step_ms(lambda: [scores(l) for l in range(LAYERS)])
        select = per_step_ms(lambda: [td.select_chunks(*scores(l), lens, cfg) for l in range(LAYERS)])
        total = per_step_ms(lambda: [td.kcache_decode(q, k[l], v[l], tables, lens, cfg) for l in range(LAYERS)])
        v_bytes = batch * LAYERS * HKV * cfg.budget * D * 2
        gather = total - select
        rows.append({"batch": batch, "context": context, "chunk_tokens": chunk, "top_n": top_n, "scan_ms": scan,
                     "select_ms": select - scan, "gather_ms": gather, "total_ms": total,
                     "gather_GBps": v_bytes / gather / 1e6 if gather > 0 else None,
                     "scan_floor_ms": k_bytes / hbm * 1e3, "gather_floor_ms": v_bytes / PCIE * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    if mode == "all":
        rows += stage_sweep(q, k, v, tables, lens, scale)
    if mode in ("all", "overlap"):
        rows += overlap_sweep(q, k, v, tables, lens)
    if mode in ("all", "parts"):
        rows += gather_parts(q, k, v, tables, lens, scale, nb)
    del k
    torch.cuda.cudart().cudaHostUnregister(v.data_ptr())
    return rows


def stage_sweep(q, k, v, tables, lens, scale) -> list[dict]:
    """The gather's time by the size and warps of its host-copy programs (chunk_tokens 8, top_n 64)."""
    cfg = KCacheConfig(top_n=64, chunk_tokens=8)
    mid = [(l, *td.chunk_scores(q, k[l], tables, lens, 8, scale)) for l in range(LAYERS)]
    keys = [td.select_chunks(lse, m, l_, lens, cfg) for _, lse, m, l_ in mid]
    out = []
    default = td.STAGE_ROWS, td.STAGE_WARPS
    for rows, warps in ((8, 1), (16, 2), (32, 2), (64, 4), (128, 4)):
        td.STAGE_ROWS, td.STAGE_WARPS = rows, warps
        ms = per_step_ms(lambda: [td.gather_chunks(kk, q, k[l], m, l_, v[l], tables, lens, cfg, scale)
                                  for kk, (l, _, m, l_) in zip(keys, mid)])
        out.append({"stage_rows": rows, "stage_warps": warps, "gather_ms": ms,
                    "gather_GBps": q.shape[0] * LAYERS * HKV * cfg.budget * D * 2 / ms / 1e6})
        print(json.dumps(out[-1]), flush=True)
    td.STAGE_ROWS, td.STAGE_WARPS = default
    return out


OVERLAPS = [((1,), 32, 64), ((1, 1), 32, 64), ((2, 1), 32, 64), ((3, 1), 32, 64), ((5, 1), 32, 64),
            ((8, 1), 32, 64), ((1, 1, 1), 32, 64), ((2, 2, 1), 32, 64), ((4, 2, 1), 32, 64), ((3, 1), 48, 64),
            ((3, 1), 16, 64), ((1,), 0, 16)]  # (OVERLAP_SHARES, STAGE_PROGRAMS, STAGE_ROWS)


def overlap_sweep(q, k, v, tables, lens, chunk=8, overlaps=OVERLAPS, **pools) -> list[dict]:
    """The whole op with the batch in slices of OVERLAP_SHARES, whose host copies overlap the next slice's scan
    (chunks of `chunk` tokens), the copy on one program per piece (0) or on a few looping programs, copying STAGE_ROWS
    rows at a time. pools: the FP8 arguments of kcache_decode by layer (k_scales, k_exact, v_scales: functions of the
    layer)."""
    out = []
    default = td.OVERLAP_SHARES, td.STAGE_PROGRAMS, td.STAGE_ROWS
    extra = lambda l: {name: f(l) for name, f in pools.items()}  # noqa: E731
    for top_n in (64, 256):
        cfg = KCacheConfig(top_n=top_n, chunk_tokens=chunk)
        for shares, programs, rows in overlaps:
            td.OVERLAP_SHARES, td.STAGE_PROGRAMS, td.STAGE_ROWS = shares, programs, rows
            ms = per_step_ms(lambda: [td.kcache_decode(q, k[l], v[l], tables, lens, cfg, **extra(l))
                                      for l in range(LAYERS)])
            out.append({"overlap_shares": shares, "stage_programs": programs, "stage_rows": rows, "top_n": top_n,
                        "chunk_tokens": chunk, "fp8": bool(pools), "host_v": "fp8" if "v_scales" in pools else "bf16",
                        "total_ms": ms})
            print(json.dumps(out[-1]), flush=True)
    td.OVERLAP_SHARES, td.STAGE_PROGRAMS, td.STAGE_ROWS = default
    return out


def gather_parts(q, k, v, tables, lens, scale, nb) -> list[dict]:
    """The gather's two launches timed apart (chunk_tokens 8, top_n 64): the host copy per layer, the same copy of
    every layer's chunks in one launch (tables offset into each layer's pool), and the weighted sum alone."""
    cfg = KCacheConfig(top_n=64, chunk_tokens=8)
    B = q.shape[0]
    mids = [td.chunk_scores(q, k[l], tables, lens, 8, scale) for l in range(LAYERS)]
    keys = torch.stack([td.select_chunks(*mid, lens, cfg) for mid in mids])  # [layers, B, Hkv, 1, NP]
    per_layer = per_step_ms(lambda: [td.stage_chunks(keys[l], v[l], tables, lens, cfg) for l in range(LAYERS)])
    offset = (torch.arange(LAYERS, device=q.device, dtype=torch.int32) * nb).view(LAYERS, 1, 1)
    all_tables = (tables[None] + offset).view(LAYERS * B, -1)  # layer l's blocks in the flat [layers * nb] pool
    flat = v.view(LAYERS * nb, HKV, BS, D)
    all_keys = keys.view(LAYERS * B, *keys.shape[2:])
    one_launch = per_step_ms(lambda: td.stage_chunks(all_keys, flat, all_tables, lens.repeat(LAYERS), cfg))
    staged = [td.stage_chunks(keys[l], v[l], tables, lens, cfg) for l in range(LAYERS)]
    v_bytes = B * LAYERS * HKV * cfg.budget * D * 2
    rows = [{"part": "host copy, one launch per layer", "ms": per_layer, "GBps": v_bytes / per_layer / 1e6},
            {"part": "host copy, all layers in one launch", "ms": one_launch, "GBps": v_bytes / one_launch / 1e6}]
    for r in rows:
        print(json.dumps(r), flush=True)
    default = td.GATHER_ROWS, td.GATHER_WARPS, td.SPLIT_WEIGHTS
    for split, tile, warps in [(False, 128, 4), (True, 128, 4), (True, 128, 8), (True, 64, 4), (True, 32, 4),
                               (False, 32, 4), (False, 64, 8)]:
        td.GATHER_ROWS, td.GATHER_WARPS, td.SPLIT_WEIGHTS = tile, warps, split
        ms = per_step_ms(lambda: [td.weighted_sum(keys[l], q, k[l], mids[l][1], mids[l][2], staged[l], tables, lens,
                                                  cfg, scale) for l in range(LAYERS)])
        rows.append({"part": "weighted sum over the staged rows (K logits again, softmax weights, sum)", "ms": ms,
                     "split_weights": split, "gather_rows": tile, "warps": warps})
        print(json.dumps(rows[-1]), flush=True)
    td.GATHER_ROWS, td.GATHER_WARPS, td.SPLIT_WEIGHTS = default
    return rows


def random_fp8_pool(blocks: int) -> torch.Tensor:
    """An e4m3 K pool [layers, blocks, Hkv, bs, D] of random values, one layer of bf16 at a time (the whole bf16 pool
    would not fit beside it)."""
    k = torch.empty(LAYERS, blocks, HKV, BS, D, device="cuda", dtype=torch.float8_e4m3fn)
    for l in range(LAYERS):
        k[l] = torch.randn(blocks, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
    return k


FP8_SETTINGS = [(8, 64, 4, "bf16"), (8, 64, 0, "bf16"), (8, 64, 4, "fp8"), (16, 64, 4, "fp8"), (8, 256, 4, "bf16"),
                (8, 256, 4, "fp8"), (16, 256, 4, "fp8")]  # (chunk_tokens, top_n, exact channels, host V)
FP8V_SETTINGS = [(8, 64, 4, "bf16"), (16, 64, 4, "fp8"), (16, 256, 4, "fp8")]
FP8V_OVERLAPS = [((1,), 32, 64), ((1, 1), 32, 64), ((3, 1), 32, 64), ((5, 1), 32, 64)]


def fp8_rows(batch: int, context: int, hbm: float, host_v_sweep: bool = False) -> list[dict]:
    """KCache's op over FP8 K (one scale per KV head; 4 exact channels, or none) with bf16 or FP8 host V, parts
    timed as in kcache_rows, then FP8 FullKV (V in FP8 too) at half the batch. host_v_sweep: FP8V_SETTINGS only,
    and the slices sweep over FP8V_OVERLAPS for bf16 host V in chunks of 8 and FP8 host V in chunks of 16."""
    dev = torch.device("cuda")
    nb = batch * context // BS
    k = random_fp8_pool(nb)
    ks = torch.full((LAYERS, HKV, 1), 0.3, device=dev)
    exact = ExactChannels(torch.randn(LAYERS, nb, HKV, BS, 4, device=dev, dtype=torch.bfloat16),
                          torch.arange(4 * HKV, device=dev, dtype=torch.int32).view(HKV, 4).repeat(LAYERS, 1, 1))
    v = host_empty((LAYERS, nb, HKV, BS, D), torch.bfloat16, dev)
    v.view(torch.int16).fill_(0x3F80)
    v8 = v.view(-1).view(torch.uint8)[: v.numel()].view(torch.float8_e4m3fn).view(v.shape)  # the same registered bytes
    vs = torch.full((LAYERS, HKV, 1), 0.5, device=dev)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(batch, nb // batch)
    scale = D ** -0.5
    k_bytes = batch * context * HKV * D * LAYERS
    rows = []
    for chunk, top_n, nx, host in FP8V_SETTINGS if host_v_sweep else FP8_SETTINGS:
        cfg = KCacheConfig(top_n=top_n, chunk_tokens=chunk)
        kx = (lambda l: ExactChannels(exact.values[l], exact.channels[l])) if nx else (lambda l: None)
        pool, vsc = (v8, lambda l: vs[l]) if host == "fp8" else (v, lambda l: None)
        scores = lambda l: td.chunk_scores(q, k[l], tables, lens, chunk, scale, ks[l], kx(l))  # noqa: E731
        op = lambda l: td.kcache_decode(q, k[l], pool[l], tables, lens, cfg, None, ks[l], vsc(l), kx(l))  # noqa: E731
        scan = per_step_ms(lambda: [scores(l) for l in range(LAYERS)])
        select = per_step_ms(lambda: [td.select_chunks(*scores(l), lens, cfg) for l in range(LAYERS)])
        total = per_step_ms(lambda: [op(l) for l in range(LAYERS)])
        shares, td.OVERLAP_SHARES = td.OVERLAP_SHARES, (1,)
        serial = per_step_ms(lambda: [op(l) for l in range(LAYERS)])
        td.OVERLAP_SHARES = shares
        v_bytes = batch * LAYERS * HKV * cfg.budget * D * (1 if host == "fp8" else 2)
        rows.append({"batch": batch, "context": context, "mode": "fp8 K", "exact_channels": nx, "host_v": host,
                     "chunk_tokens": chunk, "top_n": top_n, "scan_ms": scan, "select_ms": select - scan,
                     "gather_serial_ms": serial - select, "total_serial_ms": serial, "total_ms": total,
                     "scan_floor_ms": (k_bytes + (exact.values.numel() * 2 if nx else 0)) / hbm * 1e3,
                     "gather_floor_ms": v_bytes / PCIE * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    k_pools = {"k_scales": lambda l: ks[l], "k_exact": lambda l: ExactChannels(exact.values[l], exact.channels[l])}
    if host_v_sweep:
        rows += overlap_sweep(q, k, v, tables, lens, 8, FP8V_OVERLAPS, **k_pools)
        rows += overlap_sweep(q, k, v8, tables, lens, 16, FP8V_OVERLAPS, v_scales=lambda l: vs[l], **k_pools)
    else:
        rows += overlap_sweep(q, k, v, tables, lens, **k_pools)
    del k, exact
    torch.cuda.cudart().cudaHostUnregister(v.data_ptr())
    del v, v8
    half = batch // 2
    nb = half * context // BS
    k = random_fp8_pool(nb)
    v = k.clone()
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(half, nb // half)
    rows.append({"batch": half, "context": context, "mode": "fp8 full",
                 "total_ms": per_step_ms(lambda: [td.full_decode(q[:half], k[l], v[l], tables, lens[:half], None,
                                                                 ks[l], vs[l]) for l in range(LAYERS)]),
                 "floor_ms": 2 * k.numel() / hbm * 1e3})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def full_row(batch: int, context: int, hbm: float) -> dict:
    dev = torch.device("cuda")
    nb = batch * context // BS
    k = torch.randn(LAYERS, nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(batch, nb // batch)
    row = {"batch": batch, "context": context, "mode": "full",
           "total_ms": per_step_ms(lambda: [td.full_decode(q, k[l], v[l], tables, lens) for l in range(LAYERS)]),
           "floor_ms": 2 * k.numel() * 2 / hbm * 1e3}
    print(json.dumps(row), flush=True)
    return row


def main():
    batch, context = map(int, sys.argv[1:3]) if len(sys.argv) > 2 else (25, 32768)
    mode = sys.argv[3] if len(sys.argv) > 3 else "all"
    hbm = hbm_read_bandwidth()
    print(f"HBM streaming read: {hbm / 1e12:.2f} TB/s", flush=True)
    if mode in ("fp8", "fp8v"):
        rows = fp8_rows(batch, context, hbm, host_v_sweep=mode == "fp8v")
    else:
        rows = kcache_rows(batch, context, hbm, mode)
    result = {"card": torch.cuda.get_device_name(), "hbm_read_Bps": hbm, "kcache": rows}
    if mode == "all":
        result["full"] = full_row(batch // 2, context, hbm)
    if os.environ.get("OUT"):
        card = torch.cuda.get_device_name().split()[1].lower()
        name = "kcache_step_probe.json" if mode == "all" else f"kcache_step_probe_{mode}_{card}_{batch}x{context}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
