"""The attention math in plain PyTorch: the reference every kernel is tested against.

Cache layout (every pool, one layer): `[num_blocks, kv_heads, block_size, head_dim]`. A token's slot is
`block * block_size + offset`; `rows_at(pool, slots)` gives its rows `[T, kv_heads, D]`. Each (block, KV head)
holds its block_size tokens contiguously, so a chunk of consecutive tokens of one head is one contiguous read:
the unit KCache reads from host memory. A sequence's blocks are listed in its row of `block_tables`
`[batch, max_blocks]` and it holds `lengths[b]` tokens.

Decode (one query token per sequence) is vectorised over batch, heads and tokens; prefill runs per sequence.

FP8 pools (`kv_cache_dtype="fp8"`) hold float8 e4m3 rows under one float32 scale per (layer, KV head), `[Hkv, 1]`
per layer, set at start from the largest magnitude a calibration prefill saw (`fp8_scales`, with HEADROOM over it;
values past it saturate at e4m3's largest). e4m3 rounds each value to 3 mantissa bits relative to the value itself,
so a scale only has to keep the values inside e4m3's normal range (2^-6 .. 448): on SmolLM2 per-head scales cost the
same perplexity as one scale per token (docs/accuracy), and the kernels read no scale per token: the head's scale is
one load per program, folded into the logits (K) or the output (V). `dequantize` is the one definition of the
stored values.

An FP8 K pool may keep a few channels of each KV head exact (`ExactChannels`): their values in the model's dtype
in a pool beside it, `[num_blocks, kv_heads, block_size, n]`, and 0 in the e4m3 rows (so the head's scale is set by
the rest). A logit is then the e4m3 row's dot plus the exact channels' dot: the channels that carry most of the
rounding error (a head's largest |q| x |k|, kcache.cache.calibration) carry none.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kcache.config import KCacheConfig


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


HEADROOM = 8.0  # a head's scale maps HEADROOM x its calibrated largest |value| to 448: SmolLM2 measured the same at 2-16


def fp8_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-head largest magnitudes amax [..., Hkv] -> the scales [..., Hkv, 1] float32 of their FP8 pools."""
    return (amax.float() * HEADROOM / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)[..., None]


def quantize(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows x [..., Hkv, D] -> float8 e4m3 rows [..., Hkv, D] under the heads' scales [Hkv, 1]: x ~ rows * scales."""
    return (x.float() / scales.to(x.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # e4m3fn has no inf: saturate


def dequantize(rows: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values FP8 rows [..., Hkv, D] under the heads' scales [Hkv, 1] stand for, computed in dtype."""
    return rows.to(dtype) * scales.to(rows.device, dtype)


class ExactChannels(NamedTuple):
    """The K channels an FP8 pool keeps exact: values [blocks, Hkv, bs, n] (the model's dtype) of channels [Hkv, n]
    (int32) of each row; the e4m3 rows hold 0 there."""

    values: torch.Tensor
    channels: torch.Tensor


def split_exact(x: torch.Tensor, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., Hkv, D] -> (x with the channels [Hkv, n] set to 0, their values [..., Hkv, n])."""
    idx = channels.long().expand(*x.shape[:-1], channels.shape[-1])
    return x.scatter(-1, idx, 0.0), x.gather(-1, idx)


def join_exact(x: torch.Tensor, values: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """split_exact undone: x [..., Hkv, D] with its channels [Hkv, n] set to values [..., Hkv, n]."""
    return x.scatter(-1, channels.long().expand(*x.shape[:-1], channels.shape[-1]), values.to(x.dtype))


def rows_at(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool [blocks, Hkv, bs, D], slots [...] long on the pool's device -> rows [..., Hkv, D]."""
    bs = pool.shape[2]
    return pool[slots // bs, :, slots % bs]


def read_rows(pool: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype,
              exact: ExactChannels | None = None) -> torch.Tensor:
    """rows_at, dequantised in dtype when the pool is FP8 (scales: its heads' [Hkv, 1]; exact: the channels it keeps
    exact), else as stored."""
    rows = rows_at(pool, slots)
    if scales is None:
        return rows
    rows = dequantize(rows, scales, dtype)
    return rows if exact is None else join_exact(rows, rows_at(exact.values, slots), exact.channels)


def store_rows(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None = None,
               exact: ExactChannels | None = None) -> None:
    """pool [blocks, Hkv, bs, D] <- rows [T, Hkv, D] at slots [T], wherever the pool lives: quantised where the pool is
    FP8 (scales: its heads' [Hkv, 1]), its exact channels (if any) stored as they are in exact.values."""
    if exact is not None:
        rows, values = split_exact(rows, exact.channels)
        store_rows(exact.values, values, slots)
    if scales is not None:
        rows = quantize(rows, scales)
    slots = slots.to(pool.device)
    pool[slots // pool.shape[2], :, slots % pool.shape[2]] = rows.to(pool.device)


def load_rows(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The rows [T, Hkv, D] at slots [T] of a pool anywhere, on the slots' device."""
    return rows_at(pool, slots.to(pool.device)).to(slots.device)


def token_slots(block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, max_len: int | None = None):
    """Slots of every cached token: ([B, L] long, valid [B, L] bool), L = the longest sequence."""
    if max_len is None:
        max_len = int(lengths.max())
    pos = torch.arange(max_len, device=block_tables.device)  # [L]
    blocks = block_tables.long().gather(1, (pos // block_size).expand(block_tables.shape[0], -1).clamp_max(block_tables.shape[1] - 1))
    valid = pos[None, :] < lengths[:, None].long()  # [B, L]
    slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
    return slots, valid


def _scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact softmax over every cached token, float32: q [B, H, D], k [B or 1, Hkv, L, D] -> p [B, Hkv, G, L].

    GQA is folded into the query rows so K is never copied per query head; with one K for many queries
    (teacher-forced scoring of a chunk) the queries are folded in as well.
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    kt = k.float().transpose(-1, -2)  # [Bk, Hkv, D, L]
    if k.shape[0] == 1 and B > 1:
        qf = q.float().view(B, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
        s = torch.matmul(qf, kt).view(Hkv, B, G, L).permute(1, 0, 2, 3)
    else:
        s = torch.matmul(q.float().view(B, Hkv, G, D), kt)  # [B, Hkv, G, L]
    s = s * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1)


def full_decode(q, k_cache, v_cache, block_tables, lengths, scale=None, k_scales=None, v_scales=None, k_exact=None):
    """Ordinary attention of one query per sequence over its whole cache: q [B, H, D] -> [B, H, D]. FP8 pools come
    with their heads' scales (and FP8 K with the channels it keeps exact, if any)."""
    D = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    slots, valid = token_slots(block_tables, lengths, k_cache.shape[2])
    k = read_rows(k_cache, slots, k_scales, q.dtype, k_exact)  # [B, L, Hkv, D]
    v = read_rows(v_cache, slots, v_scales, q.dtype)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )  # [B, H, 1, D]
    return out[:, :, 0, :]


def select_chunks(p: torch.Tensor, lengths: torch.Tensor, cfg: KCacheConfig) -> torch.Tensor:
    """Indices of the kept chunks of `cfg.chunk_tokens` consecutive tokens: p [B, Hkv, G, L] -> [B, Hkv, 1|G, n],
    n = chunk_budget capped at the chunks there are.

    A chunk ranks by its exact attention mass: the sum of its tokens' softmax weights, summed over the KV head's
    query group for `group` (one set per KV head), each query head's own for `head`; `random` ranks at random (a
    baseline). Chunks holding sinks or recent tokens are forced in by ranking them above any mass; chunks past the
    sequence rank below every real one.
    """
    B, Hkv, G, L = p.shape
    c = cfg.chunk_tokens
    Lc = -(-L // c)
    mass = F.pad(p, (0, Lc * c - L)).view(B, Hkv, G, Lc, c).sum(-1)  # [B, Hkv, G, Lc]
    rank = mass if cfg.selection == "head" else mass.sum(2, keepdim=True)  # [B, Hkv, 1|G, Lc]
    if cfg.selection == "random":
        rank = torch.rand_like(rank)
    start = torch.arange(Lc, device=p.device)[None] * c  # [1, Lc] first position of each chunk
    length = lengths.long()[:, None]  # [B, 1]
    forced = start < cfg.sink_tokens
    if cfg.recent_tokens:
        forced = forced | (start + c > length - cfg.recent_tokens)
    rank = rank.masked_fill(forced[:, None, None, :], float(G) + 1.0)  # a mass is at most G
    rank = rank.masked_fill((start >= length)[:, None, None, :], -1.0)
    return rank.topk(min(cfg.chunk_budget, Lc), dim=-1, sorted=False).indices


def chunk_positions(chunks: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Token positions of chunks [..., n] -> [..., n * chunk_tokens]."""
    offsets = torch.arange(chunk_tokens, device=chunks.device)
    return (chunks[..., None] * chunk_tokens + offsets).flatten(-2)


def kcache_attend(q, k, valid, lengths, read_v, cfg: KCacheConfig, scale=None):
    """The KCache math, whatever the cache layout: q [B, H, D], k [B or 1, Hkv, L, D], valid [B, L].

    read_v(idx) returns the V rows of positions idx [B, Hkv, S, n] (all < L) as [B, Hkv, S, n, D] (S = 1 or G); it
    is the only access to V, so V may live anywhere. Every token of a selected chunk enters the weighted sum with its
    exact softmax weight (renormalised over the tokens read, or not). Returns (out [B, H, D], mass_kept [B, H]
    float32, V rows read [B] int32: selected positions inside the sequence, over heads).
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    p = _scores(q, k, valid, scale)  # [B, Hkv, G, L]
    pos = chunk_positions(select_chunks(p, lengths, cfg), cfg.chunk_tokens)  # [B, Hkv, 1|G, n]
    inside = pos < lengths.view(-1, 1, 1, 1)  # the last chunk may run past the sequence
    pos = pos.clamp_max(L - 1)
    w = p.gather(-1, pos.expand(B, Hkv, G, pos.shape[-1])) * inside  # [B, Hkv, G, n]
    mass = w.sum(-1)  # [B, Hkv, G]
    if cfg.renormalize:
        w = w / mass[..., None]
    v = read_v(pos).float().masked_fill(~inside[..., None], 0.0)  # [B, Hkv, 1|G, n, D]
    out = torch.matmul(w[..., None, :], v)[..., 0, :]  # [B, Hkv, G, D]
    rows = inside.sum((1, 2, 3), dtype=torch.int32)  # [B]
    return out.reshape(B, H, D).to(q.dtype), mass.reshape(B, H), rows


def pool_v_reader(v_cache: torch.Tensor, slots: torch.Tensor, out_device, v_scales: torch.Tensor | None = None):
    """read_v for a paged pool [blocks, Hkv, bs, D]: positions -> slots -> rows (dequantised in float32 where the
    pool is FP8, v_scales its heads' scales [Hkv, 1]). slots [B or 1, L].

    PyTorch cannot index a host tensor with device indices, so the reference moves the small index tensor to
    the pool and the rows back; the Triton kernel reads the host rows in place instead.
    """
    Hkv, bs = v_cache.shape[1], v_cache.shape[2]

    def gather(pool: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:  # sel [B, Hkv, S, n] -> [B, Hkv, S, n, D]
        sel = sel.to(pool.device)
        head = torch.arange(Hkv, device=pool.device).view(1, Hkv, 1, 1)
        return pool[sel // bs, head, sel % bs].to(out_device, non_blocking=True)

    def read_v(idx: torch.Tensor) -> torch.Tensor:
        B, _, S, n = idx.shape
        sel = slots.expand(B, -1).gather(1, idx.reshape(B, -1)).view(B, Hkv, S, n)  # [B, Hkv, S, n]
        rows = gather(v_cache, sel)
        return rows if v_scales is None else dequantize(rows, v_scales.view(Hkv, 1, 1, 1), torch.float32)

    return read_v


def kcache_decode(q, k_cache, v_cache, block_tables, lengths, cfg: KCacheConfig, scale=None, k_scales=None,
                  v_scales=None, k_exact=None, mass_out=None, rows_out=None):
    """KCache decode over paged pools: q [B, H, D] -> (out [B, H, D], mass_kept [B, H] float32, V rows read [B]).

    k_cache lives on q's device (FP8 with its heads' scales k_scales and its exact channels k_exact, or not), v_cache
    may live in host memory (FP8 with its heads' scales v_scales, or not); only the selected V rows are read.
    mass_out [B, H] and rows_out [B] (zeroed; the rows read are added to it), where given, receive the mass kept and
    the rows read, and are returned (as the kernels' kcache_decode does).
    """
    slots, valid = token_slots(block_tables, lengths, k_cache.shape[2])
    k = read_rows(k_cache, slots, k_scales, torch.float32, k_exact).transpose(1, 2)  # [B, Hkv, L, D] float32 scores
    out, mass, rows = kcache_attend(q, k, valid, lengths, pool_v_reader(v_cache, slots, q.device, v_scales), cfg, scale)
    if mass_out is not None:
        mass = mass_out.copy_(mass)
    if rows_out is not None:
        rows = rows_out.add_(rows.to(rows_out.device, rows_out.dtype))
    return out, mass, rows


def prefill_attention(q, k, v, start: int, scale=None):
    """Exact causal attention of one sequence's chunk: q [t, H, D] at positions start..start+t-1 over
    k, v [start+t, Hkv, D] (the cached prefix and the chunk) -> [t, H, D]."""
    t, H, D = q.shape
    total = k.shape[0]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    gqa = {"enable_gqa": True}
    if q.is_cuda:  # the flash / memory-efficient kernels need equal head counts; the math fallback would OOM
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
        gqa = {}
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, t, D]: fused kernels need 4-D inputs
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    else:
        qpos = torch.arange(start, start + t, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]  # [t, total]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    return out[0].transpose(0, 1)
