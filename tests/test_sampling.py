"""The sampler's filters as distributions: what top-k, top-p and temperature leave, and in what proportions."""
from __future__ import annotations

import pytest
import torch

from kcache.config import SamplingParams
from kcache.engine.sampling import sample

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.10])
DRAWS = 2000


def frequencies(params: SamplingParams) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(DRAWS, 4).contiguous()
    tokens, stats = sample(logits, [params] * DRAWS, [gen] * DRAWS)
    assert stats is None
    return torch.bincount(torch.tensor(tokens), minlength=4).double() / DRAWS


def renormalised(keep: list[int], probs: torch.Tensor = PROBS) -> torch.Tensor:
    out = torch.zeros(4, dtype=torch.float64)
    out[keep] = probs[keep].double() / probs[keep].sum()
    return out


@pytest.mark.parametrize("params, keep", [
    (SamplingParams(temperature=1.0, top_k=2), [0, 1]),
    (SamplingParams(temperature=1.0, top_p=0.8), [0, 1, 2]),  # 0.5 + 0.25 < 0.8: the third token completes it
    (SamplingParams(temperature=1.0, top_p=0.45), [0]),  # the first token alone reaches 0.45
    (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), [0, 1]),  # top-p over top-k's renormalised three
    (SamplingParams(temperature=1.0), [0, 1, 2, 3]),
], ids=["top_k=2", "top_p=0.8", "top_p=0.45", "top_k=3,top_p=0.6", "unfiltered"])
def test_filters_keep_their_set_in_proportion(params, keep):
    freq = frequencies(params)
    outside = [t for t in range(4) if t not in keep]
    assert freq[outside].sum() == 0, f"tokens {outside} are outside the filtered set"
    torch.testing.assert_close(freq, renormalised(keep), atol=0.04, rtol=0)


def test_temperature_flattens_the_distribution():
    flat = PROBS.sqrt() / PROBS.sqrt().sum()  # temperature 2: p ** (1/2), renormalised
    torch.testing.assert_close(frequencies(SamplingParams(temperature=2.0)), flat.double(), atol=0.04, rtol=0)


def test_greedy_rows_take_the_argmax_and_stats_come_back_on_the_host():
    from kcache.cache.stats import DecodeStats

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    stats = DecodeStats(torch.tensor([1.5, 2.0]), torch.tensor([0.25, 0.5]), torch.tensor([64.0, 128.0]), 2)
    tokens, host = sample(logits, [SamplingParams()] * 2, [None, None], stats)
    assert tokens == [1, 0]
    assert host.mass_sum.tolist() == [1.5, 2.0] and host.mass_min.tolist() == [0.25, 0.5]
    assert host.v_bytes.tolist() == [64.0, 128.0] and host.samples == 2 and host.mass_mean().tolist() == [0.75, 1.0]
