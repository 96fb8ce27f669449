"""Validated configuration objects: the one place where defaults live."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


MAX_CHUNK_TOKENS = 64  # the decode kernels' K tile: a chunk never spans two tiles


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def updated(self, **changes):
        """A copy with `changes`, validated as a new config is (pydantic's model_copy skips validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})


class KCacheConfig(_Frozen):
    """How KCache approximates decode attention.

    Each decode step scores the query against every cached K exactly, ranks chunks of `chunk_tokens` consecutive
    tokens by their softmax mass, keeps the best chunks up to `top_n` tokens (plus the chunks holding the
    `sink_tokens` first and `recent_tokens` last tokens, always), reads only their V rows from host memory, one
    contiguous read per chunk, and returns their weighted sum. Defaults come from docs/accuracy: renormalised group
    selection keeps every retrieval item the full cache solves at any N and chunk size tested; N=256 is the knee of
    the fidelity curve, and chunks of 8 are 2 KiB reads at head_dim 128 in bf16 (PCIe speed on the lent GPUs) for
    about a point more perplexity than token-level selection at that N on SmolLM2.
    """

    top_n: int = Field(256, ge=0, description="tokens selected per head (or KV group) at each decode step")
    selection: Literal["group", "head", "random"] = Field(
        "group",
        description="group: one set per KV head from its query group's summed weights; head: one set per query head; "
        "random: top_n random tokens per KV head (a baseline, not a method to use)",
    )
    renormalize: bool = Field(True, description="divide the kept weights by their sum (else drop the missing mass)")
    dense_layers: int = Field(0, ge=0, description="the first L layers keep a full KV cache on the device")
    sink_tokens: int = Field(0, ge=0, description="first tokens always selected, on top of top_n")
    recent_tokens: int = Field(0, ge=0, description="last tokens always selected, on top of top_n")
    chunk_tokens: int = Field(
        8, ge=1, le=MAX_CHUNK_TOKENS,
        description="the unit of selection and of host reads: chunks of this many consecutive tokens of one KV head "
        "rank by their exact attention mass, and each selected chunk is read as one contiguous piece (a power of "
        "two dividing block_size; 1: token-level selection, the paper's method)",
    )

    @model_validator(mode="after")
    def _check(self) -> "KCacheConfig":
        if self.top_n + self.sink_tokens + self.recent_tokens < 1:
            raise ValueError("top_n + sink_tokens + recent_tokens must be at least 1")
        if self.chunk_tokens & (self.chunk_tokens - 1):
            raise ValueError(f"chunk_tokens must be a power of two, got {self.chunk_tokens}")
        return self

    def check_block_size(self, block_size: int) -> None:
        """A chunk is read from one block: block_size must be a multiple of chunk_tokens."""
        if block_size % self.chunk_tokens:
            raise ValueError(f"block_size ({block_size}) must be a multiple of chunk_tokens ({self.chunk_tokens}): a "
                             "chunk is read from one block")

    @property
    def chunk_budget(self) -> int:
        """Chunks selected per head (or KV group) per step: top_n rounded up to whole chunks, plus the chunks that
        can hold the sinks and the recent tokens (r consecutive tokens span at most (r + 2c - 2) // c chunks)."""
        c = self.chunk_tokens
        recent = (self.recent_tokens + 2 * c - 2) // c if self.recent_tokens else 0
        return -(-self.top_n // c) + -(-self.sink_tokens // c) + recent

    @property
    def budget(self) -> int:
        """V rows read per head (or group) per step, at most: the selected chunks' tokens."""
        return self.chunk_budget * self.chunk_tokens

    @property
    def selection_width(self) -> int:
        """The chunk budget rounded up to a power of two, at least 16: the width of a selection in the kernels."""
        return max(16, 1 << (self.chunk_budget - 1).bit_length())


class SamplingParams(_Frozen):
    """Per-request sampling and stop conditions (greedy by default)."""

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream_text: bool = Field(False, description="decode each step's new text into RequestOutput.new_text (streaming)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class EngineConfig(_Frozen):
    """Engine and memory settings shared by generate, bench and serve."""

    model: str = "smollm2"
    load_format: Literal["auto", "dummy"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    cache: Literal["kcache", "full"] = "kcache"
    kcache: KCacheConfig = KCacheConfig()
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="auto: the cache in the model's dtype; fp8: K on the device as float8 e4m3 with one float32 "
        "scale per layer and KV head (set by one calibration prefill at start), and fp8_exact_channels channels kept "
        "exact (FullKV stores V in e4m3 the same way; KCache keeps its host V as host_v_dtype says)",
    )
    fp8_exact_channels: int = Field(
        4, ge=0, le=16,
        description="with kv_cache_dtype=fp8: each KV head's n K channels of largest mean |q| x mean |k| (found by one "
        "calibration prefill at start) are kept exact in the model's dtype beside the e4m3 rows, which carry most of "
        "FP8 K's rounding error (docs/accuracy); 0: every channel in e4m3 (then the loud channels set each head's "
        "scale: KL 2.6x the default's on SmolLM2)",
    )
    host_v_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="KCache's host V pool: auto: the model's dtype; fp8: float8 e4m3 with one float32 scale per layer "
        "and KV head (calibrated at start): half the host memory and half the bytes of each read",
    )
    block_size: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=1, description="defaults to the model's context length")
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16, description="prefill tokens per step (chunked prefill)")
    device_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    device_cache_bytes: int | None = Field(None, ge=1, description="explicit device pool size; overrides the fraction")
    host_cache_bytes: int | None = Field(None, ge=1, description="host V pool size; default: as many tokens as the device pool")
    seed: int = 0
    enforce_eager: bool = Field(False, description="never capture CUDA graphs for decode")
    async_scheduling: bool = Field(
        True, description="launch each decode step before the previous one's tokens reach the host, so the device "
        "never waits on the host's bookkeeping (single GPU; a row of a sequence that stops by EOS is computed for nothing)")
    enable_prefix_caching: bool = Field(
        True, description="requests that share a prompt prefix share its cached blocks (device K, host V) and "
        "prefill only the rest")
    tensor_parallel_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.max_model_len is not None and self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.cache == "kcache":
            self.kcache.check_block_size(self.block_size)
        elif self.host_v_dtype != "auto":
            raise ValueError("host_v_dtype is KCache's host V pool; the full cache has none (use kv_cache_dtype)")
        return self

    @property
    def fp8_pools(self) -> bool:
        """Whether some pool is FP8 (then the engine calibrates the scales at start)."""
        return self.kv_cache_dtype == "fp8" or self.host_v_dtype == "fp8"

    @property
    def k_exact_channels(self) -> int:
        """K channels per KV head kept exact: fp8_exact_channels with FP8 K, else 0 (every channel is exact)."""
        return self.fp8_exact_channels if self.kv_cache_dtype == "fp8" else 0
