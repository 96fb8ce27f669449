"""Next-token sampling: greedy, temperature, top-k, top-p, per request.

Every row is sampled on the device, and the tokens travel to the host with the step's stats in one copy that does
not block: the engine can launch the next decode step, fed these tokens on the device, before they reach the host
(kcache.engine.llm_engine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kcache.cache.stats import DecodeStats
from kcache.config import SamplingParams


@dataclass
class Sampled:
    """One step's sampled tokens, on the device and on their way to the host."""

    tokens: torch.Tensor  # [B] long, on the logits' device
    host: torch.Tensor  # [1 + 3?, B] float64: tokens, then the stats' rows; pinned and filled asynchronously on CUDA
    copied: torch.cuda.Event | None  # recorded after the copy (None: the copy was synchronous)
    samples: int | None  # DecodeStats.samples; None without stats

    def fetch(self) -> tuple[list[int], DecodeStats | None]:
        """Wait for the copy; (one token id per row, the step's stats on the host)."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.host[0].long().tolist()
        if self.samples is None:
            return tokens, None
        return tokens, DecodeStats(self.host[1], self.host[2], self.host[3], self.samples)


def sample_async(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 stats: DecodeStats | None = None) -> Sampled:
    """logits [B, V] float32 -> the tokens on the device, with their copy to the host (and the stats' [B] tensors
    beside them) started: one sync a step, when the engine fetches them."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, generators[i])
    riders = () if stats is None else (stats.mass_sum, stats.mass_min, stats.v_bytes)
    rows = torch.stack([tokens.double(), *(r.double() for r in riders)])  # [1 + 3?, B]
    if not rows.is_cuda:
        return Sampled(tokens, rows, None, None if stats is None else stats.samples)
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return Sampled(tokens, host, copied, None if stats is None else stats.samples)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           stats: DecodeStats | None = None) -> tuple[list[int], DecodeStats | None]:
    """sample_async, waited for: (one token id per row, the step's stats on the host)."""
    return sample_async(logits, params, generators, stats).fetch()


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One row's token [1], drawn on the row's device."""
    logits = logits / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=gen)
