"""How a model splits over `tp` ranks, Megatron-style.

Each rank holds a narrower copy of the model: 1/tp of the query and KV heads and of the MLP's intermediate
features (column-parallel q/k/v/gate/up, row-parallel o/down, whose partial sums are all-reduced), 1/tp of the
LM head's vocabulary rows (gathered on rank 0), and the whole embedding and norms. So a rank's `ModelConfig` is
the model's with the head and MLP counts divided, and the cache built from it holds only that rank's KV heads.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kcache.models.config import ModelConfig

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split: weight rows and bias
ROW = ("o_proj", "down_proj")  # input features split: weight columns


class TensorParallelError(ValueError):
    """The model or machine cannot be split this way: the message says why."""


def check(cfg: ModelConfig, tp: int) -> None:
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise TensorParallelError(f"tensor_parallel_size={tp} does not divide {what}={n}")


def resolve_device(name: str) -> torch.device:
    """The device a name means: "auto" is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_devices(device: str, tp: int) -> None:
    """Rank r runs on GPU (first + r): refuse more ranks than GPUs (CPU ranks share the machine)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and (dev.index or 0) + tp > torch.cuda.device_count():
        raise TensorParallelError(f"tensor_parallel_size={tp} needs {tp} GPUs from cuda:{dev.index or 0}; "
                                  f"{torch.cuda.device_count()} present")


def rank_device(device: str, rank: int) -> str:
    dev = resolve_device(device)
    return f"cuda:{(dev.index or 0) + rank}" if dev.type == "cuda" else str(dev)


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """One rank's shapes (head_dim and hidden_size are unchanged)."""
    if tp == 1:
        return cfg
    check(cfg, tp)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


def vocab_rows(vocab_size: int, tp: int) -> int:
    """LM head rows per rank; the last rank's are zero-padded and the padding cut off after the gather."""
    return -(-vocab_size // tp)


def shard_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Full tensors under Hugging Face names -> this rank's slices. A tied LM head gets its own vocab slice of the
    embedding, which stays whole."""
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    return {name: _shard(name, t, cfg, rank, tp) for name, t in tensors.items()}


def _shard(name: str, t: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    module = name.split(".")[-2] if "." in name else name
    if module in COLUMN:
        return t.chunk(tp, 0)[rank]
    if module in ROW:
        return t.chunk(tp, 1)[rank].contiguous()  # a column slice is strided: own copy for dense GEMMs
    if name == "lm_head.weight":
        n = vocab_rows(cfg.vocab_size, tp)
        part = t[rank * n:(rank + 1) * n]  # [<=n, hidden]
        return F.pad(part, (0, 0, 0, n - part.shape[0]))
    return t  # embedding and norms: replicated
