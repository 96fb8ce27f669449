"""FullKV and KCache: one interface, two places for V.

Both keep K for every layer in a paged device pool `[layers, blocks, kv_heads, block_size, head_dim]`: each
(block, KV head) holds its tokens contiguously (kcache.attention.reference). FullKV keeps V beside it on the device.
KCache keeps V of the first `dense_layers` layers on the device and the rest in one host allocation of the same
layout (block ids are shared), registered with CUDA once so kernels read it in place, a chunk of consecutive
tokens of one head at a time. The model calls `attend(layer, q, k, v, batch)`; the cache stores the new K and V,
then runs exact prefill or (approximate, for KCache) decode attention.

With `kv_cache_dtype="fp8"` K is stored as float8 e4m3 rows under one float32 scale per (layer, KV head)
(kcache.attention.reference), so a decode step appends a token's rows as they are. The scales and each KV head's
`fp8_exact_channels` channels of largest |q| x |k|, which stay exact in the model's dtype in a pool beside K, come
from a calibration prefill at start (`Fp8Calibration`, kcache.engine.calibration). FullKV stores V in e4m3 the same
way, without exact channels (the FP8 KV cache users already run); KCache keeps its host V in the model's dtype, or
in e4m3 with `host_v_dtype="fp8"`.
Prefill attends with the exact K/V its chunk computed and the dequantised K/V of the earlier chunks (what the cache
holds); decode and teacher-forced rows read everything back from the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch

from kcache.attention import decode_ops, reference
from kcache.cache.stats import DecodeStats
from kcache.config import EngineConfig, KCacheConfig
from kcache.models.config import ModelConfig


@dataclass
class StepBatch:
    """What attention needs to know about one engine step.

    Prefill: T tokens are chunks of `len(chunk_lens)` sequences, chunk i starting at token `chunk_starts[i]` of the
    step and at position `context_lens[i]` of its sequence. Decode: one token per sequence, T = B. Teacher-forced
    scoring (`shared_table`): T consecutive tokens of one sequence, each attending as its own decode step would.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] long: where each new token's K and V go
    block_tables: torch.Tensor  # [B, max_blocks] int32
    lengths: torch.Tensor  # [B] int32: tokens cached per sequence after this step
    chunk_starts: tuple[int, ...] = ()
    chunk_lens: tuple[int, ...] = ()
    context_lens: tuple[int, ...] = ()
    shared_table: bool = False


def host_empty(shape, dtype, device: torch.device) -> torch.Tensor:
    """An exact-size host allocation; registered with CUDA once when the model runs there, so that kernels read
    it in place (pin_memory would round the size up to a power of two)."""
    t = torch.empty(shape, dtype=dtype)
    if device.type == "cuda" and t.numel():
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {t.numel() * t.element_size()} bytes failed: {err}")
    return t


class Fp8Calibration(NamedTuple):
    """What FP8 pools take from the calibration prefill (kcache.engine.calibration), per layer: the scales of K and
    V [layers, Hkv, 1] float32 and the K channels kept exact [layers, Hkv, n] int32 (None: none)."""

    k_scales: torch.Tensor
    v_scales: torch.Tensor
    channels: torch.Tensor | None = None


class KVCacheDtypeError(ValueError):
    """kv_cache_dtype='fp8' asked for where FP8 pools cannot run."""


def check_fp8(device: torch.device) -> None:
    """Raise KVCacheDtypeError unless FP8 pools and the kernels reading them run on `device`."""
    if device.type == "cuda":
        if torch.version.hip:
            raise KVCacheDtypeError("kv_cache_dtype='fp8' stores NVIDIA's float8 e4m3fn, which ROCm GPUs do not "
                                    "convert natively: use kv_cache_dtype='auto'")
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):  # Triton converts float8e4nv from sm_89 (Ada, Hopper) on
            raise KVCacheDtypeError(
                f"kv_cache_dtype='fp8' needs a GPU that converts float8 e4m3 (compute capability 8.9 or newer: Ada, "
                f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}: use kv_cache_dtype='auto'")
    try:
        torch.ones(2, device=device).to(reference.FP8).float()
    except (RuntimeError, TypeError) as e:
        raise KVCacheDtypeError(f"this PyTorch cannot store float8 e4m3 on {device} ({e}): use kv_cache_dtype='auto'") from None


def _check_fp8(device: torch.device, calibration: Fp8Calibration | None) -> None:
    """FP8 pools run on `device` and have their scales."""
    check_fp8(device)
    if calibration is None:
        raise ValueError("FP8 pools need their scales: pass the calibration (kcache.engine.calibration.calibrate)")


@dataclass(frozen=True)
class LayerPools:
    """One layer's pools, [blocks, Hkv, bs, D], the heads' scales [Hkv, 1] of those that are FP8, and the channels FP8
    K keeps exact (if any)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None
    v_scales: torch.Tensor | None
    k_exact: reference.ExactChannels | None = None


@dataclass(frozen=True)
class CacheSpec:
    """Bytes one cached token takes in each pool, over all layers: what sizes the pools and what the caches hold."""

    device_bytes_per_token: int
    host_bytes_per_token: int

    def device_bytes_per_block(self, block_size: int) -> int:
        return self.device_bytes_per_token * block_size

    def host_bytes_per_block(self, block_size: int) -> int:
        return self.host_bytes_per_token * block_size


def cache_spec(model: ModelConfig, dtype: torch.dtype, dense_layers: int | None, kv_cache_dtype: str = "auto",
               host_v_dtype: str = "auto", exact_channels: int = 0) -> CacheSpec:
    """The spec of a cache for `model` (under TP one rank's shard). K of every layer is on the device; so is V of
    every layer for FullKV (dense_layers None), and of the first `dense_layers` layers only for KCache. FP8 rows take
    one byte per element, and FP8 K its `exact_channels` values in `dtype`; FullKV's V is stored as its K is (without
    exact channels), KCache's dense V as `dtype` and its host V as `host_v_dtype` says. The heads' scales are too
    few to count."""
    size = torch.empty((), dtype=dtype).element_size()
    plain = model.num_kv_heads * model.head_dim * size  # one token, one layer
    fp8_row = model.num_kv_heads * model.head_dim
    k_row = fp8_row + model.num_kv_heads * exact_channels * size if kv_cache_dtype == "fp8" else plain
    if dense_layers is None:
        return CacheSpec(model.num_layers * (k_row + (fp8_row if kv_cache_dtype == "fp8" else plain)), 0)
    dense = min(dense_layers, model.num_layers)
    host_layers = model.num_layers - dense
    if host_v_dtype == "fp8":
        return CacheSpec(model.num_layers * k_row + dense * plain, host_layers * fp8_row)
    return CacheSpec(model.num_layers * k_row + dense * plain, host_layers * plain)


class PagedKVCache:
    """Shared storage and prefill; subclasses decide where V lives and how decode reads it.

    The interface the runner and the engine use, the same for both caches: `attend` (per layer, from the model),
    `plan(batch_size)` before a decode or teacher-forced step, `decode_stats(batch_size)` after it (None when
    nothing was approximated), `exact_layers`, `use(kcfg)`, `device_bytes()`, `host_bytes()`, `close()`.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: Literal["auto", "fp8"] = "auto", calibration: Fp8Calibration | None = None):
        """calibration: the scales and exact K channels of the FP8 pools (needed where there are some)."""
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.fp8 = kv_cache_dtype == "fp8"
        if self.fp8:
            _check_fp8(self.device, calibration)
        self.ops = decode_ops(self.device)
        shape = (cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.k = torch.empty(shape, dtype=reference.FP8 if self.fp8 else dtype, device=self.device)
        self.k_scales = self._scales(calibration.k_scales) if self.fp8 else None
        self.k_exact_values = self.k_channels = None  # [layers, blocks, Hkv, bs, n] in dtype; [layers, Hkv, n] int32
        exact_channels = calibration.channels if self.fp8 else None
        if exact_channels is not None:
            if exact_channels.shape != (cfg.num_layers, cfg.num_kv_heads, exact_channels.shape[-1]):
                raise ValueError(f"exact channels {tuple(exact_channels.shape)} do not match the model's "
                                 f"[{cfg.num_layers}, {cfg.num_kv_heads}, n]")
            self.k_channels = exact_channels.to(self.device, torch.int32).contiguous()
            self.k_exact_values = torch.empty(*shape[:-1], exact_channels.shape[-1], dtype=dtype, device=self.device)

    @property
    def num_exact_channels(self) -> int:
        """The K channels per KV head kept exact beside FP8 rows (0: none)."""
        return 0 if self.k_channels is None else self.k_channels.shape[-1]

    def _scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The heads' scales [layers, Hkv, 1] float32 on the device, checked against the model."""
        want = (self.cfg.num_layers, self.cfg.num_kv_heads, 1)
        if tuple(scales.shape) != want:
            raise ValueError(f"FP8 scales {tuple(scales.shape)} do not match the model's {list(want)}")
        return scales.to(self.device, torch.float32).contiguous()

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def v_layer(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def pools(self, layer: int) -> LayerPools:
        """The layer's pools, with the scales pools of those that are FP8 (each subclass adds V's)."""
        exact = None if self.k_channels is None else reference.ExactChannels(self.k_exact_values[layer],
                                                                             self.k_channels[layer])
        return LayerPools(self.k[layer], self.v_layer(layer), None if self.k_scales is None else self.k_scales[layer],
                          None, exact)

    def close(self) -> None:
        """Give back what the pools hold outside PyTorch's allocators (nothing, unless a subclass registers)."""

    spec: CacheSpec  # set by each subclass

    def device_bytes(self) -> int:
        """Bytes of the device pools, allocated once at start."""
        return self.spec.device_bytes_per_token * self.num_tokens

    def host_bytes(self) -> int:
        return self.spec.host_bytes_per_token * self.num_tokens

    @property
    def exact_layers(self) -> int:
        """The first layers that decode exactly (all of them for FullKV)."""
        return self.cfg.num_layers

    def plan(self, batch_size: int) -> None:
        """Prepare the per-step records for a decode or teacher-forced step of batch_size rows."""

    def decode_stats(self, batch_size: int) -> DecodeStats | None:
        """What the last decode or teacher-forced step measured, per row (None: every layer was exact)."""
        return None

    def use(self, kcfg: KCacheConfig) -> None:
        """Decode with another KCache setting from the next step on (KCache only)."""
        raise ValueError("the full cache has no KCache setting: build the engine with cache='kcache'")

    def attend(self, layer: int, q, k, v, batch: StepBatch) -> torch.Tensor:
        """Store this step's K/V [T, Hkv, D], then attend: q [T, H, D] -> [T, H, D]."""
        pools = self.pools(layer)
        # quantised where the pool is FP8; on a GPU into the host pool in place: graph-capturable
        self.ops.store_rows(pools.k, k, batch.slot_mapping, pools.k_scales, pools.k_exact)
        self.ops.store_rows(pools.v, v, batch.slot_mapping, pools.v_scales)
        if batch.is_prefill:
            return self._prefill(q, k, v, pools, batch)
        if batch.shared_table:
            return self._score(layer, q, pools, batch)
        return self._decode(layer, q, pools, batch)

    def _rows(self, pool: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype,
              exact: reference.ExactChannels | None = None):
        """The rows [T, Hkv, D] at slots [T] of a pool anywhere, dequantised in dtype where the pool is FP8 (with its
        exact channels, if any)."""
        rows = self.ops.load_rows(pool, slots)
        if scales is None:
            return rows
        rows = reference.dequantize(rows, scales, dtype)
        if exact is None:
            return rows
        return reference.join_exact(rows, self.ops.load_rows(exact.values, slots), exact.channels)

    def _prefill(self, q, k, v, pools: LayerPools, batch: StepBatch) -> torch.Tensor:
        """Exact attention per sequence over its cached prefix (as stored: dequantised where FP8) and this chunk
        (the K/V it computed)."""
        out = torch.empty_like(q)
        for i, (s, n, ctx) in enumerate(zip(batch.chunk_starts, batch.chunk_lens, batch.context_lens)):
            ks, vs = k[s:s + n], v[s:s + n]
            if ctx:  # earlier chunks: K from the device pool, V read back from wherever it lives
                slots, _ = reference.token_slots(batch.block_tables[i:i + 1], batch.lengths[i:i + 1] - n, self.block_size, ctx)
                ks = torch.cat([self._rows(pools.k, pools.k_scales, slots[0], q.dtype, pools.k_exact), ks])
                vs = torch.cat([self._rows(pools.v, pools.v_scales, slots[0], q.dtype), vs])
            out[s:s + n] = reference.prefill_attention(q[s:s + n], ks, vs, ctx)
        return out

    def _sequence_slots(self, batch: StepBatch) -> torch.Tensor:
        """Slots [1, L] of the one sequence of a teacher-forced batch."""
        return reference.token_slots(batch.block_tables[:1], batch.lengths[-1:], self.block_size)[0]

    def _exact_score(self, q, pools: LayerPools, batch: StepBatch) -> torch.Tensor:
        """Teacher-forced rows with exact attention: causal attention of the rows over the sequence."""
        slots = self._sequence_slots(batch)[0]
        k = self._rows(pools.k, pools.k_scales, slots, q.dtype, pools.k_exact)
        v = self._rows(pools.v, pools.v_scales, slots, q.dtype)
        return reference.prefill_attention(q, k, v, k.shape[0] - q.shape[0])

    def _score(self, layer, q, pools: LayerPools, batch):
        return self._exact_score(q, pools, batch)

    def _decode(self, layer, q, pools: LayerPools, batch):
        raise NotImplementedError


class FullKV(PagedKVCache):
    """The ordinary KV cache: K and V on the model's device."""

    def __init__(self, cfg, num_blocks, block_size, dtype, device, kv_cache_dtype="auto", calibration=None):
        super().__init__(cfg, num_blocks, block_size, dtype, device, kv_cache_dtype, calibration)
        self.v = torch.empty_like(self.k)  # FP8 like K where K is
        self.v_scales = self._scales(calibration.v_scales) if self.fp8 else None
        self.spec = cache_spec(cfg, dtype, None, kv_cache_dtype, exact_channels=self.num_exact_channels)

    def v_layer(self, layer):
        return self.v[layer]

    def pools(self, layer):
        return replace(super().pools(layer), v_scales=None if self.v_scales is None else self.v_scales[layer])

    def _decode(self, layer, q, pools: LayerPools, batch):
        return self.ops.full_decode(q, pools.k, pools.v, batch.block_tables, batch.lengths, k_scales=pools.k_scales,
                                    v_scales=pools.v_scales, k_exact=pools.k_exact)


class KCache(PagedKVCache):
    """K on the device; V in host memory except for the first `dense_layers` layers; top-N decode.
    """

    def __init__(self, cfg, num_blocks, block_size, dtype, device, kcfg: KCacheConfig, kv_cache_dtype="auto",
                 host_v_dtype="auto", calibration=None):
        super().__init__(cfg, num_blocks, block_size, dtype, device, kv_cache_dtype, calibration)
        kcfg.check_block_size(block_size)
        self.kcfg = kcfg  # replaced only through use()
        self.dense = min(kcfg.dense_layers, cfg.num_layers)  # layers whose V pool is on the device
        self.spec = cache_spec(cfg, dtype, kcfg.dense_layers, kv_cache_dtype, host_v_dtype, self.num_exact_channels)
        shape = self.k.shape[1:]
        self.v_dense = torch.empty((self.dense, *shape), dtype=dtype, device=self.device)
        host_fp8 = host_v_dtype == "fp8"
        if host_fp8:
            _check_fp8(self.device, calibration)
        host_layers = cfg.num_layers - self.dense
        self.v_host = host_empty((host_layers, *shape), reference.FP8 if host_fp8 else dtype, self.device)
        self.v_host_scales = self._scales(calibration.v_scales)[self.dense:] if host_fp8 else None
        self._mass_buffer: torch.Tensor | None = None  # [layers, B, H] float32
        self._rows_buffer: torch.Tensor | None = None  # [layers, B] int32: V rows read from the host pool
        self.mass = self.rows = None  # views of the buffers for the step's batch

    def close(self) -> None:
        """Unregister the host pool before its memory goes back to the OS; a stale registration would make a
        later allocation at the same address fail ("resource already mapped")."""
        if self.device.type == "cuda" and self.v_host.numel():
            torch.cuda.synchronize(self.device)
            err = torch.cuda.cudart().cudaHostUnregister(self.v_host.data_ptr())
            if int(err) != 0:
                raise RuntimeError(f"cudaHostUnregister of the host V pool failed: {err}")
        self.v_host = torch.empty(0, dtype=self.dtype)

    def __del__(self):
        if getattr(self, "v_host", None) is not None:
            self.close()

    def v_layer(self, layer):
        return self.v_dense[layer] if layer < self.dense else self.v_host[layer - self.dense]

    def pools(self, layer):
        host_fp8 = layer >= self.dense and self.v_host_scales is not None
        return replace(super().pools(layer), v_scales=self.v_host_scales[layer - self.dense] if host_fp8 else None)

    def plan(self, batch_size: int) -> None:
        """Fresh per-layer records of the mass kept, [layers, B, H] (1.0 for exact layers), and of the V rows read,
        [layers, B]. One buffer each, grown when needed, so that a captured CUDA graph keeps writing where
        decode_stats reads."""
        if self._mass_buffer is None or self._mass_buffer.shape[1] < batch_size:
            self._mass_buffer = torch.ones(self.cfg.num_layers, batch_size, self.cfg.num_heads, device=self.device)
            self._rows_buffer = torch.zeros(self.cfg.num_layers, batch_size, dtype=torch.int32, device=self.device)
        self.mass, self.rows = self._mass_buffer[:, :batch_size], self._rows_buffer[:, :batch_size]
        self.mass.fill_(1.0)
        self.rows.zero_()

    def decode_stats(self, batch_size: int) -> DecodeStats | None:
        exact = self.exact_layers
        if exact >= self.cfg.num_layers:
            return None
        m = self._mass_buffer[exact:, :batch_size]  # [L', B, H]
        row_bytes = self.cfg.head_dim * self.v_host.element_size()
        v_bytes = self._rows_buffer[exact:, :batch_size].sum(0, dtype=torch.float32) * row_bytes
        return DecodeStats(m.sum((0, 2)), m.amin((0, 2)), v_bytes, m.shape[0] * m.shape[2])

    def use(self, kcfg: KCacheConfig) -> None:
        """Decode with `kcfg` from the next step on, over the same pools (the evaluation sweeps its methods over one
        prefilled cache). Layers whose V is on the device must stay exact."""
        if kcfg.dense_layers < self.dense:
            raise ValueError(f"this cache keeps V of {self.dense} layers on the device: dense_layers must be at least "
                             f"{self.dense}, got {kcfg.dense_layers}")
        kcfg.check_block_size(self.block_size)
        self.kcfg = kcfg

    @property
    def exact_layers(self) -> int:
        """The first layers decode exactly (their mass kept is 1 and they read nothing from the host)."""
        return min(self.cfg.num_layers, self.kcfg.dense_layers)

    def _exact(self, layer: int) -> bool:
        return layer < self.exact_layers

    def _decode(self, layer, q, pools: LayerPools, batch):
        if self._exact(layer):
            return self.ops.full_decode(q, pools.k, pools.v, batch.block_tables, batch.lengths, k_scales=pools.k_scales,
                                        v_scales=pools.v_scales, k_exact=pools.k_exact)
        ops = reference if self.kcfg.selection == "random" else self.ops  # the baseline has no kernel
        return ops.kcache_decode(q, pools.k, pools.v, batch.block_tables, batch.lengths, self.kcfg,
                                 k_scales=pools.k_scales, v_scales=pools.v_scales, k_exact=pools.k_exact,
                                 **self._records(layer))[0]

    def _records(self, layer: int) -> dict:
        """Where kcache_decode puts the layer's mass kept [B, H] and V rows read [B] for decode_stats: this step's
        records when the step was planned (written in place, no copies), else nowhere kept."""
        return {} if self.mass is None else dict(mass_out=self.mass[layer], rows_out=self.rows[layer])

    def _score(self, layer, q, pools: LayerPools, batch):
        if self._exact(layer):
            return self._exact_score(q, pools, batch)
        if self.ops is not reference and self.kcfg.selection != "random":  # the kernel the decode steps run
            tables = batch.block_tables[:1].expand(q.shape[0], -1).contiguous()
            return self.ops.kcache_decode(q, pools.k, pools.v, tables, batch.lengths, self.kcfg,
                                          k_scales=pools.k_scales, v_scales=pools.v_scales, k_exact=pools.k_exact,
                                          **self._records(layer))[0]
        slots = self._sequence_slots(batch)  # [1, L]
        # [1, Hkv, L, D]: one copy of K for every row, float32 as the scores are
        k = reference.read_rows(pools.k, slots, pools.k_scales, torch.float32, pools.k_exact).transpose(1, 2)
        valid = torch.arange(slots.shape[1], device=q.device)[None, :] < batch.lengths[:, None]  # [T, L]
        read_v = reference.pool_v_reader(pools.v, slots, q.device, pools.v_scales)
        out, mass, rows = reference.kcache_attend(q, k, valid, batch.lengths, read_v, self.kcfg)
        if self.mass is not None:
            self.mass[layer].copy_(mass)
            self.rows[layer].copy_(rows)
        return out


def make_cache(cfg: EngineConfig, model: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device,
               calibration: Fp8Calibration | None = None) -> PagedKVCache:
    """The cache `cfg.cache` names, for `model` (one rank's shard under TP: its KV heads only); calibration: the FP8
    pools' scales and exact K channels, where there are some."""
    args = (model, num_blocks, cfg.block_size, dtype, device)
    if cfg.cache == "full":
        return FullKV(*args, kv_cache_dtype=cfg.kv_cache_dtype, calibration=calibration)
    return KCache(*args, cfg.kcache, kv_cache_dtype=cfg.kv_cache_dtype, host_v_dtype=cfg.host_v_dtype,
                  calibration=calibration)
