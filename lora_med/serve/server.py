"""One running server: what it holds (engine, store, limits, metrics) and the ``/chat/`` request path.

A message goes: validation (422) -> triage (an emergency is answered at once, never the model, never rate limited,
never refused) -> per-user rate limit (429) -> admission by expected wait (503 when the wait for the model
would pass ``request_timeout_s``) -> the user's conversation from the store (the message stored) ->
``action``/``params.status`` from the intent layer -> the prompt in the training format -> a batch through the
engine -> the reply stored -> the response. A request that takes longer than ``request_timeout_s`` gets 504 (a
message already stored stays, unanswered).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from .batcher import Batcher, EngineFailed, EngineStopped, Overloaded, ShuttingDown
from .config import ServeConfig
from .intents import Intents
from .limits import RateLimiter, UserLocks
from .logs import log
from .metrics import Metrics
from .referee import Referee
from .replier import Replier
from .schemas import ChatResponse, Params
from .store import ConversationStore, StoreUnavailable
from .triage import Triage
from .turn import Dialog, Urgent

READY_TIMEOUT_S = 2.0  # the readiness probe's store query


def overloaded_body(e: Overloaded) -> dict:
    """503 body for a refusal by expected wait: what happened, in Spanish and English, and when to retry."""
    wait, retry = math.ceil(e.expected_s * 1000) / 1000, e.retry_after  # rounded up: it stays past the bound
    return {
        "detail": f"busy: the expected wait for the model ({wait:g} s) is longer than request_timeout_s "
        f"({e.bound_s:g} s); retry in {retry} s",
        "error": "overloaded",
        "message": {
            "es": f"El asistente está muy ocupado en este momento. Vuelve a escribir en {retry} segundos. "
            "Si es una emergencia, llama al 118.",
            "en": f"The assistant is very busy right now. Please write again in {retry} seconds. "
            "If this is an emergency, call 118.",
        },
        "expected_wait_s": wait,
        "request_timeout_s": e.bound_s,
        "retry_after_s": retry,
    }


def store_down_body(error: str) -> dict:
    return {
        "detail": f"the conversation store is unavailable ({error}); retry shortly",
        "error": "store_unavailable",
        "message": {
            "es": "No podemos guardar tu mensaje en este momento. Vuelve a escribir en unos segundos. "
            "Si es una emergencia, llama al 118.",
            "en": "We cannot save your message right now. Please write again in a few seconds. "
            "If this is an emergency, call 118.",
        },
    }


class Server:
    """Everything one running app holds (no module-level state)."""

    def __init__(
        self,
        cfg: ServeConfig,
        triage: Triage,
        intents: Intents,
        store: ConversationStore,
        replier: Replier,
        keys: list[bytes],
        referee: Referee | None = None,
    ):
        self.cfg = cfg
        self.store = store
        self.replier = replier
        self.keys = keys
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_window_s)
        self.locks = UserLocks()
        self.in_flight = 0
        cache = getattr(replier.engine, "prefix_cache", None)
        self.metrics = Metrics(
            queue_depth=lambda: self.batcher.depth(),
            in_flight=lambda: self.in_flight,
            prompt_tokens=lambda: cache.prompt_tokens if cache is not None else 0,
            reused_tokens=lambda: cache.reused_tokens if cache is not None else 0,
            expected_wait=lambda: self.batcher.expected_wait(),
        )
        # A request joins a running batch at the next step where the engine allows it, so waiting for company
        # only delays it; where batches run whole, a few ms let a burst start together.
        wait_ms = cfg.batch_wait_ms if cfg.batch_wait_ms is not None else (0.0 if replier.engine.joins else 5.0)
        self.batcher = Batcher(
            replier.stream,
            max_batch=cfg.max_batch,
            wait_s=wait_ms / 1000,
            bound_s=cfg.request_timeout_s,
            metrics=self.metrics,
        )
        self.dialog = Dialog(triage, intents, replier, self.metrics, referee)
        # The same turn logic with metrics nobody reads: streamed text is checked sentence by sentence
        # (release.Gate) and those trial checks must not count as replies.
        self.trial = copy.copy(self.dialog)
        self.trial.metrics = Metrics(queue_depth=lambda: 0, in_flight=lambda: 0)
        # SQLite takes one writer at a time; a PostgreSQL pool serves different users at once (a user's
        # messages stay in order: UserLocks here, the user's row lock across replicas).
        self.store_threads = cfg.store_pool if cfg.store else 1
        self.store_thread = ThreadPoolExecutor(max_workers=self.store_threads, thread_name_prefix="store")
        self.store_s = 0.0  # moving average of one store call's time (begin or answer)
        self.started = time.time()
        self.serving = False  # between the lifespan's start and its end
        self.port: int | None = None  # set by serve() once the socket is bound

    async def db(self, fn, *args, **kwargs):
        """Run a store call on a store thread (the store blocks; the event loop must not); its time is averaged
        for admission (a /chat/ request waits for two calls, behind the calls of the requests in flight)."""

        def timed():
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.store_s = dt if not self.store_s else 0.8 * self.store_s + 0.2 * dt

        return await asyncio.get_running_loop().run_in_executor(self.store_thread, timed)

    def store_wait(self) -> float:
        """What a /chat/ request arriving now waits for the store: its two calls behind those in flight."""
        return 2 * self.store_s * max(1, self.in_flight) / self.store_threads

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        eng = self.replier.engine
        self.serving = True
        log(
            "ready",
            host=self.cfg.host,
            port=self.port,
            model=self.cfg.model,
            engine=eng.name,
            device=eng.device,
            source=self.replier.source.kind,
            store="postgresql" if self.cfg.store else self.cfg.db,
            api_keys=len(self.keys),
            triage_rules=self.dialog.triage.rules_version,
            triage_model=self.dialog.triage.model.version,
            intents_model=self.dialog.intents.version,
        )
        try:
            yield
        finally:
            self.serving = False  # /health/ready says 503 from now: a load balancer stops sending
            await self.batcher.close()
            await self.db(self.store.close)
            self.store_thread.shutdown(wait=True)
            self.replier.close()
            log("stopped", uptime_s=round(time.time() - self.started, 1))

    async def ready(self) -> tuple[bool, dict]:
        """The readiness probe: serving (engine loaded, not stopping) and the store answering a query now."""
        if not self.serving:
            return False, {"status": "not ready", "reason": "starting or stopping"}
        if (broken := self.batcher.broken) is not None:  # the engine was given up: only emergencies are answered
            return False, {"status": "not ready", "reason": "engine", "error": broken}
        try:
            health = await asyncio.wait_for(asyncio.to_thread(self.store.health, READY_TIMEOUT_S), READY_TIMEOUT_S + 1)
        except TimeoutError:
            health = {"ok": False, "error": f"no answer in {READY_TIMEOUT_S + 1:g} s"}
        if not health.get("ok"):
            return False, {"status": "not ready", "reason": "store", "store": health}
        return True, {"status": "ready", "store_ms": health.get("ms")}

    def finish(self, status: int, t0: float, body: dict, headers: dict | None = None, **fields) -> JSONResponse:
        """Count, log (no message text) and return one /chat/ response."""
        elapsed = time.perf_counter() - t0
        self.metrics.requests.inc(status)
        self.metrics.latency.observe(elapsed)
        log(
            "chat",
            logging.INFO if status < 500 else logging.ERROR,
            status=status,
            ms=round(1000 * elapsed, 1),
            **fields,
        )
        return JSONResponse(body, status_code=status, headers=headers)

    def limit(self, user: str, urgent: Urgent | None) -> tuple[int, dict, dict] | None:
        """The per-user rate limit (never for an emergency): None, or (429, body, headers)."""
        if urgent is not None:
            return None
        wait = self.limiter.check(user, time.monotonic())
        if wait is None:
            return None
        cfg = self.cfg
        detail = (
            f"rate limit: at most {cfg.rate_limit} messages per {cfg.rate_window_s:g} s per user; retry in {wait} s"
        )
        return 429, {"detail": detail}, {"Retry-After": str(wait)}

    async def chat(self, user_id: str, message: str) -> JSONResponse:
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:12]
        cfg = self.cfg
        ids = {"request_id": rid, "user": user_id}
        headers = {"X-Request-Id": rid}
        self.in_flight += 1
        ticket = None
        future = None
        try:
            urgent = self.dialog.first_look(message)
            if (limited := self.limit(user_id, urgent)) is not None:
                status, body, extra = limited
                return self.finish(status, t0, body, {**headers, **extra}, error="rate_limited", **ids)
            if urgent is None:
                ticket = self.batcher.reserve(self.store_wait())  # Overloaded: 503 (an emergency never needs the model)
            try:
                async with asyncio.timeout(cfg.request_timeout_s):
                    # A user's messages are answered in order, but an emergency never waits behind one.
                    async with self.locks.hold(user_id) if urgent is None else contextlib.nullcontext():
                        restart = self.dialog.wants_restart(message, urgent)
                        opened = await self.db(
                            self.store.begin,
                            user_id,
                            message,
                            now=time.time(),
                            idle_s=cfg.idle_minutes * 60,
                            restart=restart,
                            request_id=rid,
                        )
                        ids["conversation"] = opened.conversation_id
                        plan = self.dialog.plan(message, opened.history, urgent)
                        prompt_len, batch = len(plan.prompt or ()), 0
                        if plan.prompt is not None:
                            assert ticket is not None  # a prompt only when the triage did not answer: reserved above
                            future = ticket.submit(plan.prompt)
                            # shield: a timeout or a client that leaves stops this wait, never the batch
                            generated = await asyncio.shield(future)
                            batch = generated.batch_size
                            plan = self.dialog.finish(plan, self.replier.decode(generated.ids))
            except TimeoutError:
                if future is not None:
                    future.cancel()  # still queued: skipped; already in the engine: its row is dropped
                detail = (
                    f"timeout: no reply within {cfg.request_timeout_s:g} s (request_timeout_s); send the message again"
                )
                return self.finish(504, t0, {"detail": detail}, headers, error="timeout", **ids)
            await self.db(
                self.store.answer,
                opened.conversation_id,
                opened.turn_id,
                plan.reply,
                action=plan.action,
                status=plan.status,
                source=plan.source,
                now=time.time(),
            )
            assert plan.reply is not None  # written by the triage, the facts, or finish()
            self.metrics.actions.inc(plan.action)
            self.metrics.sources.inc(plan.source)
            body = ChatResponse(
                response=plan.reply,
                user_id=user_id,
                conversation_id=opened.conversation_id,
                action=plan.action,
                params=Params(**plan.params()),
            ).model_dump()
            return self.finish(
                200,
                t0,
                body,
                {**headers, "X-Prompt-Tokens": str(prompt_len), "X-Batch-Size": f"{batch:g}"},
                action=plan.action,
                params_status=plan.status,
                source=plan.source,
                new_conversation=opened.new,
                prompt_tokens=prompt_len,
                batch=batch,
                guard=plan.rule,
                replaced=list(plan.reasons) or None,
                **ids,
            )
        except Overloaded as e:
            self.metrics.refused.inc("overloaded")
            retry = {**headers, "Retry-After": str(e.retry_after)}
            return self.finish(
                503, t0, overloaded_body(e), retry, error="overloaded", expected_wait_s=round(e.expected_s, 2), **ids
            )
        except StoreUnavailable as e:
            return self.finish(503, t0, store_down_body(str(e)), {**headers, "Retry-After": "1"}, error="store", **ids)
        except EngineStopped as e:  # before ShuttingDown, its parent: the engine was given up, not stopped
            body = {"detail": f"not ready: {e}; the server log has the error"}
            return self.finish(503, t0, body, headers, error="engine_stopped", **ids)
        except ShuttingDown:
            body = {"detail": "the server is shutting down; retry shortly"}
            return self.finish(503, t0, body, {**headers, "Retry-After": "1"}, error="shutting_down", **ids)
        except EngineFailed as e:
            body = {"detail": f"generation failed ({e}); request id {rid} in the server log"}
            return self.finish(500, t0, body, headers, error="engine", **ids)
        except Exception as e:
            log("chat_error", logging.ERROR, exc_info=e, request_id=rid, error=type(e).__name__)
            body = {"detail": f"internal error; request id {rid} in the server log"}
            return self.finish(500, t0, body, headers, error="internal", **ids)
        finally:
            if ticket is not None:
                ticket.release()
            self.in_flight -= 1
