"""Tensor parallelism on GPUs: TP=2 greedy output against TP=1 on the same machine, eager and with CUDA graphs.

Llama-3.1-8B shapes with random weights (every rank draws the same full weights from the seed, then keeps its
shard). float32: random weights give nearly flat logits, and bf16's rounding of sums taken in another order
under TP flips their argmax within a few tokens. Reports, per prompt, how many leading tokens equal TP=1's.

    python benchmarks/tp_check.py [TP [eager|graphs ...]]     # default: 2 graphs; JSON to $OUT
"""
from __future__ import annotations

import gc
import json
import os
import random
import sys
import time

import torch

from kcache import LLM
from kcache.config import SamplingParams

PROMPT_LEN, NEW_TOKENS, PROMPTS = 2048, 16, 4


def run(tp: int, cache: str, eager: bool, prompts) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    llm = LLM("llama-3.1-8b", cache=cache, load_format="dummy", dtype="float32", tensor_parallel_size=tp,
              max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=8, enforce_eager=eager, device_memory_fraction=0.8,
              host_cache_bytes=8 << 30)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    llm.engine.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.token_ids for o in outs], time.perf_counter() - t0


def agree(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Leading tokens that agree, per prompt."""
    return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]


def main(tp: int, modes: list[str]) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 128000) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]
    rows = []
    for cache in ("full", "kcache"):
        base, _ = run(1, cache, True, prompts)
        for eager in [m == "eager" for m in modes]:
            got, seconds = run(tp, cache, eager, prompts)
            rows.append({"cache": cache, "tp": tp, "eager": eager, "seconds": round(seconds, 1),
                         "leading_tokens_equal_to_tp1": agree(got, base), "of": NEW_TOKENS})
            print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"tp{tp}_check.json"), "w") as f:
            json.dump({"cards": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2:] or ["graphs"])
