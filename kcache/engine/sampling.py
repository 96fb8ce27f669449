"""Next-token sampling: greedy, temperature, top-k, top-p, per request."""
from __future__ import annotations

import torch

from kcache.cache.stats import DecodeStats
from kcache.config import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           stats: DecodeStats | None = None) -> tuple[list[int], DecodeStats | None]:
    """logits [B, V] float32 -> (one token id per row, the step's stats on the host). The stats' [B] tensors travel
    in the same device-to-host copy as the greedy tokens: one sync a step."""
    riders = () if stats is None else (stats.mass_sum, stats.mass_min, stats.v_bytes)
    host = torch.stack([logits.argmax(-1).double(), *(r.double() for r in riders)]).cpu()  # [1 + 3?, B]
    tokens = host[0].long().tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, generators[i])
    return tokens, None if stats is None else DecodeStats(host[1], host[2], host[3], stats.samples)


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))
