"""Engine and caches on tiny random models: batching, preemption, cancellation, stop conditions, stats."""
from __future__ import annotations

import random

import pytest
import torch

from kcache import LLMEngine, RequestError, SamplingParams
from kcache.cache.kv import FullKV, KCache
from kcache.config import EngineConfig, KCacheConfig
from kcache.engine.sequence import Sequence
from kcache.models import loader

from conftest import save_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-llama")
    save_tiny("llama", folder, seed=1)
    return loader.load(str(folder), device="cpu")


def make_engine(loaded, cache="full", kcfg=KCacheConfig(), pool_tokens=4096, **kw):
    row = loaded.config.num_layers * loaded.config.num_kv_heads * loaded.config.head_dim * 4
    return LLMEngine(EngineConfig(model="unused", cache=cache, kcache=kcfg, device="cpu", max_model_len=kw.pop("max_model_len", 256),
                                  device_cache_bytes=2 * row * pool_tokens, host_cache_bytes=row * pool_tokens, **kw), loaded)


def run_all(engine, prompts, params, check=None):
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check:
            check(engine)
    return [done[i] for i in ids]


def prompts(n, seed=0, lo=5, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_batched_equals_one_at_a_time(llama, cache):
    kcfg = KCacheConfig(top_n=8, sink_tokens=1, recent_tokens=2)
    ps = prompts(6)
    together = [o.token_ids for o in run_all(make_engine(llama, cache, kcfg), ps, GREEDY)]
    alone = [run_all(make_engine(llama, cache, kcfg), [p], GREEDY)[0].token_ids for p in ps]
    assert together == alone


def blocks_consistent(engine):
    bm = engine.blocks
    tables = [b for s in list(engine.scheduler.running) + list(engine.scheduler.waiting) for b in s.block_table]
    assert len(tables) == len(set(tables)), "a block is in two tables"
    assert len(tables) + bm.num_free == bm.num_blocks, "blocks leaked or double-freed"
    assert not set(tables) & set(bm.free)


def test_preemption_under_a_tight_pool_keeps_outputs_and_budget(llama):
    ps = prompts(8, seed=2, lo=20, hi=60)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = run_all(make_engine(llama, "full"), ps, params)
    # 256 tokens of pool: every prompt fits alone, not all together, so decoding must preempt
    tight = make_engine(llama, "full", pool_tokens=256, max_num_batched_tokens=64)
    outs = run_all(tight, ps, params, check=blocks_consistent)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert sum(o.metrics["preemptions"] for o in outs) > 0
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_chunked_prefill_equals_one_shot(llama):
    ps = prompts(3, seed=4, lo=100, hi=200)
    a = run_all(make_engine(llama, "full", max_num_batched_tokens=16), ps, GREEDY)
    b = run_all(make_engine(llama, "full", max_num_batched_tokens=2048), ps, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_no_request_starves_while_others_arrive(llama):
    engine = make_engine(llama, "full", max_num_batched_tokens=32)
    first = engine.add_request(prompts(1, seed=5, lo=150, hi=150)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    finished, steps = set(), 0
    while first not in finished:
        engine.add_request(prompts(1, seed=steps)[0], SamplingParams(max_tokens=4, ignore_eos=True))  # a steady stream
        finished |= {o.request_id for o in engine.step() if o.finished}
        steps += 1
        assert steps < 200, "the long request never finished"


def test_cancellation_frees_blocks_at_once(llama):
    engine = make_engine(llama, "kcache")
    a = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    b = engine.add_request(prompts(1, seed=1)[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.blocks.num_used
    assert engine.abort(a)
    assert engine.blocks.num_used < used
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == [b]
    assert engine.blocks.num_used == 0
    assert not engine.abort(a)


def test_stop_conditions(llama):
    engine = make_engine(llama, "full")
    free_run = run_all(engine, [[7, 8, 9]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    third = free_run.token_ids[2]
    stopped = run_all(engine, [[7, 8, 9]], SamplingParams(max_tokens=12, stop_token_ids=(third,)))[0]
    assert stopped.token_ids == free_run.token_ids[:free_run.token_ids.index(third) + 1]
    assert stopped.finish_reason == "stop" and free_run.finish_reason == "length"
    engine.eos_ids = {free_run.token_ids[0]}
    assert run_all(engine, [[7, 8, 9]], SamplingParams(max_tokens=12))[0].token_ids == free_run.token_ids[:1]


def test_dense_layers_make_kcache_exact_there(llama):
    n = llama.config.num_layers
    kc = make_engine(llama, "kcache", KCacheConfig(top_n=2, dense_layers=n))
    full = make_engine(llama, "full")
    ps = prompts(3, seed=9)
    assert [o.token_ids for o in run_all(kc, ps, GREEDY)] == [o.token_ids for o in run_all(full, ps, GREEDY)]
    assert kc.cache.host_bytes() == 0 and kc.cache.v_host.numel() == 0


def test_stats_count_rows_read_and_mass(llama):
    cfg = llama.config
    kcfg = KCacheConfig(top_n=4, dense_layers=1, selection="head", chunk_tokens=1)
    engine = make_engine(llama, "kcache", kcfg)
    prompt = prompts(1, seed=3, lo=30, hi=30)[0]
    out = run_all(engine, [prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    # decode steps see 31..39 cached tokens; each reads top_n rows per query head in every non-dense layer
    expected = sum((cfg.num_layers - 1) * cfg.num_heads * min(4, n) * cfg.head_dim * 4 for n in range(31, 40))
    assert out.metrics["v_bytes_read"] == expected
    assert 0 < out.metrics["mass_kept_min"] <= out.metrics["mass_kept_mean"] < 1
    assert isinstance(engine.cache, KCache) and engine.cache.v_host.device.type == "cpu"
    assert engine.cache.spec.device_bytes_per_token == (cfg.num_layers + 1) * cfg.num_kv_heads * cfg.head_dim * 4
    assert engine.cache.spec.host_bytes_per_token == (cfg.num_layers - 1) * cfg.num_kv_heads * cfg.head_dim * 4


def test_kcache_stores_v_in_the_host_pool(llama):
    kc = make_engine(llama, "kcache", KCacheConfig(top_n=4))
    full = make_engine(llama, "full")
    for e in (kc, full):
        run_all(e, [[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1))
    assert isinstance(full.cache, FullKV)
    # same prompt, same first blocks: the host pool of KCache holds exactly FullKV's device V
    torch.testing.assert_close(kc.cache.v_host[:, 0, :, :5], full.cache.v[:, 0, :, :5])  # [layers, block, heads, pos, D]
    torch.testing.assert_close(kc.cache.k[:, 0, :, :5], full.cache.k[:, 0, :, :5])


def test_request_errors(llama):
    engine = make_engine(llama, "full", max_model_len=64)
    with pytest.raises(RequestError, match="context"):
        engine.add_request(list(range(3, 80)))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([10**6])


def test_seeded_sampling_is_reproducible(llama):
    engine = make_engine(llama, "full")
    p = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    a, b = run_all(engine, [[4, 5, 6], [4, 5, 6]], p)
    assert a.token_ids == b.token_ids
    c = run_all(engine, [[4, 5, 6]], p.model_copy(update={"seed": 7}))[0]
    assert c.token_ids != a.token_ids


def test_block_tables_grow_and_map_positions_to_slots(llama):
    """Tables longer than their first allocation (64 blocks) keep every id, and positions map through them."""
    engine = make_engine(llama, pool_tokens=8192)
    seq = Sequence("s", list(range(1500)), GREEDY)
    shuffled = random.Random(0).sample(range(engine.blocks.num_blocks), 100)
    seq.block_table.extend(shuffled[:40])
    seq.block_table.extend(iter(shuffled[40:]))
    assert len(seq.block_table) == 100 and list(seq.block_table) == shuffled and seq.block_table[99] == shuffled[99]
    bs = engine.cfg.block_size
    want = [shuffled[p // bs] * bs + p % bs for p in range(1000, 1500)]
    assert engine.runner.slots(seq, 1000, 1500).tolist() == want
    short = Sequence("t", [1, 2], GREEDY)
    short.block_table.extend([5])
    tables = engine.runner.block_tables([seq, short])
    assert tables.shape == (2, 100) and tables[0].tolist() == shuffled and tables[1].tolist() == [5] + [0] * 99


def test_incremental_decoder_matches_whole_decode(smollm2_tokenizer):
    from kcache.engine.detokenize import IncrementalDecoder

    text = "Naïve café: 日本語 and 🙂 emoji, then plain words.\nA new line."
    prompt = smollm2_tokenizer("Say:", add_special_tokens=False)["input_ids"]
    ids = prompt + smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(smollm2_tokenizer, start=len(prompt))
    pieces = [decoder.update(ids[:n]) for n in range(len(prompt) + 1, len(ids) + 1)]
    assert "".join(pieces) == decoder.text == smollm2_tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    assert "" in pieces  # a token ending inside a multi-byte character waited for the next one


def test_stop_string_ends_the_completion_at_its_token(tiny_chat_model):
    loaded = loader.load(str(tiny_chat_model), device="cpu")
    engine = make_engine(loaded, "full")
    prompt = loaded.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    free = run_all(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    tok = loaded.tokenizer
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]  # three characters from the middle
    stopped = run_all(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(stop)]
    # generation ends at the first token whose text completes the stop string, as decoding everything would find
    first = next(n for n in range(1, 25) if stop in tok.decode(free.token_ids[:n], skip_special_tokens=True))
    assert stopped.token_ids == free.token_ids[:first]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_cuda_graphs_decode_and_measure_as_eager_does(tmp_path, cache, kv_dtype):
    """Replayed graphs pad the batch into the scratch block and record stats in the buffers they were captured
    with: tokens and per-request stats equal eager decoding's, and the block manager never hands the scratch out;
    with FP8 pools too (their scales and exact channels set by the calibration prefill before capture)."""
    save_tiny("llama", tmp_path, seed=1)
    loaded = loader.load(str(tmp_path), dtype="float32", device="cuda")
    kcfg = KCacheConfig(top_n=8, dense_layers=1)
    ps = prompts(5, seed=7)  # 5 sequences: the batch pads up to bucket 8
    outs = {}
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(model="unused", cache=cache, kcache=kcfg, device="cuda", max_model_len=256,
                                        max_num_seqs=16, device_cache_bytes=16 << 20, host_cache_bytes=16 << 20,
                                        enforce_eager=eager, kv_cache_dtype=kv_dtype), loaded)
        assert bool(engine.runner.graphs) != eager
        plan = engine.plan
        assert (plan.scratch_block is None) == eager and engine.blocks.num_blocks == plan.usable_blocks
        outs[eager] = run_all(engine, ps, GREEDY, check=blocks_consistent)
        engine.close()
    for graphed, eager in zip(outs[False], outs[True]):
        assert graphed.token_ids == eager.token_ids
        for key in ("mass_kept_mean", "mass_kept_min", "v_bytes_read"):
            assert graphed.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-5), key
    if cache == "kcache":
        assert all(o.metrics["v_bytes_read"] > 0 and o.metrics["mass_kept_mean"] < 1 for o in outs[False])


def test_new_text_streams_the_final_text_and_holds_back_a_stop_string(tiny_chat_model):
    loaded = loader.load(str(tiny_chat_model), device="cpu")
    engine = make_engine(loaded, "full")
    prompt = loaded.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    free = run_all(engine, [prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    for stops in ((), (stop,)):
        params = SamplingParams(max_tokens=24, ignore_eos=True, stream_text=True, stop=stops)
        pieces = []
        engine.add_request(prompt, params, on_output=pieces.append)
        while engine.has_unfinished():
            engine.step()
        final = pieces[-1]
        # the pieces add up to the final text: a piece sent too early (a stop string's start) would not be cut off
        assert final.finished and "".join(p.new_text for p in pieces) == final.text
        assert final.text == (free.text[:free.text.index(stop)] if stops else free.text)
        if not stops:  # it streamed, not all at the end (with the stop string, the end may come at once)
            assert sum(bool(p.new_text) for p in pieces[:-1]) > 1
    quiet = []  # without stream_text the text comes once, at the end
    engine.add_request(prompt, SamplingParams(max_tokens=24, ignore_eos=True), on_output=quiet.append)
    while engine.has_unfinished():
        engine.step()
    assert [p.new_text for p in quiet] == [""] * (len(quiet) - 1) + [free.text]


def test_chunk_size_is_checked_against_the_cache_block_size():
    """A chunk of a whole 32-token block is allowed with block_size 32; use() refuses a chunk larger than the block."""
    from kcache.cache.kv import KCache
    from kcache.models.config import ModelConfig

    cfg = ModelConfig("llama", 100, 64, 1, 1, 4, 2, 16, 4096)
    cache = KCache(cfg, 4, 32, torch.float32, torch.device("cpu"), KCacheConfig(chunk_tokens=32))
    assert cache.spec.host_bytes_per_token == 2 * 16 * 4
    with pytest.raises(ValueError, match="multiple of chunk_tokens"):
        cache.use(KCacheConfig(chunk_tokens=64))


@pytest.fixture(scope="module")
def cuda_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-llama-cuda")
    save_tiny("llama", folder, seed=1)
    return loader.load(str(folder), dtype="float32", device="cuda")


def engine_on(device, request, cache, kcfg, **kw):
    """The tiny model's engine on the CPU, or on CUDA with its decode graphs."""
    if device == "cpu":
        return make_engine(request.getfixturevalue("llama"), cache, kcfg, **kw)
    return LLMEngine(EngineConfig(model="unused", cache=cache, kcache=kcfg, device="cuda", max_model_len=256,
                                  max_num_seqs=16, device_cache_bytes=16 << 20, host_cache_bytes=16 << 20, **kw),
                     request.getfixturevalue("cuda_llama"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_running_decode_steps_ahead_changes_no_output(request, device, cache):
    """Async scheduling against the engine that waits for every step's tokens: the same tokens, stop reasons and
    stats, with sequences stopping by a stop token (their row of the step launched ahead is dropped), by length at
    different steps, sampled with seeds, arriving mid-run and aborted mid-run; and no block left held. On CUDA the
    steps launched ahead replay graphs fed the tokens on the device."""
    kcfg = KCacheConfig(top_n=8, sink_tokens=1, recent_tokens=2)
    ps = prompts(6, seed=7)
    engine = engine_on(device, request, cache, kcfg)
    probe = run_all(engine, ps[2:3], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    engine.close()
    params = [SamplingParams(max_tokens=20, ignore_eos=True), SamplingParams(max_tokens=9, ignore_eos=True),
              SamplingParams(max_tokens=20, stop_token_ids=(probe.token_ids[3],)),
              SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=30, ignore_eos=True)]

    def run(async_scheduling):
        engine = engine_on(device, request, cache, kcfg, async_scheduling=async_scheduling)
        assert bool(engine.runner.graphs) == (device == "cuda")
        outs: dict[str, list] = {}
        add = lambda p, sp: engine.add_request(p, sp, on_output=lambda o: outs.setdefault(o.request_id, []).append(o))  # noqa: E731
        ids = [add(p, sp) for p, sp in zip(ps[:4], params)]
        records, steps = [], 0
        while engine.has_unfinished():
            engine.step()
            records.append(engine.last_step)
            steps += 1
            if steps == 8:  # arrivals while decode steps run ahead
                ids += [add(p, sp) for p, sp in zip(ps[4:], params[4:])]
            if len(ids) > 5 and len(outs.get(ids[5], [])) == 2:  # by its progress: arrivals wait for the step ahead
                engine.abort(ids[5])
        assert engine.blocks.num_used == 0
        engine.close()
        finals = [outs[i][-1] for i in ids]
        streamed = [[t for o in outs[i] for t in o.new_token_ids] for i in ids]
        return finals, streamed, [r for r in records if r is not None]

    a_out, a_streamed, a_steps = run(True)
    s_out, s_streamed, s_steps = run(False)
    assert [o.token_ids for o in a_out] == [o.token_ids for o in s_out]
    assert a_streamed == s_streamed == [o.token_ids for o in s_out]
    assert [o.finish_reason for o in a_out] == [o.finish_reason for o in s_out]
    assert [o.finish_reason for o in s_out][2:] == ["stop", "length", "length", "abort"]
    for a, s in zip(a_out, s_out):
        assert a.metrics["mass_kept_mean"] == pytest.approx(s.metrics["mass_kept_mean"], abs=1e-6)
        assert a.metrics["v_bytes_read"] == s.metrics["v_bytes_read"]
    assert sum(r.overlapped for r in a_steps) > 10 and not any(r.overlapped for r in s_steps)
    decoded = lambda steps: sum(r.num_tokens for r in steps if not r.is_prefill)  # noqa: E731
    assert decoded(a_steps) == decoded(s_steps)  # tokens delivered, not rows computed
