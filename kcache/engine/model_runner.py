"""Turns a scheduled step into tensors, runs the model, returns what it computed and measured.

`prefill(chunks)` returns logits; `decode(seqs)` and `score(seq, n)` return (logits, DecodeStats | None): the
cache's per-row record of the step (mass kept, V bytes read), still on the device, for the sampler's one copy.
The runner reads sequences and never changes them: the scheduler (or the scoring loop) advances them after.

On CUDA, decode steps replay CUDA graphs captured once per batch-size bucket (as nano-vllm does): the
kernels take their grid from static shapes (the block-table width), and rows that pad a batch up to its
bucket write into the pool plan's scratch block, which the block manager never hands out.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kcache.cache.kv import PagedKVCache, StepBatch, make_cache
from kcache.cache.stats import DecodeStats
from kcache.config import EngineConfig
from kcache.engine import calibration
from kcache.engine.memory import PoolPlan, activation_peak, plan_pools
from kcache.engine.sequence import Sequence
from kcache.models.llama import LlamaForCausalLM


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def build_runner(cfg: EngineConfig, model: LlamaForCausalLM, max_model_len: int, followers=(),
                 tokenizer=None) -> tuple["ModelRunner", PoolPlan]:
    """Size the pools, calibrate the FP8 pools' scales and exact K channels (kcache.engine.calibration; on the
    tokenizer's text if given), make the cache and the runner for this rank's model. Under TP every rank runs this in lockstep: the
    activation probe, the calibration prefill, the pool-size agreement and graph capture hold collectives."""
    p = next(model.parameters())
    plan = plan_pools(cfg, model.config, p.dtype, p.device, activation_peak(model, cfg, p.dtype, p.device), max_model_len)
    fp8 = None
    if cfg.fp8_pools:
        tokens = min(calibration.CALIBRATION_TOKENS, max_model_len, cfg.max_num_batched_tokens)
        ids = calibration.calibration_ids(tokenizer, model.config.vocab_size, tokens)
        fp8 = calibration.calibrate(model, ids, cfg.k_exact_channels)
    cache = make_cache(cfg, model.config, plan.num_blocks, p.dtype, p.device, fp8)
    return ModelRunner(model, cache, plan.scratch_block, cfg.max_num_seqs, max_model_len, followers), plan


class ModelRunner:
    """Under tensor parallelism every rank has a runner over its shard; rank 0's runner sends each step's inputs (plain
    lists: token ids, positions, slots, block tables, lengths, chunk layout) down `followers`, the pipes to the
    other ranks, which run the same step (kcache.engine.workers). With a `scratch_block` (CUDA only), decode
    replays CUDA graphs for batches of up to max_num_seqs sequences of up to max_model_len tokens."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, scratch_block: int | None, max_num_seqs: int,
                 max_model_len: int, followers=()):
        self.model, self.cache, self.followers = model, cache, followers
        self.device, self.block_size = cache.device, cache.block_size
        self.tp = len(followers) + 1  # as rank 0 sees it: stats are read there only
        self.scratch_block = scratch_block
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its output)
        self.graph_vars: dict[str, torch.Tensor | torch.cuda.Event] = {}  # the graphs' static inputs and staging
        if scratch_block is not None and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs, -(-max_model_len // self.block_size))

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(data, dtype=dtype).to(self.device)

    def slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Pool slots [end - start] int64 of the sequence's positions start..end-1."""
        pos = np.arange(start, end)
        return seq.block_table.ids[pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size

    def block_tables(self, seqs: list[Sequence]) -> np.ndarray:
        """[B, widest table] int32, zero-padded."""
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
        for row, s in zip(tables, seqs):
            row[:len(s.block_table)] = s.block_table.ids
        return tables

    def run(self, kind: str, inputs: dict) -> torch.Tensor | None:
        """Send the step to the other ranks (if any), then run it here."""
        assert not (self.followers and isinstance(inputs.get("ids"), torch.Tensor)), "device ids cannot reach other ranks"
        for conn in self.followers:
            conn.send((kind, inputs))
        return self.execute(kind, inputs)

    @torch.inference_mode()
    def execute(self, kind: str, inputs: dict) -> torch.Tensor | None:
        """Run one step from its inputs; logits (None on ranks other than 0 under TP)."""
        return getattr(self, f"_{kind}")(**inputs)

    def _measured(self, batch_size: int) -> DecodeStats | None:
        """What the step just run measured, read from the cache; V bytes over all ranks (each reads as much)."""
        stats = self.cache.decode_stats(batch_size)
        if stats is None or self.tp == 1:
            return stats
        return dataclasses.replace(stats, v_bytes=stats.v_bytes * self.tp)

    # ---- steps ------------------------------------------------------------------------------------------------

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the chunks' K/V (n tokens of each sequence from its num_cached on); logits [len(chunks), V] at
        each chunk's last token."""
        ids, pos, slots, starts, lens, ctxs = [], [], [], [], [], []
        for seq, n in chunks:
            c = seq.num_cached
            starts.append(len(ids))
            ids += seq.token_ids[c:c + n]
            pos.append(np.arange(c, c + n))
            slots.append(self.slots(seq, c, c + n))
            lens.append(n)
            ctxs.append(c)
        tables = self.block_tables([s for s, _ in chunks])
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

    def decode(self, seqs: list[Sequence], ahead: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeStats | None]:
        """One token per sequence (its last, not yet cached); (logits [B, V], what the step measured). With `ahead`,
        the tokens [B] the step before is sampling for seqs, on the device: each sequence decodes that token, one
        position past what the host knows of it (the engine's run-ahead; one rank only: the ids never reach the host)."""
        tables = self.block_tables(seqs)
        pos = np.array([s.num_tokens for s in seqs]) - (1 if ahead is None else 0)
        slots = tables[np.arange(len(seqs)), pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        ids = [s.token_ids[-1] for s in seqs] if ahead is None else ahead
        logits = self.run("decode", dict(ids=ids, pos=pos, slots=slots, tables=tables, lens=pos + 1))
        return logits, self._measured(len(seqs))

    def _decode(self, ids, pos, slots, tables, lens):
        if self.graphs and len(ids) <= max(self.graphs):
            return self.model.logits(self._replay(ids, pos, slots, tables, lens))
        batch = StepBatch(is_prefill=False, slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
                          lengths=self._tensor(lens, torch.int32))
        self.cache.plan(len(ids))
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
        return self.model.logits(hidden)

    def score(self, seq: Sequence, n: int) -> tuple[torch.Tensor, DecodeStats | None]:
        """Teacher forcing: the n tokens of seq after its cached ones each attend as a decode step would (KCache
        active), all in one pass since they share one block table; (logits [n, V] at each of them, what it measured)."""
        c = seq.num_cached
        logits = self.run("score", dict(ids=seq.token_ids[c:c + n], pos=list(range(c, c + n)),
                                        slots=self.slots(seq, c, c + n), tables=self.block_tables([seq]),
                                        lens=list(range(c + 1, c + n + 1))))
        return logits, self._measured(n)

    def _score(self, ids, pos, slots, tables, lens):
        batch = StepBatch(is_prefill=False, slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
                          lengths=self._tensor(lens, torch.int32), shared_table=True)
        self.cache.plan(len(ids))
        hidden = self.model(self._tensor(ids), self._tensor(pos), self.cache, batch)
        return self.model.logits(hidden)

    # ---- CUDA graphs ------------------------------------------------------------------------------------------

    def _capture_graphs(self, max_num_seqs: int, max_blocks: int) -> None:
        """One graph per bucket up to max_num_seqs, largest first so the smaller ones reuse its memory pool."""
        buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [min(max_num_seqs, GRAPH_BUCKETS[-1])]
        n, scratch, dev = buckets[-1], self.scratch_block, self.device
        # One pinned host buffer ("staging") and its device twin carry a step's inputs in one copy: [B, 4 + width]
        # int64 rows of (id, position, slot, length, block table).
        staging = torch.empty(n * (4 + max_blocks), dtype=torch.long, pin_memory=True)
        self.graph_vars = {
            "ids": torch.zeros(n, dtype=torch.long, device=dev),
            "pos": torch.zeros(n, dtype=torch.long, device=dev),
            "slots": torch.full((n,), scratch * self.block_size, dtype=torch.long, device=dev),
            "tables": torch.full((n, max_blocks), scratch, dtype=torch.int32, device=dev),
            "lens": torch.ones(n, dtype=torch.int32, device=dev),
            "staging": staging, "staging_dev": torch.empty_like(staging, device=dev), "staged": torch.cuda.Event(),
        }
        self.cache.plan(n)  # allocates the stats buffers at their final size before any capture
        pool = None
        with torch.inference_mode():
            for b in reversed(buckets):
                self.cache.plan(b)  # the graph records writes into this view of the stats buffers
                run = self._static_forward(b)
                run()  # warm-up: compiles the kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = run()
                pool = graph.pool()
                self.graphs[b] = (graph, hidden)

    def _static_forward(self, b: int):
        gv = self.graph_vars
        batch = StepBatch(is_prefill=False, slot_mapping=gv["slots"][:b], block_tables=gv["tables"][:b], lengths=gv["lens"][:b])
        return lambda: self.model(gv["ids"][:b], gv["pos"][:b], self.cache, batch)

    def _replay(self, ids, pos, slots, tables, lens) -> torch.Tensor:
        """Fill the static inputs from one pinned host-to-device copy (small pageable copies cost far more), pad the
        batch up to its bucket with rows that write into the scratch block, replay."""
        B = len(ids)
        bucket = min(b for b in self.graphs if b >= B)
        gv = self.graph_vars
        width = tables.shape[1]
        gv["staged"].synchronize()  # the previous step's copy has left the buffer
        host = gv["staging"][:B * (4 + width)].view(B, 4 + width)
        rows = host.numpy()
        on_device = isinstance(ids, torch.Tensor)  # sampled by the step before, not yet on the host
        rows[:, 0] = 0 if on_device else ids
        rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4:] = pos, slots, lens, tables
        packed = gv["staging_dev"][:host.numel()].view_as(host)
        packed.copy_(host, non_blocking=True)
        gv["staged"].record()
        for i, name in enumerate(("ids", "pos", "slots", "lens")):
            gv[name][:B] = packed[:, i]
        if on_device:
            gv["ids"][:B] = ids
        gv["tables"][:bucket] = self.scratch_block
        gv["tables"][:B, :width] = packed[:, 4:]
        gv["slots"][B:bucket] = self.scratch_block * self.block_size
        gv["lens"][B:bucket] = 1
        self.cache.plan(bucket)  # the stats rows the graph writes; decode_stats then reads the first B
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:B]
