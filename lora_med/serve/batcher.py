"""Dynamic batching: requests wait in a bounded queue and reach the engine together.

One worker coroutine takes the first waiting prompt, gives others ``wait_s`` to arrive (a few ms), and
sends up to ``max_batch`` prompts to the engine in one ``generate`` call, run on a single engine thread
so the event loop keeps accepting requests meanwhile. Prompts that arrived while the engine ran form the
next batch at once. Every prompt submitted gets its result or an exception on its future; a prompt whose
request has gone (timed out, client disconnected) is skipped before its batch runs, or its result is
dropped after; the other rows of the batch are not affected.

The bound counts prompts waiting plus requests holding a ticket (accepted, prompt being built), so a
burst cannot overshoot it between acceptance and submission.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

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
    batch_size: int  # prompts in the engine call that produced it
    engine_s: float  # that call's duration


@dataclass
class _Job:
    prompt: list[int]
    future: asyncio.Future


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
    def __init__(self, generate: Callable[[list[list[int]]], list[list[int]]], *, max_batch: int, wait_s: float,
                 queue_size: int, metrics: Metrics | None = None):
        self._generate = generate
        self.max_batch, self.wait_s, self.queue_size = max_batch, wait_s, queue_size
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._reserved = 0
        self._running = 0  # prompts inside the engine now
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def depth(self) -> int:
        """Requests waiting for the engine (queued or holding a ticket); a queued prompt whose request has gone
        (timed out) no longer counts, though the worker only drops it when its batch forms."""
        return sum(not j.future.done() for j in self._jobs) + self._reserved

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
        self._jobs.append(_Job(prompt, fut))
        self._wake.set()
        return fut

    def start(self) -> None:
        """Start the worker (call from the running event loop)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Finish the batch in the engine, fail what still waits with ShuttingDown, stop the thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown())
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            # Give companions a few ms to arrive, unless the batch is already full.
            deadline = loop.time() + self.wait_s
            while len(self._jobs) < self.max_batch and not self._closing:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]
            live = [j for j in batch if not j.future.done()]  # a done future: its request has gone
            if live:
                await self._run_batch(loop, live)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, live: list[_Job]) -> None:
        self._running = len(live)
        t = time.perf_counter()
        try:
            outs = await loop.run_in_executor(self._executor, self._generate, [j.prompt for j in live])
            if len(outs) != len(live):
                raise RuntimeError(f"the engine returned {len(outs)} rows for {len(live)} prompts")
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            log("engine_error", logging.ERROR, batch=len(live), error=f"{type(e).__name__}: {e}")
            for j in live:
                if not j.future.done():
                    j.future.set_exception(EngineFailed(type(e).__name__))
            return
        finally:
            self._running = 0
        dt = time.perf_counter() - t
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(live))
            self.metrics.generate_seconds.observe(dt)
            self.metrics.engine_requests.inc(by=len(live))
        for j, ids in zip(live, outs):
            if not j.future.done():
                j.future.set_result(Generated(list(ids), len(live), dt))
