"""`kcache bench`: offline throughput in the manner of `vllm bench throughput`, FullKV and KCache in one engine.

All prompts are submitted at once (`ignore_eos`), so the scheduler admits as many as the memory budgets allow:
the largest concurrent batch is where KCache's halved device footprint shows. Prompts are random token ids, or
windows of a real text (`--dataset`): real weights attend to real text as they do in use, which decides how much
of the attention the top N keep and how often consecutive steps select the same tokens.
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

from kcache.cli import CLIError, add_engine_args, engine_config_from_args, positive_int
from kcache.eval.haystack import BOOKS, read_text

RATIO_KEYS = ("requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
              "full_batch_decode_tokens_per_s", "max_concurrent_seqs", "mean_ttft_s", "mean_tpot_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=positive_int, default=1024, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=128, help="generated tokens per request")
    p.add_argument("--num-prompts", type=positive_int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw each length uniformly from [len*(1-r), len*(1+r)] (0: all equal)")
    p.add_argument("--dataset", default="random",
                   help=f"prompt source: 'random' token ids, a shipped book ({', '.join(BOOKS)}) or a text file, cut "
                        "into windows of --input-len tokens at different offsets (needs the model's tokenizer)")
    p.add_argument("--compare", action="store_true", help="run KCache and FullKV in one process and print the ratio")
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
        return [([rng.randrange(10, vocab) for _ in range(n)], out) for n, out in lengths]
    if tokenizer is None:
        raise CLIError("--dataset with a text needs a model with a tokenizer (dummy weights have none): use --dataset random")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [(window(ids, rng.randrange(len(ids)), n), out) for n, out in lengths]


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


def run_mode(cfg, loaded, args, text: str | None) -> dict:
    from kcache.engine.llm_engine import LLMEngine

    engine = LLMEngine(cfg, loaded)
    try:
        return measure(engine, make_requests(args, text, engine.model_config.vocab_size, engine.tokenizer))
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(engine, requests) -> dict:
    """Submit every request at once, step until all finish; the summary of the run."""
    from kcache.config import SamplingParams

    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for ids, out_len in requests:
        engine.add_request(ids, SamplingParams(max_tokens=out_len, ignore_eos=True))
    finished, steps = [], []
    with tqdm(total=len(requests), desc=f"bench {engine.cfg.cache}", unit="req", file=sys.stderr) as bar:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished.append(out)
                    bar.update(1)
            if engine.last_step is not None:
                steps.append(engine.last_step)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return summarize(engine, finished, steps, time.perf_counter() - t0)


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
        "mean_decode_batch": sum(s.num_tokens for s in decode) / len(decode) if decode else float("nan"),
        "decode_seconds": decode_s,
        "prefill_seconds": sum(s.seconds for s in prefill),
        "prefill_tokens_per_s": _tokens_per_s(prefill),
        "mean_ttft_s": sum(ttft) / len(ttft), "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99),
        "mean_tpot_s": sum(tpot) / len(tpot) if tpot else float("nan"),
        "p50_tpot_s": percentile(tpot, 50), "p99_tpot_s": percentile(tpot, 99),
        "max_concurrent_seqs": engine.scheduler.max_running,
        "preemptions": sum(o.metrics["preemptions"] for o in finished),
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


def print_table(results: dict[str, dict], ratio: dict | None) -> None:
    rows = ["requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "full_batch_decode_tokens_per_s",
            "mean_decode_batch", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s",
            "mean_tpot_s", "p50_tpot_s", "p99_tpot_s", "max_concurrent_seqs", "preemptions", "pool_tokens",
            "device_pool_bytes", "host_pool_bytes", "mass_kept_mean"]
    modes = list(results)
    width = max(map(len, rows)) + 2
    header = f"{'metric':<{width}}" + "".join(f"{m:>16}" for m in modes) + (f"{'kcache/full':>14}" if ratio else "")
    print(header)
    for key in rows:
        line = f"{key:<{width}}" + "".join(f"{_fmt(results[m][key]):>16}" for m in modes)
        if ratio:
            line += f"{_fmt(ratio.get(key)) if key in ratio else '':>14}"
        print(line)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def run(args) -> int:
    from kcache.models import loader

    modes = ["kcache", "full"] if args.compare else [args.cache]
    base = engine_config_from_args(args)
    text = read_dataset(args.dataset)
    # one load shared by both modes; under tensor parallelism each rank loads its own shard instead
    loaded = loader.load(base.model, base.load_format, base.dtype, base.device, base.seed) if base.tensor_parallel_size == 1 else None
    longest = int(args.input_len * (1 + args.random_range_ratio)) + int(args.output_len * (1 + args.random_range_ratio))
    results = {}
    for mode in modes:
        cfg = base.model_copy(update={"cache": mode, "max_model_len": base.max_model_len or longest})
        results[mode] = run_mode(cfg, loaded, args, text)
    ratio = None
    if args.compare:
        ratio = {k: results["kcache"][k] / results["full"][k] for k in RATIO_KEYS if results["full"][k]}
    print_table(results, ratio)
    if args.output_json:
        payload = {"command": args.command_line,
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "machine": machine(), "model": base.model, "results": results, "kcache_over_full": ratio}
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0
