"""Perplexity of FP8 K with each KV head's loudest channels kept exact: a way past e4m3's rounding.

FP8 K costs SmolLM2 +1.6% perplexity after 2k tokens (docs/accuracy, FP8 K). The rounding error of a channel moves
the logits in proportion to |q| x |k| there, and a few channels per head carry most of it. This simulates storages
of K in the full cache (float32, CPU): every K row a layer stores is replaced by what the storage would give back.
FP8 per (token, head) as kv_cache_dtype=fp8 stores it; and the same with each head's n channels of largest
mean |k| x mean |q| kept exact ("channels"), or its n/2 rotary pairs (i, i + D/2) of largest summed weight ("pairs":
a rotation keeps a pair's magnitude, so the choice does not depend on the position); and as kcache stores it, under
one scale per (layer, KV head) with the same channels exact ("head": kcache.engine.calibration's scales). The
channels and scales are calibrated on 2048 tokens of another book (Peter Pan). Scored: perplexity and mean KL of the next-token distribution over 512
tokens of Sherlock Holmes after 2048, against the exact cache.

    python benchmarks/fp8_outlier_probe.py [--out docs/accuracy/fp8-outliers.json] [--variants head:1,head:2 ...]
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from kcache.attention import reference as ref
from kcache.engine import calibration
from kcache.eval.haystack import read_text
from kcache.llm import LLM

PREFIX, SCORED, CALIBRATION = 2048, 512, 2048
VARIANTS = [("fp8", 0), ("channels", 4), ("channels", 8), ("channels", 16), ("pairs", 4), ("pairs", 8), ("head", 0),
            ("head", 4), ("head", 8)]


def channel_weights(llm: LLM, ids: list[int]) -> dict[int, torch.Tensor]:
    """Per layer: mean |k| x mean |q| (over the KV head's query group) of each channel [Hkv, D] over a prefill (up to
    a constant: the calibration's sums)."""
    return dict(enumerate(calibration.channel_weights(llm.engine.model, ids).cpu()))


def kept_channels(weight: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    """[Hkv, D] bool: the n channels kept exact."""
    D = weight.shape[-1]
    if kind == "pairs":  # channel i rotates with i + D/2
        pair = weight[:, :D // 2] + weight[:, D // 2:]
        top = pair.topk(n // 2, -1).indices
        top = torch.cat([top, top + D // 2], -1)
    else:
        top = weight.topk(n, -1).indices
    return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)


def per_row(x: torch.Tensor) -> torch.Tensor:
    """Rows x [..., D] as e4m3 under one scale per row (its largest magnitude / 448) gives them back."""
    scales = (x.float().abs().amax(-1, keepdim=True) / ref.FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return ((x.float() / scales).clamp(-ref.FP8_MAX, ref.FP8_MAX).to(ref.FP8).float() * scales).to(x.dtype)


def stored(k: torch.Tensor, keep: torch.Tensor | None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """K rows [T, Hkv, D] as FP8 gives them back, the `keep` channels [Hkv, D] exact: per (token, head), or under the
    heads' scales [Hkv, 1] as kcache stores them."""
    rest = k if keep is None else k.masked_fill(keep, 0.0)
    back = per_row(rest) if scales is None else ref.dequantize(ref.quantize(rest, scales), scales, k.dtype)
    return back if keep is None else torch.where(keep, k, back)


def next_token_logprobs(llm: LLM, ids: list[int], keep: dict[int, torch.Tensor | None] | None,
                        scales: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities [SCORED, V] float64 of the scored tokens, K stored as `keep` and `scales` [layers, Hkv, 1]
    say (keep None: exact)."""
    attend = llm.engine.cache.attend
    if keep is not None:
        llm.engine.cache.attend = lambda layer, q, k, v, batch: attend(
            layer, q, stored(k, keep[layer], None if scales is None else scales[layer]), v, batch)
    try:
        return torch.log_softmax(llm.score(ids, PREFIX).logits.double(), -1)
    finally:
        llm.engine.cache.attend = attend


def variants(text: str) -> list[tuple[str, int]]:
    """'head:1,head:2' -> [("head", 1), ("head", 2)]."""
    out = [(kind, int(n)) for kind, n in (item.split(":") for item in text.split(","))]
    if any(kind not in ("fp8", "channels", "pairs", "head") for kind, _ in out):
        raise argparse.ArgumentTypeError(f"unknown storage in {text!r}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/accuracy/fp8-outliers.json")
    p.add_argument("--variants", type=variants, default=VARIANTS,
                   help="storage:exact_channels, comma-separated (storages: fp8, channels, pairs, head)")
    args = p.parse_args()
    llm = LLM("smollm2", cache="full", dtype="float32", device="cpu")  # plain float32 K: each storage is simulated
    tokens = lambda book, n: llm.tokenizer(read_text(book), verbose=False)["input_ids"][:n]  # noqa: E731
    calibration_ids = tokens("peter_pan", CALIBRATION)
    weights = channel_weights(llm, calibration_ids)
    ids = tokens("sherlock", PREFIX + SCORED)
    target = torch.tensor(ids[PREFIX:])
    exact = next_token_logprobs(llm, ids, None)
    nll = lambda logp: -logp[torch.arange(len(target)), target].mean().item()  # noqa: E731
    rows = []
    for kind, n in args.variants:
        scales = None
        if kind == "head":  # what the engine calibrates: the scales and the channels of calibration.calibrate
            fp8 = calibration.calibrate(llm.engine.model, calibration_ids, n)
            scales = fp8.k_scales.cpu()
            keep = {layer: None if fp8.channels is None else
                    torch.zeros_like(w, dtype=torch.bool).scatter_(1, fp8.channels[layer].long().cpu(), True)
                    for layer, w in weights.items()}
        else:
            keep = {layer: None if kind == "fp8" else kept_channels(w, kind, n) for layer, w in weights.items()}
        logp = next_token_logprobs(llm, ids, keep, scales)
        rows.append({"storage": kind, "exact_channels": n, "ppl_x_full": math.exp(nll(logp) - nll(exact)),
                     "kl": (exact.exp() * (exact - logp)).sum(-1).mean().item(),
                     "top1_agreement": (logp.argmax(-1) == exact.argmax(-1)).double().mean().item()})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": "smollm2 (float32, CPU)", "calibration": f"peter_pan, {CALIBRATION} tokens",
                   "scored": f"sherlock, {SCORED} tokens after {PREFIX}", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
