"""One decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM2.

Tokens of all sequences in a step are flattened to one axis T (as in nano-vllm); attention is delegated to
the cache object, which knows where K and V live. Parameter names match Hugging Face checkpoints, so a
state dict loads as it is.

Under tensor parallelism (`tp_size > 1`) each rank builds this model from its shard's config (fewer heads and
MLP features, see kcache.models.sharding): o_proj and down_proj then produce partial sums, all-reduced
here, and the LM head holds a slice of the vocabulary, gathered on rank 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kcache.distributed import comm
from kcache.models.sharding import vocab_rows
from kcache.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies [D/2], float32, with linear or llama3 scaling applied as transformers does."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s.get("rope_type") == "linear":
        return inv / s["factor"]
    if s.get("rope_type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, 1, D]."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # float32, as transformers does
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_size: int = 1):
        super().__init__()
        self.layer_idx, self.tp_size = layer_idx, tp_size
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache, batch):
        T = x.shape[0]
        q = apply_rope(self.q_proj(x).view(T, self.h, self.d), cos, sin)  # [T, H, D]
        k = apply_rope(self.k_proj(x).view(T, self.hkv, self.d), cos, sin)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.hkv, self.d)  # [T, Hkv, D]
        o = cache.attend(self.layer_idx, q, k, v, batch)  # [T, H, D]
        out = self.o_proj(o.reshape(T, self.h * self.d))  # [T, hidden]: this rank's heads' share under TP
        return comm.all_reduce(out) if self.tp_size > 1 else out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        self.tp_size = tp_size
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        out = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, hidden], partial under TP
        return comm.all_reduce(out) if self.tp_size > 1 else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_size: int = 1):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, tp_size)
        self.mlp = MLP(cfg, tp_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # whole on every rank
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        self.config, self.tp_size = cfg, tp_size
        self.model = Backbone(cfg, tp_size)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_rows(cfg.vocab_size, tp_size), bias=False)
        if cfg.tie_word_embeddings and tp_size == 1:  # under TP the head is a vocab slice of its own
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, D] in the activation dtype, computed in float32 as transformers does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, positions, cache, batch) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab], float32 (under TP: on rank 0; None on the other ranks)."""
        logits = self.lm_head(hidden).float()  # [n, vocab / tp]
        return comm.gather_vocab(logits, self.config.vocab_size) if self.tp_size > 1 else logits
