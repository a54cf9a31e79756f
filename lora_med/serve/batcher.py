"""Continuous batching: requests wait in a queue and join the engine's running batch.

One engine thread holds an :meth:`Engine.stream <lora_med.engine.Engine.stream>` of ``max_batch`` rows for
the server's life. Between decode steps it takes waiting prompts into free rows (their prompts run, then
they decode with the others), drops rows whose request has gone (timed out, client disconnected), and
hands each finished reply to its request. A reply that finishes early frees its row at once: a request
never waits for a whole batch to end. When the engine is idle, the first prompt waits ``wait_s`` (a few
ms) for company, so a burst starts as one batch. A backend that cannot join rows (PyTorch, CUDA graphs)
takes prompts only between whole batches, with the same code.

Every prompt submitted gets its result or an exception on its future; an engine failure fails the rows
it was generating (the others wait on) and the stream is opened afresh. An engine that fails with nothing in
flight (its stream cannot even be opened: memory gone, device lost) is retried ``IDLE_RETRIES`` times with a
growing pause, then given up: ``broken`` says why, waiting and new requests fail with ``EngineStopped`` and the
server reports itself not ready.

Admission is by expected wait, not by queue length: ``reserve`` refuses a request (``Overloaded``) only when
the time it would wait for its reply, estimated from the requests ahead of it (queued, holding a ticket, or
in the engine) and the engine's recent cost per reply, passes ``bound_s`` (the request timeout). The estimate:
``cost * (ahead + 1)`` plus the batch window when the engine is idle, with ``cost`` a moving average of a
reply's engine time divided by the rows decoded beside it (the engine time it alone takes). It assumes no gain
from batching more rows than were seen: on a CPU a full batch costs nearly as much per row as the rows seen,
and a refusal must only come past the bound. Before the first reply nothing is refused.

A request may listen to its reply as it is made (``submit(..., listener=...)``): after each decode step the
new tokens of every listening row are handed to the event loop in the same wake-up as the finished replies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

from ..engine import RowSettings
from .logs import log
from .metrics import Metrics

SERVICE_EWMA = 0.2  # weight of the newest reply in the moving average of engine time per reply


class Overloaded(Exception):
    """The request's expected wait passes the bound (answered with 503 and Retry-After)."""

    def __init__(self, expected_s: float, bound_s: float):
        super().__init__(f"expected wait {expected_s:.1f} s > {bound_s:g} s")
        self.expected_s, self.bound_s = expected_s, bound_s

    @property
    def retry_after(self) -> int:
        """Seconds until the requests ahead have drained enough for a new one to fit the bound."""
        return max(1, math.ceil(self.expected_s - self.bound_s))


class ShuttingDown(Exception):
    """The server stopped before this prompt reached the engine (answered with 503)."""


class EngineFailed(Exception):
    """The engine raised while generating this prompt's batch (answered with 500; the error is logged)."""


class EngineStopped(ShuttingDown):
    """The engine failed ``IDLE_RETRIES`` times with nothing in flight and is no longer tried (503, not ready)."""


IDLE_RETRIES = 4  # failures in a row with nothing in flight before the engine is given up


@dataclass(frozen=True)
class Generated:
    ids: list[int]  # new token ids (EOS not included)
    batch_size: float  # rows decoded together while it was generated, on average
    engine_s: float  # from joining the engine to its last token


@dataclass
class _Job:
    prompt: list[int]
    future: asyncio.Future
    settings: RowSettings | None = None
    listener: Callable[[list[int]], None] | None = None  # called on the event loop with each step's new tokens
    sent: int = 0  # tokens handed to the listener (engine thread)
    t0: float = 0.0  # when it joined the engine

    def gone(self) -> bool:
        return self.future.done()  # a result is set only by the engine thread, once it stops tracking the job


class Ticket:
    """A place in the queue, taken before the prompt is built; ``submit`` once, or ``release``."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        self._held = True

    def submit(
        self,
        prompt: list[int],
        settings: RowSettings | None = None,
        listener: Callable[[list[int]], None] | None = None,
    ) -> asyncio.Future:
        """Queue the prompt; the future gets its ``Generated`` (cancel it to drop the row).
        ``listener(tokens)`` is called on the event loop with the reply's new tokens after each step."""
        if not self._held:
            raise RuntimeError("ticket already used")
        self._held = False
        self._batcher._reserved -= 1
        return self._batcher._enqueue(_Job(prompt, None, settings, listener))  # type: ignore[arg-type]

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
        bound_s: float,
        metrics: Metrics | None = None,
    ):
        self._open = open_stream  # rows -> a context manager yielding an engine Stream
        self.max_batch, self.wait_s, self.bound_s = max_batch, wait_s, bound_s
        self.service_s = 0.0  # moving average of a reply's engine time per row beside it (0: none seen yet)
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()  # guarded by _cv
        self._cv = threading.Condition()
        self._reserved = 0  # event loop only
        self._running = 0  # rows in the engine now (written by the engine thread)
        self._joining: list[_Job] = []  # jobs being added to the stream (engine thread)
        self._closing = False
        self.broken: str | None = None  # why the engine was given up (see IDLE_RETRIES); None: it works
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

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for its reply (see the module docstring)."""
        ahead = self.depth() + self._running
        idle = self.wait_s if ahead == 0 else 0.0
        return idle + self.service_s * (ahead + 1)

    def reserve(self, extra_s: float = 0.0) -> Ticket:
        """A place in the queue; ``extra_s``: what the request waits for besides the engine (the store).

        Raises:
            Overloaded: the expected wait passes ``bound_s``.
            EngineStopped: the engine was given up (it kept failing with nothing in flight).
            ShuttingDown: the server is stopping.
        """
        if self.broken is not None:
            raise EngineStopped(self.broken)
        if self._closing:
            raise ShuttingDown()
        expected = self.expected_wait() + extra_s
        if expected > self.bound_s:
            raise Overloaded(expected, self.bound_s)
        self._reserved += 1
        return Ticket(self)

    def _enqueue(self, job: _Job) -> asyncio.Future:
        fut = job.future = asyncio.get_running_loop().create_future()
        if self.broken is not None:
            fut.set_exception(EngineStopped(self.broken))
            return fut
        if self._closing:
            fut.set_exception(ShuttingDown())
            return fut
        with self._cv:
            self._jobs.append(job)
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
        """Serve from one stream until closing; an engine failure fails its rows and opens a fresh stream, and an
        engine that keeps failing with nothing in flight is given up (``broken``)."""
        idle_failures = 0
        while not self._closing:
            live: dict[int, _Job] = {}
            try:
                with self._open(self.max_batch) as stream:
                    idle_failures = 0
                    self._serve(stream, live)
            except Exception as e:
                failed = [*live.values(), *self._joining]
                error = f"{type(e).__name__}: {e}"[:500]
                log("engine_error", logging.ERROR, batch=len(failed), error=error)
                self._settle([(job, EngineFailed(type(e).__name__)) for job in failed])
                self._joining = []
                idle_failures = 0 if failed else idle_failures + 1
                if idle_failures >= IDLE_RETRIES:
                    self._give_up(error, idle_failures)
                    return
                # A broken engine fails each request it is given, without spinning; one that cannot even open its
                # stream waits longer each time (0.05, 0.2, 0.8 s ...).
                time.sleep(0.05 * 4 ** max(idle_failures - 1, 0))
            finally:
                self._running = 0

    def _give_up(self, error: str, tries: int) -> None:
        """Stop trying an engine that fails with nothing in flight: fail what waits, refuse what comes."""
        self.broken = f"the engine failed {tries} times in a row with no request in flight ({error})"
        log("engine_stopped", logging.ERROR, tries=tries, error=error)
        with self._cv:
            left, self._jobs = list(self._jobs), collections.deque()
        self._settle([(job, EngineStopped(self.broken)) for job in left])

    def _serve(self, stream, live: dict[int, _Job]) -> None:
        while True:
            for h, job in list(live.items()):  # requests that have gone: their rows are free at once
                if job.gone():
                    stream.drop(h)
                    del live[h]
            self._running = stream.live  # before _take may wait for work
            take = self._take(stream, live)
            if take is None:
                return
            if take:
                t0 = time.perf_counter()
                for job in take:
                    job.t0 = t0
                self._joining = take  # failed with the live rows if the engine raises while taking them
                live.update(zip(stream.add([j.prompt for j in take], [j.settings for j in take]), take))
                self._joining = []
                if self.metrics is not None:
                    self.metrics.engine_requests.inc(by=len(take))
            self._running = stream.live
            done: list[tuple[_Job, object]] = []
            for f in stream.step():
                job = live.pop(f.handle)
                dt = time.perf_counter() - job.t0
                cost = dt / max(f.batch, 1.0)  # the engine's time this reply took, its batch-mates' share left out
                self.service_s = (
                    cost if not self.service_s else (1 - SERVICE_EWMA) * self.service_s + SERVICE_EWMA * cost
                )
                if self.metrics is not None:
                    self.metrics.batch_size.observe(f.batch)
                    self.metrics.generate_seconds.observe(dt)
                done.append((job, Generated(list(f.ids), round(f.batch, 2), dt)))
            news = []
            for h, job in live.items():
                if job.listener is not None and (toks := stream.tokens(h)) and len(toks) > job.sent:
                    news.append((job, toks[job.sent :]))
                    job.sent = len(toks)
            if done or news:
                self._settle(done, news)
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

    def _settle(self, outcomes: Sequence[tuple[_Job, object]], news: Sequence[tuple[_Job, list[int]]] = ()) -> None:
        """Hand listeners their new tokens, then give each job its outcome (a result, or an exception), on the
        event loop: one wake-up for them all."""

        def settle() -> None:
            for job, tokens in news:
                if not job.future.done() and job.listener is not None:
                    job.listener(tokens)
            for job, outcome in outcomes:
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

        assert self._loop is not None, "the engine thread runs only after start() took the event loop"
        self._loop.call_soon_threadsafe(settle)
