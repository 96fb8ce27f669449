"""Starting one rank of the model: the same steps for rank 0 (the engine's process) and the TP workers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kcache.config import EngineConfig
from kcache.distributed import comm
from kcache.engine.memory import PoolPlan
from kcache.engine.model_runner import ModelRunner, build_runner
from kcache.models import loader, sharding


@dataclass
class Rank:
    loaded: loader.LoadedModel  # this rank's shard (the whole model when tp == 1)
    runner: ModelRunner
    plan: PoolPlan
    max_model_len: int


def load_rank(cfg: EngineConfig, rank: int, loaded: loader.LoadedModel | None = None) -> loader.LoadedModel:
    """This rank's model: `loaded` (a whole model) or the model `cfg` names, cut to the rank's shard under TP."""
    tp = cfg.tensor_parallel_size
    if tp == 1:
        return loaded or loader.load(cfg.model, cfg.load_format, cfg.dtype, cfg.device, cfg.seed)
    sharding.check_devices(cfg.device, tp)
    if loaded is not None:
        return loader.shard(loaded, rank, tp)
    return loader.load(cfg.model, cfg.load_format, cfg.dtype, sharding.rank_device(cfg.device, rank), cfg.seed, rank, tp)


def start_rank(cfg: EngineConfig, rank: int, port: int | None, shard: loader.LoadedModel | None = None,
               followers=()) -> Rank:
    """Join the process group (under TP), load this rank's shard unless given, then size the pools and build the
    runner; every rank runs this in lockstep (the pool sizing and graph capture hold collectives)."""
    if cfg.tensor_parallel_size > 1:
        comm.init(rank, cfg.tensor_parallel_size, port, torch.device(sharding.rank_device(cfg.device, rank)))
    shard = shard or load_rank(cfg, rank)
    max_model_len = cfg.max_model_len or shard.config.max_position_embeddings
    shard.config.check_context(max_model_len)
    runner, plan = build_runner(cfg, shard.model, max_model_len, followers, shard.tokenizer)
    return Rank(shard, runner, plan, max_model_len)
