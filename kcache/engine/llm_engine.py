"""The engine: requests in, tokens out, one scheduled step at a time."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kcache.config import EngineConfig, SamplingParams
from kcache.distributed import comm, sharding
from kcache.distributed.worker import Workers
from kcache.engine.block_manager import BlockManager
from kcache.engine.detokenize import IncrementalDecoder
from kcache.engine.model_runner import build_runner
from kcache.engine.sampling import sample
from kcache.engine.scheduler import Scheduler
from kcache.engine.sequence import Sequence
from kcache.models import loader


class RequestError(ValueError):
    """A request the engine cannot serve (too long, empty, ...): the message says why."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # completion so far
    new_token_ids: list[int]  # added by the last step
    text: str
    finished: bool
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)


@dataclass
class StepRecord:
    is_prefill: bool
    seconds: float
    num_tokens: int


class LLMEngine:
    """Rank 0 of the model: it schedules, runs its shard and samples. With `tensor_parallel_size` N > 1 it starts
    N-1 worker processes, which load the other shards and follow its steps until `close()`."""

    def __init__(self, cfg: EngineConfig, loaded: loader.LoadedModel | None = None):
        self.cfg = cfg
        self.tp = cfg.tensor_parallel_size
        self.workers: Workers | None = None
        self.loaded = self._load(cfg, loaded)
        self.model, self.model_config, self.tokenizer = self.loaded.model, self.loaded.config, self.loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.max_model_len = cfg.max_model_len or self.model_config.max_position_embeddings
        self.model_config.check_context(self.max_model_len)
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        try:
            followers = self._start_workers() if self.tp > 1 else ()
            self.runner, self.plan = build_runner(cfg, self.model, self.max_model_len, followers)
        except BaseException:
            self._stop_workers()
            raise
        self.cache = self.runner.cache
        graphs = bool(self.runner.graphs)
        self.blocks = BlockManager(self.plan.num_blocks - graphs, cfg.block_size)  # graphs pad into the last block
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self.steps: list[StepRecord] = []
        self._ids = itertools.count()

    def _load(self, cfg: EngineConfig, loaded: loader.LoadedModel | None) -> loader.LoadedModel:
        """The model, or under TP rank 0's shard of it (shape errors surface here, before any worker starts)."""
        if self.tp == 1:
            return loaded or loader.load(cfg.model, cfg.load_format, cfg.dtype, cfg.device, cfg.seed)
        sharding.check_devices(cfg.device, self.tp)
        if loaded is not None:
            return loader.shard(loaded, 0, self.tp)
        return loader.load(cfg.model, cfg.load_format, cfg.dtype, sharding.rank_device(cfg.device, 0), cfg.seed, 0, self.tp)

    def _start_workers(self) -> list:
        """Ranks 1..N-1, then the process group with them; returns the pipes that carry each step to them."""
        port = comm.free_port()
        self.workers = Workers(self.cfg, port)
        comm.init(0, self.tp, port, self.device)
        return self.workers.conns

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
        return self.scheduler.has_work()

    # ---- stepping -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        chunks, is_prefill = self.scheduler.schedule()
        if not chunks:
            return []
        t0 = time.perf_counter()
        stats_on_device = ()
        if is_prefill:
            logits = self.runner.prefill(chunks)
            ready = [(i, s) for i, (s, n) in enumerate(chunks) if self.scheduler.prefilled(s, n)]
        else:
            seqs = [s for s, _ in chunks]
            logits = self.runner.decode(seqs)
            stats_on_device = self._decode_summary(len(seqs))
            for s in seqs:
                s.num_cached = s.num_tokens
            ready = list(enumerate(seqs))
        outputs = []
        if ready:
            seqs = [s for _, s in ready]
            if len(ready) < logits.shape[0]:  # some prefill chunks did not finish their prompt
                logits = logits[torch.tensor([i for i, _ in ready], device=logits.device)]
            tokens, stats = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], stats_on_device)
            if not is_prefill:
                self._record_decode_stats(seqs, stats)
            now = time.perf_counter()
            for seq, tok in zip(seqs, tokens):
                outputs.append(self._append(seq, tok, now))
        self.steps.append(StepRecord(is_prefill, time.perf_counter() - t0, sum(n for _, n in chunks)))
        return outputs

    def _append(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        seq.token_ids.append(token)
        seq.token_times.append(now)
        reason = self._stop_reason(seq, token)
        if reason:
            self.scheduler.finish(seq, reason)
        return self._emit(seq, [token])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None and self._stop_string_ends_here(seq):
            return "stop"
        if seq.num_tokens - seq.num_prompt >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stop_string_ends_here(self, seq: Sequence) -> bool:
        """Whether the text this token adds completes one of the stop strings (earlier text was searched before)."""
        if seq.stop_text is None:
            seq.stop_text = IncrementalDecoder(self.tokenizer, start=seq.num_prompt)
        piece = seq.stop_text.update(seq.token_ids)
        if not piece:
            return False
        tail = seq.stop_text.text[-(len(piece) + max(map(len, seq.params.stop)) - 1):]
        return any(s in tail for s in seq.params.stop)

    def _decode_summary(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Per sequence, the sum and minimum of this step's mass kept over approximate layers and heads (rank 0's
        heads under TP) and the V bytes read, still on the device: they come back with the sampled tokens."""
        stats = self.cache.decode_stats(batch)
        if stats is None:
            return ()
        self._samples = stats.samples
        return stats.mass_sum, stats.mass_min, stats.v_bytes

    def _record_decode_stats(self, seqs: list[Sequence], stats: list[list[float]]) -> None:
        if not stats:
            return
        for s, total, low, v_bytes in zip(seqs, *stats):
            s.mass_kept_sum += total
            s.mass_kept_count += self._samples
            s.mass_kept_min = min(s.mass_kept_min, low)
            s.v_bytes_read += int(v_bytes) * self.tp  # every rank reads as much

    def _emit(self, seq: Sequence, new: list[int]) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=seq.completion_ids,
            new_token_ids=new, text=self._text(seq) if seq.is_finished else "", finished=seq.is_finished,
            finish_reason=seq.finish_reason, metrics=self.metrics(seq) if seq.is_finished else {},
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
            "completion_tokens": len(seq.completion_ids),
            "ttft_s": ttft,
            "tpot_s": tpot,
            "preemptions": seq.num_preemptions,
            "mass_kept_mean": seq.mass_kept_sum / seq.mass_kept_count if seq.mass_kept_count else 1.0,
            "mass_kept_min": seq.mass_kept_min,
            "v_bytes_read": seq.v_bytes_read,
        }

    def close(self) -> None:
        """Release the cache pools (the host pool's CUDA registration included) and stop the TP workers."""
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
        }
