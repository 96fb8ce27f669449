"""Turns a scheduled step into tensors, runs the model, returns the logits to sample from."""
from __future__ import annotations

import torch

from kcache.cache.kv import KCache, PagedKVCache, StepBatch
from kcache.engine.sequence import Sequence
from kcache.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device, self.block_size = cache.device, cache.block_size

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the chunks' K/V; logits [len(chunks), V] at each chunk's last token."""
        ids, pos, slots, starts, lens, ctxs = [], [], [], [], [], []
        for seq, n in chunks:
            c = seq.num_cached
            starts.append(len(ids))
            ids += seq.token_ids[c:c + n]
            pos += range(c, c + n)
            slots += self._slots(seq, c, c + n)
            lens.append(n)
            ctxs.append(c)
        seqs = [s for s, _ in chunks]
        batch = StepBatch(
            is_prefill=True, slot_mapping=self._tensor(slots), block_tables=self._block_tables(seqs),
            lengths=self._tensor([c + n for c, n in zip(ctxs, lens)], torch.int32),
            chunk_starts=tuple(starts), chunk_lens=tuple(lens), context_lens=tuple(ctxs),
        )
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
        last = self._tensor([s + n - 1 for s, n in zip(starts, lens)])
        return self.model.logits(hidden[last])

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per sequence (its last, not yet cached); logits [B, V]."""
        batch = StepBatch(
            is_prefill=False,
            slot_mapping=self._tensor([self._slots(s, s.num_tokens - 1, s.num_tokens)[0] for s in seqs]),
            block_tables=self._block_tables(seqs),
            lengths=self._tensor([s.num_tokens for s in seqs], torch.int32),
        )
        if isinstance(self.cache, KCache):
            self.cache.begin_decode(len(seqs))
        hidden = self.model(
            self._tensor([s.token_ids[-1] for s in seqs]), self._tensor([s.num_tokens - 1 for s in seqs]), self.cache, batch
        )
        return self.model.logits(hidden)

    @torch.inference_mode()
    def score_chunk(self, seq: Sequence, n: int) -> torch.Tensor:
        """Teacher forcing: the next n tokens of seq each attend as a decode step would (KCache active), all in
        one pass since they share one block table; logits [n, V] at each of them."""
        c = seq.num_cached
        batch = StepBatch(
            is_prefill=False, slot_mapping=self._tensor(self._slots(seq, c, c + n)),
            block_tables=self._block_tables([seq]), lengths=self._tensor(range(c + 1, c + n + 1), torch.int32),
            shared_table=True,
        )
        if isinstance(self.cache, KCache):
            self.cache.begin_decode(n)
        hidden = self.model(self._tensor(seq.token_ids[c:c + n]), self._tensor(range(c, c + n)), self.cache, batch)
        seq.num_cached += n
        return self.model.logits(hidden)
