"""Batch-1 decode: transformers' `generate` (sdpa, its default cache) beside kcache's FullKV and KCache.

What users run today is the reference: the same card, Llama-3.1-8B shapes, random weights, bf16, one prompt of
each context length. Decode tok/s of `generate` = new tokens / (time of a run that generates them - time of a
run that generates one, i.e. the prefill); kcache's = 1 / its measured time per output token.

    python benchmarks/batch1_vs_hf.py                                   # 16k and 32k; JSON to $OUT
    python benchmarks/batch1_vs_hf.py --preset smollm2-135m --device cpu --contexts 256 --new-tokens 8   # smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from kcache import LLM
from kcache.config import KCacheConfig, SamplingParams
from kcache.models.presets import PRESETS


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_decode_tok_s(preset: str, context: int, new: int, device: str, dtype: torch.dtype) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(PRESETS[preset])
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
    config = AutoConfig.for_model(model_type[cfg.pop("architectures")[0]], **cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(10, config.vocab_size, (1, context), device=device)

    def timed(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    prefill = min(timed(1) for _ in range(2))
    total = timed(new + 1)
    del model
    free()
    return new / (total - prefill)


def kcache_decode_tok_s(preset: str, context: int, new: int, device: str, dtype: str, cache) -> float:
    llm = LLM(preset, cache=cache, load_format="dummy", dtype=dtype, device=device, max_model_len=context + new + 1,
              max_num_seqs=1, enforce_eager=device == "cpu")
    prompt = torch.randint(10, llm.engine.model_config.vocab_size, (context,)).tolist()
    params = SamplingParams(max_tokens=new + 1, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    llm.engine.close()
    del llm
    free()
    return 1.0 / out.metrics["tpot_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--top-n", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    rows = []
    for ctx in a.contexts:
        row = {"context": ctx, "new_tokens": a.new_tokens,
               "transformers_generate": hf_decode_tok_s(a.preset, ctx, a.new_tokens, a.device, getattr(torch, a.dtype)),
               "kcache_full": kcache_decode_tok_s(a.preset, ctx, a.new_tokens, a.device, a.dtype, "full"),
               f"kcache_top{a.top_n}": kcache_decode_tok_s(a.preset, ctx, a.new_tokens, a.device, a.dtype,
                                                           KCacheConfig(top_n=a.top_n))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "batch1_vs_hf.json"), "w") as f:
            json.dump({"card": card, "preset": a.preset, "dtype": a.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
