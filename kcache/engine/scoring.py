"""Teacher-forced scoring, the one path `LLM.score` and the evaluation share: prefill a prefix exactly, then feed
the true next tokens in chunks, each attending as its own decode step would (KCache active), so that the logits
are those a decode of exactly these tokens would have seen."""
from __future__ import annotations

import torch

from kcache.engine.model_runner import ModelRunner
from kcache.engine.sequence import Sequence


def prefill(runner: ModelRunner, seq: Sequence, n: int) -> torch.Tensor:
    """Cache the next n tokens of seq exactly (one chunk); logits [1, V] at the last of them."""
    logits = runner.prefill([(seq, n)])
    seq.advance(n)
    return logits


def teacher_force(runner: ModelRunner, seq: Sequence, end: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed seq.token_ids[num_cached:end] (end > num_cached), chunk tokens a pass. Returns (logits [n, V] on the
    host, row j predicting token num_cached + j + 1; mean mass kept [n] over approximated layers and heads, 1.0
    where every layer was exact)."""
    logits, mass = [], []
    while seq.num_cached < end:
        n = min(chunk, end - seq.num_cached)
        out, stats = runner.score(seq, n)
        seq.advance(n)
        logits.append(out)
        mass.append(torch.ones(n) if stats is None else stats.mass_mean().float().cpu())
    return torch.cat(logits).cpu(), torch.cat(mass)
