"""The OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed or not).

Same engine, same turn as ``/chat/`` (:mod:`lora_med.serve.turn`): the last message (role ``user``) gets the
triage's first look (an emergency is answered by the triage, never by the model, never refused), the
flow's ``action``/``status`` from the conversation, the prompt in the training format, and ``finish`` over the
model's text. Like OpenAI's, the API is stateless: the client sends the conversation in ``messages`` (system
and tool messages are left out of the prompt: the model was trained on patient/assistant turns) and nothing
is stored; the flow's state of earlier assistant turns is worked out again from the messages. The response
carries ``lora_med: {action, params, source}`` beside OpenAI's fields (clients ignore what they do not know).

Streaming is server-sent events: a first chunk with the role, then ``choices[0].delta.content`` chunks as the
engine makes tokens and the checks release them (:mod:`lora_med.serve.release`), a chunk with
``finish_reason``, optionally one with ``usage``, then ``data: [DONE]``. A client that disconnects mid-stream
(or, not streaming, before the reply) frees its engine row at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import RowSettings
from .batcher import EngineFailed, EngineStopped, Overloaded, ShuttingDown, Ticket
from .intents import EMERGENCY_STATUS
from .logs import log
from .release import Gate, cut_at_stop
from .server import Server, overloaded_body
from .store import Turn
from .turn import Plan

V1_EXAMPLE = '{"model": "...", "messages": [{"role": "user", "content": "Hola, necesito una cita"}]}'


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    # OpenAI parameters this server has no use for (presence_penalty, logit_bias, ...) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class ApiError(Exception):
    """An error in OpenAI's shape (the clients raise it as ``openai.<Kind>Error`` with ``.code``/``.param``)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _reply(plan: Plan) -> str:
    """The reply of a plan that has one (written by the triage, the facts, or ``finish``)."""
    assert plan.reply is not None
    return plan.reply


def not_ready(e: EngineStopped) -> ApiError:
    """503 for a request the model would answer, once the engine was given up (see ``Batcher.broken``)."""
    return ApiError(503, f"not ready: {e}; the server log has the error", "engine_stopped")


def install(app: FastAPI, server: Server) -> None:
    """Add the /v1 routes to ``app``."""
    cfg = server.cfg
    model_id = cfg.model_id or Path(cfg.model.rstrip("/")).name or "lora-med"
    card = {"id": model_id, "object": "model", "created": int(server.started), "owned_by": "lora-med"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.get("/v1/models", tags=["OpenAI-compatible"])
    async def models() -> dict:
        """The served model (its id is what ``model`` must say)."""
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}", tags=["OpenAI-compatible"])
    async def model(name: str) -> dict:
        if name != model_id:
            raise ApiError(
                404, f"The model `{name}` does not exist; this server serves `{model_id}`.", "model_not_found", "model"
            )
        return card

    @app.post("/v1/chat/completions", tags=["OpenAI-compatible"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's chat completions: ``messages`` in, the assistant's reply out (``stream``: server-sent events)."""
        return await Completion(server, body, model_id).run(request)


class Completion:
    """One /v1/chat/completions request."""

    def __init__(self, server: Server, body: CompletionRequest, model_id: str):
        self.server, self.body, self.model_id = server, body, model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.fields: dict = {"request_id": self.id[9:21], "user": body.user or "", "stream": body.stream}
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        self.stop = [s for s in stop if s]
        cfg = server.cfg
        asked = body.max_completion_tokens or body.max_tokens
        self.max_new = min(asked, cfg.max_new_tokens) if asked else cfg.max_new_tokens  # the server's limit rules
        self.row = RowSettings(
            max_new_tokens=self.max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        # a stream's engine job and what its end must release (close(), once, whatever ends the stream)
        self.future: asyncio.Future | None = None
        self.ticket: Ticket | None = None
        self.status, self.closed, self.streaming = 200, False, False

    def done(self, status: int, **fields) -> None:
        """Count and log the request (no message text)."""
        s = self.server
        s.metrics.openai_requests.inc(status)
        ms = round(1000 * (time.perf_counter() - self.t0), 1)
        log(
            "completion", logging.INFO if status < 500 else logging.ERROR, status=status, ms=ms, **self.fields, **fields
        )

    def fail(self, err: ApiError, **fields) -> JSONResponse:
        self.done(err.status, error=err.body["error"]["code"], **fields)
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    async def run(self, request: Request) -> Response:
        s, body = self.server, self.body
        if body.model != self.model_id:
            msg = f"The model `{body.model}` does not exist; this server serves `{self.model_id}` (GET /v1/models)."
            return self.fail(ApiError(404, msg, "model_not_found", "model"))
        last = body.messages[-1]
        message = last.text()
        if last.role != "user" or not message.strip():
            msg = "messages: the last message must be the patient's (role user, with text)"
            return self.fail(ApiError(422, msg, "invalid_body", f"messages.{len(body.messages) - 1}"))
        if len(message) > s.cfg.max_message_chars:
            msg = f"messages.{len(body.messages) - 1}.content: at most {s.cfg.max_message_chars} characters (max_message_chars)"
            return self.fail(ApiError(422, msg, "invalid_body", f"messages.{len(body.messages) - 1}.content"))
        s.in_flight += 1
        ticket = None
        try:
            urgent = s.dialog.first_look(message)
            if body.user and (limited := s.limit(body.user, urgent)) is not None:
                _, detail, headers = limited
                return self.fail(ApiError(429, detail["detail"], "rate_limit_exceeded", None, headers))
            if urgent is None:
                ticket = s.batcher.reserve()
            plan = s.dialog.plan(message, self.history(), urgent)
            self.fields.update(action=plan.action, prompt_tokens=len(plan.prompt or ()))
            if body.stream:
                tokens: asyncio.Queue = asyncio.Queue()
                if plan.prompt is not None:
                    assert ticket is not None  # a prompt only when the triage did not answer: reserved above
                    self.future = ticket.submit(plan.prompt, self.row, listener=tokens.put_nowait)
                    self.future.add_done_callback(lambda _: tokens.put_nowait(None))
                self.ticket, ticket, self.streaming = ticket, None, True
                stream = self.events(plan, tokens)
                # A response cancelled before its first chunk never runs the generator's finally: close() then
                # runs when the generator is collected, so the row and the ticket are freed either way.
                weakref.finalize(stream, self.close, plan)
                headers = {
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    "X-Request-Id": self.fields["request_id"],
                }
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            return await self.whole(plan, ticket, request)
        except Overloaded as e:
            s.metrics.refused.inc("overloaded")
            err = ApiError(503, overloaded_body(e)["detail"], "overloaded", None, {"Retry-After": str(e.retry_after)})
            err.body.update({k: v for k, v in overloaded_body(e).items() if k not in ("detail", "error")})
            return self.fail(err, expected_wait_s=round(e.expected_s, 2))
        except EngineStopped as e:  # before ShuttingDown, its parent: the engine was given up, not stopped
            return self.fail(not_ready(e))
        except ShuttingDown:
            return self.fail(
                ApiError(503, "the server is shutting down; retry shortly", "shutting_down", None, {"Retry-After": "1"})
            )
        finally:
            if ticket is not None:
                ticket.release()
            if not self.streaming:  # a stream counts itself out in close()
                s.in_flight -= 1

    def history(self) -> list[Turn]:
        """The conversation before the last message as stored turns would be: user and assistant messages, each
        assistant turn with the flow's action and status worked out again from the messages before it."""
        dialog, turns, asked = self.server.dialog, [], None
        for m in self.body.messages[:-1]:
            if m.role == "user":
                asked = m.text()
                turns.append(Turn("user", asked))
            elif m.role == "assistant":
                if asked is None:
                    turns.append(Turn("assistant", m.text()))
                    continue
                before = turns[:-1]
                if dialog.first_look(asked) is not None:
                    action, status = "emergency", EMERGENCY_STATUS
                else:
                    d = dialog.intents.decide(asked, before)
                    action, status = d.action, d.status
                turns.append(Turn("assistant", m.text(), action, status))
        return turns

    def text_of(self, ids: list[int]) -> tuple[str, bool]:
        return cut_at_stop(self.server.replier.decode(ids), self.stop)

    def extra(self, plan: Plan) -> dict:
        return {"action": plan.action, "params": plan.params(), "source": plan.source}

    def usage(self, plan: Plan, completion: int) -> dict:
        prompt = len(plan.prompt or ())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self, plan: Plan, ticket, request: Request) -> Response:
        """Not streamed: the reply once made and checked; a client that leaves first frees the row."""
        s, ids, reason = self.server, [], "stop"
        if plan.prompt is not None:
            future = ticket.submit(plan.prompt, self.row)
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                async with asyncio.timeout(s.cfg.request_timeout_s):
                    await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                future.cancel()
                msg = f"timeout: no reply within {s.cfg.request_timeout_s:g} s (request_timeout_s)"
                return self.fail(ApiError(504, msg, "timeout"))
            finally:
                gone.cancel()
            if not future.done():  # the client left: nobody reads what follows
                future.cancel()
                s.metrics.client_gone.inc()
                self.done(499, error="client_gone")
                return Response(status_code=499)
            try:
                generated = future.result()
            except EngineFailed as e:
                return self.fail(
                    ApiError(
                        500,
                        f"generation failed ({e}); request id {self.fields['request_id']} in the server log",
                        "engine",
                    )
                )
            except EngineStopped as e:
                return self.fail(not_ready(e))
            except ShuttingDown:
                return self.fail(
                    ApiError(
                        503, "the server is shutting down; retry shortly", "shutting_down", None, {"Retry-After": "1"}
                    )
                )
            ids = generated.ids
            text, stopped = self.text_of(ids)
            reason = "length" if len(ids) >= self.max_new and not stopped else "stop"
            plan = s.dialog.finish(plan, text)
        s.metrics.actions.inc(plan.action)
        s.metrics.sources.inc(plan.source)
        out = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": plan.reply},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            ],
            "usage": self.usage(plan, len(ids)),
            "lora_med": self.extra(plan),
        }
        self.done(200, source=plan.source, completion_tokens=len(ids))
        return JSONResponse(out, headers={"X-Request-Id": self.fields["request_id"]})

    def chunk(self, delta: dict | None, reason: str | None = None, **extra) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}]
        data = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    async def events(self, plan: Plan, tokens: asyncio.Queue) -> AsyncIterator[bytes]:
        """The streamed reply (see the module docstring); its ``finally`` frees the row whatever ends it."""
        s, future = self.server, self.future
        ids, outcome, reason = [], "kept", "stop"
        gate = Gate(lambda text: _reply(s.trial.finish(plan, text)), s.cfg.stream_release, self.stop)
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            if future is not None:
                halted = False
                async with asyncio.timeout(s.cfg.request_timeout_s):
                    while (new := await tokens.get()) is not None:
                        ids += new
                        text, stopped = self.text_of(ids)
                        out, halt = gate.feed(text)
                        if out:
                            yield self.chunk({"content": out})
                        if halt or stopped:
                            halted = True
                            future.cancel()  # the row is freed at the next step
                            break
                if future.done() and not future.cancelled():
                    ids = future.result().ids  # EngineFailed / ShuttingDown: the error event below
                text, stopped = self.text_of(ids)
                reason = "length" if len(ids) >= self.max_new and not (stopped or halted) else "stop"
                plan = s.dialog.finish(plan, text)
                rest, outcome = gate.end(text, _reply(plan))
            else:
                rest = _reply(plan)  # the guard's reply: no model, sent whole
            if rest:
                yield self.chunk({"content": rest})
            s.metrics.actions.inc(plan.action)
            s.metrics.sources.inc(plan.source)
            s.metrics.stream_checks.inc(outcome)
            self.fields.update(source=plan.source, outcome=outcome, completion_tokens=len(ids))
            yield self.chunk({}, reason, lora_med=self.extra(plan))
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self.chunk(None, usage=self.usage(plan, len(ids)))
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client left: Starlette cancelled the response task
            self.status = 499
            raise
        except (TimeoutError, EngineFailed, ShuttingDown) as e:  # the status line is sent: say it in the stream
            self.status = {TimeoutError: 504, EngineFailed: 500}.get(type(e), 503)
            msg = f"{type(e).__name__}: the reply could not be finished; request id {self.fields['request_id']}"
            error = {"error": {"message": msg, "type": "server_error", "param": None, "code": str(self.status)}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
        finally:
            self.close(plan)

    def close(self, plan: Plan) -> None:
        """Free the stream's row (its job cancelled: dropped at the next step) and ticket; count and log it."""
        if self.closed:
            return
        self.closed = True
        s = self.server
        if self.future is not None and not self.future.done():
            self.future.cancel()
            if self.status == 200:
                self.status = 499  # ended before the reply did: the client went away
        if self.status == 499:
            s.metrics.client_gone.inc()
        if self.ticket is not None:
            self.ticket.release()
        s.in_flight -= 1
        self.done(self.status)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (once the body is read, ``receive()`` only yields ``http.disconnect``)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
