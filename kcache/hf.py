"""KCache as a drop-in for Hugging Face transformers: a cache and an attention implementation for `generate`.

    import kcache.hf                      # registers attn_implementation="kcache"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kcache")
    out = model.generate(**inputs, past_key_values=kcache.hf.KCacheHF(model.config, top_n=64))

How it plugs in: the model calls `cache.update(k, v, layer)` and then the attention function with what `update`
returned. `KCacheLayer.update` hands back the new K and a `_Chunk` (the layer and the new V) instead of the whole
cache, and `kcache_attention` stores the chunk and attends. Storing happens in the attention function because only
it sees the mask, and the mask says which new tokens are padding.

Each layer stores its tokens compacted: sequence b holds `lengths[b]` tokens at positions 0..lengths[b]-1 with
padding dropped, which is the layout `kcache_attend` expects (sink tokens are a sequence's first real tokens, recent
tokens its last ones). K `[B, Hkv, cap, D]` stays on the model's device, V of the same layout (the engine's pool
layout, with one block per sequence) lives in host memory (pinned when the device is CUDA), except in the first
`dense_layers` layers, which keep V on the device.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kcache.attention.reference import kcache_attend, pool_v_reader
from kcache.cache.stats import CacheStats
from kcache.config import KCacheConfig

# 5.4 is the first release whose cache layers take `get_mask_sizes(query_length)` and `update(k, v, *args, **kwargs)`
# and whose Llama/Qwen2/Mistral no longer thread `cache_position`; 5.40 drops the `past_key_values=` forward argument.
SUPPORTED_TRANSFORMERS = (Version("5.4"), Version("5.40"))
SUPPORTED_MODELS = ("llama", "qwen2", "mistral")


@functools.cache
def check_transformers_version(version: str) -> None:
    """Raise a ValueError unless transformers `version` lies in the supported window (checked once per version)."""
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(version) < high:
        raise ValueError(f"kcache.hf supports transformers >={low},<{high}; found transformers {version}")


def check_model(config) -> None:
    """Raise a ValueError for transformers versions or architectures kcache.hf does not support."""
    check_transformers_version(transformers.__version__)
    if config.model_type not in SUPPORTED_MODELS:
        raise ValueError(
            f"kcache.hf supports {', '.join(SUPPORTED_MODELS)} models; got model_type {config.model_type!r}"
        )


class _Chunk(NamedTuple):
    """What `update` returns as the value states: this step's V and the layer that will store it."""

    layer: "KCacheLayer"
    values: torch.Tensor  # [B, Hkv, q, D]


def _grown(t: torch.Tensor, dim: int, size: int, pin: bool = False) -> torch.Tensor:
    """A zeroed copy of t with `dim` grown to size. Zeros, not garbage: a short sequence of a batch may select rows
    past its end (with weight 0), and 0 * NaN would poison the sum."""
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype, device=t.device, pin_memory=pin)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class KCacheLayer(CacheLayerMixin):
    """One decoder layer: K on the model's device, V in host memory (or on the device for a dense layer)."""

    is_compileable = False  # the decode step gathers rows from host memory, which CUDA graphs cannot capture
    is_sliding = False

    def __init__(self, cfg: KCacheConfig, stats: CacheStats, dense: bool):
        super().__init__()
        self.cfg, self.stats, self.dense = cfg, stats, dense
        self.seen = 0  # tokens the model has passed, padding included: the mask's frame

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        self.device = key_states.device
        host = self.device if self.dense else torch.device("cpu")
        self.pin = host.type == "cpu" and self.device.type == "cuda"  # pinned, so row reads can be async DMA
        self.keys = key_states.new_zeros(B, Hkv, 0, D)
        self.values = torch.zeros(B, Hkv, 0, D, dtype=value_states.dtype, device=host)
        self.lengths = torch.zeros(B, dtype=torch.long, device=self.device)  # real tokens stored per sequence
        self.max_len = 0
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[2]
        return key_states, _Chunk(self, value_states)

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store the chunk's real tokens after each sequence's last one: k, v [B, Hkv, q, D], valid [B, q]."""
        dest = self.lengths[:, None] + valid.cumsum(1) - 1  # [B, q] compacted position of each new token
        self.lengths = self.lengths + valid.sum(1)
        self.max_len = int(self.lengths.max())
        self._reserve(self.max_len)
        b, t = valid.nonzero(as_tuple=True)  # the real tokens
        pos = dest[b, t]
        self.keys[b, :, pos] = k[b, :, t]
        self.values[b.to(self.values.device), :, pos.to(self.values.device)] = v[b, :, t].to(self.values.device)

    def _reserve(self, n: int) -> None:
        cap = self.keys.shape[2]
        if n > cap:  # growing by a quarter keeps copies amortised O(1) per token and the slack under 25%
            cap = max(n, cap + max(256, cap // 4))
            self.keys = _grown(self.keys, 2, cap)
            self.values = _grown(self.values, 2, cap, self.pin)

    def past(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first n positions, V brought back in bulk: k, v [B, Hkv, n, D] and valid [B, n] on the device."""
        valid = torch.arange(n, device=self.device) < self.lengths[:, None]
        v = self.values[:, :, :n].to(self.device)  # blocking: append overwrites rows past lengths
        return self.keys[:, :, :n], v, valid

    def decode(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Top-N attention of one query per sequence over everything stored: q [B, H, D] -> [B, H, D]."""
        B, L = q.shape[0], self.max_len
        pos = torch.arange(L, device=self.device)
        valid = pos < self.lengths[:, None]  # [B, L]
        slots = torch.arange(B, device=self.device)[:, None] * self.values.shape[2] + pos  # [B, L] rows of V
        read_v = pool_v_reader(self.values, slots, q.device)
        out, mass, rows = kcache_attend(q, self.keys[:, :, :L], valid, self.lengths, read_v, self.cfg, scale)
        self.stats.add_mass(mass.sum().item(), mass.numel(), mass.min().item())
        self.stats.v_bytes_read += int(rows.sum()) * self.values.shape[-1] * self.values.element_size()
        return out

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:  # the abstract method's name from transformers 5.13
        return -1

    def get_max_cache_shape(self) -> int:  # and before
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0


class KCacheHF(Cache):
    """KCache for `model.generate(..., past_key_values=KCacheHF(model.config, top_n=64))`.

    Options are KCacheConfig's fields (top_n, selection, renormalize, dense_layers, sink_tokens, recent_tokens),
    given as keywords or as `cfg=KCacheConfig(...)`. `stats` reports decode-time statistics.
    """

    def __init__(self, config, cfg: KCacheConfig | None = None, **options):
        check_model(config)
        if cfg is not None and options:
            raise ValueError("pass either cfg=KCacheConfig(...) or KCacheConfig fields as keywords, not both")
        self.config = config
        self.cfg = cfg if cfg is not None else KCacheConfig(**options)
        self._stats = CacheStats()
        n = config.num_hidden_layers
        super().__init__(layers=[KCacheLayer(self.cfg, self._stats, i < self.cfg.dense_layers) for i in range(n)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # Checked here, not at construction: set_attn_implementation may change the model after the cache is built
        if self.config._attn_implementation != "kcache":
            raise ValueError(
                "KCacheHF needs the model loaded with attn_implementation='kcache' (after `import kcache.hf`); "
                f"this model uses {self.config._attn_implementation!r}"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def stats(self) -> CacheStats:
        """Decode statistics, with the memory fields refreshed to what the layers hold now."""
        held = [layer for layer in self.layers if layer.is_initialized]
        on_device = [l.keys for l in held] + [l.values for l in held if l.dense]
        self._stats.device_bytes = sum(t.numel() * t.element_size() for t in on_device)
        self._stats.host_bytes = sum(l.values.numel() * l.values.element_size() for l in held if not l.dense)
        return self._stats


def _chunk_valid(mask: torch.Tensor | None, B: int, q: int, device) -> torch.Tensor:
    """Which of the chunk's q tokens are real, [B, q], from sdpa's boolean mask [B, 1, q, kv] or None (no padding).
    The last query row sees every chunk token causally, so its last q columns are exactly the padding mask."""
    if mask is None:
        return torch.ones(B, q, dtype=torch.bool, device=device)
    return mask[:, 0, -1, -q:]


def _exact(module, query, key, value, valid, layer, mask, dropout, scaling, kwargs):
    """Exact attention of the chunk over the stored tokens and itself (prefill, and decode in dense layers)."""
    P = layer.max_len
    if P:  # the stored tokens are compacted, so the model's mask no longer lines up: build one that does
        q = query.shape[2]
        k_past, v_past, past_valid = layer.past(P)
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
        mask = torch.cat([past_valid[:, None, :].expand(-1, q, -1), causal & valid[:, None, :]], -1)[:, None]
        key, value = torch.cat([k_past, key], 2), torch.cat([v_past, value], 2)  # [B, Hkv, P + q, D]
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out


def kcache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """attn_implementation="kcache": query [B, H, q, D], key [B, Hkv, q, D] (this step's), value a `_Chunk`
    -> ([B, q, H, D], None). Prefill is exact; decode keeps the top-N tokens by exact scores over all K."""
    check_model(module.config)
    if not isinstance(value, _Chunk):
        raise ValueError(
            "attn_implementation='kcache' needs a KCacheHF cache: "
            "model.generate(..., past_key_values=kcache.hf.KCacheHF(model.config, top_n=64))"
        )
    layer = value.layer
    if sliding_window is not None and layer.seen > sliding_window:
        raise ValueError(
            f"this {module.config.model_type} model attends over a sliding window of {sliding_window} tokens, shorter "
            f"than the sequence ({layer.seen} tokens); KCache selects from every cached token, so kcache.hf supports "
            "sliding-window models only while the sequence fits in the window"
        )
    B, _, q, _ = query.shape
    valid = _chunk_valid(attention_mask, B, q, query.device)
    if q == 1 and module.layer_idx == 0:
        layer.stats.decode_steps += 1
    if q > 1 or layer.dense:
        out = _exact(module, query, key, value.values, valid, layer, attention_mask, dropout, scaling, kwargs)
        layer.append(key, value.values, valid)
        return out, None
    layer.append(key, value.values, valid)
    return layer.decode(query[:, :, 0], scaling)[:, None], None


AttentionInterface.register("kcache", kcache_attention)
# Without a registered mask function, transformers hands custom attention names no mask at all (no padding info)
AttentionMaskInterface.register("kcache", sdpa_mask)
