"""Turns a scheduled step into tensors, runs the model, returns the logits to sample from.

On CUDA, decode steps replay CUDA graphs captured once per batch-size bucket (as nano-vllm does): the
kernels take their grid from static shapes (the block-table width), and rows that pad a batch up to its
bucket write into a scratch block that no sequence owns.
"""
from __future__ import annotations

import torch

from kcache.cache.kv import KCache, PagedKVCache, StepBatch
from kcache.engine.sequence import Sequence
from kcache.models.llama import LlamaForCausalLM


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, max_num_seqs: int = 1, max_model_len: int = 1,
                 use_graphs: bool = False):
        self.model, self.cache = model, cache
        self.device, self.block_size = cache.device, cache.block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if use_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs, -(-max_model_len // self.block_size))

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
        if self.graphs and len(seqs) <= max(self.graphs):
            return self.model.logits(self._replay(seqs))
        if isinstance(self.cache, KCache):
            self.cache.begin_decode(len(seqs))
        hidden = self.model(
            self._tensor([s.token_ids[-1] for s in seqs]), self._tensor([s.num_tokens - 1 for s in seqs]), self.cache, batch
        )
        return self.model.logits(hidden)

    # ---- CUDA graphs ------------------------------------------------------------------------------------------

    def _capture_graphs(self, max_num_seqs: int, max_blocks: int) -> None:
        """One graph per bucket up to max_num_seqs, largest first so the smaller ones reuse its memory pool."""
        buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [min(max_num_seqs, GRAPH_BUCKETS[-1])]
        n = buckets[-1]
        scratch = self.cache.num_blocks - 1  # reserved by the engine: padding rows write here
        self.static = {
            "ids": torch.zeros(n, dtype=torch.long, device=self.device),
            "pos": torch.zeros(n, dtype=torch.long, device=self.device),
            "slots": torch.full((n,), scratch * self.block_size, dtype=torch.long, device=self.device),
            "tables": torch.full((n, max_blocks), scratch, dtype=torch.int32, device=self.device),
            "lens": torch.ones(n, dtype=torch.int32, device=self.device),
        }
        self.scratch = scratch
        if isinstance(self.cache, KCache):
            self.cache.begin_decode(n)  # allocates the mass buffer at its final size before any capture
        pool = None
        with torch.inference_mode():
            for b in reversed(buckets):
                if isinstance(self.cache, KCache):
                    self.cache.begin_decode(b)  # the graph records writes into this view of the mass buffer
                run = self._static_forward(b)
                run()  # warm-up: compiles the kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = run()
                pool = graph.pool()
                self.graphs[b] = (graph, hidden)

    def _static_forward(self, b: int):
        st = self.static
        batch = StepBatch(is_prefill=False, slot_mapping=st["slots"][:b], block_tables=st["tables"][:b], lengths=st["lens"][:b])
        return lambda: self.model(st["ids"][:b], st["pos"][:b], self.cache, batch)

    def _replay(self, seqs: list[Sequence]) -> torch.Tensor:
        B = len(seqs)
        bucket = min(b for b in self.graphs if b >= B)
        st = self.static
        bs = self.block_size
        st["ids"][:B] = self._tensor([s.token_ids[-1] for s in seqs])
        st["pos"][:B] = self._tensor([s.num_tokens - 1 for s in seqs])
        st["slots"][:B] = self._tensor([self._slots(s, s.num_tokens - 1, s.num_tokens)[0] for s in seqs])
        st["lens"][:B] = self._tensor([s.num_tokens for s in seqs], torch.int32)
        st["tables"][:bucket] = self.scratch
        table = self._block_tables(seqs)
        st["tables"][:B, :table.shape[1]] = table
        st["slots"][B:bucket] = self.scratch * bs
        st["lens"][B:bucket] = 1
        if isinstance(self.cache, KCache):
            self.cache.begin_decode(bucket)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:B]

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
