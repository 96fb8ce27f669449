"""Fixed-size blocks of the cache pools: a free list and per-sequence block tables.

KCache's host V pool uses the same block ids as the device K pool, so one allocation covers both budgets.
"""
from __future__ import annotations

from collections import deque

from kcache.engine.sequence import BlockTable, Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give the sequence blocks for all its tokens."""
        need = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        assert need <= self.num_free, "allocate() without can_allocate()"
        seq.block_table.extend(self.free.popleft() for _ in range(need))

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = BlockTable()
        seq.num_cached = 0
