"""Prefill once, decode every method: how the evaluation drives the engine.

Prefill is exact whatever the method, so one prefilled cache serves them all: each method switches the cache's
setting (`cache.use`), rewinds the sequences to their prompts (`Sequence.rewind`) and decodes from there,
overwriting the K/V rows that the previous method's tokens left past the prompt. On a 2-core CPU this is what
makes a sweep of dozens of methods affordable (a long prefill costs minutes; a decode step a fraction of a
second). Sequences of one call are decoded as one batch, so a step's weights are read once for all of them.
A FullKV engine serves the full cache only (the FP8 FullKV, whose V differs from KCache's).
Teacher-forced scoring is kcache.engine.scoring, the path `LLM.score` uses too.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from kcache.config import KCacheConfig, SamplingParams
from kcache.engine import scoring
from kcache.engine.llm_engine import LLMEngine
from kcache.engine.sequence import Sequence


class Harness:
    def __init__(self, engine: LLMEngine):
        if engine.runner.graphs:
            raise ValueError("the evaluation needs enforce_eager=True: a CUDA graph replays the setting it was captured with")
        self.engine, self.cache, self.runner = engine, engine.cache, engine.runner
        self.num_layers = engine.model_config.num_layers
        self.full_only = engine.cfg.cache == "full"

    def _use(self, cfg: KCacheConfig) -> None:
        """Decode with cfg from now on: KCache switches its setting; FullKV runs only the full cache."""
        if not self.full_only:
            self.cache.use(cfg)
        elif cfg.dense_layers < self.num_layers:
            raise ValueError("a FullKV engine decodes only the full cache: KCache settings need cache='kcache'")

    @contextmanager
    def prefilled(self, prompts: list[list[int]]):
        """(sequences holding the prompts' K/V, exact next-token logits [B, V] of each prompt); frees them after."""
        seqs = [Sequence(f"eval-{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]
        try:
            logits = []
            for s in seqs:
                self._grow(s)
                logits.append(scoring.prefill(self.runner, s, s.num_tokens))
            yield seqs, torch.cat(logits)
        finally:
            for s in seqs:
                self.engine.blocks.release(s)

    def greedy(self, seqs: list[Sequence], prompts: list[list[int]], first: list[int], cfg: KCacheConfig,
               max_new: int) -> tuple[list[list[int]], list[float]]:
        """Greedy continuations (at most max_new tokens, up to EOS) under `cfg`, each starting with the prompt's
        exact first token; and each one's mean attention mass kept over its decode steps."""
        self._use(cfg)
        for s, p, t in zip(seqs, prompts, first):
            s.rewind(len(p))
            s.token_ids.append(t)
        masses: list[list[float]] = [[] for _ in seqs]
        live = [i for i, (s, p) in enumerate(zip(seqs, prompts)) if not self._done(s, len(p), max_new)]
        while live:
            batch = [seqs[i] for i in live]
            for s in batch:
                self._grow(s)
            logits, stats = self.runner.decode(batch)
            mass = [1.0] * len(batch) if stats is None else stats.mass_mean().tolist()
            for j, (i, token) in enumerate(zip(live, logits.argmax(-1).tolist())):
                seqs[i].advance(1)
                seqs[i].token_ids.append(token)
                masses[i].append(mass[j])
            live = [i for i in live if not self._done(seqs[i], len(prompts[i]), max_new)]
        completions = [s.token_ids[len(p):] for s, p in zip(seqs, prompts)]
        return completions, [sum(m) / len(m) if m else 1.0 for m in masses]

    def score(self, seq: Sequence, ids: list[int], prefix_len: int, cfg: KCacheConfig,
              chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing from a sequence prefilled with ids[:prefix_len]: every later token attends as a decode
        step would under `cfg`. Returns (logits [n, V] predicting ids[prefix_len + 1:], mass kept [n])."""
        self._use(cfg)
        seq.rewind(prefix_len)
        seq.token_ids.extend(ids[prefix_len:])
        self._grow(seq)
        return scoring.teacher_force(self.runner, seq, len(ids) - 1, chunk)

    def _done(self, seq: Sequence, prompt_len: int, max_new: int) -> bool:
        return seq.num_tokens - prompt_len >= max_new or seq.token_ids[-1] in self.engine.eos_ids

    def _grow(self, seq: Sequence) -> None:
        if not self.engine.blocks.can_allocate(seq):
            raise ValueError(f"the cache pool ({self.engine.blocks.num_free} free blocks) cannot hold {seq.num_tokens} "
                             "more tokens")
        self.engine.blocks.allocate(seq)
