"""The HTTP edge: the body limit (413 before parsing) and JSON parsing that cannot overflow the stack (422).

* ``BodyLimit``, a pure ASGI middleware: a ``Content-Length`` over ``--max-body-bytes`` is answered 413 before a
  byte of the body is read (the app never runs); a chunked body or a lying header gets 413 as soon as the bytes
  received pass the limit. The body is never buffered whole. A body announced over the limit but small enough
  to drain (8 MiB) is read and dropped first, so the client surely reads the 413 and keeps its connection;
  a larger one is answered at once with ``Connection: close``.
* ``StrictJSONRoute``: FastAPI parses bodies with ``json.loads``, whose ``RecursionError`` on a body nested
  ~1,000 levels deep FastAPI turns into a bare 400 that no handler of the app sees (not logged, not counted).
  This route parses with pydantic-core (a nesting limit of 200, no recursion), so such a body, invalid UTF-8
  and lone surrogates are 422 ``json_invalid`` through the app's validation handler like any bad body.

The over-limit exception raised from ``receive`` subclasses Starlette's ``HTTPException`` on purpose: FastAPI
re-raises those while reading a body, but turns any other exception into the same bare 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pydantic_core
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

DRAIN_BYTES = 8 << 20


def too_large_body(max_bytes: int) -> dict:
    return {
        "detail": f"body too large: at most {max_bytes} bytes (max_body_bytes)",
        "error": f"body: larger than {max_bytes} bytes",
    }


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(status_code=413, detail=too_large_body(max_bytes)["detail"])
        self.max_bytes = max_bytes


class BodyLimit:
    """413 for request bodies over ``max_bytes``; ``refused(length)`` is called once per refusal (count, log)."""

    def __init__(self, app, max_bytes: int, refused: Callable[[dict, int | None], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.refused = refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = content_length(scope)
        if length is not None and length > self.max_bytes:
            drained = length <= DRAIN_BYTES and await _drain(receive)
            await self._reject(scope, send, length, close=not drained)
            return
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._reject(scope, send, length, close=True)

    async def _reject(self, scope, send, length: int | None, close: bool) -> None:
        if self.refused is not None:
            self.refused(scope, length)
        body = json.dumps(too_large_body(self.max_bytes)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive) -> bool:
    """Read the body to its end, keeping nothing; False if the client went away."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


def content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class StrictJSONRequest(Request):
    """``json()`` by pydantic-core: nesting past 200 levels, invalid UTF-8 and lone surrogates are errors that
    FastAPI reports as 422 ``json_invalid`` (it makes a ``JSONDecodeError`` one), never a RecursionError."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as e:
                raise json.JSONDecodeError(str(e), body.decode("utf-8", "replace"), _column(str(e))) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """``app.router.route_class = StrictJSONRoute`` before adding routes: each parses JSON with StrictJSONRequest."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def _column(message: str) -> int:
    """The offset pydantic-core names ("... at line 1 column 202")."""
    try:
        return max(0, int(message.rsplit("column ", 1)[1]) - 1)
    except (IndexError, ValueError):
        return 0


CHAT_EXAMPLE = '{"user_id": "+59170123456", "message": "..."}'


def problem(err: dict, max_chars: int, example: str = CHAT_EXAMPLE) -> str:
    """One line naming the field of a validation error and what is wrong with it (never the value sent);
    ``example``: the body to suggest when it is not JSON or empty."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')}); send {example}"
    if kind == "missing":
        if field == "body":
            return f"body: empty; send {example}"
        return f"{field}: required field is missing"
    if field == "message" and kind == "string_too_long":
        return f"message: at most {max_chars} characters (max_message_chars)"
    if field == "user_id" and kind == "string_pattern_mismatch":
        return "user_id: must be a phone number such as +59170123456 (7 to 15 digits, optional +)"
    return f"{field}: {err.get('msg', 'invalid')}"
