"""Which FP8 scale granularity K needs: per (token, KV head) against per (block, KV head), on a real model's K.

Prefills a text with the full cache (exact), records every layer's post-RoPE queries and keys as attention sees them,
then quantises K both ways (e4m3, scale = amax / 448 over one row, or over the block_size rows of one block and
head), and per row after subtracting each channel's mean over the text (softmax is invariant to the shift q . mean,
so a follow-up could store K - mean; here the mean sees the whole text, an upper bound on that gain), per row with
the first SINKS tokens (the attention sinks) kept exact, per row with each head's OUTLIERS channels of largest
mean |k| x mean |q| over the text kept exact (the rest FP8 under its own row scale; the channels are a property of
the model, so a calibration text could fix them), and, for scale, K rounded to bf16; and measures,
per layer and head, the relative error of the dequantised K and the KL divergence of each query's causal softmax
over the dequantised K from the exact one (the distribution KCache ranks chunks by).

    python benchmarks/fp8_scale_probe.py [--tokens 2048] [--out docs/accuracy/fp8-scales.json]
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from fp8_outlier_probe import kept_channels, per_row, stored  # same folder
from kcache.eval.haystack import read_text
from kcache.llm import LLM

BLOCK = 16  # the engine's default block size
SINKS = 4
OUTLIERS = (4, 8, 16)


def outliers_exact(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """k [T, Hkv, D] with each head's n channels of largest mean |k| x mean |q| (its query group's) exact and the
    rest per row in FP8, float32."""
    T, Hkv, D = k.shape
    weight = k.abs().mean(0) * q.abs().view(T, Hkv, -1, D).mean((0, 2))  # [Hkv, D]: a channel's share of the logits
    return stored(k, kept_channels(weight, "channels", n))


def quantize_blocks(k: torch.Tensor) -> torch.Tensor:
    """k [T, Hkv, D] -> its values under one scale per (block of BLOCK tokens, KV head), float32."""
    T, Hkv, D = k.shape
    blocks = k.view(T // BLOCK, BLOCK, Hkv, D).transpose(1, 2).reshape(T // BLOCK, Hkv, BLOCK * D)
    back = per_row(blocks)  # one scale over the block's rows of each head
    return back.view(T // BLOCK, Hkv, BLOCK, D).transpose(1, 2).reshape(T, Hkv, D)


def causal_kl(q: torch.Tensor, k: torch.Tensor, k_approx: torch.Tensor) -> torch.Tensor:
    """Mean KL(exact || approx) per KV head of the causal softmax of q [T, H, D] over k [T, Hkv, D] -> [Hkv]."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    qf = q.double().view(T, Hkv, H // Hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, T, D]

    def logp(keys):
        s = qf @ keys.double().permute(1, 2, 0)[:, None] / math.sqrt(D)  # [Hkv, G, T, T]
        return torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1)

    exact, approx = logp(k), logp(k_approx)
    kl = (exact.exp() * (exact - approx)).masked_fill(~mask, 0.0).sum(-1)  # [Hkv, G, T]
    return kl.mean((1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--text", default="sherlock")
    p.add_argument("--out", default="docs/accuracy/fp8-scales.json")
    args = p.parse_args()
    llm = LLM("smollm2", cache="full", dtype="float32", device="cpu")
    ids = llm.tokenizer(read_text(args.text), verbose=False)["input_ids"][:args.tokens]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    attend = llm.engine.cache.attend

    def record(layer, q, k, v, batch):
        seen[layer] = (q.clone(), k.clone()) if layer not in seen else (torch.cat([seen[layer][0], q]),
                                                                          torch.cat([seen[layer][1], k]))
        return attend(layer, q, k, v, batch)

    llm.engine.cache.attend = record
    llm.score(ids, args.tokens - 1)  # prefill of every token but the last: the queries and keys of the text
    T = len(seen[0][1]) // BLOCK * BLOCK
    rows = []
    for layer, (q, k) in sorted(seen.items()):
        q, k = q[:T], k[:T]
        per_token = per_row(k)
        per_block = quantize_blocks(k)
        mean = k.mean(0, keepdim=True)  # [1, Hkv, D]
        centred = per_row(k - mean) + mean
        sinks_exact = torch.cat([k[:SINKS], per_token[SINKS:]])
        bf16 = k.to(torch.bfloat16).float()
        err = lambda approx: ((approx - k).norm(dim=(0, 2)) / k.norm(dim=(0, 2))).tolist()  # noqa: E731  per head
        rows.append(dict(layer=layer, k_rel_err_token=err(per_token), k_rel_err_block=err(per_block),
                         k_rel_err_centred=err(centred), kl_token=causal_kl(q, k, per_token).tolist(),
                         kl_block=causal_kl(q, k, per_block).tolist(), kl_centred=causal_kl(q, k, centred).tolist(),
                         kl_sinks_exact=causal_kl(q, k, sinks_exact).tolist(), kl_bf16=causal_kl(q, k, bf16).tolist(),
                         **{f"kl_outliers_{n}": causal_kl(q, k, outliers_exact(q, k, n)).tolist() for n in OUTLIERS}))
        print(f"layer {layer:2d}: K rel err token {max(rows[-1]['k_rel_err_token']):.4f} block "
              f"{max(rows[-1]['k_rel_err_block']):.4f}; KL token {max(rows[-1]['kl_token']):.2e} block "
              f"{max(rows[-1]['kl_block']):.2e} centred {max(rows[-1]['kl_centred']):.2e}", flush=True)
    mean = lambda key: sum(sum(r[key]) / len(r[key]) for r in rows) / len(rows)  # noqa: E731
    summary = {key: mean(key) for key in ("k_rel_err_token", "k_rel_err_block", "k_rel_err_centred", "kl_token",
                                          "kl_block", "kl_centred", "kl_sinks_exact", "kl_bf16",
                                          *(f"kl_outliers_{n}" for n in OUTLIERS))}
    print(json.dumps(summary))
    with open(args.out, "w") as f:
        json.dump(dict(model="smollm2", text=args.text, tokens=T, block_size=BLOCK, mean=summary, layers=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
