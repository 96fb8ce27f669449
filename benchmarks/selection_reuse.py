"""How many of a decode step's selected chunks the step before had selected too, and could serve from the device.

The host copy of the chosen chunks is the part of KCache's decode step that nothing overlaps (benchmarks/README.md:
2 ms of a 24 ms step at 32k, ~8 ms of ~35 at 8k on the lent H200). If consecutive steps select mostly the same
chunks, keeping the previous step's staged chunks on the device would serve those from HBM instead. A chunk can
be served that way only if its V cannot have changed: it was whole (all its tokens written) at the step before.
Measured on real weights (SmolLM2-135M-Instruct, CPU, greedy decoding after a long book passage) and on the same
shapes with random weights (what the GPU throughput runs use), group selection, chunks of 8 and 16.

For every layer and KV head: reuse = the share of step t's selected chunks that step t-1 selected and that were
whole at t-1; reuse_any = the share selected at t-1 at all.

    python benchmarks/selection_reuse.py [out.json]   # default benchmarks/results/selection_reuse_chunks_smollm2.json
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

PROMPT_TOKENS, NEW_TOKENS = 4096, 48


def record_selections(llm: LLM, prompt: list[int], layers: int) -> list[list[tuple[torch.Tensor, int]]]:
    """Per decode step, per layer: (the selected chunks [Hkv, n] of the one sequence, its length then)."""
    steps: list[list[tuple[torch.Tensor, int]]] = []
    select = reference.select_chunks

    def spy(p, lengths, cfg):
        chunks = select(p, lengths, cfg)
        if p.shape[0] == 1:  # a decode step (prefill attention selects nothing)
            if not steps or len(steps[-1]) == layers:
                steps.append([])
            steps[-1].append((chunks[0, :, 0].clone(), int(lengths[0])))
        return chunks

    reference.select_chunks = spy
    try:
        llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS), use_tqdm=False)
    finally:
        reference.select_chunks = select
    return steps


def reuse(steps: list[list[tuple[torch.Tensor, int]]], chunk_tokens: int) -> tuple[float, float]:
    """(mean share of chunks selected at t-1 and whole then, mean share selected at t-1) over steps, layers, heads."""
    whole, any_ = [], []
    for t in range(1, len(steps)):
        for (now, _), (before, length) in zip(steps[t], steps[t - 1]):
            for h in range(now.shape[0]):
                hit = torch.isin(now[h], before[h])
                any_.append(hit.float().mean().item())
                whole.append((hit & ((now[h] + 1) * chunk_tokens <= length)).float().mean().item())
    return sum(whole) / len(whole), sum(any_) / len(any_)


def measure(weights: str, top_n: int, chunk_tokens: int) -> dict:
    kwargs = {"load_format": "dummy"} if weights == "random" else {}
    model = "smollm2-135m" if weights == "random" else "smollm2"
    llm = LLM(model, cache=KCacheConfig(top_n=top_n, chunk_tokens=chunk_tokens), device="cpu", dtype="float32",
              max_model_len=8192, **kwargs)
    vocab = llm.engine.model_config.vocab_size
    if llm.tokenizer is not None:
        prompt = llm.tokenizer.encode(read_text("peter_pan"))[:PROMPT_TOKENS]
    else:
        prompt = torch.randint(10, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = record_selections(llm, prompt, llm.engine.model_config.num_layers - llm.engine.cache.exact_layers)
    llm.engine.close()
    served, selected_before = reuse(steps, chunk_tokens)
    row = {"weights": weights, "top_n": top_n, "chunk_tokens": chunk_tokens, "prompt_tokens": len(prompt),
           "decode_steps": len(steps), "reuse": round(served, 4), "reuse_any": round(selected_before, 4)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    rows = [measure(w, n, c) for w in ("real", "random") for n in (64, 256) for c in (8, 16)]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else (
        Path(__file__).parent / "results" / "selection_reuse_chunks_smollm2.json")
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32 on CPU)", "selection": "group",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
