"""How much of a decode step's top-N selection was already selected at the step before?

On the lent GPU the host V reads bound KCache's decode (benchmarks/README.md). If consecutive steps select
mostly the same tokens, a device-side copy of the previous steps' selected V rows would serve those reads
from HBM. This measures that reuse on real weights (SmolLM2-135M-Instruct, CPU, greedy decoding of a long
book passage) and on the same shapes with random weights (what the GPU throughput runs use).

For every approximate layer and KV head, reuse(k) = the share of step t's selected positions that were selected
at one of the k steps before (the position of the token just generated is new at step t and counts as a miss).

    python benchmarks/selection_reuse.py            # JSON to benchmarks/results/selection_reuse_smollm2.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kcache.attention import reference
from kcache.config import KCacheConfig, SamplingParams
from kcache.eval.haystack import read_text
from kcache.llm import LLM

PROMPT_TOKENS, NEW_TOKENS, HISTORY = 4096, 48, (1, 2, 4, 8)


def record_selections(llm: LLM, prompt: list[int], layers: int) -> list[list[torch.Tensor]]:
    """Per decode step, per approximate layer: the selected positions [Hkv, n] of the one sequence."""
    steps: list[list[torch.Tensor]] = []
    select = reference.select_tokens

    def spy(p, lengths, cfg):
        idx = select(p, lengths, cfg)
        if not steps or len(steps[-1]) == layers:
            steps.append([])
        steps[-1].append(idx[0, :, 0].clone())  # [Hkv, n] (group selection: one set per KV head)
        return idx

    reference.select_tokens = spy
    try:
        llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS), use_tqdm=False)
    finally:
        reference.select_tokens = select
    return steps


def reuse(steps: list[list[torch.Tensor]], k: int) -> float:
    """Mean over steps >= k, layers and KV heads of |S_t ∩ (S_t-1 ∪ ... ∪ S_t-k)| / |S_t|."""
    shares = []
    for t in range(k, len(steps)):
        for layer, now in enumerate(steps[t]):
            for h in range(now.shape[0]):
                before = torch.cat([steps[t - j][layer][h] for j in range(1, k + 1)])
                shares.append(torch.isin(now[h], before).float().mean().item())
    return sum(shares) / len(shares)


def measure(weights: str, top_n: int) -> dict:
    kwargs = {"load_format": "dummy"} if weights == "random" else {}
    model = "smollm2-135m" if weights == "random" else "smollm2"
    llm = LLM(model, cache=KCacheConfig(top_n=top_n), device="cpu", dtype="float32", max_model_len=8192, **kwargs)
    vocab = llm.engine.model_config.vocab_size
    if llm.tokenizer is not None:
        prompt = llm.tokenizer.encode(read_text("peter_pan"))[:PROMPT_TOKENS]
    else:
        prompt = torch.randint(10, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = record_selections(llm, prompt, llm.engine.model_config.num_layers - llm.engine.cache.exact_layers)
    llm.engine.close()
    row = {"weights": weights, "top_n": top_n, "prompt_tokens": len(prompt), "decode_steps": len(steps),
           **{f"reuse_last_{k}": round(reuse(steps, k), 4) for k in HISTORY}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    rows = [measure(w, n) for w in ("real", "random") for n in (64, 256)]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "selection_reuse_smollm2.json"
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32 on CPU)", "selection": "group",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
