"""Continuous batching: which sequences run in the next step.

A step either prefills (chunks of waiting prompts under a token budget; a long prompt takes several steps)
or decodes one token for every running sequence. When both kinds of work exist the two alternate, so
arrivals never stall decoding and decoding never starves arrivals. Admission is FIFO: a prompt is admitted
only when blocks for all its tokens are free (plus one spare block per running sequence for its next token),
so nothing is ever over budget; with prefix caching it first takes the cached blocks of its longest cached
prefix, and prefills only the rest (a prompt whose next block another chunk of the same step is filling waits one
step, and then shares it: a burst of requests over one document prefills the document once). When a decoding sequence needs a block and none is free, the newest running
sequence is preempted by recompute: its blocks are freed and it is re-queued at the front, to be prefilled
again (exactly) with its generated tokens. Recompute needs no swap space and prefill is compute-bound and
fast; swapping K out would cost PCIe traffic both ways, and in KCache mode V already lives on the host.

Running ahead (`schedule_ahead`): while a decode step runs on the device, the next one can be scheduled before its
tokens reach the host, each sequence one token further than the host knows it, when nothing else would change
the batch: no prompt is admissible, no sequence needs preempting. Otherwise the engine accounts the step first
and calls schedule().
"""
from __future__ import annotations

from collections import deque

from kcache.cache.stats import DecodeStats
from kcache.engine.block_manager import BlockManager
from kcache.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.last_was_prefill = False
        self.max_running = 0  # the largest decode batch so far

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], bool]:
        """The next step: ([(sequence, tokens to compute)], is_prefill)."""
        if self.waiting and not (self.last_was_prefill and self.running):
            chunks = self._schedule_prefill()
            if chunks:
                self.last_was_prefill = True
                return chunks, True
        self.last_was_prefill = False
        seqs = self._schedule_decode()
        self.max_running = max(self.max_running, len(seqs))
        return [(s, 1) for s in seqs], False

    def _schedule_prefill(self) -> list[tuple[Sequence, int]]:
        budget, chunks = self.max_tokens, []
        filling: set[bytes] = set()  # keys of the blocks this step's chunks fill
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(chunks) >= self.max_num_seqs:
                break
            if not seq.block_table:
                if filling and self.blocks.first_missing_key(seq) in filling:
                    break  # the rest of its cached prefix is being prefilled now: admitted next step, it shares it
                if not self.blocks.admit(seq, reserve=len(self.running)):
                    break  # FIFO: a later, shorter prompt may not overtake (it would starve long prompts)
            n = min(seq.num_tokens - seq.num_cached, budget)
            chunks.append((seq, n))
            filling.update(self.blocks.keys_completed(seq, n))
            budget -= n
        return chunks

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.blocks.can_allocate(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.blocks.allocate(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def schedule_ahead(self, inflight: list[Sequence], continuing: list[Sequence]) -> bool:
        """While the decode step of `inflight` runs: schedule the next decode step for `continuing` (those of them
        that will not stop by length at it), giving each the blocks for the token being sampled for it now. False
        (nothing changed) when schedule() would choose otherwise: a prompt to admit or a sequence to preempt."""
        if not continuing or list(self.running) != inflight or self._prefill_due():
            return False
        if sum(self.blocks.blocks_needed(s, ahead=1) for s in continuing) > self.blocks.num_free:
            return False
        for seq in continuing:
            self.blocks.allocate(seq, ahead=1)
        self.max_running = max(self.max_running, len(continuing))
        return True

    def _prefill_due(self) -> bool:
        """Whether schedule() would run a prefill now: a prompt waits, mid-prefill or admissible."""
        if not self.waiting or (self.last_was_prefill and self.running) or len(self.running) >= self.max_num_seqs:
            return False
        first = self.waiting[0]
        return bool(first.block_table) or self.blocks.can_admit(first, reserve=len(self.running))

    def preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    @staticmethod
    def sampled_rows(chunks: list[tuple[Sequence, int]]) -> list[int]:
        """The rows of a step that yield a token: every decode row, and the prefill chunks that end their prompt."""
        return [i for i, (s, n) in enumerate(chunks) if s.num_cached + n >= s.num_tokens]

    def postprocess(self, chunks: list[tuple[Sequence, int]], tokens: list[int], stats: DecodeStats | None,
                    now: float) -> list[Sequence]:
        """Account a step that ran: each chunk's tokens are now cached; a completed prompt starts decoding; the
        sampled rows (`sampled_rows`, in order) get their token and, on decode steps, what the step measured (stats
        on the host). Returns the sequences that got a token."""
        for seq, n in chunks:
            seq.advance(n)
            if seq.status is Status.WAITING:  # a prefill chunk: its full blocks may join the prefix cache
                self.blocks.cache_prefill(seq)
                if seq.num_cached >= seq.num_tokens:
                    self.waiting.remove(seq)
                    seq.status = Status.RUNNING
                    self.running.append(seq)
        seqs = [s for s, _ in chunks if s.num_cached >= s.num_tokens]
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
            seq.token_times.append(now)
        if stats is not None:
            rows = zip(seqs, stats.mass_sum.tolist(), stats.mass_min.tolist(), stats.v_bytes.tolist())
            for seq, total, low, v_bytes in rows:
                seq.stats.add_step(total, stats.samples, low, int(v_bytes))
        return seqs

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
