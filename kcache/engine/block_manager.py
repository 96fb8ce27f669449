"""Fixed-size blocks of the cache pools: reference counts, a free list, per-sequence block tables, and (with prefix
caching) blocks named by their content so that requests sharing a prompt prefix share its blocks.

KCache's host V pool uses the same block ids as the device K pool, so one allocation covers both budgets, and a
shared block shares its device K and its host V together.

Prefix caching. A full block's key is a hash of its tokens and of the previous block's key, so equal prefixes
have equal keys. A block is keyed (`cache_prefill`) once a prefill has written all its tokens, and is never
written again: its sequence only writes positions after it. A keyed block that no sequence holds stays cached
until a block is needed and none is free; then the least recently released is evicted (its key forgotten, so
nothing finds it again). Only prefill-written blocks are keyed: a decode step's K/V for layers past the first
depend on the approximate attention below them in KCache mode, and would differ from what a prefill of the same
tokens computes. The last, partial block of a sequence is private.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from kcache.engine.sequence import BlockTable, Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unheld, holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unheld but keyed: least recently released first
        self.key_of: dict[int, bytes] = {}  # keyed block -> key
        self.block_of: dict[bytes, int] = {}  # key -> keyed block
        self.hit_tokens = 0  # prompt tokens admissions found cached, and all they looked up (for hit rates)
        self.queried_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: the free ones and the cached ones no sequence holds."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Keyed blocks, held or not."""
        return len(self.block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- plain allocation (the scheduler's decode steps, the evaluation, LLM.score) ----------------------------

    def blocks_needed(self, seq: Sequence, ahead: int = 0) -> int:
        """Fresh blocks the sequence needs for its tokens and `ahead` more (sampled on the device, not yet known)."""
        return self.blocks_for(seq.num_tokens + ahead) - len(seq.block_table)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        return self.blocks_needed(seq) + reserve <= self.num_free

    def allocate(self, seq: Sequence, ahead: int = 0) -> None:
        """Give the sequence fresh blocks for all its tokens and `ahead` more."""
        need = self.blocks_needed(seq, ahead)
        assert need <= self.num_free, "allocate() without can_allocate()"
        seq.block_table.extend(self._take_free() for _ in range(need))

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its blocks. Tail blocks are released first, so that they are evicted before the
        prefix blocks that more requests share."""
        for b in reversed(seq.block_table.ids.tolist()):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        seq.block_table = BlockTable()
        seq.num_cached = seq.num_keyed_blocks = 0

    def _take_free(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.block_of[self.key_of.pop(b)]
        self.refs[b] = 1
        return b

    # ---- admission with prefix caching ------------------------------------------------------------------------

    def can_admit(self, seq: Sequence, reserve: int = 0, hit: list[int] | None = None) -> bool:
        """Whether admit(seq, reserve) would succeed (hit: seq's cached prefix, if looked up already)."""
        hit = self.cached_prefix(seq) if hit is None else hit
        taken_from_free = sum(self.refs[b] == 0 for b in hit)  # cached-but-unheld blocks are free blocks too
        return self.blocks_for(seq.num_tokens) - len(hit) + taken_from_free + reserve <= self.num_free

    def admit(self, seq: Sequence, reserve: int = 0) -> bool:
        """Give a sequence without blocks its longest cached prefix and fresh blocks for the rest of its tokens, if
        that leaves `reserve` blocks free; the prefix's tokens count as cached, so prefill starts after them."""
        hit = self.cached_prefix(seq)
        if not self.can_admit(seq, reserve, hit):
            return False
        for b in hit:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        seq.block_table.extend(hit)
        seq.num_cached = seq.num_prefix_hit = len(hit) * self.block_size
        seq.num_keyed_blocks = len(hit)
        self.allocate(seq)
        if self.prefix_caching:
            self.hit_tokens += seq.num_prefix_hit
            self.queried_tokens += seq.num_tokens
        return True

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding seq's first full blocks, as far as they match. A prompt is never served
        entirely from the cache: its last token is computed, for the logits that sample the next one."""
        if not self.prefix_caching:
            return []
        hit = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.block_size):
            b = self.block_of.get(key)
            if b is None:
                break
            hit.append(b)
        return hit

    def first_missing_key(self, seq: Sequence) -> bytes | None:
        """The key of seq's first full block that is not cached (None: none, or no prefix caching)."""
        n = len(self.cached_prefix(seq))
        limit = (seq.num_tokens - 1) // self.block_size
        return self._keys(seq, n + 1)[n] if self.prefix_caching and n < limit else None

    def keys_completed(self, seq: Sequence, n: int) -> list[bytes]:
        """The keys of the blocks that prefilling seq's next n tokens fills (and so will key)."""
        if not self.prefix_caching:
            return []
        first, end = seq.num_cached // self.block_size, (seq.num_cached + n) // self.block_size
        return self._keys(seq, end)[first:]

    def cache_prefill(self, seq: Sequence) -> None:
        """Key the sequence's blocks that a prefill has now written in full. A block whose content is cached already
        (another sequence prefilled the same tokens in the same step) stays private."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.block_size
        keys = self._keys(seq, full)
        for i in range(seq.num_keyed_blocks, full):
            b = seq.block_table[i]
            if keys[i] not in self.block_of:
                self.block_of[keys[i]], self.key_of[b] = b, keys[i]
        seq.num_keyed_blocks = max(seq.num_keyed_blocks, full)

    def _keys(self, seq: Sequence, n: int) -> list[bytes]:
        """The content keys of seq's first n full blocks, computed once per block (tokens in a full block never
        change while the sequence lives)."""
        keys, bs = seq.block_keys, self.block_size
        if len(keys) < n:
            data = np.asarray(seq.token_ids[len(keys) * bs:n * bs], dtype=np.int64).tobytes()  # one conversion
            step = bs * 8
            for off in range(0, len(data), step):
                keys.append(hashlib.blake2b(data[off:off + step], key=keys[-1] if keys else b"", digest_size=16).digest())
        return keys[:n]
