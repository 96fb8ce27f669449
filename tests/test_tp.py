"""Tensor parallelism on CPU (gloo, 2 and 4 processes): TP=2 and TP=4 greedy output equal TP=1, in both cache modes."""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from kcache import LLMEngine, SamplingParams
from kcache.cli import Parser, add_engine_args, engine_config_from_args
from kcache.config import EngineConfig, KCacheConfig
from kcache.models.sharding import TensorParallelError
from kcache.engine.sequence import Sequence

from conftest import save_tiny

PROMPTS = [[1, 17, 300, 42, 99, 7, 250, 13, 400, 3] * 4, [5, 200, 201, 9, 11], [123, 77, 301]]
CACHES = {"full": ("full", KCacheConfig()), "kcache-top4": ("kcache", KCacheConfig(top_n=4)),
          "kcache-all": ("kcache", KCacheConfig(top_n=1024))}  # top_n covering the length: exact


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tp-{request.param}")
    save_tiny(request.param, folder, seed=3)
    return folder


def engine(folder, cache="full", kcfg=KCacheConfig(), tp=1, device="cpu"):
    # float32 on CPU; chunked prefill (16 tokens a step) so that prefill also reads back cached K and V
    return LLMEngine(EngineConfig(model=str(folder), cache=cache, kcache=kcfg, device=device, max_model_len=128,
                                  max_num_batched_tokens=16, device_cache_bytes=4 << 20, host_cache_bytes=4 << 20,
                                  tensor_parallel_size=tp))


def greedy(eng: LLMEngine, new: int = 16) -> list[list[int]]:
    ids = [eng.add_request(p, SamplingParams(max_tokens=new, ignore_eos=True)) for p in PROMPTS]
    done = {}
    while eng.has_unfinished():
        done |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
    return [done[i] for i in ids]


def prefill_logits(eng: LLMEngine):
    """Logits [V] after the first prompt: tiny tied-embedding models (Qwen2) repeat tokens greedily, so this
    checks the numbers as well."""
    seq = Sequence("logits", PROMPTS[0], SamplingParams())
    eng.blocks.allocate(seq)
    logits = eng.runner.prefill([(seq, len(PROMPTS[0]))])[0]
    eng.blocks.release(seq)
    return logits


def assert_tp_matches_tp1(folder, mode: str, tp: int) -> None:
    """TP=tp keeps 1/tp of the KV heads per rank, holds tp times the tokens in the same budget, and gives TP=1's
    greedy tokens and prefill logits (partial sums add up in another order: close, not equal)."""
    cache, kcfg = CACHES[mode]
    one = engine(folder, cache, kcfg)
    expected, logits = greedy(one), prefill_logits(one)
    one.close()
    many = engine(folder, cache, kcfg, tp=tp)
    try:
        assert many.cache.k.shape[2] == many.model_config.num_kv_heads // tp  # rank 0's share of the KV heads
        assert many.plan.device_bytes_per_block * tp == one.plan.device_bytes_per_block
        assert greedy(many) == expected
        torch.testing.assert_close(prefill_logits(many), logits, atol=1e-5, rtol=1e-5)
    finally:
        many.close()
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("mode", CACHES)
def test_tp2_matches_tp1(checkpoint, mode):
    assert_tp_matches_tp1(checkpoint, mode, 2)


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """A tiny Llama whose 8 query and 4 KV heads split over 4 ranks (one KV head each, as 70B's 8 do over 8)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY

    folder = tmp_path_factory.mktemp("tp4-llama")
    torch.manual_seed(4)
    cfg = LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("mode", ["full", "kcache-top4"])
def test_tp4_matches_tp1(four_kv_heads, mode):
    assert_tp_matches_tp1(four_kv_heads, mode, 4)  # one KV head per rank


@pytest.mark.parametrize("tp, what", [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_heads_must_divide(checkpoint, tp, what):
    # tiny models: 4 query heads, 2 KV heads
    with pytest.raises(TensorParallelError, match=what) as err:
        engine(checkpoint, tp=tp)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert not multiprocessing.active_children()  # refused before any worker started


def test_more_ranks_than_gpus():
    with pytest.raises(TensorParallelError, match="GPUs"):  # checked before the model is even looked for
        engine("no-such-model", tp=torch.cuda.device_count() + 2, device="cuda")


def test_cli_flag():
    p = Parser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--tensor-parallel-size", "2"])).tensor_parallel_size == 2
    assert engine_config_from_args(p.parse_args([])).tensor_parallel_size == 1


def test_a_retired_group_lets_the_next_engine_start_one():
    """On GPUs rank 0 retires its NCCL group instead of tearing it down (teardown deadlocks there); the bookkeeping
    must still let a later engine in the same process start a new group. Checked here with gloo, world size 1."""
    import torch.distributed as dist

    from kcache.distributed import comm

    comm.init(0, 1, comm.free_port(), torch.device("cpu"))
    comm.retire(dist.distributed_c10d._get_default_group())
    assert not dist.is_initialized()
    comm.init(0, 1, comm.free_port(), torch.device("cpu"))
    x = torch.ones(3)
    dist.all_reduce(x)
    assert x.tolist() == [1.0, 1.0, 1.0]
    comm.destroy()
    assert not dist.is_initialized()


def test_host_memory_counts_every_rank(monkeypatch):
    """Each rank holds its own heads' V in host memory: 4 ranks of 29.3 GiB do not fit in 100 GiB, 2 do."""
    from kcache.engine import memory

    monkeypatch.setattr(memory, "available_host_bytes", lambda: 100 << 30)
    plan = memory.PoolPlan(num_blocks=1000, block_size=16, device_bytes_per_block=1 << 20, host_bytes_per_block=30 << 20)
    memory.check_host_memory(plan, EngineConfig(tensor_parallel_size=2), torch.device("cuda"))
    with pytest.raises(memory.HostMemoryError, match=r"117.2 GiB of host memory \(4 ranks x 29.3 GiB\)"):
        memory.check_host_memory(plan, EngineConfig(tensor_parallel_size=4), torch.device("cuda"))
