"""A request as the engine tracks it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

import numpy as np
import torch

from kcache.cache.stats import CacheStats
from kcache.config import SamplingParams
from kcache.engine.detokenize import TextStream


class Status(Enum):
    WAITING = auto()  # queued, or prefilling in chunks, or preempted
    RUNNING = auto()  # decoding
    FINISHED = auto()


class BlockTable:
    """A sequence's block ids in order. It only grows at the end (until released), and lives in a numpy array so
    that a decode step copies each table instead of rebuilding it from Python ints (2048 per 32k sequence)."""

    def __init__(self):
        self._ids = np.zeros(64, dtype=np.int32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> int:
        return int(self.ids[i])

    def __iter__(self):
        return iter(self.ids.tolist())

    @property
    def ids(self) -> np.ndarray:
        """[len] int32, a view: valid until the next extend."""
        return self._ids[:self._n]

    def extend(self, blocks) -> None:
        new = np.fromiter(blocks, dtype=np.int32)
        if self._n + len(new) > len(self._ids):
            grown = np.zeros(max(2 * len(self._ids), self._n + len(new)), dtype=np.int32)
            grown[:self._n] = self.ids
            self._ids = grown
        self._ids[self._n:self._n + len(new)] = new
        self._n += len(new)


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt: int = 0
    num_cached: int = 0  # tokens whose K and V are in the cache: moved only by advance, rewind and the block manager
    block_table: BlockTable = field(default_factory=BlockTable)
    num_prefix_hit: int = 0  # prompt tokens its latest admission found in the prefix cache
    num_keyed_blocks: int = 0  # leading blocks of block_table looked up in or added to the prefix cache
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its first full blocks (BlockManager)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)  # when each completion token was sampled
    stats: CacheStats = field(default_factory=CacheStats)  # what its decode steps measured (mass kept, V bytes)
    generator: torch.Generator | None = None  # per-request seed
    text: TextStream | None = None  # the completion's text as it grows, when stop strings or streaming need it
    # the prompt, copied once for every step's output: slicing a long prompt per sequence per step cost milliseconds
    prompt_ids: list[int] = field(init=False)

    def __post_init__(self):
        self.num_prompt = self.num_prompt or len(self.token_ids)
        self.prompt_ids = self.token_ids[:self.num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def advance(self, n: int) -> None:
        """n more tokens have their K and V in the cache (a prefill chunk, a decode step, a teacher-forced chunk)."""
        self.num_cached += n

    def rewind(self, num_tokens: int) -> None:
        """Forget every token after the first num_tokens (the evaluation decodes several methods from one prefill);
        their cache rows are overwritten by the next steps."""
        assert self.num_keyed_blocks == 0, "a sequence sharing prefix-cached blocks cannot rewind"
        del self.token_ids[num_tokens:]
        self.block_keys.clear()  # recomputed from the tokens kept when needed
        self.num_cached = min(self.num_cached, num_tokens)
