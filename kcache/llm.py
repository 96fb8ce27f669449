"""The offline Python API, shaped like vLLM's `LLM.generate`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kcache.config import EngineConfig, KCacheConfig, SamplingParams
from kcache.engine import scoring
from kcache.engine.llm_engine import LLMEngine, RequestOutput
from kcache.engine.sequence import Sequence


@dataclass
class ScoreOutput:
    logits: torch.Tensor  # [n, V] float32: row j predicts token prefix_len + j
    mass_kept: torch.Tensor  # [n] mean mass kept over layers and heads at each scored position (1.0 for FullKV)


def engine_config(model: str = "smollm2", cache: str | KCacheConfig = "kcache", **kwargs) -> EngineConfig:
    """EngineConfig from `cache="full"`, `cache="kcache"` or `cache=KCacheConfig(...)` plus engine options."""
    if isinstance(cache, KCacheConfig):
        kwargs["kcache"] = cache
        cache = "kcache"
    return EngineConfig(model=model, cache=cache, **kwargs)


def chat_ids(tokenizer, message: str) -> list[int]:
    """Token ids of one user message under the tokenizer's chat template, ready for the assistant's answer."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


class LLM:
    """`LLM(model="smollm2", cache=KCacheConfig(top_n=64)).generate(prompts, SamplingParams(max_tokens=64))`."""

    def __init__(self, model: str = "smollm2", cache: str | KCacheConfig = "kcache", **kwargs):
        self.engine = LLMEngine(engine_config(model, cache, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion, batched; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.engine.add_request(p, sampling_params) for p in prompts]
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def score(self, token_ids: list[int], prefix_len: int, chunk: int = 64) -> ScoreOutput:
        """Teacher-forced scoring: prefill token_ids[:prefix_len] exactly, then every later token as a decode step
        (KCache active) fed the true previous tokens. Logits at positions prefix_len-1 .. len-2."""
        eng = self.engine
        if not 0 < prefix_len < len(token_ids) <= eng.max_model_len:
            raise ValueError("need 0 < prefix_len < len(token_ids) <= max_model_len")
        if eng.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        seq = Sequence("score", list(token_ids), SamplingParams(), num_prompt=prefix_len)
        if not eng.blocks.can_allocate(seq):
            raise ValueError("the text does not fit in the cache")
        eng.blocks.allocate(seq)
        try:
            logits, mass = [scoring.prefill(eng.runner, seq, prefix_len).cpu()], [torch.ones(1)]  # predicts token prefix_len
            if seq.num_cached < len(token_ids) - 1:
                forced, kept = scoring.teacher_force(eng.runner, seq, len(token_ids) - 1, chunk)
                logits.append(forced)
                mass.append(kept)
            return ScoreOutput(torch.cat(logits), torch.cat(mass))
        finally:
            eng.blocks.release(seq)
