"""Prefix caching: requests sharing a prompt prefix share its cached blocks, and decode exactly as without it."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from kcache import SamplingParams
from kcache.config import KCacheConfig
from kcache.engine.block_manager import BlockManager
from kcache.engine.sequence import Sequence

from test_engine import llama, make_engine, run_all  # noqa: F401  (llama: the module's tiny Llama fixture)

BS = 16
KCFG = KCacheConfig(top_n=8, sink_tokens=1, recent_tokens=2, chunk_tokens=4)
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def shared_prompts(prefix_len: int, n: int, seed: int = 0, suffix=(1, 30)) -> list[list[int]]:
    """n prompts: one prefix of prefix_len tokens, each followed by its own random suffix (maybe empty)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, 500) for _ in range(rng.randint(*suffix))] for _ in range(n)]


def accounting_holds(engine) -> None:
    """Every block is held by exactly as many sequences as its count says, free and cached-unheld blocks are held by
    none, and every block is in exactly one of: held, free, evictable."""
    bm = engine.blocks
    live = list(engine.scheduler.running) + list(engine.scheduler.waiting)
    holders = Counter(b for s in live for b in s.block_table)
    assert all(bm.refs[b] == holders.get(b, 0) for b in range(bm.num_blocks)), "a reference count is off"
    assert not (set(holders) & (set(bm.free) | set(bm.evictable))), "a held block is free"
    assert len(holders) + bm.num_free == bm.num_blocks, "blocks leaked or double-freed"
    assert set(bm.key_of) == set(bm.block_of.values()) and set(bm.evictable) <= set(bm.key_of)
    for s in live:  # the blocks a sequence writes next are private to it
        first_written = s.num_cached // bm.block_size
        assert all(bm.refs[b] == 1 and b not in bm.key_of for b in s.block_table.ids[first_written:].tolist())


def run_staged(engine, stages: list[list[list[int]]], params=GREEDY, check=accounting_holds):
    """Submit each stage's prompts once the previous stage has finished; outputs in submission order."""
    return [out for prompts in stages for out in run_all(engine, prompts, params, check)]


MODES = {"full": ("full", KCFG), "kcache": ("kcache", KCFG),
         "kcache-dense1": ("kcache", KCacheConfig(**{**KCFG.model_dump(), "dense_layers": 1}))}  # layer 0's V on the device


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix_len", [21, 32, 64])  # inside a block, at a block edge, several blocks
def test_shared_prefixes_decode_as_without_caching(llama, mode, prefix_len):
    cache, kcfg = MODES[mode]
    first, rest = shared_prompts(prefix_len, 1, seed=prefix_len), shared_prompts(prefix_len, 5, seed=prefix_len)[1:]
    # the whole first prompt again, and a prompt that is exactly the shared prefix
    rest += [first[0], first[0][:prefix_len]]
    stages = [first, rest]
    kw = dict(block_size=BS, max_num_batched_tokens=48)
    plain = run_staged(make_engine(llama, cache, kcfg, enable_prefix_caching=False, **kw), stages)
    engine = make_engine(llama, cache, kcfg, **kw)
    cached = run_staged(engine, stages)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    hits = [o.metrics["cached_prompt_tokens"] for o in cached]
    assert hits[0] == 0 and [o.metrics["cached_prompt_tokens"] for o in plain] == [0] * len(plain)
    for prompt, hit in zip(rest, hits[1:]):
        # the full blocks it shares with the first prompt, never its last token (computed for its logits)
        common = next((i for i, (x, y) in enumerate(zip(prompt, first[0])) if x != y), min(len(prompt), len(first[0])))
        assert hit == min(common, len(prompt) - 1) // BS * BS, (len(prompt), common, hit)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not any(engine.blocks.refs)
    assert engine.blocks.num_cached > 0


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_prefix_caching_across_preemption_and_cancellation(llama, cache):
    ps = shared_prompts(40, 8, seed=3, suffix=(10, 40))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    # A preempted sequence is prefilled again, exactly, where its tokens were first decoded with KCache's top-N: that
    # changes KCache's output whatever the prefix cache does, so here KCache's budget covers the context (its host V
    # blocks are still shared and read through the selection path).
    kcfg = KCacheConfig(top_n=256, chunk_tokens=4)
    plain = run_staged(make_engine(llama, cache, kcfg, enable_prefix_caching=False), [ps[:1], ps[1:]], params)
    # 256 tokens of pool: the shared blocks plus a few sequences, so decoding preempts, and cached blocks are evicted
    engine = make_engine(llama, cache, kcfg, pool_tokens=256, max_num_batched_tokens=64)
    cached = run_staged(engine, [ps[:1], ps[1:]], params)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert sum(o.metrics["preemptions"] for o in cached) > 0
    assert sum(o.metrics["cached_prompt_tokens"] for o in cached) > 0

    # cancel a request that shares the cached prefix while it decodes and others read the same blocks
    keep = engine.add_request(ps[1], params)
    gone = engine.add_request(ps[2], params)
    for _ in range(4):
        engine.step()
        accounting_holds(engine)
    assert engine.abort(gone)
    accounting_holds(engine)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
        accounting_holds(engine)
    assert [o.request_id for o in outs] == [keep] and outs[0].token_ids == plain[1].token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks and not any(engine.blocks.refs)


def test_an_evicted_block_is_never_found_again():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5], GREEDY)
    assert bm.admit(a) and a.block_table.ids.tolist() == [0, 1, 2]
    a.num_cached = 5
    bm.cache_prefill(a)
    assert bm.num_cached == 2  # [1, 2] and [3, 4]; the partial block [5] is private
    bm.release(a)
    assert bm.num_free == 4 and bm.num_cached == 2
    # a prompt with nothing in common takes the 2 free blocks, then evicts the tail block [3, 4] (released first)
    b = Sequence("b", [9] * 5, GREEDY)
    assert bm.admit(b) and b.num_prefix_hit == 0
    assert sorted(b.block_table.ids.tolist()) == [1, 2, 3] and list(bm.block_of.values()) == [0]
    again = Sequence("c", [1, 2, 3, 4, 6], GREEDY)
    assert bm.cached_prefix(again) == [0]  # [1, 2] survives; [3, 4] is gone with its key
    bm.release(b)
    assert bm.admit(again) and again.num_prefix_hit == 2 and again.block_table[0] == 0


def test_cached_unheld_blocks_count_as_free_and_budgets_stay_exact():
    bm = BlockManager(num_blocks=3, block_size=4, prefix_caching=True)
    a = Sequence("a", list(range(9)), GREEDY)  # 3 blocks
    assert bm.admit(a)
    a.num_cached = 9
    bm.cache_prefill(a)
    bm.release(a)
    assert bm.num_free == 3  # all cached, none held
    b = Sequence("b", list(range(8)) + [42], GREEDY)  # shares 2 blocks, needs 1 more
    assert not bm.admit(b, reserve=1)  # 3 blocks + 1 reserved > 3
    assert bm.admit(b) and b.num_prefix_hit == 8 and bm.num_free == 0
    c = Sequence("c", [7], GREEDY)
    assert not bm.admit(c)


def test_prefix_caching_off_caches_nothing(llama):
    engine = make_engine(llama, "kcache", KCFG, enable_prefix_caching=False)
    run_staged(engine, [shared_prompts(48, 1), shared_prompts(48, 3)])
    assert engine.blocks.num_cached == 0 and engine.blocks.hit_tokens == 0


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_a_burst_over_one_prefix_prefills_it_once(llama, cache):
    """Requests that arrive together: the first prefills the shared blocks, the others wait one step and share them
    (without the wait each would prefill them in the same step)."""
    ps = shared_prompts(64, 4, seed=9)
    plain = run_all(make_engine(llama, cache, KCFG, enable_prefix_caching=False), ps, GREEDY)
    engine = make_engine(llama, cache, KCFG, max_num_batched_tokens=1024)
    cached = run_all(engine, ps, GREEDY, check=accounting_holds)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert [o.metrics["cached_prompt_tokens"] for o in cached] == [0, 64, 64, 64]
