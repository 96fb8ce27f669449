"""The compact specs of `kcache eval`: methods and tasks as `kind[:N][:key=value]...` strings.

Methods (N is the V budget: rows read per KV head, or per query head with `selection=head`, at each step):
  full[:kv_cache_dtype=fp8]          the exact cache (every layer decodes exactly, on the same pools); with fp8 the
                                     FP8 FullKV (K and V in float8 e4m3), on pools of its own
  kcache[:N][:key=value...]          KCacheConfig fields, e.g. kcache:64:renormalize=false:dense_layers=2, and
                                     kv_cache_dtype=fp8 (K in float8 e4m3) or host_v_dtype=fp8 (the host V in float8
                                     e4m3), each on pools of its own
  With kv_cache_dtype=fp8 both take fp8_exact_channels=n (the K channels per head kept exact; the engine's default
  otherwise).
  streaming:N[:sink_tokens=S]        StreamingLLM-style: S first tokens (4) plus the N-S most recent ones
  random:N[:key=value...]            N random tokens per KV head, renormalised (a baseline)
Tasks: a name of kcache.eval.tasks.TASKS with its options, e.g. multikey:keys=2 or multihop:hops=2:chains=1.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from pydantic import ValidationError

from kcache.config import KCacheConfig
from kcache.eval.tasks import TASKS

KINDS = ("full", "kcache", "streaming", "random")
STREAMING_SINKS = 4  # the attention sinks of StreamingLLM (Xiao et al., 2023)


KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class Method:
    name: str  # the spec as written
    family: str  # the spec without its budget: one curve of the plots against N ("full" for the full cache)
    kcache: KCacheConfig | None  # None: the full cache
    kv_cache_dtype: str = "auto"
    host_v_dtype: str = "auto"
    fp8_exact_channels: int | None = None  # None: the engine's default

    @property
    def budget(self) -> int | None:
        return None if self.kcache is None else self.kcache.budget

    @property
    def engine(self) -> tuple[str, str, str, int | None]:
        """(cache, kv_cache_dtype, host_v_dtype, fp8_exact_channels) of the engine whose prefilled pools this method
        decodes from. The full cache in the model's dtype shares KCache's (its exact layers compute what FullKV
        does); in FP8 it is FullKV's own, whose V is FP8 too, as users run it."""
        full_fp8 = self.kcache is None and self.kv_cache_dtype != "auto"
        return ("full" if full_fp8 else "kcache", self.kv_cache_dtype, self.host_v_dtype, self.fp8_exact_channels)

    def config(self, num_layers: int) -> KCacheConfig:
        """The cache setting to decode with; the full cache is KCache with every layer exact."""
        return self.kcache if self.kcache is not None else KCacheConfig(dense_layers=num_layers)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the spec as written, e.g. "multikey:keys=2"
    task: str  # the generator in TASKS
    options: dict


def _value(text: str):
    """'64' -> 64, '0.5' -> 0.5, 'false' -> False, anything else stays a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split(spec: str) -> tuple[str, int | None, dict, list[str]]:
    """'kcache:64:renormalize=false' -> ('kcache', 64, {'renormalize': False}, ['renormalize=false'])."""
    kind, *parts = spec.strip().split(":")
    n, options, raw = None, {}, []
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if i or not part.isdigit():
                raise ValueError(f"{spec!r}: {part!r} is neither the budget (a number right after the kind) nor key=value")
            n = int(part)
            continue
        options[key] = _value(value)
        raw.append(part)
    return kind, n, options, raw


def parse_method(spec: str) -> Method:
    kind, n, options, raw = _split(spec)
    if kind not in KINDS:
        raise ValueError(f"{spec!r}: unknown method {kind!r} (use one of {', '.join(KINDS)})")
    dtypes = {}
    for key in ("kv_cache_dtype", "host_v_dtype"):
        dtypes[key] = options.pop(key, "auto")
        if dtypes[key] not in KV_CACHE_DTYPES:
            raise ValueError(f"{spec!r}: {key} must be one of {', '.join(KV_CACHE_DTYPES)}, got {dtypes[key]!r}")
    exact = options.pop("fp8_exact_channels", None)
    if exact is not None and (dtypes["kv_cache_dtype"] != "fp8" or not isinstance(exact, int) or not 0 <= exact <= 16):
        raise ValueError(f"{spec!r}: fp8_exact_channels takes a number from 0 to 16, with kv_cache_dtype=fp8")
    if kind == "full":
        if n is not None or options or dtypes["host_v_dtype"] != "auto":
            raise ValueError(f"{spec!r}: the full cache takes only kv_cache_dtype (and fp8_exact_channels)")
        return Method(spec.strip(), ":".join(["full"] + raw), None, dtypes["kv_cache_dtype"], fp8_exact_channels=exact)
    fields = {}
    if kind == "streaming":
        if n is None:
            raise ValueError(f"{spec!r}: give streaming its budget, e.g. streaming:64")
        sinks = options.pop("sink_tokens", STREAMING_SINKS)
        fields = dict(top_n=0, sink_tokens=sinks, recent_tokens=n - sinks, renormalize=True, chunk_tokens=1)
    elif n is not None:
        fields["top_n"] = n
    if kind == "random":
        fields.update(selection="random", chunk_tokens=1)  # the baselines pick tokens, unless told otherwise
    fields.update(options)
    try:
        cfg = KCacheConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{spec!r}: {'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}") from None
    family = ":".join([kind] + [p for p in raw if not p.startswith("top_n=")])
    return Method(spec.strip(), family, cfg, **dtypes, fp8_exact_channels=exact)


def parse_task(spec: str) -> TaskSpec:
    task, n, options, _ = _split(spec)
    if task not in TASKS:
        raise ValueError(f"{spec!r}: unknown task {task!r} (use one of {', '.join(TASKS)})")
    allowed = set(inspect.signature(TASKS[task]).parameters) - {"tokenizer", "length", "depth", "seed", "haystack_file"}
    unknown = set(options) - allowed
    if n is not None or unknown:
        raise ValueError(f"{spec!r}: {task} takes only {', '.join(sorted(allowed)) or 'no options'}")
    return TaskSpec(spec.strip(), task, options)
