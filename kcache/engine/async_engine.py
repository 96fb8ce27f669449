"""AsyncEngine: the engine on one background thread, its outputs streamed to asyncio tasks.

LLMEngine is not thread-safe, so one thread owns it: requests and aborts reach that thread through a queue, and it
steps whenever there is work. Each request's outputs go back to the event loop that asked for them, through an
asyncio queue fed with `call_soon_threadsafe`. A request never hangs: it ends with its last output or with an
EngineError (the engine failed, or shut down before the request finished).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import torch

from kcache.config import SamplingParams
from kcache.engine.llm_engine import LLMEngine, RequestError, RequestOutput

log = logging.getLogger("kcache")


class EngineError(RuntimeError):
    """The engine could not finish a request: it failed, or it stopped. The message says which."""


class EngineShutdownError(EngineError):
    """The engine shut down (or is shutting down) before the request finished."""


@dataclass
class EngineStats:
    """Written by the engine thread only; others read it (a read may mix two iterations, never tear a number)."""

    waiting: int = 0  # queued or prefilling
    running: int = 0  # decoding
    blocks_used: int = 0
    blocks_total: int = 0
    device_cache_bytes_used: int = 0
    host_cache_bytes_used: int = 0
    prompt_tokens: int = 0  # of admitted requests
    prefix_queried_tokens: int = 0  # prompt tokens admissions looked up in the prefix cache, and those found there
    prefix_hit_tokens: int = 0
    blocks_cached: int = 0  # blocks in the prefix cache, held or not
    generation_tokens: int = 0
    steps: int = 0
    step_errors: int = 0


Post = Callable[[object], None]  # delivers an output or an exception to a request's event loop


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats(blocks_total=engine.blocks.num_blocks)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, Post] = {}  # engine thread only
        self._deadline: float | None = None  # set by shutdown: in-flight requests must finish by then
        self._lock = threading.Lock()  # orders "closed" against submissions, so none lands after the last drain
        self._closed: EngineError | None = None
        self._thread = threading.Thread(target=self._run, name="kcache-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ------------------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, the last one `finished`. Raises RequestError for a
        request the engine refuses, EngineError if it fails or stops first. Closing the iterator early aborts it."""
        request_id = request_id or uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:
                pass  # the caller's event loop is closed: nobody is waiting any more

        self._submit(("add", request_id, prompt, params, post))
        done = False
        try:
            while not done:
                item = await outputs.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:  # the consumer left (client disconnect, cancellation): free the blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        try:
            self._submit(("abort", request_id))
        except EngineError:
            pass  # closed: nothing runs any more

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; let in-flight ones finish for grace_s seconds, then fail them. Safe in a signal
        handler (no lock: SimpleQueue.put is reentrant)."""
        self._inbox.put(("stop", time.monotonic() + grace_s))

    async def shutdown(self, grace_s: float = 0.0) -> None:
        self.begin_shutdown(grace_s)
        await asyncio.to_thread(self._thread.join)

    @property
    def alive(self) -> bool:
        return self._closed is None and self._thread.is_alive()

    def _submit(self, command: tuple) -> None:
        with self._lock:
            if self._closed is not None:
                raise type(self._closed)(*self._closed.args)
            self._inbox.put(command)

    # ---- engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        closed = EngineShutdownError("the engine has shut down")
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # a new thread starts on device 0; kernels launch on the current one
        try:
            while self._deadline is None or (self._live and time.monotonic() < self._deadline):
                self._handle_commands()
                if self.engine.has_unfinished():
                    self._step()
                self._update_gauges()
            self._fail_all(EngineShutdownError("the server shut down before this request finished"))
            self._update_gauges()
        except Exception as e:  # a bug here must fail every request, not leave them waiting forever
            log.exception("the engine loop failed")
            closed = EngineError(f"the engine stopped: {type(e).__name__}: {e}")
        self._close(closed)

    def _handle_commands(self) -> None:
        """Everything queued; when there is nothing to step, wait for the next command (or the shutdown deadline)."""
        try:
            if self.engine.has_unfinished():
                command = self._inbox.get_nowait()
            else:
                timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
                command = self._inbox.get(timeout=timeout)
            while True:
                self._handle(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, command: tuple) -> None:
        kind, *args = command
        if kind == "add":
            self._add(*args)
        elif kind == "abort":
            self.engine.abort(args[0])  # its final output reaches the consumer, if still there, via _on_output
        elif kind == "stop":
            self._deadline = args[0] if self._deadline is None else min(self._deadline, args[0])

    def _add(self, request_id: str, prompt, params: SamplingParams, post: Post) -> None:
        if self._deadline is not None:
            post(EngineShutdownError("the server is shutting down"))
            return
        try:
            ids = self.engine.encode(prompt)
            self.engine.add_request(ids, params, request_id, on_output=self._on_output)
        except RequestError as e:
            post(e)
            return
        except Exception as e:  # unexpected, but one request's problem: the engine keeps serving the others
            log.exception("adding request %s failed", request_id)
            post(EngineError(f"the engine could not add this request: {type(e).__name__}: {e}"))
            return
        self._live[request_id] = post
        self.stats.prompt_tokens += len(ids)

    def _on_output(self, out: RequestOutput) -> None:
        post = self._live.get(out.request_id)
        if post is None:
            return  # already failed with an error
        self.stats.generation_tokens += len(out.new_token_ids)
        if out.finished:
            del self._live[out.request_id]
        post(out)

    def _step(self) -> None:
        try:
            self.engine.step()
            self.stats.steps += 1
        except Exception as e:
            # A step that raised may have left any live sequence half-updated, so all of them fail (and their
            # blocks are freed); the engine then serves new requests. If aborting fails too, _run closes it.
            log.exception("engine step failed")
            self.stats.step_errors += 1
            self._fail_all(EngineError(f"the engine failed while running this request: {type(e).__name__}: {e}"))

    def _fail_all(self, error: EngineError) -> None:
        for request_id, post in list(self._live.items()):
            del self._live[request_id]  # first, so the abort's output is not delivered after the error
            post(type(error)(*error.args))  # one instance per request: each gets its own traceback
            self.engine.abort(request_id)

    def _update_gauges(self) -> None:
        s, plan = self.stats, self.engine.plan
        s.waiting, s.running = len(self.engine.scheduler.waiting), len(self.engine.scheduler.running)
        blocks = self.engine.blocks
        s.blocks_used, s.blocks_cached = blocks.num_used, blocks.num_cached
        s.prefix_queried_tokens, s.prefix_hit_tokens = blocks.queried_tokens, blocks.hit_tokens
        s.device_cache_bytes_used = s.blocks_used * plan.device_bytes_per_block
        s.host_cache_bytes_used = s.blocks_used * plan.host_bytes_per_block

    def _close(self, error: EngineError) -> None:
        """No engine calls after this: fail what is live or still queued, refuse what comes later."""
        with self._lock:
            self._closed = error
            pending = []
            while True:
                try:
                    pending.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        for command in pending:
            if command[0] == "add":
                command[-1](type(error)(*error.args))
        for post in self._live.values():
            post(type(error)(*error.args))
        self._live.clear()
