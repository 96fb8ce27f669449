"""What an FP8 cache calibrates by one prefill when the engine starts: each (layer, KV head)'s scales (its largest |k|
outside the exact channels, its largest |v|; kcache.attention.reference.fp8_scales) and the K channels it keeps exact:
each KV head's n channels of largest mean |k| x mean |q|.

e4m3 keeps 3 mantissa bits, and a channel's rounding moves a logit in proportion to |q| x |k| there; in
Llama-family models a few channels of each head carry most of that product, whatever the text (their large
magnitudes come from the weights). On SmolLM2, keeping 4 per head exact takes FP8 K's perplexity cost after 2k
tokens from +1.6% to +0.3% (docs/accuracy/fp8-outliers.json). The calibration prefills CALIBRATION_TOKENS tokens of a
book the package ships when the model has a tokenizer, else seeded random token ids (dummy weights; on SmolLM2
random ids pick 86% of the same channels, for +0.46%).
"""
from __future__ import annotations

import torch

from kcache.attention import reference
from kcache.cache.kv import Fp8Calibration, StepBatch
from kcache.eval.haystack import read_text
from kcache.models.llama import LlamaForCausalLM

CALIBRATION_TOKENS = 2048
CALIBRATION_BOOK = "peter_pan"  # the evaluation scores perplexity on another (sherlock)


class _Magnitudes:
    """Stands in for the cache during the calibration prefill: per channel the sums of |k| and |q| and the largest
    |k|, per head the largest |v|; then attends exactly."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> [Hkv, D]
        self.q: dict[int, torch.Tensor] = {}  # layer -> [Hkv, D], summed over the query group
        self.k_max: dict[int, torch.Tensor] = {}  # layer -> [Hkv, D]
        self.v_max: dict[int, torch.Tensor] = {}  # layer -> [Hkv]

    def attend(self, layer: int, q, k, v, batch: StepBatch) -> torch.Tensor:
        T, Hkv, D = k.shape
        self.k[layer] = k.float().abs().sum(0)
        self.q[layer] = q.float().abs().view(T, Hkv, -1, D).sum((0, 2))
        self.k_max[layer] = k.float().abs().amax(0)
        self.v_max[layer] = v.float().abs().amax((0, 2))
        return reference.prefill_attention(q, k, v, 0)


def calibration_ids(tokenizer, vocab_size: int, n: int) -> list[int]:
    """n token ids of the calibration book, or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        text = read_text(CALIBRATION_BOOK)[:16 * n]  # more characters than n tokens take
        ids = tokenizer(text, verbose=False)["input_ids"][:n]
        if len(ids) == n:
            return ids
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@torch.inference_mode()
def _measure(model: LlamaForCausalLM, ids: list[int]) -> _Magnitudes:
    """The magnitudes of a prefill of ids (under TP: this rank's heads; every rank runs it)."""
    device = next(model.parameters()).device
    T = len(ids)
    stats = _Magnitudes()
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    batch = StepBatch(is_prefill=True, slot_mapping=empty.long(), block_tables=empty[None], lengths=empty,
                      chunk_starts=(0,), chunk_lens=(T,), context_lens=(0,))
    model(torch.tensor(ids, device=device), torch.arange(T, device=device), stats, batch)
    return stats


def _stack(per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.stack([per_layer[i] for i in range(len(per_layer))])


def channel_weights(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """Sum |k| x sum |q| (over the KV head's query group) of each channel over a prefill of ids: [layers, Hkv, D]
    float32 on the model's device."""
    stats = _measure(model, ids)
    return _stack(stats.k) * _stack(stats.q)


def calibrate(model: LlamaForCausalLM, ids: list[int], n: int) -> Fp8Calibration:
    """The FP8 scales and each KV head's n exact K channels (0: none; the n of largest mean |k| x mean |q|,
    ascending) from one prefill of ids. K's scale covers the channels left in e4m3 only."""
    if not 0 <= n <= model.config.head_dim:
        raise ValueError(f"fp8_exact_channels must lie in [0, head_dim={model.config.head_dim}], got {n}")
    stats = _measure(model, ids)
    k_max = _stack(stats.k_max)  # [layers, Hkv, D]
    channels = None
    if n:
        channels = (_stack(stats.k) * _stack(stats.q)).topk(n, -1).indices.sort(-1).values.to(torch.int32)
        k_max = k_max.scatter(-1, channels.long(), 0.0)
    return Fp8Calibration(reference.fp8_scales(k_max.amax(-1)), reference.fp8_scales(_stack(stats.v_max)), channels)
