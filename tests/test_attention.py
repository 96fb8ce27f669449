"""The KCache math against an independent float64 implementation, and against full attention."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kcache.attention import reference as ref
from kcache.config import KCacheConfig


def random_pools(B, Hkv, D, bs, lengths, seed, dtype=torch.float32):
    """Pools with each sequence's blocks scattered at random, as after many allocations."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [math.ceil(n / bs) for n in lengths]
    nb = sum(per_seq) + 3
    k = torch.randn(nb, bs, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(nb, bs, Hkv, D, generator=g, dtype=dtype)
    ids = torch.randperm(nb, generator=g).tolist()
    width = max(per_seq)
    tables = [ids[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(B)]
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k, v, bt, torch.tensor(lengths, dtype=torch.int32)


def float64_kcache(q, k_pool, v_pool, bt, lengths, cfg: KCacheConfig):
    """Per sequence and KV head, written out plainly in float64: the spec of KCache decode."""
    B, H, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    mass = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        slots = [int(bt[b, p // bs]) * bs + p % bs for p in range(n)]
        K = k_pool.reshape(-1, Hkv, D)[slots].double()  # [n, Hkv, D]
        V = v_pool.reshape(-1, Hkv, D)[slots].double()
        forced = set(range(min(cfg.sink_tokens, n))) | set(range(max(0, n - cfg.recent_tokens), n))
        for kv in range(Hkv):
            heads = range(kv * G, (kv + 1) * G)
            probs = {h: torch.softmax(K[:, kv] @ q[b, h].double() / math.sqrt(D), 0) for h in heads}
            group_rank = sum(probs.values())
            for h in heads:
                rank = group_rank if cfg.selection == "group" else probs[h]
                rest = [p for p in sorted(range(n), key=lambda p: -float(rank[p])) if p not in forced]
                chosen = sorted(forced | set(rest[:max(0, min(cfg.budget, n) - len(forced))]))
                w = probs[h][chosen]
                mass[b, h] = w.sum()
                if cfg.renormalize:
                    w = w / w.sum()
                out[b, h] = w @ V[chosen, kv]
    return out, mass


configs = st.builds(
    KCacheConfig,
    top_n=st.integers(1, 24),
    selection=st.sampled_from(["group", "head"]),
    renormalize=st.booleans(),
    sink_tokens=st.integers(0, 3),
    recent_tokens=st.integers(0, 3),
)


@settings(max_examples=40, deadline=None)
@given(cfg=configs, lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), group=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_kcache_decode_matches_float64_spec(cfg, lengths, group, seed):
    Hkv, D, bs = 2, 8, 4
    k, v, bt, lens = random_pools(len(lengths), Hkv, D, bs, lengths, seed)
    q = torch.randn(len(lengths), Hkv * group, D, generator=torch.Generator().manual_seed(seed + 1))
    out, mass, *_ = ref.kcache_decode(q, k, v, bt, lens, cfg)
    want_out, want_mass = float64_kcache(q, k, v, bt, lens, cfg)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mass.double(), want_mass, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kcache_equals_full_when_n_covers_length(selection, renormalize, dtype):
    lengths = [1, 17, 40, 33]
    k, v, bt, lens = random_pools(4, 3, 16, 8, lengths, seed=3, dtype=dtype)
    q = torch.randn(4, 9, 16).to(dtype)
    cfg = KCacheConfig(top_n=max(lengths), selection=selection, renormalize=renormalize)
    out, mass, *_ = ref.kcache_decode(q, k, v, bt, lens, cfg)
    full = ref.full_decode(q, k, v, bt, lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), full.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


def test_sinks_and_recent_tokens_are_always_selected():
    # one sequence, one head; scores make token 5 dominant; top_n=1 with 2 sinks and 2 recent must read 5 tokens
    D, n = 4, 12
    k_pool = torch.zeros(2, 8, 1, D)
    v_pool = torch.zeros(2, 8, 1, D)
    k_pool.view(-1, 1, D)[5, 0, 0] = 10.0
    for p in range(n):
        v_pool.view(-1, 1, D)[p, 0, 0] = p  # V row p carries its position
    bt, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    seen = []
    read = ref.pool_v_reader(v_pool, ref.token_slots(bt, lens, 8)[0], q.device)
    k = k_pool.view(-1, 1, D)[ref.token_slots(bt, lens, 8)[0]].transpose(1, 2)
    valid = torch.ones(1, n, dtype=torch.bool)
    cfg = KCacheConfig(top_n=1, sink_tokens=2, recent_tokens=2, renormalize=False)
    ref.kcache_attend(q, k, valid, lens, lambda idx: seen.append(idx.flatten().tolist()) or read(idx), cfg)
    assert sorted(seen[0]) == [0, 1, 5, 10, 11]


def test_unrenormalized_output_is_the_kept_mass_times_renormalized():
    k, v, bt, lens = random_pools(2, 2, 8, 4, [30, 25], seed=7)
    q = torch.randn(2, 4, 8)
    a, mass, *_ = ref.kcache_decode(q, k, v, bt, lens, KCacheConfig(top_n=5, renormalize=False))
    b, mass_b, *_ = ref.kcache_decode(q, k, v, bt, lens, KCacheConfig(top_n=5, renormalize=True))
    torch.testing.assert_close(a, b * mass[..., None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass, mass_b)
    assert (mass < 1).all() and (mass > 0).all()


def test_prefill_chunks_equal_one_shot_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    whole = ref.prefill_attention(q, k, v, 0)
    tail = ref.prefill_attention(q[12:], k, v, 12)
    torch.testing.assert_close(tail, whole[12:], atol=1e-6, rtol=1e-5)
