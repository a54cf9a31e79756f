"""The seed guide's ``/chat/`` app on an exported model: FastAPI routes, the request path, and ``serve``.

A message goes: validation (422) -> triage (an emergency is answered at once, never the model, never rate
limited) -> per-user rate limit (429) -> a place in the queue (503) -> the user's conversation from the
store (the message stored) -> ``action``/``params.status`` from the intent layer -> the prompt in the
training format -> a batch through the engine -> the reply stored -> the response. A request that takes
longer than ``request_timeout_s`` gets 504 (a message already stored stays, unanswered).

(No ``from __future__ import annotations`` here: FastAPI reads the route's body annotation at runtime, and
the request model is built per app, with that app's message limit.)
"""

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ConfigError
from .batcher import Batcher, EngineFailed, QueueFull, ShuttingDown
from .config import ServeConfig, check, resolve_path
from .intents import ACTIONS, Intents
from .limits import RateLimiter, UserLocks
from .logs import log, logging_config
from .metrics import CONTENT_TYPE, Metrics
from .replier import Replier, load_replier, resolve_model
from .store import ConversationStore, SQLiteStore
from .triage import Triage
from .turn import Dialog

USER_ID_PATTERN = r"^\+?[1-9][0-9]{6,14}$"  # a phone number, E.164 digits with or without '+'
SEED_EXAMPLE = {"user_id": "+59170123456", "message": "Hola, necesito una cita"}


class Params(BaseModel):
    # The seed's status, and whatever else the turn knows (lora_med.serve.turn.Plan.params).
    model_config = ConfigDict(extra="allow")
    status: str = Field(description="Where the conversation's flow stands (configs/intents.yaml lists them).")
    triage: Literal["emergency", "caution", "none"] | None = Field(
        None, description="The triage tier of the message (docs/triage.md); a caution's reply ends with a safety line."
    )
    intent: str | None = Field(None, description="The message's intent, kept whatever the tier (an action name).")


class ChatResponse(BaseModel):
    response: str = Field(description="The assistant's reply.")
    user_id: str
    conversation_id: str = Field(description="conv_<user_id>_<id>, stable within a conversation.")
    action: Literal[ACTIONS] = Field(description="What the message asks for (intent layer, or the triage's emergency).")
    params: Params


def _request_model(max_chars: int) -> type[BaseModel]:
    class ChatRequest(BaseModel):
        model_config = ConfigDict(json_schema_extra={"examples": [SEED_EXAMPLE]})
        user_id: str = Field(pattern=USER_ID_PATTERN, description="The patient's phone number, e.g. +59170123456.")
        message: str = Field(min_length=1, max_length=max_chars, description=f"At most {max_chars} characters.")

        @field_validator("message")
        @classmethod
        def _not_blank(cls, v: str) -> str:
            if not v.strip():
                raise ValueError("message is blank; send the patient's text")
            return v

    return ChatRequest


class _Server:
    """Everything one running app holds (no module-level state)."""

    def __init__(self, cfg: ServeConfig, triage: Triage, intents: Intents, store: ConversationStore, replier: Replier):
        self.cfg = cfg
        self.store = store
        self.replier = replier
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_window_s)
        self.locks = UserLocks()
        self.in_flight = 0
        cache = getattr(replier.engine, "prefix_cache", None)
        self.metrics = Metrics(
            queue_depth=lambda: self.batcher.depth(),
            in_flight=lambda: self.in_flight,
            prompt_tokens=lambda: cache.prompt_tokens if cache is not None else 0,
            reused_tokens=lambda: cache.reused_tokens if cache is not None else 0,
        )
        # A request joins a running batch at the next step where the engine allows it, so waiting for company
        # only delays it; where batches run whole, a few ms let a burst start together.
        wait_ms = cfg.batch_wait_ms if cfg.batch_wait_ms is not None else (0.0 if replier.engine.joins else 5.0)
        self.batcher = Batcher(
            replier.stream,
            max_batch=cfg.max_batch,
            wait_s=wait_ms / 1000,
            queue_size=cfg.queue_size,
            metrics=self.metrics,
        )
        self.dialog = Dialog(triage, intents, replier, self.metrics)
        self.store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.started = time.time()
        self.port: int | None = None  # set by serve() once the socket is bound

    async def db(self, fn, *args, **kwargs):
        """Run a store call on the store thread (SQLite blocks; the event loop must not)."""
        return await asyncio.get_running_loop().run_in_executor(self.store_thread, lambda: fn(*args, **kwargs))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        eng = self.replier.engine
        log(
            "ready",
            host=self.cfg.host,
            port=self.port,
            model=self.cfg.model,
            engine=eng.name,
            device=eng.device,
            source=self.replier.source.kind,
            db=self.cfg.db,
            triage_rules=self.dialog.triage.rules_version,
            triage_model=self.dialog.triage.model.version,
        )
        try:
            yield
        finally:
            await self.batcher.close()
            await self.db(self.store.close)
            self.store_thread.shutdown(wait=True)
            self.replier.close()
            log("stopped", uptime_s=round(time.time() - self.started, 1))

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
            if urgent is None:
                wait = self.limiter.check(user_id, time.monotonic())
                if wait is not None:
                    return self.finish(
                        429,
                        t0,
                        {
                            "detail": f"rate limit: at most {cfg.rate_limit} messages per "
                            f"{cfg.rate_window_s:g} s per user; retry in {wait} s"
                        },
                        {**headers, "Retry-After": str(wait)},
                        error="rate_limited",
                        **ids,
                    )
                try:
                    ticket = self.batcher.reserve()
                except QueueFull:
                    return self.finish(
                        503,
                        t0,
                        {
                            "detail": f"busy: {cfg.queue_size} requests are waiting for the "
                            "model (queue_size); retry shortly"
                        },
                        {**headers, "Retry-After": "1"},
                        error="queue_full",
                        **ids,
                    )
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
                            future = ticket.submit(plan.prompt)
                            # shield: a timeout or a client that leaves stops this wait, never the batch
                            generated = await asyncio.shield(future)
                            batch = generated.batch_size
                            plan = self.dialog.finish(plan, self.replier.decode(generated.ids))
            except TimeoutError:
                if future is not None:
                    future.cancel()  # still queued: skipped; already in the engine: its row is dropped
                return self.finish(
                    504,
                    t0,
                    {
                        "detail": f"timeout: no reply within {cfg.request_timeout_s:g} s "
                        "(request_timeout_s); send the message again"
                    },
                    headers,
                    error="timeout",
                    **ids,
                )
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
            self.metrics.actions.inc(plan.action)
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
                **ids,
            )
        except ShuttingDown:
            return self.finish(
                503,
                t0,
                {"detail": "the server is shutting down; retry shortly"},
                {**headers, "Retry-After": "1"},
                error="shutting_down",
                **ids,
            )
        except EngineFailed as e:
            return self.finish(
                500,
                t0,
                {"detail": f"generation failed ({e}); request id {rid} in the server log"},
                headers,
                error="engine",
                **ids,
            )
        except Exception as e:
            log("chat_error", logging.ERROR, exc_info=e, request_id=rid, error=type(e).__name__)
            return self.finish(
                500,
                t0,
                {"detail": f"internal error; request id {rid} in the server log"},
                headers,
                error="internal",
                **ids,
            )
        finally:
            if ticket is not None:
                ticket.release()
            self.in_flight -= 1


def create_app(cfg: ServeConfig, engine=None, store: ConversationStore | None = None) -> FastAPI:
    """The FastAPI app for ``cfg``. Loads the model (unless ``engine`` is given) and opens the store
    (``cfg.db`` as SQLite unless ``store`` is given); run it with uvicorn, or call :func:`serve`.

    Raises:
        ConfigError: a setting, the model folder, the rule files or the database is unusable.
    """
    check(cfg)
    # Cheap things first, so their mistakes show before the model loads.
    triage, intents = Triage(resolve_path(cfg.emergency)), Intents(resolve_path(cfg.intents))
    source = resolve_model(cfg.model)  # a LoRA run or a half export is refused before the database is touched
    store = store if store is not None else SQLiteStore(cfg.db)
    try:
        replier = load_replier(cfg, engine, source)
    except BaseException:
        store.close()
        raise
    server = _Server(cfg, triage, intents, store, replier)
    app = FastAPI(
        title="lora-med serve",
        version="1",
        lifespan=server.lifespan,
        description="The seed guide's /chat/ app on a model fine-tuned and exported with lora-med.",
    )
    app.state.server = server
    ChatRequest = _request_model(cfg.max_message_chars)

    @app.post(
        "/chat/",
        response_model=ChatResponse,
        responses={
            422: {"description": "Invalid body (the field and the limit are named)"},
            429: {"description": "Rate limit (Retry-After)"},
            503: {"description": "Queue full"},
            504: {"description": "Timeout"},
        },
    )
    async def chat(body: ChatRequest) -> JSONResponse:  # type: ignore[valid-type]
        """Answer one patient message (the seed guide's request and response)."""
        return await server.chat(body.user_id, body.message)

    @app.get("/health")
    async def health() -> dict:
        """Model, engine, device, uptime, queue depth, and which triage rules and model run."""
        eng = server.replier.engine
        cache = getattr(eng, "prefix_cache", None)
        return {
            "status": "ok",
            "model": cfg.model,
            "source": server.replier.source.kind,
            "engine": eng.name,
            "device": eng.device,
            "precision": eng.precision,
            "capacity": eng.capacity,
            "format": server.replier.fmt,
            "prompt_budget": server.replier.budget,
            "uptime_s": round(time.time() - server.started, 1),
            "queue_depth": server.batcher.depth(),
            "in_flight": server.in_flight,
            "max_batch": cfg.max_batch,
            "batching": "continuous" if eng.joins else "whole batches",
            "batch_wait_ms": server.batcher.wait_s * 1000,
            "cut_block": server.replier.cut_block,
            "prefix_cache_mb": cache.max_bytes / 2**20 if cache is not None else 0,
            "triage": server.dialog.triage.versions(),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem(e, cfg.max_message_chars) for e in exc.errors()]
        # The offending input is not echoed back or logged: it may be the patient's message.
        detail = [
            {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": p} for e, p in zip(exc.errors(), problems)
        ]
        return server.finish(
            422,
            time.perf_counter(),
            {"detail": detail, "error": "; ".join(problems)},
            error="invalid_body",
            problems=[d["type"] for d in detail],
        )

    return app


def _problem(err: dict, max_chars: int) -> str:
    """One line naming the field and what is wrong with it."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')}); send "
            '{"user_id": "+59170123456", "message": "..."}'
        )
    if kind == "missing":
        if field == "body":
            return 'body: empty; send {"user_id": "+59170123456", "message": "..."}'
        return f"{field}: required field is missing"
    if field == "message" and kind == "string_too_long":
        return f"message: at most {max_chars} characters (max_message_chars)"
    if field == "user_id" and kind == "string_pattern_mismatch":
        return "user_id: must be a phone number such as +59170123456 (7 to 15 digits, optional +)"
    return f"{field}: {err.get('msg', 'invalid')}"


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a busy port fails fast with a clear error."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); is another "
            "server running? choose another --port (0 picks a free one)"
        ) from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM finish the requests in flight, then stop).

    Raises:
        ConfigError: settings, model, rules, database or port unusable (before anything is served).
    """
    import logging.config

    import uvicorn

    check(cfg)
    logging.config.dictConfig(logging_config(cfg.log_file))
    sock = _bind(cfg.host, cfg.port)
    try:
        app = create_app(cfg)
        app.state.server.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=logging_config(cfg.log_file),
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(cfg.request_timeout_s) + 5,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
