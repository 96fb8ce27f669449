"""The engine: requests in, tokens out, one scheduled step at a time.

A step reads as schedule -> run -> sample -> postprocess -> emit: the scheduler picks the sequences, the runner
returns logits and what the step measured (DecodeStats, on the device), the sampler fetches both in one copy,
the scheduler advances the sequences, and the engine checks the stop conditions and emits each request's new
tokens and text.

Decode steps run one ahead (`async_scheduling`): before the host waits for step N's tokens, it schedules and
launches step N+1, whose input ids are N's tokens on the device, so the device runs N+1 while the host accounts N
(and the graph launch and Python of each step leave the device busy). A sequence that stops at N by EOS or a stop
string has had its row of N+1 computed for nothing; that row is dropped. Stops by length are known beforehand:
those sequences are left out of N+1.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kcache.config import EngineConfig, SamplingParams
from kcache.distributed import comm
from kcache.engine.block_manager import BlockManager
from kcache.engine.detokenize import TextStream
from kcache.engine.rank import load_rank, start_rank
from kcache.engine.sampling import Sampled, sample, sample_async
from kcache.engine.scheduler import Scheduler
from kcache.engine.sequence import Sequence
from kcache.engine.workers import Workers
from kcache.models import loader


class RequestError(ValueError):
    """A request the engine cannot serve (too long, empty, ...): the message says why."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # completion so far
    new_token_ids: list[int]  # added by the last step
    text: str  # the final text, once finished (cut before a stop string)
    finished: bool
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)
    new_text: str = ""  # text added by the last step, held back while a stop string could claim it (with
    # SamplingParams(stream_text=True); the finished output carries whatever of `text` was not sent yet)


@dataclass
class DecodeStep:
    """A decode step launched on the device, its tokens not yet on the host."""

    seqs: list[Sequence]
    sampled: Sampled


@dataclass
class StepRecord:
    is_prefill: bool
    seconds: float  # the step() call, scheduling included
    num_tokens: int
    overlapped: bool = False  # a decode step whose host accounting overlapped the next step, launched ahead


class LLMEngine:
    """Rank 0 of the model: it schedules, runs its shard and samples. With `tensor_parallel_size` N > 1 it starts
    N-1 worker processes, which load the other shards and follow its steps until `close()`.

    `last_step` is the StepRecord of the latest step (None if it ran nothing); bench and generate collect them: the
    engine keeps no trace, so a server runs in constant memory."""

    def __init__(self, cfg: EngineConfig, loaded: loader.LoadedModel | None = None):
        self.cfg = cfg
        self.tp = cfg.tensor_parallel_size
        self.workers: Workers | None = None
        shard = load_rank(cfg, 0, loaded)  # shape errors surface here, before any worker starts
        try:
            port = self._start_workers() if self.tp > 1 else None
            rank = start_rank(cfg, 0, port, shard, self.workers.conns if self.workers else ())
        except BaseException:
            self._stop_workers()
            raise
        self.loaded, self.runner, self.plan, self.max_model_len = rank.loaded, rank.runner, rank.plan, rank.max_model_len
        self.model, self.model_config, self.tokenizer = self.loaded.model, self.loaded.config, self.loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.cache = self.runner.cache
        self.blocks = BlockManager(self.plan.usable_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self.last_step: StepRecord | None = None
        self._ids = itertools.count()
        self.run_ahead = cfg.async_scheduling and self.tp == 1  # other ranks would need the ids on the host
        self._inflight: DecodeStep | None = None  # the decode step launched ahead, accounted by the next step()

    def _start_workers(self) -> int:
        """Ranks 1..N-1; returns the port of the process group they are joining."""
        port = comm.free_port()
        self.workers = Workers(self.cfg, port)
        return port

    # ---- requests -------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> str:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens")
        if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise RequestError(f"token ids must lie in [0, {self.model_config.vocab_size})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise RequestError(f"duplicate request id {rid!r}")
        seq = Sequence(rid, ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[rid] = seq
        if on_output is not None:
            self.callbacks[rid] = on_output
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks at once; False if it is unknown or already finished."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        self._emit(seq, [])
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- stepping -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run (or, for a decode step launched ahead, finish) one step; the outputs of the requests it advanced."""
        self.last_step = None
        t0 = time.perf_counter()
        done, self._inflight = self._inflight, None
        if done is None:
            chunks, is_prefill = self.scheduler.schedule()
            if not chunks:
                return []
            if is_prefill:
                return self._prefill(chunks, t0)
            done = self._launch([s for s, _ in chunks])
        if self.run_ahead:
            self._inflight = self._launch_ahead(done)
        outputs = self._complete(done)
        self.last_step = StepRecord(False, time.perf_counter() - t0, len(outputs), self._inflight is not None)
        return outputs

    def _prefill(self, chunks: list[tuple[Sequence, int]], t0: float) -> list[RequestOutput]:
        logits, tokens, rows = self.runner.prefill(chunks), [], self.scheduler.sampled_rows(chunks)
        if rows:
            if len(rows) < logits.shape[0]:  # some prefill chunks did not finish their prompt
                logits = logits[torch.tensor(rows, device=logits.device)]
            seqs = [chunks[i][0] for i in rows]
            tokens, _ = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        seqs = self.scheduler.postprocess(chunks, tokens, None, time.perf_counter())
        outputs = [self._stop_or_continue(s) for s in seqs]
        self.last_step = StepRecord(True, time.perf_counter() - t0, sum(n for _, n in chunks))
        return outputs

    def _launch(self, seqs: list[Sequence], ahead: torch.Tensor | None = None) -> DecodeStep:
        """Run a decode step and start its sampling, without waiting for it (ahead: see ModelRunner.decode)."""
        logits, stats = self.runner.decode(seqs, ahead)
        return DecodeStep(seqs, sample_async(logits, [s.params for s in seqs], [s.generator for s in seqs], stats))

    def _launch_ahead(self, done: DecodeStep) -> DecodeStep | None:
        """The next decode step, launched while `done` runs, if the scheduler can tell it now (Scheduler.schedule_ahead)."""
        keep = [i for i, s in enumerate(done.seqs) if not self._ends_by_length(s, 1)]
        continuing = [done.seqs[i] for i in keep]
        if not self.scheduler.schedule_ahead(done.seqs, continuing):
            return None
        ids = done.sampled.tokens
        if len(keep) < len(done.seqs):  # the rows' index through pinned memory: a pageable copy would wait for `done`
            rows = torch.tensor(keep)
            ids = ids[(rows.pin_memory() if ids.is_cuda else rows).to(ids.device, non_blocking=True)]
        return self._launch(continuing, ids)

    def _complete(self, done: DecodeStep) -> list[RequestOutput]:
        """Wait for a decode step's tokens and account them, for its sequences still live (one that stopped or was
        aborted after the step was launched gets nothing)."""
        tokens, stats = done.sampled.fetch()
        live = [i for i, s in enumerate(done.seqs) if not s.is_finished]
        if len(live) < len(done.seqs):
            tokens = [tokens[i] for i in live]
            stats = None if stats is None else stats.select(live)
        seqs = self.scheduler.postprocess([(done.seqs[i], 1) for i in live], tokens, stats, time.perf_counter())
        return [self._stop_or_continue(s) for s in seqs]

    def _stop_or_continue(self, seq: Sequence) -> RequestOutput:
        """After a sequence got its token: finish it if a stop condition holds; its output either way."""
        if seq.text is None and self.tokenizer is not None and (seq.params.stop or seq.params.stream_text):
            seq.text = TextStream(self.tokenizer, seq.num_prompt, seq.params.stop)
        reason = self._stop_reason(seq, seq.token_ids[-1])
        if reason:
            self.scheduler.finish(seq, reason)
        return self._emit(seq, [seq.token_ids[-1]])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stop_string = seq.text is not None and seq.text.update(seq.token_ids)  # decodes the token's text: every step
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids or stop_string:
            return "stop"
        if self._ends_by_length(seq):
            return "length"
        return None

    def _ends_by_length(self, seq: Sequence, more: int = 0) -> bool:
        """Whether the sequence has reached its length limit, or will `more` tokens on."""
        n = seq.num_tokens + more
        return n - seq.num_prompt >= seq.params.max_tokens or n >= self.max_model_len

    def _emit(self, seq: Sequence, new: list[int]) -> RequestOutput:
        text = self._text(seq) if seq.is_finished else ""
        if seq.text is not None:
            new_text = seq.text.new_text(text if seq.is_finished else None)
        else:
            new_text = text
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=seq.completion_ids,
            new_token_ids=new, text=text, finished=seq.is_finished, finish_reason=seq.finish_reason,
            metrics=self.metrics(seq) if seq.is_finished else {}, new_text=new_text,
        )
        cb = self.callbacks.get(seq.request_id)
        if cb is not None:
            cb(out)
        if seq.is_finished:
            self.callbacks.pop(seq.request_id, None)
            self.seqs.pop(seq.request_id, None)
        return out

    def _text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(seq.completion_ids, skip_special_tokens=True)
        for s in seq.params.stop:  # the stop string itself is not returned, as in OpenAI's API
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def metrics(self, seq: Sequence) -> dict:
        times = seq.token_times
        ttft = times[0] - seq.arrival_time if times else None
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return {
            "prompt_tokens": seq.num_prompt,
            "cached_prompt_tokens": seq.num_prefix_hit,
            "completion_tokens": len(seq.completion_ids),
            "ttft_s": ttft,
            "tpot_s": tpot,
            "preemptions": seq.num_preemptions,
            "mass_kept_mean": seq.stats.mass_kept_mean,
            "mass_kept_min": seq.stats.mass_kept_min,
            "v_bytes_read": seq.stats.v_bytes_read,
        }

    def close(self) -> None:
        """Release the cache pools (the host pool's CUDA registration included) and stop the TP workers."""
        self._inflight = None  # a step launched ahead for sequences that have all stopped; the pools' close waits for it
        self.cache.close()
        self._stop_workers()

    def _stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.send_stop()
            self.workers.join()
            self.workers = None
            comm.destroy()

    def memory(self) -> dict:
        """Bytes the pools hold and use now (rank 0's pools under TP; every rank holds as much)."""
        used = self.blocks.num_used / max(1, self.blocks.num_blocks)
        return {
            "device_pool_bytes": self.cache.device_bytes(), "host_pool_bytes": self.cache.host_bytes(),
            "pool_tokens": self.plan.num_tokens, "blocks_used": self.blocks.num_used, "usage": used,
            "blocks_cached": self.blocks.num_cached,
        }
