"""The server's FastAPI app: routes, the HTTP edge, and ``serve``.

Routes: the seed guide's ``POST /chat/`` (its request path is :mod:`lora_med.serve.server`), the OpenAI-compatible
``/v1`` (:mod:`lora_med.serve.openai_api`), ``/health/live`` and ``/health/ready`` (probes, always open),
``/health`` (details) and ``/metrics``. In front of them, outermost first: the API key (:mod:`.auth`, when keys
are set), the body limit (:mod:`.http`, 413 before parsing). Bodies are parsed by ``StrictJSONRoute``, so every
malformed body is a 422 naming the field, logged and counted, deeply nested JSON included.

(No ``from __future__ import annotations`` here: FastAPI reads the route's body annotation at runtime, and
the request model is built per app, with that app's message limit.)
"""

import errno
import socket
import time
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from ..errors import ConfigError
from . import openai_api
from .auth import BearerAuth, check_exposure, load_keys
from .config import ServeConfig, check, resolve_path
from .http import BodyLimit, BodyTooLarge, StrictJSONRoute, content_length, problem, too_large_body
from .intents import Intents
from .logs import log, logging_config
from .metrics import CONTENT_TYPE
from .referee import load_referee
from .replier import load_replier, resolve_model
from .schemas import ChatResponse, request_model
from .server import Server
from .store import ConversationStore, SQLiteStore
from .triage import Triage


def open_store(cfg: ServeConfig) -> ConversationStore:
    """``cfg.store`` (a PostgreSQL URL) when set, else the SQLite file ``cfg.db``.

    Raises:
        ConfigError: the database cannot be opened or reached (named, with the fix).
    """
    if cfg.store:
        from .postgres import PostgresStore

        return PostgresStore(cfg.store, pool_size=cfg.store_pool)
    return SQLiteStore(cfg.db)


def create_app(cfg: ServeConfig, engine=None, store: ConversationStore | None = None) -> FastAPI:
    """The FastAPI app for ``cfg``. Loads the model (unless ``engine`` is given) and opens the store
    (``cfg.store`` or the SQLite file ``cfg.db``, unless ``store`` is given); run it with uvicorn, or call
    :func:`serve`.

    Raises:
        ConfigError: a setting, the API keys, the model folder, the rule files or the database is unusable.
    """
    check(cfg)
    keys = load_keys(cfg)
    check_exposure(cfg, keys)
    # Cheap things first, so their mistakes show before the model loads.
    triage, intents = Triage(resolve_path(cfg.emergency)), Intents(resolve_path(cfg.intents))
    referee = load_referee(cfg.facts, cfg.replies, cfg.words, cfg.now, cfg.check_replies)
    source = resolve_model(cfg.model)  # a LoRA run or a half export is refused before the database is touched
    store = store if store is not None else open_store(cfg)
    try:
        replier = load_replier(cfg, engine, source)
    except BaseException:
        store.close()
        raise
    server = Server(cfg, triage, intents, store, replier, keys, referee)
    app = FastAPI(
        title="lora-med serve",
        version="1",
        lifespan=server.lifespan,
        description="The seed guide's /chat/ app, and an OpenAI-compatible /v1, on a model fine-tuned and "
        "exported with lora-med.",
    )
    app.state.server = server
    app.router.route_class = StrictJSONRoute  # before any route: deep JSON is a 422, not FastAPI's bare 400

    def too_large(scope: MutableMapping[str, Any], length: int | None) -> None:
        server.metrics.refused.inc("too_large")
        log("too_large", path=scope.get("path"), content_length=length, max_body_bytes=cfg.max_body_bytes)

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, refused=too_large)

    @app.exception_handler(BodyTooLarge)
    async def over_limit(request: Request, exc: BodyTooLarge) -> JSONResponse:
        """A body that passed the limit while a route read it (chunked, or a lying Content-Length)."""
        too_large(request.scope, content_length(request.scope))
        return JSONResponse(too_large_body(exc.max_bytes), status_code=413, headers={"Connection": "close"})

    if keys:  # added last: outermost, so a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, keys=keys, refused=server.metrics.refused.inc)
    ChatRequest = request_model(cfg.max_message_chars)

    @app.post(
        "/chat/",
        response_model=ChatResponse,
        responses={
            401: {"description": "No API key or a wrong one (when the server has keys)"},
            413: {"description": "Body larger than max_body_bytes"},
            422: {"description": "Invalid body (the field and the limit are named)"},
            429: {"description": "Rate limit (Retry-After)"},
            503: {"description": "Busy: the expected wait passes request_timeout_s (Retry-After; Spanish and English)"},
            504: {"description": "Timeout"},
        },
    )
    async def chat(body: ChatRequest) -> JSONResponse:  # type: ignore[valid-type]
        """Answer one patient message (the seed guide's request and response)."""
        return await server.chat(body.user_id, body.message)  # type: ignore[attr-defined]

    openai_api.install(app, server)

    @app.get("/health/live")
    async def live() -> dict:
        """The process answers (no key needed)."""
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """200 when the engine serves and the store answers a query now; 503 otherwise (no key needed)."""
        ok, body = await server.ready()
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})

    @app.get("/health")
    async def health() -> JSONResponse:
        """Model, engine, device, uptime, queue, admission and store (behind the key when there is one); 503 and
        "not ready" once the engine was given up."""
        eng = server.replier.engine
        cache = getattr(eng, "prefix_cache", None)
        _, readiness = await server.ready()
        broken = server.batcher.broken
        body = {
            "status": "ok" if broken is None else "not ready",
            **({"error": broken} if broken else {}),
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
            "engine_rows": server.batcher.running(),
            "max_batch": cfg.max_batch,
            "batching": "continuous" if eng.joins else "whole batches",
            "batch_wait_ms": server.batcher.wait_s * 1000,
            "expected_wait_s": round(server.batcher.expected_wait(), 3),
            "engine_s_per_reply": round(server.batcher.service_s, 4),
            "store_s_per_call": round(server.store_s, 4),
            "request_timeout_s": cfg.request_timeout_s,
            "cut_block": server.replier.cut_block,
            "prefix_cache_mb": cache.max_bytes / 2**20 if cache is not None else 0,
            "triage": server.dialog.triage.versions(),
            "intents": server.dialog.intents.version,
            "store": "postgresql" if cfg.store else "sqlite",
            "ready": readiness,
            "api_keys": len(keys),
            "stream_release": cfg.stream_release,
        }
        return JSONResponse(body, status_code=200 if broken is None else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        v1 = request.url.path.startswith("/v1/")
        example = openai_api.V1_EXAMPLE if v1 else None
        problems = [problem(e, cfg.max_message_chars, *([example] if example else [])) for e in exc.errors()]
        # The offending input is not echoed back or logged: it may be the patient's message.
        detail = [
            {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": p} for e, p in zip(exc.errors(), problems)
        ]
        server.metrics.refused.inc("invalid_body")
        if v1:
            param = ".".join(str(x) for x in exc.errors()[0].get("loc", ()) if x != "body") or None
            err = openai_api.ApiError(422, "; ".join(problems), "invalid_body", param)
            server.metrics.openai_requests.inc(422)
            log("completion", status=422, error="invalid_body", problems=[d["type"] for d in detail])
            return JSONResponse({**err.body, "detail": detail}, status_code=422)
        return server.finish(
            422,
            time.perf_counter(),
            {"detail": detail, "error": "; ".join(problems)},
            error="invalid_body",
            problems=[d["type"] for d in detail],
        )

    return app


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a bad address or a busy port fails fast, with the
    advice that fits (an address this machine does not have is the host's fault, not the port's)."""
    hosts = "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"--host {host}: not an address or a name this machine can resolve ({reason}); {hosts}"
        ) from None
    try:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror}); {hosts}") from None
        if e.errno == errno.EACCES and 0 < port < 1024:
            raise ConfigError(f"--port {port}: ports below 1024 need root; use 8000 or another above 1023") from None
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); is another "
            "server running? choose another --port (0 picks a free one)"
        ) from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM finish the requests in flight, then stop).

    Raises:
        ConfigError: settings, keys, model, rules, database or port unusable (before anything is served).
    """
    import logging.config

    import uvicorn

    check(cfg)
    check_exposure(cfg, load_keys(cfg))  # before binding: an open port without a key is never opened
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
