"""Fidelity of an approximate cache against the full one, and task accuracy.

Logits are `[..., V]` (any leading positions, e.g. `[T, V]` or `[B, T, V]`) and every position counts once.
Log-probabilities and sums are float64 so a mean over thousands of positions does not drift; they are taken
over blocks of positions so a long text with a large vocabulary never needs a float64 copy of all its logits.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

_BLOCK = 1024  # positions per float64 block


def _log_prob_blocks(logits: torch.Tensor):
    """[..., V] logits -> float64 log-probabilities, [<=_BLOCK, V] at a time, positions in order."""
    for block in logits.reshape(-1, logits.shape[-1]).split(_BLOCK):
        yield F.log_softmax(block.double(), dim=-1)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    # The block loops zip positions, so a mismatch would otherwise be truncated silently.
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood): logits [..., V] predict targets [...] (already shifted by one)."""
    _same_shape(logits[..., 0], targets)
    ids = targets.reshape(-1, 1).long().split(_BLOCK)
    nll = sum(-logp.gather(1, t).sum().item() for logp, t in zip(_log_prob_blocks(logits), ids))
    return math.exp(nll / targets.numel())


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Share of positions whose argmax equals the reference's: both [..., V]."""
    _same_shape(logits, ref_logits)
    return (logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item()


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref || approx) in nats: both [..., V]; 0 when the distributions agree."""
    _same_shape(ref_logits, logits)
    blocks = zip(_log_prob_blocks(ref_logits), _log_prob_blocks(logits))
    kl = sum(F.kl_div(approx, ref, log_target=True, reduction="sum").item() for ref, approx in blocks)
    return kl / (ref_logits.numel() // ref_logits.shape[-1])


def greedy_agreement(tokens: Sequence[int] | torch.Tensor, ref_tokens: Sequence[int] | torch.Tensor
                     ) -> tuple[int, float]:
    """(index of the first differing token, share of positions equal) of two free-running generations [T], [T_ref].

    Positions past the shorter sequence count as different; with no difference the index is the common length.
    Informational only: one near-tie flips a small model's continuation for good.
    """
    a, b = list(map(int, tokens)), list(map(int, ref_tokens))
    longest = max(len(a), len(b))
    if longest == 0:
        return 0, 1.0
    same = [x == y for x, y in zip(a, b)]
    first = same.index(False) if False in same else len(same)
    return first, sum(same) / longest


def summarize(correct: Iterable[bool]) -> dict:
    """{"correct": c, "total": n, "accuracy": c / n} (accuracy 0.0 when n is 0)."""
    flags = list(correct)
    n, c = len(flags), sum(map(bool, flags))
    return {"correct": c, "total": n, "accuracy": c / n if n else 0.0}
