"""Triton decode attention over the paged pools: FullKV flash-decoding and KCache chunked top-N decode.

Pools (one layer): `[num_blocks, kv_heads, block_size, head_dim]`; slot = block * block_size + offset. Row
`(block * kv_heads + h) * block_size + offset` of the flat `[rows, head_dim]` view is one vector of one KV head
(256 bytes at bf16, d=128), and the block_size rows of one (block, head) are contiguous: a chunk of KCache's
`chunk_tokens` consecutive tokens is one contiguous read (2 KiB for 8 tokens at d=128), which the lent GPUs serve
from host memory at PCIe speed where scattered 256-byte rows run at a fixed ~28 M reads/s.

One program handles all G query heads of a KV head, so each K row is read once per step (GQA folded); the
G rows are padded to 16 for `tl.dot`, and the scan's softmax works on the first 8 of them where G fits
(_kept_rows). The sequence is split so that small batches still fill the GPU; the split count depends only on
static shapes, so every launch here can be captured in a CUDA graph.

FP8 pools (float8 e4m3 rows under one float32 scale per KV head, `[Hkv, 1]` per layer, see
kcache.attention.reference) are dequantised in the arithmetic: a program loads its head's scale once and multiplies
the logits by K's, the output by V's; that is the reference's dequantise-then-multiply, reassociated. (A scale per
row cost the scan a small dependent load per tile: a stripped scan over FP8 K ran at 2.4 TB/s with it on the H200,
3.9 without; benchmarks/results/fp8_scan_probe_h200.json.) With 16-bit queries the e4m3 K tile goes into one
fp16 tensor-core dot (e4m3 and the queries, over a power-of-two row scale, are exact in fp16: _query_operand);
float32 queries take the tile converted to float32. The flags KQ / VQ (constexpr) say which pools are FP8, F16
whether the K dots run in fp16. An FP8 K pool may keep NX channels per KV head exact (reference.ExactChannels):
their values join each logit as one more tensor-core dot of the queries' values there against the tile's, padded to
16 channels (_exact_q).

KCache decode runs five launches (a merge level more for very long contexts):
  scores  K tiles -> each chunk's log-sum-exp of scaled logits [B, Hkv, G, L/c] + per-split (max, sum-exp), so the
          softmax is exact and the ranking reads 1/c of what token logits would take
  rank    chunk log-sum-exps -> chunk masses -> ranks (group sum or per head, sinks/recent forced) -> top per tile
  merge   top of the tiles' candidates (bitonic top-k in registers) -> chunks [B, Hkv, 1|G, NP]
  stage   each selected chunk's V rows as one contiguous read straight from pinned host memory (UVA) into a
          device buffer: many small programs keep many PCIe reads in flight
  sum     per selected chunk: its tokens' exact logits again from K (on the device), their softmax weights, the
          weighted sum of the staged rows on the tensor cores, renormalisation
With more than one of OVERLAP_SHARES the batch runs in slices, each slice's host copy on a side stream beside the
next slice's scan, on a few looping programs (STAGE_PROGRAMS) that leave the SMs to the scan.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kcache.config import KCacheConfig

# Tokens per K tile, from the lent H200 (32k tokens, ms per layer; benchmarks/results/tile_probe_h200.json): the
# KCache scan 0.41 at 128 against 0.49 at 64 and 0.46 at 256 (batch 23, bf16); the full decode 0.23 at 64 against
# 0.28 at 128 in bf16 (batch 11), but 1.38 at 128 against 2.16 at 64 with FP8 K and V (batch 46): an FP8 tile holds
# half the bytes, so it wants twice the tokens in flight. The scan's launch at 0f2876a (kernel_ab_h200.json): FP8 K at
# batch 46 0.439 with 128 tokens, 4 warps, 3 stages, within 1% of the best of 12 launches (0.435, 2 warps), 0.674 at
# 64 tokens; bf16 at batch 23 0.379 (best 0.374 at 256).
SCAN_TILE = 128
FULL_TILE = {2: 64, 4: 64, 1: 128}  # by the K pool's element size
FULL_WARPS = 4  # the FP8 full decode compiles to 255 registers at 4 (199 at 8); kernel_ab.py times both
SCAN_WARPS = 4
# The scan's block-table entries for a whole split loaded before its loop, each tile's gathered from them, instead of
# loaded per tile: a K load indexed by a load in the same loop gets one pipeline stage from Triton (one K buffer, the
# next tile's copy issued after this tile's math); indexed by registers it gets SCAN_STAGES - 1 (compiled for sm_90:
# benchmarks/compile_sm90.py). On the lent H100 at 32k, ms per layer (benchmarks/results/kernel_ab_h100.json): FP8 K
# at batch 46 0.548 with 4 stages against 0.569 looked up per tile (3 stages; 0.568 at 4), bf16 at batch 23 0.524
# against 0.531. With it on, the step probe's uneven batch slices faulted (93d76e2: OVERLAP_SHARES (2, 1) at 32k,
# batch 23 and 45): the pipeliner computes the table index of the SCAN_STAGES - 1 tiles past a split's end too, which
# ran past the 128-entry table at batch 15's split of 120 blocks; the index now wraps into it (8ed707d: the GPU tests
# and slices_fault_probe.py pass on the H100). In the engine at 32k on the H100, against the table looked up per tile
# at 3 stages: bf16 K at batch 23 787 against 775 tok/s, FP8 K at batch 45 1336 against 1313
# (benchmarks/results/bench_h100_pool48_*_8ed707d.json).
SCAN_TABLE_IN_REGISTERS = True
SCAN_STAGES = 4  # the software pipeline's depth over the scan's K tiles
FULL_STAGES = 3  # the full decode's (H100: no launch of 9 beats 128 / 4 warps / 3 stages for FP8, all within 1% in bf16)
BLOCK_L = 1024  # chunks ranked per program (each keeps its local top NP); 4096, one program per head at 32k, was
# slower in the engine (bf16 K, 32k, batch 23, H100: 754 against 787 tok/s)
RANK_WARPS = 8  # warps of a rank program: its bitonic top-k trades shuffles against shared-memory rounds
MERGE_KEYS = 4096  # keys per merge program (its register tile)
GATHER_ROWS = 128  # staged V rows summed per gather step
GATHER_WARPS = 4
SPLIT_WEIGHTS = True  # 16-bit q: weights as two 16-bit halves on the tensor cores (see _gather_kernel)
STAGE_ROWS = 64  # V rows one staging program copies from host memory at a time (whole chunks, at least one)
STAGE_WARPS = 2
STAGE_PROGRAMS = 32  # staging programs: 0, one per STAGE_ROWS rows; else this many, looping (see OVERLAP_SHARES)
MAX_SPLITS = 64  # bounds the reduce's register tile [splits, head_dim]
# Split until batch * kv_heads * splits reaches this many programs per SM. Few splits leave a part-filled last wave
# of programs: the lent H200's full decode at 32k took 0.98 ms per layer at batch 23 with 4 (3 splits), 0.74 with
# 16; 0.334 / 0.338 at batch 11; FP8 K and V 1.04 / 0.82 at batch 23, 1.63 / 1.65 at 46; the KCache op over 32
# layers at batch 23 15.69 / 15.58 ms (benchmarks/results/launch_probe_h200.json).
PROGRAMS_PER_SM = 16
# KCache decode in batch slices of these shares of the batch (first to last), each slice's host copy on a side stream
# while the next slice's K scan runs: PCIe and HBM are separate resources, but a copy spread over the GPU (one
# program per 16 rows) takes SMs from the scan and hides nothing. On 32 looping programs of 64 rows it does: the op
# over 32 layers on the lent H200 (benchmarks/results/kcache_step_probe_overlap_h200_*.json, chunks of 8), 1 slice
# spread against 2 slices on 32 programs: 8k, batch 92, N=64 21.9 -> 18.3 ms; N=256 45.4 -> 39.1; 16k, batch 46,
# N=64 17.9 -> 16.3; 32k, batch 23, N=64 15.6 -> 15.5; N=256 21.7 -> 18.6. Only the sums overlap the last slice's
# copy, so a smaller last slice hides more, while its scan still covers the copy of the slice before (untimed: see
# SCAN_TABLE_IN_REGISTERS).
OVERLAP_SHARES = (1, 1)
LOG2E = tl.constexpr(1 / math.log(2))  # the scan's softmax runs in base 2
LN2 = tl.constexpr(math.log(2))
FP8_MAX = tl.constexpr(448.0)  # e4m3fn's largest (reference.FP8_MAX)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    # CPU tensors only reach here under TRITON_INTERPRET=1 (kernel debugging without a GPU).
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split(batch: int, kv_heads: int, max_len: int, device: torch.device, tile: int) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of tile) from static shapes only: enough programs to fill the GPU."""
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), batch * kv_heads)
    splits = max(1, min(want, MAX_SPLITS, triton.cdiv(max_len, tile)))
    per_split = triton.cdiv(triton.cdiv(max_len, splits), tile) * tile
    return triton.cdiv(max_len, per_split), per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for a float32 dot is tf32 (~3e-4 error), too coarse to rank tokens like the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fp16_dots(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the K dots run in fp16 (_query_operand): FP8 K with 16-bit queries."""
    return k_cache.dtype == torch.float8_e4m3fn and q.element_size() == 2


def _pad_rows(g: int) -> int:
    return max(16, triton.next_power_of_2(g))  # tl.dot needs at least 16 rows


def _kept(g: int) -> int:
    """The rows of the scan's dot its softmax works on (_kept_rows): half of 16 where G fits."""
    return 8 if _pad_rows(g) == 16 and g <= 8 else _pad_rows(g)


@triton.jit
def _kv_rows(table_row, pos, valid, BS: tl.constexpr, HKV: tl.constexpr, h):
    """Rows of positions pos [N] of KV head h in the flat pool [blocks * Hkv * BS, D], int64 (pools exceed 2**31
    elements)."""
    page = tl.load(table_row + pos // BS, mask=valid, other=0)
    return (page.to(tl.int64) * HKV + h) * BS + pos % BS


@triton.jit
def _pow2_scale(amax, TOP: tl.constexpr):
    """Per row, a power of two s with amax / s in [TOP, 2 * TOP) (1 where amax is 0 or subnormal): dividing by it
    is exact."""
    bits = amax.to(tl.int32, bitcast=True) & 0x7F800000
    return tl.where(bits > 0, bits.to(tl.float32, bitcast=True) * (1.0 / TOP), 1.0)


@triton.jit
def _query_operand(qv, F16: tl.constexpr):
    """The queries [BG, D] as the K dot takes them, and their row scales [BG]. F16 (FP8 K, 16-bit queries): fp16 over
    a power-of-two row scale that puts each row's largest element in [2^14, 2^15), which holds bf16 and fp16 values
    exactly (fp16 keeps 11 significant bits) but for elements below ~2^-28 of the row's largest; else as they are
    (and ones)."""
    if F16:
        x = qv.to(tl.float32)
        s = _pow2_scale(tl.max(tl.abs(x), 1), 16384.0)
        qd = (x / s[:, None]).to(tl.float16)
    else:
        qd, s = qv, tl.full([qv.shape[0]], 1.0, tl.float32)
    return qd, s


@triton.jit
def _exact_q(q, channels, b, h, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr,
             NX: tl.constexpr):
    """The G queries' values at KV head h's NX exact channels, padded with zeros: [BG, 16] (a dot's least width)."""
    g = tl.arange(0, BG)
    r = tl.arange(0, 16)
    ch = tl.load(channels + h * NX + r, mask=r < NX, other=0)
    mask = (g[:, None] < G) & (r[None, :] < NX)
    return tl.load(q + ((b * HKV + h) * G + g[:, None]) * D + ch[None, :], mask=mask, other=0.0)


@triton.jit
def _kept_rows(x, KEEP: tl.constexpr):
    """The first KEEP rows of a dot's output [BG, N]: KEEP = BG / 2 when the G queries fit in it (_kept). In the
    tensor cores' layout row r + 8 of 16 sits in the same thread as row r, so dropping the second half moves no data
    and halves the work per logit after the dot."""
    if KEEP < x.shape[0]:
        x, _ = tl.split(tl.permute(tl.reshape(x, [2, KEEP, x.shape[1]]), [1, 2, 0]))
    return x


@triton.jit
def _tile_logits(qd, rs, qx, k_cache, kx, table_row, pos, end, scale, h, HKV: tl.constexpr, D: tl.constexpr,
                 BS: tl.constexpr, PREC: tl.constexpr, KQ: tl.constexpr, F16: tl.constexpr, NX: tl.constexpr,
                 KEEP: tl.constexpr):
    """Scaled logits [KEEP, N] of the queries qd (_query_operand) under their row scales rs [KEEP] (the query's,
    K's head scale and the softmax scale) at positions pos [N] (-inf from `end` on), their pool rows and validity.
    F16: the e4m3 tile goes into an fp16 dot (exact; on Hopper Triton's e4m3 dots for 16 query rows run as fp16
    ones too). Else an FP8 tile (KQ) goes into the dot as the queries' dtype. NX > 0: the exact channels' values
    kx [rows, NX] against the queries' there, qx (_exact_q), join the logit."""
    valid = pos < end
    rows = _kv_rows(table_row, pos, valid, BS, HKV, h)
    return _logits_at(qd, rs, qx, k_cache, kx, rows, valid, scale, D, PREC, KQ, F16, NX, KEEP), rows, valid


@triton.jit
def _logits_at(qd, rs, qx, k_cache, kx, rows, valid, scale, D: tl.constexpr, PREC: tl.constexpr, KQ: tl.constexpr,
               F16: tl.constexpr, NX: tl.constexpr, KEEP: tl.constexpr):
    """_tile_logits at the pool rows [N] of the positions, -inf where not valid."""
    d = tl.arange(0, D)
    kt = tl.load(k_cache + rows[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
    if F16:
        kt = kt.to(tl.float16)
    elif KQ:
        kt = kt.to(qd.dtype)
    x = _kept_rows(tl.dot(qd, tl.trans(kt), input_precision=PREC), KEEP) * rs[:, None]
    if NX:
        r = tl.arange(0, 16)
        xt = tl.load(kx + rows[:, None] * NX + r[None, :], mask=valid[:, None] & (r[None, :] < NX), other=0.0)
        x += _kept_rows(tl.dot(qx, tl.trans(xt), input_precision=PREC), KEEP) * scale  # [KEEP, N]
    return tl.where(valid[None, :], x, float("-inf"))


@triton.jit
def _row_scales(qs, k_scales, scale, h, KQ: tl.constexpr, KEEP: tl.constexpr):
    """The logit scales [KEEP] of the first KEEP query rows for _tile_logits, from their row scales qs [BG]
    (_query_operand): query row scale x K's head scale x scale."""
    qs = tl.reshape(_kept_rows(qs[:, None], KEEP), [KEEP])
    return qs * ((tl.load(k_scales + h) * scale) if KQ else scale)


@triton.jit
def _load_q(q, b, h, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr):
    """The G query heads of KV head h, padded with zero rows: [BG, D]."""
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    return tl.load(q + ((b * HKV + h) * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)


@triton.jit
def _merge_stats(m_in, l_in, bh, S, G: tl.constexpr, BG: tl.constexpr, SP: tl.constexpr):
    """Global softmax max M [BG] and normaliser Z [BG] from per-split stats [B*Hkv*G, S]; pad rows get (0, 1)."""
    g = tl.arange(0, BG)
    s = tl.arange(0, SP)
    mask = (g[:, None] < G) & (s[None, :] < S)
    off = (bh * G + g[:, None]) * S + s[None, :]
    m = tl.load(m_in + off, mask=mask, other=float("-inf"))
    l = tl.load(l_in + off, mask=mask, other=0.0)
    top = tl.where(g < G, tl.max(m, 1), 0.0)
    z = tl.sum(l * tl.exp(m - top[:, None]), 1)
    return top, tl.where(g < G, z, 1.0)


@triton.jit
def _full_split_kernel(
    q, k_cache, v_cache, k_scales, v_scales, k_exact, k_channels, block_tables, lengths, acc_out, m_out, l_out, scale,
    max_blocks, per_split, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BG: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, KQ: tl.constexpr, VQ: tl.constexpr, F16: tl.constexpr, NX: tl.constexpr,
):
    """Online-softmax attention of one KV head's G queries over one split: unnormalised acc [G, D], max, sum.
    With FP8 V and 16-bit queries (F16) the weights go into the dot as fp16, the V tile converted to fp16 (exact
    for e4m3); V's scale multiplies acc at the end."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = tl.num_programs(2)
    qv = _load_q(q, b, h, HKV, G, D, BG)  # [BG, D]
    qd, qs = _query_operand(qv, F16)
    rs = _row_scales(qs, k_scales, scale, h, KQ, BG)
    qx = _exact_q(q, k_channels, b, h, HKV, G, D, BG, NX) if NX else qv
    table_row = block_tables + b * max_blocks
    d = tl.arange(0, D)
    start = s * per_split
    end = tl.minimum(start + per_split, tl.load(lengths + b))
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    for t in range(start, end, BLOCK_N):  # every tile holds a valid token, so m stays finite after it
        pos = t + tl.arange(0, BLOCK_N)
        x, rows, valid = _tile_logits(qd, rs, qx, k_cache, k_exact, table_row, pos, end, scale, h, HKV, D, BS, PREC,
                                      KQ, F16, NX, BG)
        vt = tl.load(v_cache + rows[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(x, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if VQ and F16:
            pv = tl.dot(p.to(tl.float16), vt.to(tl.float16))
        elif VQ:
            pv = tl.dot(p.to(qv.dtype), vt.to(qv.dtype), input_precision=PREC)
        else:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if VQ:
        acc = acc * tl.load(v_scales + h)
    g = tl.arange(0, BG)
    head = (b * HKV + h) * G + g  # [BG] query head index into [B, H]
    tl.store(acc_out + (head[:, None] * S + s) * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(m_out + head * S + s, m, mask=g < G)
    tl.store(l_out + head * S + s, l, mask=g < G)


@triton.jit
def _full_reduce_kernel(acc_in, m_in, l_in, out, S, D: tl.constexpr, SP: tl.constexpr):
    """Combine the splits of one query head: out [D] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s."""
    head = tl.program_id(0)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    m = tl.load(m_in + head * S + s, mask=s < S, other=float("-inf"))
    l = tl.load(l_in + head * S + s, mask=s < S, other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # empty splits have m = -inf: weight 0
    acc = tl.load(acc_in + (head * S + s[:, None]) * D + d[None, :], mask=s[:, None] < S, other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out + head * D + d, o.to(out.dtype.element_ty))


@triton.jit
def _scores_kernel(
    q, k_cache, k_scales, k_exact, k_channels, block_tables, lengths, chunk_lse, m_out, l_out, scale, max_blocks,
    per_split, LC, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BG: tl.constexpr,
    KEEP: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr, KQ: tl.constexpr,
    F16: tl.constexpr, NX: tl.constexpr, PAGES: tl.constexpr,
):
    """One KV head's G queries over one split: each chunk of C tokens' log-sum-exp of the scaled logits into
    chunk_lse [B, Hkv, G, LC] (-inf where no token is valid), plus the split's max / sum-exp. The softmax runs in
    base 2 (the scale times log2(e), so exp2 and log2 are single instructions) on the dot's first KEEP rows
    (_kept_rows); what it stores is in base e. PAGES > 0: the split's (at most PAGES) block-table entries are loaded
    once before the loop and each tile's are gathered from them (SCAN_TABLE_IN_REGISTERS)."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = tl.num_programs(2)
    qv = _load_q(q, b, h, HKV, G, D, BG)  # [BG, D]
    qd, qs = _query_operand(qv, F16)
    scale2 = scale * LOG2E
    rs = _row_scales(qs, k_scales, scale2, h, KQ, KEEP)  # [KEEP]
    qx = _exact_q(q, k_channels, b, h, HKV, G, D, BG, NX) if NX else qv
    g = tl.arange(0, KEEP)
    head = (b * HKV + h) * G + g
    start = s * per_split  # a multiple of the tile, so chunks never straddle two programs
    end = tl.minimum(start + per_split, tl.load(lengths + b))
    m = tl.full([KEEP], float("-inf"), tl.float32)
    l = tl.zeros([KEEP], tl.float32)
    table_row = block_tables + b * max_blocks
    if PAGES:
        j = start // BS + tl.arange(0, PAGES)
        pages = tl.load(table_row + j, mask=j * BS < end, other=0)  # [PAGES]
    for t in range(start, end, BLOCK_N):
        pos = t + tl.arange(0, BLOCK_N)
        if PAGES:
            valid = pos < end
            # Wrapped into the table: the pipeliner computes the addresses of up to SCAN_STAGES - 1 tiles past the
            # split's end (their loads predicated off), and a gather index out of range is undefined.
            entry = (pos // BS - start // BS) & (PAGES - 1)
            rows = (tl.gather(pages, entry, 0).to(tl.int64) * HKV + h) * BS + pos % BS
            x = _logits_at(qd, rs, qx, k_cache, k_exact, rows, valid, scale2, D, PREC, KQ, F16, NX, KEEP)
        else:
            x = _tile_logits(qd, rs, qx, k_cache, k_exact, table_row, pos, end, scale2, h, HKV, D, BS, PREC, KQ, F16,
                             NX, KEEP)[0]  # [KEEP, BLOCK_N], base 2
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp2(x - m_new[:, None])  # shared by the split's sum and the chunks' sums
        l = l * tl.exp2(m - m_new) + tl.sum(p, 1)
        m = m_new
        if C == 1:
            lse = x
        else:  # a chunk's log-sum-exp relative to the tile's max; a chunk far below it (mass < 2^-126) gets -inf
            lse = m_new[:, None] + tl.log2(tl.sum(tl.reshape(p, [KEEP, BLOCK_N // C, C]), 2))  # [KEEP, BLOCK_N // C]
        ci = t // C + tl.arange(0, BLOCK_N // C)
        tl.store(chunk_lse + head[:, None] * LC + ci[None, :], lse * LN2,
                 mask=(g[:, None] < G) & (ci[None, :] * C < end))
    tl.store(m_out + head * S + s, m * LN2, mask=g < G)
    tl.store(l_out + head * S + s, l, mask=g < G)


@triton.jit
def _rank_top_kernel(
    chunk_lse, m_in, l_in, lengths, cand, S, LC, sink, recent,
    HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, SP: tl.constexpr, BLOCK_L: tl.constexpr,
    NP: tl.constexpr, C: tl.constexpr, GROUP: tl.constexpr,
):
    """Rank BLOCK_L chunks of one KV head as the reference's select_chunks does, keep their top NP.

    A chunk's mass is exp(lse - M) / Z, its tokens' softmax weights summed. Forced chunks (holding a sink or a
    recent token) rank G + 1, above any mass. A candidate is an int64 key, rank bits << 32 | chunk: ranks are
    >= 0 floats, so keys order like ranks; chunks past the sequence get key -1, below all.
    Output cand [B, Hkv, 1|G, T, NP] (T = programs along axis 1), each tile's keys in descending order.
    """
    bh, c = tl.program_id(0), tl.program_id(1)
    T = tl.num_programs(1)
    length = tl.load(lengths + bh // HKV)
    g = tl.arange(0, BG)
    j = tl.arange(0, NP)
    out = cand + (bh * (1 if GROUP else G) * T + c) * NP
    if c * BLOCK_L * C >= length:  # past the sequence (the table is as wide as the longest one can be): no candidates
        if GROUP:
            tl.store(out + j, tl.full([NP], -1, tl.int64))
        else:
            tl.store(out + g[:, None] * T * NP + j[None, :], tl.full([BG, NP], -1, tl.int64), mask=g[:, None] < G)
    else:
        top, z = _merge_stats(m_in, l_in, bh, S, G, BG, SP)
        chunk = c * BLOCK_L + tl.arange(0, BLOCK_L)
        first = chunk * C  # the chunk's first position
        valid = first < length
        x = tl.load(chunk_lse + (bh * G + g[:, None]) * LC + chunk[None, :], mask=(g[:, None] < G) & valid[None, :],
                    other=float("-inf"))
        p = tl.exp(x - top[:, None]) / z[:, None]  # [BG, BLOCK_L], 0 on masked entries
        forced = ((first < sink) | ((recent > 0) & (first + C > length - recent))) & valid
        if GROUP:
            r = tl.where(forced, G + 1.0, tl.sum(p, 0))
            key = tl.where(valid, (r.to(tl.int32, bitcast=True).to(tl.int64) << 32) | chunk, -1)
            tl.store(out + j, tl.topk(key, NP))
        else:
            r = tl.where(forced[None, :], G + 1.0, p)
            key = tl.where(valid[None, :], (r.to(tl.int32, bitcast=True).to(tl.int64) << 32) | chunk[None, :], -1)
            tl.store(out + g[:, None] * T * NP + j[None, :], tl.topk(key, NP, dim=1), mask=g[:, None] < G)


@triton.jit
def _merge_top_kernel(cand, out, C, NP: tl.constexpr, FAN: tl.constexpr):
    """Top NP keys of FAN consecutive chunks of one row: cand [rows, C, NP] -> out [rows, cdiv(C, FAN), NP]."""
    row, c = tl.program_id(0), tl.program_id(1)
    k = c * FAN * NP + tl.arange(0, FAN * NP)
    keys = tl.load(cand + row * C * NP + k, mask=k < C * NP, other=-1)
    tl.store(out + (row * tl.num_programs(1) + c) * NP + tl.arange(0, NP), tl.topk(keys, NP))


@triton.jit
def _stage_kernel(keys, v_cache, block_tables, lengths, staged, max_blocks, n, pieces, HKV: tl.constexpr,
                  D: tl.constexpr, BS: tl.constexpr, NP: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
                  NSEL: tl.constexpr):
    """Copy selected chunks from the (host) pool to staged [B, Hkv, 1|G, NP * C, D] on the device, each chunk one
    contiguous read, CH chunks (a piece) at a time: piece w is chunks p * CH.. of selection row = w // per_row. The
    programs stride over the pieces: one piece each (many small programs keep many host reads in flight), or a
    few programs looping (a copy that leaves the SMs to a K scan running beside it)."""
    per_row = tl.cdiv(n, CH)
    r = tl.arange(0, CH * C)
    d = tl.arange(0, D)
    for w in range(tl.program_id(0), pieces, tl.num_programs(0)):
        row, p = w // per_row, w % per_row  # row: the selection, b * Hkv * NSEL + h * NSEL + sel
        b, h = row // (NSEL * HKV), (row // NSEL) % HKV
        length = tl.load(lengths + b)
        j = p * CH + r // C  # [CH * C] which selected chunk each row belongs to
        chunk = tl.load(keys + row * NP + j, mask=j < n, other=-1).to(tl.int32)  # the low 32 bits; -1 stays -1
        pos = tl.where(chunk >= 0, chunk * C + r % C, length)  # no chunk: a position past the sequence
        valid = pos < length
        rows = _kv_rows(block_tables + b * max_blocks, pos, valid, BS, HKV, h)
        v = tl.load(v_cache + rows[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        dest = (row.to(tl.int64) * NP * C + p * CH * C + r)
        tl.store(staged + dest[:, None] * D + d[None, :], v, mask=(j < n)[:, None])


@triton.jit
def _gather_kernel(
    keys, q, k_cache, k_scales, k_exact, k_channels, v_scales, m_in, l_in, staged, block_tables, lengths, out, mass,
    rows_read, scale, max_blocks, S, n, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BG: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr, C: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr,
    RENORM: tl.constexpr, PREC: tl.constexpr, KQ: tl.constexpr, VQ: tl.constexpr, SPLIT: tl.constexpr,
    F16: tl.constexpr, NX: tl.constexpr,
):
    """Weighted sum over one selection's chunks, their V rows staged on the device by _stage_kernel.

    group: selection sel = 0 serves all G heads of the KV head; head: selection sel serves query head sel.
    keys [B, Hkv, 1|G, NP] hold the selected chunks in their low 32 bits (-1: none), the first n of them used,
    TILE at a time. Each token's weight is its exact softmax weight: its logit again from K (a device read of the
    few selected rows), normalised by the scan's global max and sum. The V rows read are added to rows_read [B].
    VQ: the staged rows are FP8; the head's V scale multiplies the sum.
    SPLIT (16-bit q): V in q's dtype (exact: 16-bit V, or e4m3), each float32 weight w summed as hi + lo, hi = w
    rounded to that dtype and lo = the rest rounded again, so two tensor-core dots with float32 accumulation give
    the float32 sum to ~2^-16 of w; a float32 dot ("ieee") cannot use the tensor cores.
    """
    b, h, sel = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = b * HKV + h
    top, z = _merge_stats(m_in, l_in, bh, S, G, BG, SP)
    length = tl.load(lengths + b)
    qv = _load_q(q, b, h, HKV, G, D, BG)
    qd, qs = _query_operand(qv, F16)
    rs = _row_scales(qs, k_scales, scale, h, KQ, BG)
    qx = _exact_q(q, k_channels, b, h, HKV, G, D, BG, NX) if NX else qv
    table_row = block_tables + b * max_blocks
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    r = tl.arange(0, TILE * C)
    base = (bh * tl.num_programs(2) + sel).to(tl.int64) * NP * C  # this selection's rows in staged
    mine = (g < G) if GROUP else (g == sel)  # [BG] query heads served here
    acc = tl.zeros([BG, D], tl.float32)
    kept = tl.zeros([BG], tl.float32)
    read = 0
    for c0 in range(0, n, TILE):
        j = c0 + r // C  # [TILE * C] which selected chunk each row belongs to
        key = tl.load(keys + (bh * tl.num_programs(2) + sel) * NP + j, mask=j < n, other=-1)
        chunk = key.to(tl.int32)  # truncation keeps the low 32 bits; -1 stays -1
        pos = tl.where(chunk >= 0, chunk * C + r % C, length)  # no chunk: a position past the sequence
        x, _, valid = _tile_logits(qd, rs, qx, k_cache, k_exact, table_row, pos, length, scale, h, HKV, D, BS, PREC,
                                   KQ, F16, NX, BG)
        w = tl.exp(tl.where(mine[:, None], x, float("-inf")) - top[:, None]) / z[:, None]  # [BG, TILE * C]
        v = tl.load(staged + (base + c0 * C + r)[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        if SPLIT:
            v = v.to(qv.dtype)
            hi = w.to(qv.dtype)
            acc += tl.dot(hi, v) + tl.dot((w - hi.to(tl.float32)).to(qv.dtype), v)
        else:
            acc += tl.dot(w, v.to(tl.float32), input_precision="ieee")  # float32 like the reference
        kept += tl.sum(w, 1)
        read += tl.sum(valid.to(tl.int32), 0)
    if VQ:
        acc = acc * tl.load(v_scales + h)
    if RENORM:
        acc = acc / tl.where(kept > 0, kept, 1.0)[:, None]
    head = bh * G + g
    tl.store(out + head[:, None] * D + d[None, :], acc.to(out.dtype.element_ty), mask=mine[:, None])
    tl.store(mass + head, kept, mask=mine)
    tl.atomic_add(rows_read + b, read)


def _shapes(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor):
    B, H, D = q.shape
    _, Hkv, bs, _ = k_cache.shape
    return B, H, D, bs, Hkv, H // Hkv, block_tables.shape[1] * bs


def _scales_arg(scales: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
    """The heads' scales [Hkv, 1] to pass a kernel; without them the pool stands in (its flag keeps it unread)."""
    return pool if scales is None else scales


def _exact_args(k_exact, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values pool, channels, NX) of an FP8 K pool's exact channels (reference.ExactChannels); without them the K
    pool stands in for both (NX = 0 keeps them unread)."""
    if k_exact is None:
        return k_cache, k_cache, 0
    assert k_exact.channels.shape[-1] <= 16, "the kernels pad the exact channels to 16"
    return k_exact.values, k_exact.channels, k_exact.channels.shape[-1]


def full_decode(q, k_cache, v_cache, block_tables, lengths, scale=None, k_scales=None, v_scales=None, k_exact=None):
    """Exact attention of one query per sequence over its paged cache: q [B, H, D] -> [B, H, D]. FP8 pools come
    with their heads' scales (and FP8 K with the channels it keeps exact, if any)."""
    B, H, D, bs, Hkv, G, L = _shapes(q, k_cache, block_tables)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    tile = FULL_TILE[k_cache.element_size()]
    S, per_split = _split(B, Hkv, L, q.device, tile)
    acc = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kx, kc, nx = _exact_args(k_exact, k_cache)
    _full_split_kernel[(B, Hkv, S)](
        q, k_cache, v_cache, _scales_arg(k_scales, k_cache), _scales_arg(v_scales, v_cache), kx, kc, block_tables,
        lengths, acc, m, l, scale, block_tables.shape[1], per_split, HKV=Hkv, G=G, D=D, BS=bs, BG=_pad_rows(G),
        BLOCK_N=tile, PREC=_dot_precision(q.dtype), KQ=k_scales is not None, VQ=v_scales is not None,
        F16=_fp16_dots(q, k_cache), NX=nx, num_warps=FULL_WARPS, num_stages=FULL_STAGES,
    )
    out = torch.empty_like(q)
    _full_reduce_kernel[(B * H,)](acc, m, l, out, S, D=D, SP=triton.next_power_of_2(S), num_warps=4)
    return out


def chunk_scores(q, k_cache, block_tables, lengths, chunk_tokens: int, scale: float, k_scales=None, k_exact=None):
    """The K scan (FP8 K with its heads' scales k_scales and exact channels k_exact, or not): chunk log-sum-exps
    [B, Hkv, G, L / c] float32 (written up to each length) and per-split stats m, l [B, Hkv, G, S]."""
    B, H, D, bs, Hkv, G, L = _shapes(q, k_cache, block_tables)
    S, per_split = _split(B, Hkv, L, q.device, SCAN_TILE)
    LC = L // chunk_tokens
    lse = torch.empty(B, Hkv, G, LC, dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hkv, G, S, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kx, kc, nx = _exact_args(k_exact, k_cache)
    _scores_kernel[(B, Hkv, S)](
        q, k_cache, _scales_arg(k_scales, k_cache), kx, kc, block_tables, lengths, lse, m, l, scale,
        block_tables.shape[1], per_split, LC, HKV=Hkv, G=G, D=D, BS=bs, BG=_pad_rows(G), KEEP=_kept(G),
        BLOCK_N=SCAN_TILE, C=chunk_tokens, PREC=_dot_precision(q.dtype), KQ=k_scales is not None,
        F16=_fp16_dots(q, k_cache), NX=nx, PAGES=_scan_pages(per_split, bs), num_warps=SCAN_WARPS,
        num_stages=SCAN_STAGES,
    )
    return lse, m, l


def _scan_pages(per_split: int, block_size: int) -> int:
    """The scan's PAGES: the block-table entries a split can touch, as a power of two, with SCAN_TABLE_IN_REGISTERS
    and up to 1024 of them (a few registers a thread); else 0 (each tile's looked up in the table)."""
    pages = triton.next_power_of_2(per_split // block_size + 1)
    return pages if SCAN_TABLE_IN_REGISTERS and pages <= 1024 else 0


def select_chunks(lse, m, l, lengths, cfg: KCacheConfig):
    """The top-N selection: keys of the selected chunks [B, Hkv, 1|G, NP], descending (NP = selection_width)."""
    B, Hkv, G, LC = lse.shape
    S = m.shape[-1]
    group = cfg.selection == "group"
    rows = B * Hkv * (1 if group else G)
    NP = cfg.selection_width
    block_l = max(BLOCK_L, NP)
    T = triton.cdiv(LC, block_l)
    cand = torch.empty(rows, T, NP, dtype=torch.int64, device=lse.device)
    _rank_top_kernel[(B * Hkv, T)](
        lse, m, l, lengths, cand, S, LC, cfg.sink_tokens, cfg.recent_tokens,
        HKV=Hkv, G=G, BG=triton.next_power_of_2(G), SP=triton.next_power_of_2(S), BLOCK_L=block_l, NP=NP,
        C=cfg.chunk_tokens, GROUP=group, num_warps=RANK_WARPS,
    )
    fan = max(2, min(MERGE_KEYS // NP, triton.next_power_of_2(T)))  # no wider than the tiles there are
    while T > 1:  # a tree of merges: each level keeps the top NP of `fan` tiles
        merged = torch.empty(rows, triton.cdiv(T, fan), NP, dtype=torch.int64, device=lse.device)
        _merge_top_kernel[(rows, merged.shape[1])](cand, merged, T, NP=NP, FAN=fan, num_warps=8)
        cand, T = merged, merged.shape[1]
    return cand.view(B, Hkv, rows // (B * Hkv), NP)


def staging_buffer(keys, v_cache, cfg: KCacheConfig) -> torch.Tensor:
    """Room on the device for the selected chunks' V rows: [B, Hkv, 1|G, NP * c, D]."""
    B, Hkv, nsel, NP = keys.shape
    return torch.empty(B, Hkv, nsel, NP * cfg.chunk_tokens, v_cache.shape[-1], dtype=v_cache.dtype, device=keys.device)


def stage_chunks(keys, v_cache, block_tables, lengths, cfg: KCacheConfig, staged=None) -> torch.Tensor:
    """Copy the selected chunks' V rows from the (host) pool to the device, one contiguous read per chunk, into
    staged (a staging_buffer; a new one if None)."""
    B, Hkv, nsel, NP = keys.shape
    c, n, D = cfg.chunk_tokens, cfg.chunk_budget, v_cache.shape[-1]
    staged = staging_buffer(keys, v_cache, cfg) if staged is None else staged
    ch = max(1, STAGE_ROWS // c)
    pieces = B * Hkv * nsel * triton.cdiv(n, ch)
    _stage_kernel[(min(pieces, STAGE_PROGRAMS) if STAGE_PROGRAMS else pieces,)](
        keys, v_cache, block_tables, lengths, staged, block_tables.shape[1], n, pieces, HKV=Hkv, D=D,
        BS=v_cache.shape[2], NP=NP, C=c, CH=ch, NSEL=nsel, num_warps=STAGE_WARPS,
    )
    return staged


def weighted_sum(keys, q, k_cache, m, l, staged, block_tables, lengths, cfg: KCacheConfig, scale: float,
                 k_scales=None, v_scales=None, k_exact=None, out=None, mass=None, rows=None):
    """The weighted sums over the staged chunks (FP8 rows with their heads' scales v_scales, or not) -> (out [B, H, D],
    mass [B, H] float32, V rows read [B] int32), written into out, mass and rows where given (rows zeroed: the
    counts are added to it)."""
    B, H, D, bs, Hkv, G, L = _shapes(q, k_cache, block_tables)
    nsel, NP = keys.shape[2], keys.shape[3]
    c = cfg.chunk_tokens
    out, mass, rows = _outputs(q, out, mass, rows)
    kx, kc, nx = _exact_args(k_exact, k_cache)
    _gather_kernel[(B, Hkv, nsel)](
        keys, q, k_cache, _scales_arg(k_scales, k_cache), kx, kc, _scales_arg(v_scales, k_cache), m, l, staged,
        block_tables, lengths, out, mass, rows, scale, block_tables.shape[1], m.shape[-1], cfg.chunk_budget, HKV=Hkv,
        G=G, D=D, BS=bs, BG=_pad_rows(G), SP=triton.next_power_of_2(m.shape[-1]), NP=NP, C=c,
        TILE=max(1, min(NP, GATHER_ROWS // c)), GROUP=cfg.selection == "group", RENORM=cfg.renormalize,
        PREC=_dot_precision(q.dtype), KQ=k_scales is not None, VQ=v_scales is not None,
        SPLIT=SPLIT_WEIGHTS and q.element_size() == 2, F16=_fp16_dots(q, k_cache), NX=nx, num_warps=GATHER_WARPS,
    )
    return out, mass, rows


def _outputs(q, out=None, mass=None, rows=None) -> tuple:
    """The decode's results: out [B, H, D], mass kept [B, H] float32, V rows read [B] int32 (zeroed, added to),
    each the one given or a new one."""
    out = torch.empty_like(q) if out is None else out
    mass = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if mass is None else mass
    rows = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device) if rows is None else rows
    return out, mass, rows


def gather_chunks(keys, q, k_cache, m, l, v_cache, block_tables, lengths, cfg: KCacheConfig, scale: float,
                  k_scales=None, v_scales=None, k_exact=None):
    """The selected chunks' V read from the pool and summed with their exact weights -> (out [B, H, D], mass [B, H]
    float32, V rows read [B] int32)."""
    staged = stage_chunks(keys, v_cache, block_tables, lengths, cfg)
    return weighted_sum(keys, q, k_cache, m, l, staged, block_tables, lengths, cfg, scale, k_scales, v_scales, k_exact)


def kcache_decode(q, k_cache, v_cache, block_tables, lengths, cfg: KCacheConfig, scale=None, k_scales=None,
                  v_scales=None, k_exact=None, mass_out=None, rows_out=None):
    """KCache decode over paged pools: q [B, H, D] -> (out [B, H, D], mass_kept [B, H] float32, V rows read [B]).

    k_cache lives on the GPU (FP8 with its heads' scales k_scales and exact channels k_exact, or not); v_cache may be
    a pinned (or cudaHostRegister-ed) CPU tensor, read in place (FP8 with its heads' scales v_scales on the GPU, or
    not). mass_out [B, H] float32 and rows_out [B] int32 (zeroed; the rows read are added to it): where the mass
    kept and the rows read go (new tensors if None), so that a caller's records cost no copies.
    """
    D = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    out, mass, rows = _outputs(q, None, mass_out, rows_out)
    bounds = _slice_bounds(q.shape[0]) if q.is_cuda else [0, q.shape[0]]
    if len(bounds) > 2:
        _overlapped_decode(q, k_cache, v_cache, block_tables, lengths, cfg, scale, k_scales, v_scales, k_exact, bounds,
                           (out, mass, rows))
        return out, mass, rows
    lse, m, l = chunk_scores(q, k_cache, block_tables, lengths, cfg.chunk_tokens, scale, k_scales, k_exact)
    keys = select_chunks(lse, m, l, lengths, cfg)
    staged = stage_chunks(keys, v_cache, block_tables, lengths, cfg)
    return weighted_sum(keys, q, k_cache, m, l, staged, block_tables, lengths, cfg, scale, k_scales, v_scales, k_exact,
                        out, mass, rows)


def _slice_bounds(batch: int) -> list[int]:
    """The batch's slice boundaries [0, ..., batch] by OVERLAP_SHARES, empty slices dropped."""
    total, run, bounds = sum(OVERLAP_SHARES), 0, [0]
    for share in OVERLAP_SHARES:
        run += share
        if (end := round(batch * run / total)) > bounds[-1]:
            bounds.append(end)
    return bounds


@functools.lru_cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _overlapped_decode(q, k_cache, v_cache, block_tables, lengths, cfg: KCacheConfig, scale: float, k_scales,
                       v_scales, k_exact, bounds: list[int], results: tuple):
    """kcache_decode over the batch slices between bounds, into results (out, mass, rows): slice i's host copy (a
    side stream) runs while slice i + 1's K scan runs (this stream); each slice's weighted sum waits for its copy.
    Capturable in a CUDA graph (the side stream forks from this one and joins it again)."""
    main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
    copies = []
    for lo, hi in zip(bounds, bounds[1:]):
        qs, tables, lens = q[lo:hi], block_tables[lo:hi], lengths[lo:hi]
        lse, m, l = chunk_scores(qs, k_cache, tables, lens, cfg.chunk_tokens, scale, k_scales, k_exact)
        keys = select_chunks(lse, m, l, lens, cfg)
        staged = staging_buffer(keys, v_cache, cfg)  # this stream's memory: reused only after the join below
        side.wait_stream(main)  # the slice's keys are ready
        with torch.cuda.stream(side):
            stage_chunks(keys, v_cache, tables, lens, cfg, staged)
        copied = torch.cuda.Event()
        copied.record(side)
        copies.append((lo, hi, m, l, keys, staged, copied))
    for lo, hi, m, l, keys, staged, copied in copies:
        main.wait_event(copied)
        weighted_sum(keys, q[lo:hi], k_cache, m, l, staged, block_tables[lo:hi], lengths[lo:hi], cfg, scale, k_scales,
                     v_scales, k_exact, *(r[lo:hi] for r in results))
    main.wait_stream(side)  # join: the capture of a CUDA graph must end on this stream


@triton.jit
def _pool_row(slot, h, HKV: tl.constexpr, BS: tl.constexpr):
    """Row of KV head h's vector at slot (block * BS + offset, int64) in a flat pool [blocks * HKV * BS, ...]."""
    return (slot // BS * HKV + h) * BS + slot % BS


@triton.jit
def _copy_rows_kernel(pool, rows, slots, n, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                      EP: tl.constexpr, BR: tl.constexpr, TO_POOL: tl.constexpr):
    """Copy BR token rows of HKV * D elements each (padded to EP, a power of two) between rows [n, HKV, D] and
    their slots of the pool [blocks, HKV, BS, D]: into the pool (TO_POOL) or out of it."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    e = tl.arange(0, EP)
    h, d = e // D, e % D
    mask = (r[:, None] < n) & (e[None, :] < HKV * D)
    slot = tl.load(slots + r, mask=r < n, other=0).to(tl.int64)
    at_pool = pool + _pool_row(slot[:, None], h[None, :], HKV, BS) * D + d[None, :]
    at_rows = rows + r[:, None].to(tl.int64) * (HKV * D) + e[None, :]
    if TO_POOL:
        tl.store(at_pool, tl.load(at_rows, mask=mask), mask=mask)
    else:
        tl.store(at_rows, tl.load(at_pool, mask=mask), mask=mask)


def _copy_rows(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, to_pool: bool) -> None:
    if pool.dtype == torch.float8_e4m3fn:  # a copy moves bytes: as uint8, which every Triton (and its interpreter) has
        pool, rows = pool.view(torch.uint8), rows.view(torch.uint8)
    _, Hkv, bs, D = pool.shape
    T, BR = rows.shape[0], 16
    if T:
        _copy_rows_kernel[(triton.cdiv(T, BR),)](
            pool, rows, slots, T, HKV=Hkv, D=D, BS=bs, EP=triton.next_power_of_2(Hkv * D), BR=BR, TO_POOL=to_pool,
            num_warps=4,
        )


@triton.jit
def _store_fp8_kernel(pool, rows, slots, scales, exact, channels, n, HKV: tl.constexpr, D: tl.constexpr,
                      BS: tl.constexpr, EP: tl.constexpr, BR: tl.constexpr, NX: tl.constexpr, XP: tl.constexpr):
    """BR token rows of rows [n, HKV, D] quantised under their heads' scales [HKV, 1] into their slots of an e4m3 pool
    [blocks, HKV, BS, D] (elements padded to EP, a power of two); with NX > 0 each head's channels [HKV, NX] go to
    exact [blocks, HKV, BS, NX] as they are (HKV * NX padded to XP), and 0 in their place to the e4m3 pool: the
    reference's split_exact, quantize and store_rows in one launch."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    live = r < n
    slot = tl.load(slots + r, mask=live, other=0).to(tl.int64)
    at_row = rows + r[:, None].to(tl.int64) * (HKV * D)  # [BR, 1]
    e = tl.arange(0, EP)
    h, d = e // D, e % D
    inside = e < HKV * D
    mask = live[:, None] & inside[None, :]
    x = tl.load(at_row + e[None, :], mask=mask, other=0.0).to(tl.float32)  # [BR, EP]
    if NX:
        f = tl.arange(0, XP)
        fh, fj = f // NX, f % NX
        ch = tl.load(channels + f, mask=f < HKV * NX, other=0)  # [XP]: channel fj of head fh
        fmask = live[:, None] & (f < HKV * NX)[None, :]
        values = tl.load(at_row + (fh * D + ch)[None, :], mask=fmask)
        tl.store(exact + _pool_row(slot[:, None], fh[None, :], HKV, BS) * NX + fj[None, :],
                 values.to(exact.dtype.element_ty), mask=fmask)
        hit = tl.zeros([EP], tl.int1)
        for j in tl.static_range(NX):
            hit |= d == tl.load(channels + h * NX + j, mask=inside, other=-1)
        x = tl.where(hit[None, :], 0.0, x)
    y = tl.math.div_rn(x, tl.load(scales + h, mask=inside, other=1.0)[None, :])  # IEEE division, as torch's
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)  # e4m3fn has no inf: saturate
    tl.store(pool + _pool_row(slot[:, None], h[None, :], HKV, BS) * D + d[None, :], y.to(pool.dtype.element_ty),
             mask=mask)


def store_rows(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None = None,
               exact=None) -> None:
    """The reference's store_rows, written by the GPU straight into a pinned host pool (or a device one): quantised
    in the same launch where the pool is FP8 (scales its heads' [Hkv, 1]; exact its exact channels, if any).

    rows [T, Hkv, D] on the GPU, slots [T] int on the GPU; no host sync, so decode steps stay graph-capturable.
    """
    rows = rows.contiguous()
    if scales is None:
        _copy_rows(pool, rows, slots, to_pool=True)
        return
    _, Hkv, bs, D = pool.shape
    T, BR = rows.shape[0], 16
    values, channels = (pool, scales) if exact is None else exact
    nx = 0 if exact is None else channels.shape[-1]
    if T:
        _store_fp8_kernel[(triton.cdiv(T, BR),)](
            pool, rows, slots, scales, values, channels, T, HKV=Hkv, D=D, BS=bs, EP=triton.next_power_of_2(Hkv * D),
            BR=BR, NX=nx, XP=triton.next_power_of_2(max(1, Hkv * nx)), num_warps=4,
        )


def load_rows(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The reference's load_rows, read by the GPU straight from a pinned host pool (or a device one). slots [T] int
    on the GPU -> [T, Hkv, D]."""
    rows = torch.empty(slots.shape[0], pool.shape[1], pool.shape[3], dtype=pool.dtype, device=slots.device)
    _copy_rows(pool, rows, slots, to_pool=False)
    return rows
