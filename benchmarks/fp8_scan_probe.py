"""What caps the FP8 K scan: a stripped scan (logits, online max and sum) over a paged pool, one way of feeding
the FP8 tile into the dot per mode, with and without loading each tile's per-row scales beside it.

Modes: bf16 K (the reference speed); FP8 converted to bf16; FP8 converted to fp16 (hardware conversion); FP8 to
fp16 by bit operations; FP8 into e4m3 dots with e4m3 queries, one dot or two (the kernels' path: bf16 queries as two
exact e4m3 parts). Scales: none, loaded beside their tile, or loaded a tile ahead (as the kernels do).
Llama-3.1-8B KV shapes, 32k tokens, ms per layer and TB/s.

    python benchmarks/fp8_scan_probe.py              # the sweep; writes $OUT/fp8_scan_probe.json when OUT is set
    python benchmarks/fp8_scan_probe.py one MODE B   # one launch of one mode at batch B (for ncu)
    python benchmarks/fp8_scan_probe.py ablate       # the kernels' scan by launch constants, beside stripped ones
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

from attention_microbench import time_graph  # same folder

HQ, HKV, D, BS, CONTEXT, LAYERS = 32, 8, 128, 16, 32768, 4
NAMES = {0: "bf16 K", 1: "fp8 -> bf16", 2: "fp8 -> fp16 (cvt)", 3: "fp8 -> fp16 (bits)", 4: "fp8 dot, fp8 q",
         5: "2 fp8 dots, fp8 q"}
SCALES = {0: "none", 1: "with the tile", 2: "a tile ahead"}


@triton.jit
def _rows(table_row, pos, end, h, HKV: tl.constexpr, BS: tl.constexpr):
    page = tl.load(table_row + pos // BS, mask=pos < end, other=0)
    return (page.to(tl.int64) * HKV + h) * BS + pos % BS


@triton.jit
def _scan(q, k, ks, tables, m_out, l_out, scale, max_blocks, per_split, HKV: tl.constexpr, G: tl.constexpr,
          D: tl.constexpr, BS: tl.constexpr, BG: tl.constexpr, N: tl.constexpr, MODE: tl.constexpr,
          SCALES: tl.constexpr, C: tl.constexpr = 1, lse_out=None):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    qv = tl.load(q + ((b * HKV + h) * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
    if MODE == 2 or MODE == 3:
        qv = qv.to(tl.float16)
    if MODE >= 4:
        qv = qv.to(tl.float8e4nv)
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)
    start = s * per_split
    end = start + per_split
    ahead = tl.load(ks + _rows(tables + b * max_blocks, start + tl.arange(0, N), end, h, HKV, BS))
    for t in range(start, end, N):
        pos = t + tl.arange(0, N)
        rows = _rows(tables + b * max_blocks, pos, end, h, HKV, BS)
        if SCALES == 2:
            this = ahead
            nxt = pos + N
            ahead = tl.load(ks + _rows(tables + b * max_blocks, nxt, end, h, HKV, BS), mask=nxt < end, other=0.0)
        kt = tl.load(k + rows[:, None] * D + d[None, :])
        if MODE == 1:
            kt = kt.to(tl.bfloat16)
        if MODE == 2:
            kt = kt.to(tl.float16)
        if MODE == 3:  # e4m3 bits into fp16 bits: the value times 2^-8
            kb = kt.to(tl.int16)
            kt = (((kb & 0x80) << 8) | ((kb & 0x7F) << 7)).to(tl.float16, bitcast=True)
        x = tl.dot(qv, tl.trans(kt))
        if MODE == 5:
            x += tl.dot(qv, tl.trans(kt)) * (1.0 / 16)
        if SCALES == 1:
            x = x * tl.load(ks + rows)[None, :]
        if SCALES == 2:
            x = x * this[None, :]
        x = x * scale
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp(x - m_new[:, None])
        l = l * tl.exp(m - m_new) + tl.sum(p, 1)
        m = m_new
        if C > 1:  # the kernels' chunk log-sum-exps, stored
            lse = m_new[:, None] + tl.log(tl.sum(tl.reshape(p, [BG, N // C, C]), 2))
            ci = t // C + tl.arange(0, N // C)
            lc = per_split * tl.num_programs(2) // C
            tl.store(lse_out + ((b * HKV + h) * G + g[:, None]) * lc + ci[None, :], lse, mask=g[:, None] < G)
    head = (b * HKV + h) * G + g
    tl.store(m_out + head * tl.num_programs(2) + s, m, mask=g < G)
    tl.store(l_out + head * tl.num_programs(2) + s, l, mask=g < G)


def run(batch: int, mode: int, tile: int, stages: int, warps: int, scales: int, chunk: int = 1) -> dict:
    nb = batch * CONTEXT // BS
    k = torch.randn(LAYERS, nb, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
    if mode:
        k = k.to(torch.float8_e4m3fn)
    k_in = k.view(torch.uint8) if mode == 3 else k
    ks = torch.ones(LAYERS, nb, HKV, BS, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nb, device="cuda").to(torch.int32).view(batch, -1)
    splits = max(1, min(64, triton.cdiv(4 * torch.cuda.get_device_properties(0).multi_processor_count, batch * HKV)))
    m = torch.empty(batch, HQ, splits, device="cuda")
    l = torch.empty_like(m)
    lse = torch.empty(batch, HQ, CONTEXT // chunk, device="cuda") if chunk > 1 else None

    def layer(i):
        _scan[(batch, HKV, splits)](q, k_in[i], ks[i], tables, m, l, 0.1, tables.shape[1], CONTEXT // splits, HKV=HKV,
                                    G=HQ // HKV, D=D, BS=BS, BG=16, N=tile, MODE=mode, SCALES=scales, C=chunk,
                                    lse_out=lse, num_warps=warps, num_stages=stages)

    ms = time_graph(lambda: [layer(i) for i in range(LAYERS)], calls=1, replays=10) * 1e3 / LAYERS
    gb = k[0].numel() * k.element_size() / 1e9
    return dict(batch=batch, mode=NAMES[mode], scales=SCALES[scales], tile=tile, stages=stages, warps=warps,
                chunk=chunk, ms=ms, TBps=gb / ms)


def ablate() -> list[dict]:
    """The kernels' own scan (triton_decode.chunk_scores, chunks of 8) over FP8 K at batch 46 and bf16 at 23, by its
    launch constants, beside the stripped scan with one or two e4m3 dots, with and without the chunk sums."""
    from kcache.attention import triton_decode as td

    rows = []
    for batch, mode, chunk in [(23, 0, 1), (23, 0, 8), (46, 4, 1), (46, 5, 1), (46, 4, 8), (46, 5, 8)]:
        for tile, stages, warps in ((128, 3, 4), (128, 4, 4), (256, 3, 4), (256, 3, 8)):
            rows.append(run(batch, mode, tile, stages, warps, 0, chunk))
            print(json.dumps(rows[-1]), flush=True)
    default = td.SCAN_TILE, td.SCAN_STAGES, td.PROGRAMS_PER_SM
    for batch, fp8 in ((23, False), (46, True)):
        nb = batch * CONTEXT // BS
        k = torch.randn(LAYERS, nb, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
        k = k.to(torch.float8_e4m3fn) if fp8 else k
        ks = torch.full((HKV, 1), 0.3, device="cuda") if fp8 else None
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(nb, device="cuda").to(torch.int32).view(batch, -1)
        lens = torch.full((batch,), CONTEXT, device="cuda", dtype=torch.int32)
        for tile, stages, per_sm in ((128, 3, 16), (128, 4, 16), (128, 3, 4), (256, 3, 16), (64, 4, 16)):
            td.SCAN_TILE, td.SCAN_STAGES, td.PROGRAMS_PER_SM = tile, stages, per_sm
            ms = time_graph(lambda: [td.chunk_scores(q, k[i], tables, lens, 8, 0.1, ks) for i in range(LAYERS)],
                            calls=1, replays=10) * 1e3 / LAYERS
            rows.append(dict(batch=batch, mode="chunk_scores " + ("fp8" if fp8 else "bf16"), tile=tile, stages=stages,
                             programs_per_sm=per_sm, ms=ms, TBps=k[0].numel() * k.element_size() / 1e9 / ms))
            print(json.dumps(rows[-1]), flush=True)
        del k
    td.SCAN_TILE, td.SCAN_STAGES, td.PROGRAMS_PER_SM = default
    return rows


def main():
    if sys.argv[1:2] == ["ablate"]:
        rows = ablate()
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "fp8_scan_ablation.json"), "w") as f:
                json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
    if sys.argv[1:2] == ["one"]:
        print(run(int(sys.argv[3]), int(sys.argv[2]), 128, 3, 4, 2 if int(sys.argv[2]) else 0))
        return
    rows = [run(23, 0, 128, 3, 4, 0)]
    for mode in (1, 2, 3, 4, 5):
        for scales in SCALES:
            for tile, stages, warps in ((128, 3, 4), (128, 4, 4), (256, 2, 4), (256, 3, 8), (512, 2, 8)):
                rows.append(run(46, mode, tile, stages, warps, scales))
                print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp8_scan_probe.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
