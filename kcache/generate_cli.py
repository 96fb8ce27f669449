"""`kcache generate`: one prompt in, text streamed to stdout, a stats block on stderr."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kcache.cli import CLIError, add_engine_args, engine_config_from_args, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file, or standard input)")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    add_engine_args(p)


def read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise CLIError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read prompt file {args.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError("no prompt: give it as an argument, with --prompt-file, or on standard input")
    return sys.stdin.read()


class TextStreamer:
    """Prints the completion as the engine decodes it (RequestOutput.new_text)."""

    def __init__(self, out):
        self.out = out

    def __call__(self, output) -> None:
        if output.new_text:
            self.out.write(output.new_text)
            self.out.flush()


def run(args) -> int:
    from kcache.config import SamplingParams
    from kcache.engine.llm_engine import LLMEngine
    from kcache.llm import chat_ids

    prompt = read_prompt(args)
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos, stream_text=True)
    engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1))
    if engine.tokenizer is None:
        raise CLIError("this model has no tokenizer files; generate needs text (use `kcache bench` for dummy weights)")
    ids = engine.encode(prompt)
    if args.chat:
        if not getattr(engine.tokenizer, "chat_template", None):
            raise CLIError("this model has no chat template; drop --chat")
        ids = chat_ids(engine.tokenizer, prompt)
    final = {}
    streamer = TextStreamer(sys.stdout)

    def on_output(out):
        streamer(out)
        if out.finished:
            final["out"] = out

    t0 = time.perf_counter()
    engine.add_request(ids, params, on_output=on_output)
    steps = []
    while engine.has_unfinished():
        engine.step()
        if engine.last_step is not None:
            steps.append(engine.last_step)
    sys.stdout.write("\n")
    print_stats(engine, final["out"], steps, time.perf_counter() - t0)
    return 0


def print_stats(engine, out, steps, seconds: float) -> None:
    m, mem = out.metrics, engine.memory()
    prefill = sum(s.seconds for s in steps if s.is_prefill)
    decode_steps = [s for s in steps if not s.is_prefill]
    decode_s = sum(s.seconds for s in decode_steps)
    rows = [
        ("cache", engine.cfg.cache + (_kcache_setting(engine.cfg.kcache) if engine.cfg.cache == "kcache" else "")
         + (f", kv_cache_dtype={engine.cfg.kv_cache_dtype}" if engine.cfg.kv_cache_dtype != "auto" else "")
         + (f" with {engine.cfg.k_exact_channels} exact K channels per head" if engine.cfg.k_exact_channels else "")
         + (f", host_v_dtype={engine.cfg.host_v_dtype}" if engine.cfg.host_v_dtype != "auto" else "")),
        ("prompt tokens", m["prompt_tokens"]),
        ("new tokens", f"{m['completion_tokens']} ({out.finish_reason})"),
        ("prefill seconds", f"{prefill:.3f}"),
        ("decode tokens/s", f"{len(decode_steps) / decode_s:.1f}" if decode_s else "n/a"),
        ("device KV bytes", f"{_held(engine, out, 'device'):,}"),
        ("host V bytes", f"{_held(engine, out, 'host'):,}"),
        ("attention mass kept", f"mean {m['mass_kept_mean']:.4f}, min {m['mass_kept_min']:.4f}"),
        ("V bytes read from host", f"{m['v_bytes_read']:,}"),
        ("pool capacity", f"{mem['pool_tokens']} tokens"),
        ("total seconds", f"{seconds:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("--- kcache stats ---", file=sys.stderr)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=sys.stderr)


def _held(engine, out, where: str) -> int:
    """Bytes this request's cache held at the end (its tokens' rows), not the whole preallocated pool."""
    tokens = len(out.prompt_token_ids) + len(out.token_ids)
    per_token = engine.cache.spec.device_bytes_per_token if where == "device" else engine.cache.spec.host_bytes_per_token
    return tokens * per_token


def _kcache_setting(k) -> str:
    return f" (top_n={k.top_n}, chunk_tokens={k.chunk_tokens}, selection={k.selection}, renormalize={k.renormalize})"
