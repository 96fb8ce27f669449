"""`kcache` command line: generate, bench, eval, serve.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`. Errors a
user can fix are printed as one line on stderr with a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "generate": ("kcache.generate_cli", "generate text from a prompt, streaming it to stdout"),
    "bench": ("kcache.bench.throughput", "offline throughput benchmark (FullKV vs KCache)"),
    "eval": ("kcache.eval.runner", "accuracy tasks and fidelity metrics against the full cache"),
    "serve": ("kcache.server.cli", "OpenAI-compatible HTTP server"),
}


class CLIError(Exception):
    """An error to print as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _default(name: str):
    """EngineConfig's default for a field: the one place defaults live."""
    from kcache.config import EngineConfig

    return EngineConfig.model_fields[name].default


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, cache and memory options shared by every subcommand that runs the engine."""
    d = _default
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d("model"), help="'smollm2' (bundled), a Hugging Face folder, a .gguf file, or a preset/config.json with --load-format dummy")
    g.add_argument("--load-format", choices=["auto", "dummy"], default=d("load_format"), help="dummy: random weights of the model's shapes")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d("dtype"), help="auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default=d("device"), help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--max-model-len", type=positive_int, default=d("max_model_len"), help="context length (default: the model's)")
    g.add_argument("--tensor-parallel-size", type=positive_int, default=d("tensor_parallel_size"),
                   help="split the model over N GPUs (N processes; gloo processes on CPU)")
    c = p.add_argument_group("cache")
    c.add_argument("--cache", choices=["kcache", "full"], default=d("cache"), help="kcache: V in host memory, top-N decode; full: ordinary KV cache")
    # KCache options default to None: only those given override KCacheConfig's defaults
    c.add_argument("--top-n", type=positive_int, default=None, help="tokens whose V rows are read per head/group per step")
    c.add_argument("--selection", choices=["group", "head"], default=None, help="one selection per KV group or per query head")
    c.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=None, help="renormalize the kept weights")
    c.add_argument("--dense-layers", type=non_negative_int, default=None, help="first L layers keep a full cache on the device")
    c.add_argument("--sink-tokens", type=non_negative_int, default=None, help="first tokens always selected")
    c.add_argument("--recent-tokens", type=non_negative_int, default=None, help="last tokens always selected")
    c.add_argument("--chunk-tokens", type=positive_int, default=None,
                   help="tokens per selected chunk, read from host memory as one piece (a power of two dividing "
                        "--block-size; 1: token-level selection)")
    c.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default=d("kv_cache_dtype"),
                   help="fp8: K (and FullKV's V) stored as float8 e4m3 with a scale per layer and KV head (calibrated at start)")
    c.add_argument("--fp8-exact-channels", type=non_negative_int, default=d("fp8_exact_channels"),
                   help="with --kv-cache-dtype fp8: K channels per KV head kept exact beside the e4m3 rows (its "
                        "loudest, calibrated at start; at most 16; 0: none)")
    c.add_argument("--host-v-dtype", choices=["auto", "fp8"], default=d("host_v_dtype"),
                   help="KCache's host V pool; fp8: float8 e4m3 rows (half the host memory and bytes read), their "
                        "scales on the device")
    m = p.add_argument_group("memory")
    m.add_argument("--block-size", type=positive_int, default=d("block_size"))
    m.add_argument("--max-num-seqs", type=positive_int, default=d("max_num_seqs"), help="largest decode batch")
    m.add_argument("--max-num-batched-tokens", type=positive_int, default=d("max_num_batched_tokens"), help="prefill tokens per step")
    m.add_argument("--device-memory-fraction", type=float, default=d("device_memory_fraction"), help="share of device memory kcache may use (CUDA)")
    m.add_argument("--device-cache-gb", type=float, default=None, help="explicit device pool size in GiB (per GPU under TP)")
    m.add_argument("--enforce-eager", action="store_true", default=d("enforce_eager"), help="run decode without CUDA graphs")
    m.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d("async_scheduling"),
                   help="launch each decode step before the previous step's tokens reach the host")
    m.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d("enable_prefix_caching"),
                   help="share the cached blocks of prompt prefixes across requests")
    m.add_argument("--host-cache-gb", type=float, default=None, help="host V pool size in GiB, per rank under TP (default: as many tokens as the device pool)")
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("-v", "--verbose", action="store_true", help="log the pool sizes and other engine details")


def kcache_config_from_args(args):
    from kcache.config import KCacheConfig

    names = ("top_n", "selection", "renormalize", "dense_layers", "sink_tokens", "recent_tokens", "chunk_tokens")
    return KCacheConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})


def engine_config_from_args(args, **overrides):
    from kcache.config import EngineConfig

    gib = lambda x: None if x is None else int(x * 2**30)  # noqa: E731
    fields = dict(
        model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, cache=args.cache,
        kv_cache_dtype=args.kv_cache_dtype, fp8_exact_channels=args.fp8_exact_channels, host_v_dtype=args.host_v_dtype,
        kcache=kcache_config_from_args(args), block_size=args.block_size, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        device_memory_fraction=args.device_memory_fraction, device_cache_bytes=gib(args.device_cache_gb),
        host_cache_bytes=gib(args.host_cache_gb), seed=args.seed, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kcache", description="KCache: K cache on the accelerator, V cache in host memory.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("kcache"):
                continue  # a subcommand not built into this version
            raise
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug."""
    from pydantic import ValidationError

    from kcache.cache.kv import KVCacheDtypeError
    from kcache.models.sharding import TensorParallelError
    from kcache.engine.llm_engine import RequestError
    from kcache.engine.memory import CacheTooSmallError, HostMemoryError
    from kcache.models.config import UnsupportedModelError
    from kcache.models.loader import ModelLoadError

    return (CLIError, ValidationError, RequestError, CacheTooSmallError, HostMemoryError, UnsupportedModelError,
            ModelLoadError, TensorParallelError, KVCacheDtypeError, OSError)


def _field_error(err: dict) -> str:
    """'top_n: Input should be greater than or equal to 0'; a whole-config check's message alone."""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{'.'.join(map(str, err['loc']))}: {msg}" if err["loc"] else msg


def describe(e: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(_field_error(err) for err in e.errors())
    return str(e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["kcache", *argv])  # as typed, for results files
    chatty = getattr(args, "verbose", False) or args.command in ("bench", "serve")
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING, format="kcache: %(message)s", stream=sys.stderr)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return module.run(args)
    except user_errors() as e:
        print(f"kcache {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
