"""Turns a scheduled step into tensors, runs the model, returns the logits to sample from.

On CUDA, decode steps replay CUDA graphs captured once per batch-size bucket (as nano-vllm does): the
kernels take their grid from static shapes (the block-table width), and rows that pad a batch up to its
bucket write into a scratch block that no sequence owns.
"""
from __future__ import annotations

import numpy as np
import torch

from kcache.cache.kv import PagedKVCache, StepBatch, make_cache
from kcache.config import EngineConfig
from kcache.engine.memory import PoolPlan, activation_peak, plan_pools
from kcache.engine.sequence import Sequence
from kcache.models.llama import LlamaForCausalLM


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def build_runner(cfg: EngineConfig, model: LlamaForCausalLM, max_model_len: int, followers=()) -> tuple["ModelRunner", PoolPlan]:
    """Size the pools, make the cache and the runner for this rank's model. Under TP every rank runs this in
    lockstep: the activation probe, the pool-size agreement and graph capture hold collectives."""
    p = next(model.parameters())
    plan = plan_pools(cfg, model.config, p.dtype, p.device, activation_peak(model, cfg, p.dtype, p.device), max_model_len)
    cache = make_cache(cfg, model.config, plan.num_blocks, p.dtype, p.device)
    graphs = p.device.type == "cuda" and not cfg.enforce_eager
    return ModelRunner(model, cache, cfg.max_num_seqs, max_model_len, graphs, followers), plan


class ModelRunner:
    """Under tensor parallelism every rank has a runner over its shard; rank 0's runner sends each step's inputs (plain
    lists: token ids, positions, slots, block tables, lengths, chunk layout) down `followers`, the pipes to the
    other ranks, which run the same step (kcache.distributed.worker)."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, max_num_seqs: int = 1, max_model_len: int = 1,
                 use_graphs: bool = False, followers=()):
        self.model, self.cache, self.followers = model, cache, followers
        self.device, self.block_size = cache.device, cache.block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if use_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs, -(-max_model_len // self.block_size))

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(data, dtype=dtype).to(self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Pool slots [end - start] int64 of the sequence's positions start..end-1."""
        pos = np.arange(start, end)
        return seq.block_table.ids[pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> np.ndarray:
        """[B, widest table] int32, zero-padded."""
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
        for row, s in zip(tables, seqs):
            row[:len(s.block_table)] = s.block_table.ids
        return tables

    def run(self, kind: str, inputs: dict) -> torch.Tensor | None:
        """Send the step to the other ranks (if any), then run it here."""
        for conn in self.followers:
            conn.send((kind, inputs))
        return self.execute(kind, inputs)

    @torch.inference_mode()
    def execute(self, kind: str, inputs: dict) -> torch.Tensor | None:
        """Run one step from its inputs; logits (None on ranks other than 0 under TP)."""
        return getattr(self, f"_{kind}")(**inputs)

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the chunks' K/V; logits [len(chunks), V] at each chunk's last token."""
        ids, pos, slots, starts, lens, ctxs = [], [], [], [], [], []
        for seq, n in chunks:
            c = seq.num_cached
            starts.append(len(ids))
            ids += seq.token_ids[c:c + n]
            pos.append(np.arange(c, c + n))
            slots.append(self._slots(seq, c, c + n))
            lens.append(n)
            ctxs.append(c)
        tables = self._block_tables([s for s, _ in chunks])
        return self.run("prefill", dict(ids=ids, pos=np.concatenate(pos), slots=np.concatenate(slots), tables=tables,
                                        starts=starts, lens=lens, ctxs=ctxs))

    def _prefill(self, ids, pos, slots, tables, starts, lens, ctxs):
        batch = StepBatch(
            is_prefill=True, slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
            lengths=self._tensor([c + n for c, n in zip(ctxs, lens)], torch.int32),
            chunk_starts=tuple(starts), chunk_lens=tuple(lens), context_lens=tuple(ctxs),
        )
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
        last = self._tensor([s + n - 1 for s, n in zip(starts, lens)])
        return self.model.logits(hidden[last])

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per sequence (its last, not yet cached); logits [B, V]."""
        tables = self._block_tables(seqs)
        pos = np.array([s.num_tokens - 1 for s in seqs])
        slots = tables[np.arange(len(seqs)), pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        return self.run("decode", dict(ids=[s.token_ids[-1] for s in seqs], pos=pos, slots=slots, tables=tables, lens=pos + 1))

    def _decode(self, ids, pos, slots, tables, lens):
        if self.graphs and len(ids) <= max(self.graphs):
            return self.model.logits(self._replay(ids, pos, slots, tables, lens))
        batch = StepBatch(is_prefill=False, slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
                          lengths=self._tensor(lens, torch.int32))
        self.cache.plan(len(ids))
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
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
        # One pinned host buffer and its device twin carry a step's inputs in one copy: [B, 4 + width] int64 rows
        # of (id, position, slot, length, block table).
        self.staging = torch.empty(n * (4 + max_blocks), dtype=torch.long, pin_memory=True)
        self.staging_dev = torch.empty_like(self.staging, device=self.device)
        self.staged = torch.cuda.Event()
        self.cache.plan(n)  # allocates the mass buffer at its final size before any capture
        pool = None
        with torch.inference_mode():
            for b in reversed(buckets):
                self.cache.plan(b)  # the graph records writes into this view of the mass buffer
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

    def _replay(self, ids, pos, slots, tables, lens) -> torch.Tensor:
        """Fill the static inputs from one pinned host-to-device copy (in a VM each small pageable copy costs about
        a millisecond), pad the batch up to its bucket, replay."""
        B = len(ids)
        bucket = min(b for b in self.graphs if b >= B)
        st = self.static
        width = tables.shape[1]
        self.staged.synchronize()  # the previous step's copy has left the buffer
        host = self.staging[:B * (4 + width)].view(B, 4 + width)
        rows = host.numpy()
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4:] = ids, pos, slots, lens, tables
        packed = self.staging_dev[:host.numel()].view_as(host)
        packed.copy_(host, non_blocking=True)
        self.staged.record()
        for i, name in enumerate(("ids", "pos", "slots", "lens")):
            st[name][:B] = packed[:, i]
        st["tables"][:bucket] = self.scratch
        st["tables"][:B, :width] = packed[:, 4:]
        st["slots"][B:bucket] = self.scratch * self.block_size
        st["lens"][B:bucket] = 1
        self.cache.plan(bucket)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:B]

    def score_chunk(self, seq: Sequence, n: int) -> torch.Tensor:
        """Teacher forcing: the next n tokens of seq each attend as a decode step would (KCache active), all in
        one pass since they share one block table; logits [n, V] at each of them."""
        c = seq.num_cached
        logits = self.run("score", dict(ids=seq.token_ids[c:c + n], pos=list(range(c, c + n)), slots=self._slots(seq, c, c + n),
                                        tables=self._block_tables([seq]), lens=list(range(c + 1, c + n + 1))))
        seq.num_cached += n
        return logits

    def _score(self, ids, pos, slots, tables, lens):
        batch = StepBatch(is_prefill=False, slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
                          lengths=self._tensor(lens, torch.int32), shared_table=True)
        self.cache.plan(len(ids))
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
        return self.model.logits(hidden)
