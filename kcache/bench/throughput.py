"""`kcache bench`: offline throughput in the manner of `vllm bench throughput`, FullKV and KCache in one engine.

All prompts are submitted at once (`ignore_eos`), so the scheduler admits as many as the memory budgets allow:
the largest concurrent batch is where KCache's halved device footprint shows. Prompts are random token ids, or
windows of a real text (`--dataset`): real weights attend to real text as they do in use, which decides how much
of the attention the top N keep and how often consecutive steps select the same tokens.

`--shared-prefix-len P` models questions over one long document: every prompt starts with the same P tokens and
goes on with its own --input-len tokens; the first request runs alone until its first token, then the others
arrive. `--compare-prefix-caching` runs each cache mode with the prefix cache on and off, for their TTFT (the
mean over the requests after the first is the number prefix caching changes), for throughput without sharing, and
for whether each request's greedy output came out the same (`same_greedy_outputs`, the share of requests).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kcache.cli import CLIError, add_engine_args, engine_config_from_args, non_negative_int, positive_int
from kcache.eval.haystack import BOOKS, read_text

RATIO_KEYS = ("requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
              "full_batch_decode_tokens_per_s", "max_concurrent_seqs", "mean_ttft_s", "mean_ttft_after_first_s",
              "mean_tpot_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=positive_int, default=1024, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=128, help="generated tokens per request")
    p.add_argument("--num-prompts", type=positive_int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw each length uniformly from [len*(1-r), len*(1+r)] (0: all equal)")
    p.add_argument("--dataset", default="random",
                   help=f"prompt source: 'random' token ids, a shipped book ({', '.join(BOOKS)}) or a text file, cut "
                        "into windows of --input-len tokens at different offsets (needs the model's tokenizer)")
    p.add_argument("--shared-prefix-len", type=non_negative_int, default=0,
                   help="tokens every prompt starts with (one document, many questions); the first request runs "
                        "alone until its first token, then the others arrive")
    p.add_argument("--compare", action="store_true", help="run KCache and FullKV in one process and print the ratio")
    p.add_argument("--compare-prefix-caching", action="store_true",
                   help="run each cache mode with the prefix cache on and off and print the ratio")
    p.add_argument("--output-json", type=Path, help="write the results here")
    add_engine_args(p)


def make_requests(args, text: str | None, vocab: int, tokenizer) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request, the same for every mode (seeded); text: the dataset's, or None."""
    rng = random.Random(args.seed)
    r = args.random_range_ratio

    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - r)), int(n * (1 + r)))) if r else n

    lengths = [(draw(args.input_len), draw(args.output_len)) for _ in range(args.num_prompts)]
    if text is None:
        tokens = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    elif tokenizer is None:
        raise CLIError("--dataset with a text needs a model with a tokenizer (dummy weights have none): use --dataset random")
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = lambda n: window(ids, rng.randrange(len(ids)), n)  # noqa: E731
    prefix = tokens(args.shared_prefix_len) if args.shared_prefix_len else []
    return [(prefix + tokens(n), out) for n, out in lengths]


def read_dataset(source: str) -> str | None:
    """The text prompts are cut from (None: random token ids); checked before any model loads."""
    if source == "random":
        return None
    try:
        text = read_text(source)
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--dataset: cannot read {source!r} ({getattr(e, 'strerror', None) or e}): give 'random', a "
                       f"shipped book ({', '.join(BOOKS)}) or a text file") from None
    if not text.strip():
        raise CLIError(f"--dataset: {source!r} has no text")
    return text


def window(ids: list[int], start: int, n: int) -> list[int]:
    """n tokens of ids from start, wrapping around (a text shorter than a prompt repeats)."""
    return [ids[(start + i) % len(ids)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_mode(cfg, loaded, args, text: str | None) -> tuple[dict, list[list[int]]]:
    """One engine's run: its summary and each request's output tokens, in submission order."""
    from kcache.engine.llm_engine import LLMEngine

    engine = LLMEngine(cfg, loaded)
    try:
        requests = make_requests(args, text, engine.model_config.vocab_size, engine.tokenizer)
        return measure(engine, requests, first_alone=args.shared_prefix_len > 0)
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(engine, requests, first_alone: bool = False) -> tuple[dict, list[list[int]]]:
    """Submit every request at once (or the first alone, the others once it has its first token), step until all
    finish; the summary of the run and the output tokens of each request, in submission order."""
    from kcache.config import SamplingParams

    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pending = [(ids, SamplingParams(max_tokens=out_len, ignore_eos=True)) for ids, out_len in requests]
    order = [engine.add_request(ids, params) for ids, params in (pending[:1] if first_alone else pending)]
    pending = pending[1:] if first_alone else []
    finished, steps = [], []
    with tqdm(total=len(requests), desc=f"bench {engine.cfg.cache}", unit="req", file=sys.stderr) as bar:
        while engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                if out.finished:
                    finished.append(out)
                    bar.update(1)
            if engine.last_step is not None:
                steps.append(engine.last_step)
            if pending and outs:  # the first request has its first token
                order += [engine.add_request(ids, params) for ids, params in pending]
                pending = []
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    rank = {rid: i for i, rid in enumerate(order)}
    finished.sort(key=lambda o: rank[o.request_id])  # in submission order: the first request's TTFT comes first
    return summarize(engine, finished, steps, time.perf_counter() - t0), [list(o.token_ids) for o in finished]


def summarize(engine, finished, steps, elapsed: float) -> dict:
    """The run's numbers from its finished outputs and its engine steps (StepRecords)."""
    prefill = [s for s in steps if s.is_prefill]
    decode = [s for s in steps if not s.is_prefill]
    decode_s = sum(s.seconds for s in decode)
    # Steady state: the decode steps that ran the largest batch (ramp-up and draining steps run fewer sequences).
    full_batch = [s for s in decode if s.num_tokens == engine.scheduler.max_running]
    out_tokens = sum(len(o.token_ids) for o in finished)
    ttft = [o.metrics["ttft_s"] for o in finished if o.metrics["ttft_s"] is not None]
    tpot = [o.metrics["tpot_s"] for o in finished if o.metrics["tpot_s"] is not None]
    mem = engine.memory()
    return {
        "cache": engine.cfg.cache,
        "kcache": engine.cfg.kcache.model_dump() if engine.cfg.cache == "kcache" else None,
        "requests": len(finished),
        "elapsed_s": elapsed,
        "requests_per_s": len(finished) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "decode_tokens_per_s": _tokens_per_s(decode),
        "full_batch_decode_tokens_per_s": _tokens_per_s(full_batch),
        "full_batch_decode_steps": len(full_batch),
        "decode_steps_overlapped": sum(s.overlapped for s in decode),  # the next step was launched before their tokens were fetched
        "mean_decode_batch": sum(s.num_tokens for s in decode) / len(decode) if decode else float("nan"),
        "decode_seconds": decode_s,
        "prefill_seconds": sum(s.seconds for s in prefill),
        "prefill_tokens": sum(s.num_tokens for s in prefill),
        "prefill_tokens_per_s": _tokens_per_s(prefill),
        "mean_ttft_s": sum(ttft) / len(ttft), "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99),
        "mean_ttft_after_first_s": sum(ttft[1:]) / len(ttft[1:]) if len(ttft) > 1 else float("nan"),
        "mean_tpot_s": sum(tpot) / len(tpot) if tpot else float("nan"),
        "p50_tpot_s": percentile(tpot, 50), "p99_tpot_s": percentile(tpot, 99),
        "max_concurrent_seqs": engine.scheduler.max_running,
        "preemptions": sum(o.metrics["preemptions"] for o in finished),
        "prefix_cached_tokens_per_request": sum(o.metrics["cached_prompt_tokens"] for o in finished) / len(finished),
        "pool_tokens": mem["pool_tokens"],
        "device_pool_bytes": mem["device_pool_bytes"],
        "host_pool_bytes": mem["host_pool_bytes"],
        "device_peak_bytes": torch.cuda.max_memory_allocated() if engine.device.type == "cuda" else None,
        "mass_kept_mean": sum(o.metrics["mass_kept_mean"] for o in finished) / len(finished),
    }


def _tokens_per_s(steps) -> float:
    seconds = sum(s.seconds for s in steps)
    return sum(s.num_tokens for s in steps) / seconds if seconds else float("nan")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name()
        info["card_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def print_table(results: dict[str, dict], ratios: dict[str, dict]) -> None:
    """One column per run, then one per ratio (named 'a/b')."""
    rows = ["requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "full_batch_decode_tokens_per_s", "decode_steps_overlapped",
            "mean_decode_batch", "mean_ttft_s", "mean_ttft_after_first_s", "p50_ttft_s", "p99_ttft_s",
            "mean_tpot_s", "p50_tpot_s", "p99_tpot_s", "max_concurrent_seqs", "preemptions",
            "prefill_tokens", "prefix_cached_tokens_per_request", "pool_tokens", "device_pool_bytes", "host_pool_bytes", "mass_kept_mean"]
    width = max(map(len, rows)) + 2
    columns = {name: max(16, len(name) + 2) for name in [*results, *ratios]}
    print(f"{'metric':<{width}}" + "".join(f"{name:>{w}}" for name, w in columns.items()))
    for key in rows:
        cells = [_fmt(results[m][key]) for m in results] + [_fmt(r[key]) if key in r else "" for r in ratios.values()]
        print(f"{key:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, columns.values())))


def _ratio(a: dict, b: dict) -> dict:
    return {k: a[k] / b[k] for k in RATIO_KEYS if b[k]}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def run(args) -> int:
    from kcache.models import loader

    caches = ["kcache", "full"] if args.compare else [args.cache]
    base = engine_config_from_args(args)
    prefix = [True, False] if args.compare_prefix_caching else [base.enable_prefix_caching]
    text = read_dataset(args.dataset)
    # one load shared by both modes; under tensor parallelism each rank loads its own shard instead
    loaded = loader.load(base.model, base.load_format, base.dtype, base.device, base.seed) if base.tensor_parallel_size == 1 else None
    longest = (args.shared_prefix_len + int(args.input_len * (1 + args.random_range_ratio))
               + int(args.output_len * (1 + args.random_range_ratio)))
    def name(cache: str, cached: bool) -> str:
        return f"{cache}/{'prefix' if cached else 'no-prefix'}" if len(prefix) > 1 else cache

    results, outputs = {}, {}
    for cache in caches:
        for cached in prefix:
            # --host-v-dtype is KCache's host pool: the full cache of a --compare run has none
            cfg = base.updated(cache=cache, enable_prefix_caching=cached, max_model_len=base.max_model_len or longest,
                               host_v_dtype=base.host_v_dtype if cache == "kcache" else "auto")
            results[name(cache, cached)], outputs[name(cache, cached)] = run_mode(cfg, loaded, args, text)
    ratios = {}
    if args.compare:
        for cached in prefix:
            a, b = name("kcache", cached), name("full", cached)
            ratios[f"{a}/{b}"] = _ratio(results[a], results[b])
    if args.compare_prefix_caching:
        for cache in caches:
            on, off = outputs[name(cache, True)], outputs[name(cache, False)]
            ratios[f"{cache}: prefix/none"] = {**_ratio(results[name(cache, True)], results[name(cache, False)]),
                                               "same_greedy_outputs": sum(a == b for a, b in zip(on, off)) / len(on)}
    print_table(results, ratios)
    for key, r in ratios.items():
        if "same_greedy_outputs" in r:
            print(f"{key}: same greedy outputs with and without the prefix cache for "
                  f"{r['same_greedy_outputs']:.0%} of the requests")
    if args.output_json:
        payload = {"command": args.command_line,
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "machine": machine(), "model": base.model, "results": results, "ratios": ratios,
                   "kcache_over_full": ratios.get("kcache/full")}
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0
