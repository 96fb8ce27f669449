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
    k = torch.randn(nb, Hkv, bs, D, generator=g, dtype=dtype)
    v = torch.randn(nb, Hkv, bs, D, generator=g, dtype=dtype)
    ids = torch.randperm(nb, generator=g).tolist()
    width = max(per_seq)
    tables = [ids[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(B)]
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k, v, bt, torch.tensor(lengths, dtype=torch.int32)


def float64_kcache(q, k_pool, v_pool, bt, lengths, cfg: KCacheConfig):
    """Per sequence and KV head, written out plainly in float64: the spec of KCache decode. Tokens go in chunks of
    c consecutive positions; a chunk ranks by the summed softmax weights of its tokens (over the query group, or
    of one head); the chunks holding a sink or a recent token are kept, then the best others up to chunk_budget."""
    B, H, D = q.shape
    Hkv, bs = k_pool.shape[1], k_pool.shape[2]
    G, c = H // Hkv, cfg.chunk_tokens
    out = torch.zeros(B, H, D, dtype=torch.float64)
    mass = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        blocks, offsets = [int(bt[b, p // bs]) for p in range(n)], [p % bs for p in range(n)]
        K = k_pool[blocks, :, offsets].double()  # [n, Hkv, D]
        V = v_pool[blocks, :, offsets].double()
        chunks = [list(range(j, min(j + c, n))) for j in range(0, n, c)]
        forced = {i for i, ts in enumerate(chunks) if any(t < cfg.sink_tokens or t >= n - cfg.recent_tokens for t in ts)}
        for kv in range(Hkv):
            heads = range(kv * G, (kv + 1) * G)
            probs = {h: torch.softmax(K[:, kv] @ q[b, h].double() / math.sqrt(D), 0) for h in heads}
            group_rank = sum(probs.values())
            for h in heads:
                rank = group_rank if cfg.selection == "group" else probs[h]
                score = [float(rank[ts].sum()) for ts in chunks]
                rest = [i for i in sorted(range(len(chunks)), key=lambda i: -score[i]) if i not in forced]
                kept = forced | set(rest[:max(0, min(cfg.chunk_budget, len(chunks)) - len(forced))])
                chosen = sorted(t for i in kept for t in chunks[i])
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
    chunk_tokens=st.sampled_from([1, 2, 4]),
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
@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_kcache_equals_full_when_n_covers_length(selection, renormalize, dtype, chunk):
    lengths = [1, 17, 40, 33]
    k, v, bt, lens = random_pools(4, 3, 16, 8, lengths, seed=3, dtype=dtype)
    q = torch.randn(4, 9, 16).to(dtype)
    cfg = KCacheConfig(top_n=max(lengths), selection=selection, renormalize=renormalize, chunk_tokens=chunk)
    out, mass, *_ = ref.kcache_decode(q, k, v, bt, lens, cfg)
    full = ref.full_decode(q, k, v, bt, lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), full.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


def test_sinks_and_recent_tokens_are_always_selected():
    # one sequence, one head; scores make token 5 dominant; top_n=1 with 2 sinks and 2 recent must read 5 tokens
    D, n = 4, 12
    k_pool = torch.zeros(2, 1, 8, D)
    v_pool = torch.zeros(2, 1, 8, D)
    k_pool[0, 0, 5, 0] = 10.0
    for p in range(n):
        v_pool[p // 8, 0, p % 8, 0] = p  # V row p carries its position
    bt, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    seen = []
    read = ref.pool_v_reader(v_pool, ref.token_slots(bt, lens, 8)[0], q.device)
    k = ref.rows_at(k_pool, ref.token_slots(bt, lens, 8)[0]).transpose(1, 2)
    valid = torch.ones(1, n, dtype=torch.bool)
    cfg = KCacheConfig(top_n=1, sink_tokens=2, recent_tokens=2, renormalize=False, chunk_tokens=1)
    ref.kcache_attend(q, k, valid, lens, lambda idx: seen.append(idx.flatten().tolist()) or read(idx), cfg)
    assert sorted(seen[0]) == [0, 1, 5, 10, 11]


def test_unrenormalized_output_is_the_kept_mass_times_renormalized():
    k, v, bt, lens = random_pools(2, 2, 8, 4, [30, 25], seed=7)
    q = torch.randn(2, 4, 8)
    a, mass, *_ = ref.kcache_decode(q, k, v, bt, lens, KCacheConfig(top_n=5, renormalize=False, chunk_tokens=2))
    b, mass_b, *_ = ref.kcache_decode(q, k, v, bt, lens, KCacheConfig(top_n=5, renormalize=True, chunk_tokens=2))
    torch.testing.assert_close(a, b * mass[..., None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass, mass_b)
    assert (mass < 1).all() and (mass > 0).all()


def test_prefill_chunks_equal_one_shot_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    whole = ref.prefill_attention(q, k, v, 0)
    tail = ref.prefill_attention(q[12:], k, v, 12)
    torch.testing.assert_close(tail, whole[12:], atol=1e-6, rtol=1e-5)


def test_chunks_are_read_whole_and_rows_counted():
    """Chunk selection reads every token of a chosen chunk: one dominant token pulls in its whole chunk of 4, and
    the rows read count the tokens inside the sequence (the last chunk of a sequence may be short)."""
    D, n, c = 4, 14, 4
    k_pool, v_pool = torch.zeros(2, 1, 8, D), torch.zeros(2, 1, 8, D)
    k_pool[0, 0, 5, 0] = 10.0  # position 5: chunk 1 = positions 4..7
    bt, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    slots = ref.token_slots(bt, lens, 8)[0]
    k = ref.rows_at(k_pool, slots).transpose(1, 2)
    read = ref.pool_v_reader(v_pool, slots, q.device)
    seen = []
    cfg = KCacheConfig(top_n=1, recent_tokens=1, chunk_tokens=c)  # one chunk by mass, plus the chunk of the last token
    _, mass, rows = ref.kcache_attend(q, k, torch.ones(1, n, dtype=torch.bool), lens,
                                      lambda idx: seen.append(idx.flatten().tolist()) or read(idx), cfg)
    assert sorted(set(seen[0])) == [4, 5, 6, 7, 12, 13]  # chunk 3 holds positions 12..15, 14 and 15 lie past the end
    assert rows.tolist() == [6]
    e = math.exp(10.0 / math.sqrt(D))  # the dominant token's weight against 1 for each of the 13 others
    assert float(mass) == pytest.approx((e + 5) / (e + 13), rel=1e-6)  # tokens 5, 4, 6, 7, 12, 13 read


@pytest.mark.parametrize("chunk,budget,recent", [(1, 5, 2), (4, 8 + 4 + 8, 2), (8, 8 + 16, 9), (16, 16 + 16, 1)])
def test_chunk_budget_covers_top_n_sinks_and_recent(chunk, budget, recent):
    cfg = KCacheConfig(top_n=3 if chunk == 1 else 8, sink_tokens=0 if chunk != 4 else 4, recent_tokens=recent,
                       chunk_tokens=chunk)
    assert cfg.budget == budget
    with pytest.raises(ValueError, match="power of two"):
        KCacheConfig(chunk_tokens=6)
