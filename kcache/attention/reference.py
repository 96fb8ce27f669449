"""The attention math in plain PyTorch: the reference every kernel is tested against.

Cache layout (both pools, one layer): `[num_blocks, block_size, kv_heads, head_dim]`; a token's slot is
`block * block_size + offset`, so `pool.view(-1, kv_heads, head_dim)[slot]` is its row. A sequence's blocks are
listed in its row of `block_tables` `[batch, max_blocks]` and it holds `lengths[b]` tokens.

Decode (one query token per sequence) is vectorised over batch, heads and tokens; prefill runs per sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kcache.config import KCacheConfig


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


def full_decode(q, k_cache, v_cache, block_tables, lengths, scale=None):
    """Ordinary attention of one query per sequence over its whole cache: q [B, H, D] -> [B, H, D]."""
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    slots, valid = token_slots(block_tables, lengths, bs)
    k = k_cache.view(-1, Hkv, D)[slots]  # [B, L, Hkv, D]
    v = v_cache.view(-1, Hkv, D)[slots]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )  # [B, H, 1, D]
    return out[:, :, 0, :]


def select_tokens(p: torch.Tensor, lengths: torch.Tensor, cfg: KCacheConfig) -> torch.Tensor:
    """Indices of the kept tokens: p [B, Hkv, G, L] -> positions [B, Hkv, 1 or G, n], n = budget capped at L.

    `group` ranks tokens by the summed weight of the KV head's query group (one set per KV head), `head` by each
    query head's own weight, `random` at random (a baseline). Sinks and recent tokens are forced in by ranking
    them above any weight.
    """
    L = p.shape[-1]
    rank = p if cfg.selection == "head" else p.sum(2, keepdim=True)  # [B, Hkv, 1|G, L]
    if cfg.selection == "random":
        rank = torch.rand_like(rank).masked_fill(rank == 0, -1.0)  # never a padding position over a real token
    if cfg.sink_tokens or cfg.recent_tokens:
        pos = torch.arange(L, device=p.device)[None]  # [1, L]
        length = lengths.long()[:, None]  # [B, 1]
        forced = (pos < cfg.sink_tokens) | ((pos >= length - cfg.recent_tokens) & (pos < length))  # [B, L]
        rank = rank.masked_fill(forced[:, None, None, :], float(p.shape[2]) + 1.0)  # a rank is at most G
    n = min(cfg.budget, L)
    return rank.topk(n, dim=-1, sorted=False).indices


def kcache_attend(q, k, valid, lengths, read_v, cfg: KCacheConfig, scale=None):
    """The KCache math, whatever the cache layout: q [B, H, D], k [B or 1, Hkv, L, D], valid [B, L].

    read_v(idx) returns the V rows of positions idx [B, Hkv, S, n] as [B, Hkv, S, n, D] (S = 1 or G); it is
    the only access to V, so V may live anywhere. Returns (out [B, H, D], mass_kept [B, H] float32, V rows read
    [B] int32: selected positions inside the sequence, over heads).
    """
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    p = _scores(q, k, valid, scale)  # [B, Hkv, G, L]
    idx = select_tokens(p, lengths, cfg)  # [B, Hkv, 1|G, n]
    w = p.gather(-1, idx.expand(B, Hkv, G, idx.shape[-1]))  # [B, Hkv, G, n]
    mass = w.sum(-1)  # [B, Hkv, G]
    if cfg.renormalize:
        w = w / mass[..., None]
    v = read_v(idx).float()  # [B, Hkv, 1|G, n, D]
    out = torch.matmul(w[..., None, :], v)[..., 0, :]  # [B, Hkv, G, D]
    rows = (idx < lengths.view(-1, 1, 1, 1)).sum((1, 2, 3), dtype=torch.int32)  # [B]
    return out.reshape(B, H, D).to(q.dtype), mass.reshape(B, H), rows


def pool_v_reader(v_cache: torch.Tensor, slots: torch.Tensor, out_device):
    """read_v for a paged pool: positions -> slots -> rows. slots [B or 1, L].

    PyTorch cannot index a host tensor with device indices, so the reference moves the small index tensor to
    the pool and the rows back; the Triton kernel reads the host rows in place instead.
    """
    Hkv, D = v_cache.shape[-2], v_cache.shape[-1]
    flat = v_cache.view(-1, Hkv, D)

    def read_v(idx: torch.Tensor) -> torch.Tensor:
        B, _, S, n = idx.shape
        sel = slots.expand(B, -1).gather(1, idx.reshape(B, -1)).view(B, Hkv, S, n)  # [B, Hkv, S, n]
        head = torch.arange(Hkv, device=idx.device).view(1, Hkv, 1, 1).expand_as(sel)
        rows = flat[sel.to(flat.device), head.to(flat.device)]  # [B, Hkv, S, n, D]
        return rows.to(out_device, non_blocking=True)

    return read_v


def kcache_decode(q, k_cache, v_cache, block_tables, lengths, cfg: KCacheConfig, scale=None):
    """KCache decode over paged pools: q [B, H, D] -> (out [B, H, D], mass_kept [B, H] float32, V rows read [B]).

    k_cache lives on q's device, v_cache may live in host memory; only the selected V rows are read.
    """
    _, bs, Hkv, D = k_cache.shape
    slots, valid = token_slots(block_tables, lengths, bs)
    k = k_cache.view(-1, Hkv, D)[slots].transpose(1, 2)  # [B, Hkv, L, D]
    return kcache_attend(q, k, valid, lengths, pool_v_reader(v_cache, slots, q.device), cfg, scale)


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
