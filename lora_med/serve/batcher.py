"""Continuous batching: requests wait in a bounded queue and join the engine's running batch.

One engine thread holds an :meth:`Engine.stream <lora_med.engine.Engine.stream>` of ``max_batch`` rows for
the server's life. Between decode steps it takes waiting prompts into free rows (their prompts run, then
they decode with the others), drops rows whose request has gone (timed out, client disconnected), and
hands each finished reply to its request. A reply that finishes early frees its row at once: a request
never waits for a whole batch to end. When the engine is idle, the first prompt waits ``wait_s`` (a few
ms) for company, so a burst starts as one batch. A backend that cannot join rows (PyTorch, CUDA graphs)
takes prompts only between whole batches, with the same code.

Every prompt submitted gets its result or an exception on its future; an engine failure fails the rows
it was generating (the others wait on) and the stream is opened afresh.

The bound counts prompts waiting plus requests holding a ticket (accepted, prompt being built), so a
burst cannot overshoot it between acceptance and submission.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

from .logs import log
from .metrics import Metrics


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests already (answered with 503)."""


class ShuttingDown(Exception):
    """The server stopped before this prompt reached the engine (answered with 503)."""


class EngineFailed(Exception):
    """The engine raised while generating this prompt's batch (answered with 500; the error is logged)."""


@dataclass(frozen=True)
class Generated:
    ids: list[int]  # new token ids (EOS not included)
    batch_size: float  # rows decoded together while it was generated, on average
    engine_s: float  # from joining the engine to its last token


@dataclass
class _Job:
    prompt: list[int]
    future: asyncio.Future
    t0: float = 0.0  # when it joined the engine

    def gone(self) -> bool:
        return self.future.done()  # a result is set only by the engine thread, once it stops tracking the job


class Ticket:
    """A place in the queue, taken before the prompt is built; ``submit`` once, or ``release``."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        self._held = True

    def submit(self, prompt: list[int]) -> asyncio.Future:
        if not self._held:
            raise RuntimeError("ticket already used")
        self._held = False
        self._batcher._reserved -= 1
        return self._batcher._enqueue(prompt)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._reserved -= 1


class Batcher:
    def __init__(
        self,
        open_stream: Callable[[int], ContextManager],
        *,
        max_batch: int,
        wait_s: float,
        queue_size: int,
        metrics: Metrics | None = None,
    ):
        self._open = open_stream  # rows -> a context manager yielding an engine Stream
        self.max_batch, self.wait_s, self.queue_size = max_batch, wait_s, queue_size
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()  # guarded by _cv
        self._cv = threading.Condition()
        self._reserved = 0  # event loop only
        self._running = 0  # rows in the engine now (written by the engine thread)
        self._joining: list[_Job] = []  # jobs being added to the stream (engine thread)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    def depth(self) -> int:
        """Requests waiting for the engine (queued or holding a ticket); a queued prompt whose request has gone
        (timed out) no longer counts, though the engine thread only drops it when it looks at the queue."""
        with self._cv:
            return sum(not j.gone() for j in self._jobs) + self._reserved

    def running(self) -> int:
        return self._running

    def reserve(self) -> Ticket:
        """A place in the queue.

        Raises:
            QueueFull: ``queue_size`` requests are waiting already.
            ShuttingDown: the server is stopping.
        """
        if self._closing:
            raise ShuttingDown()
        if self.depth() >= self.queue_size:
            raise QueueFull()
        self._reserved += 1
        return Ticket(self)

    def _enqueue(self, prompt: list[int]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(ShuttingDown())
            return fut
        with self._cv:
            self._jobs.append(_Job(prompt, fut))
            self._cv.notify()
        return fut

    def start(self) -> None:
        """Start the engine thread (call from the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker = self._loop.run_in_executor(self._executor, self._work)

    async def close(self) -> None:
        """Finish the replies in the engine, fail what still waits with ShuttingDown, stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._worker is not None:
            await self._worker
        with self._cv:
            left, self._jobs = list(self._jobs), collections.deque()
        for job in left:
            if not job.gone():
                job.future.set_exception(ShuttingDown())
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- the engine thread

    def _work(self) -> None:
        """Serve from one stream until closing; an engine failure fails its rows and opens a fresh stream."""
        while not self._closing:
            live: dict[int, _Job] = {}
            try:
                with self._open(self.max_batch) as stream:
                    self._serve(stream, live)
            except Exception as e:
                failed = [*live.values(), *self._joining]
                log("engine_error", logging.ERROR, batch=len(failed), error=f"{type(e).__name__}: {e}")
                self._settle([(job, EngineFailed(type(e).__name__)) for job in failed])
                self._joining = []
                time.sleep(0.05)  # a broken engine fails each request it is given, without spinning
            finally:
                self._running = 0

    def _serve(self, stream, live: dict[int, _Job]) -> None:
        while True:
            for h, job in list(live.items()):  # requests that have gone: their rows are free at once
                if job.gone():
                    stream.drop(h)
                    del live[h]
            take = self._take(stream, live)
            if take is None:
                return
            if take:
                t0 = time.perf_counter()
                for job in take:
                    job.t0 = t0
                self._joining = take  # failed with the live rows if the engine raises while taking them
                live.update(zip(stream.add([j.prompt for j in take]), take))
                self._joining = []
                if self.metrics is not None:
                    self.metrics.engine_requests.inc(by=len(take))
            self._running = stream.live
            done = []
            for f in stream.step():
                job = live.pop(f.handle)
                dt = time.perf_counter() - job.t0
                if self.metrics is not None:
                    self.metrics.batch_size.observe(f.batch)
                    self.metrics.generate_seconds.observe(dt)
                done.append((job, Generated(list(f.ids), round(f.batch, 2), dt)))
            if done:
                self._settle(done)
            self._running = stream.live

    def _take(self, stream, live: dict[int, _Job]) -> list[_Job] | None:
        """The waiting prompts that fit in the stream's free rows (waiting for one when the engine is idle);
        None when closing and nothing is in flight."""
        with self._cv:
            while not live and not self._jobs and not self._closing:
                self._cv.wait()
            if self._closing:
                return None if not live else []
            if not live and self.wait_s > 0:  # an idle engine: give companions a few ms to arrive
                deadline = time.monotonic() + self.wait_s
                while len(self._jobs) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            take: list[_Job] = []
            free = stream.free()
            while self._jobs and len(take) < free:
                job = self._jobs.popleft()
                if not job.gone():
                    take.append(job)
            return take

    def _settle(self, outcomes: Sequence[tuple[_Job, object]]) -> None:
        """Give each job its outcome (a result, or an exception) on the event loop: one wake-up for them all."""

        def settle() -> None:
            for job, outcome in outcomes:
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

        assert self._loop is not None, "the engine thread runs only after start() took the event loop"
        self._loop.call_soon_threadsafe(settle)
