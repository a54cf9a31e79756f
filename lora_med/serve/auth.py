"""A key at the door: ``Authorization: Bearer <key>`` on every route but the two probes.

Keys come from ``--api-key-file`` (one per line: several keys let a clinic rotate them, adding the new key,
moving its apps over, then removing the old one; blank lines and ``#`` comments are skipped) and from the
``LORA_MED_API_KEY`` environment variable. A key is compared with every configured key in constant time
(``hmac.compare_digest``, all of them, whatever matches), and never logged: the log line of a refusal says
only which route and why (``missing`` or ``wrong`` key).

Binding a host other than loopback without a key is refused (``check_exposure``) unless ``--insecure-no-auth``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

from ..errors import ConfigError, LoraMedError
from ..fileio import read_regular
from ..settings import describe
from .config import ServeConfig
from .logs import log

ENV_KEY = "LORA_MED_API_KEY"
OPEN_PATHS = frozenset({"/health/live", "/health/ready"})  # what a load balancer or orchestrator probes
MIN_KEY_CHARS = 16


def load_keys(cfg: ServeConfig) -> list[bytes]:
    """The keys from ``cfg.api_key_file`` and ``LORA_MED_API_KEY`` (empty: no key set).

    Raises:
        ConfigError: the file is missing, unreadable or holds no key, or a key is too short or not ASCII.
    """
    found: list[tuple[str, str]] = []  # (where it was given, the key)
    if cfg.api_key_file:
        flag = describe(cfg, "api_key_file")
        try:
            raw = read_regular(cfg.api_key_file, "give a text file with one API key per line", limit=1 << 20)
        except LoraMedError as e:
            raise ConfigError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
        try:
            lines = raw.decode("ascii").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"{flag}: keys must be ASCII text, one per line") from None
        found += [(f"{flag} line {i}", ln.strip()) for i, ln in enumerate(lines, 1) if _is_key_line(ln)]
        if not found:
            raise ConfigError(f"{flag}: holds no key; write one key per line (e.g. from `openssl rand -hex 32`)")
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        found.append((ENV_KEY, env))
    for where, key in found:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key) or not key.isascii():
            raise ConfigError(
                f"{where}: a key must be at least {MIN_KEY_CHARS} ASCII characters without spaces "
                "(e.g. `openssl rand -hex 32`)"
            )
    return [key.encode() for _, key in found]


def _is_key_line(line: str) -> bool:
    return bool(line.strip()) and not line.strip().startswith("#")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_exposure(cfg: ServeConfig, keys: list[bytes]) -> None:
    """Refuse to listen beyond this machine without a key (unless ``--insecure-no-auth``).

    Raises:
        ConfigError: naming the host and the two ways out.
    """
    if keys or cfg.insecure_no_auth or is_loopback(cfg.host):
        return
    raise ConfigError(
        f"{describe(cfg, 'host')}: listening beyond this machine without an API key would let anyone who "
        f"reaches the port read and write patients' conversations; give --api-key-file FILE (or set {ENV_KEY}), "
        "or --insecure-no-auth if something in front of the server checks every request"
    )


def matches(given: bytes, keys: list[bytes]) -> bool:
    """``given`` equals one of ``keys``; every key is compared (constant time per key, no early exit)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


class BearerAuth:
    """Pure ASGI middleware (streamed responses and their cancellation pass through untouched): 401 unless the
    request carries one of ``keys``; the probes in ``OPEN_PATHS`` are always open. ``refused(reason)`` counts."""

    def __init__(self, app, keys: list[bytes], refused=None):
        self.app = app
        self.keys = keys
        self.refused = refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        why = "missing" if not token.strip() else "wrong"
        if self.refused is not None:
            self.refused("unauthorized")
        log("unauthorized", path=scope["path"], key=why, client=(scope.get("client") or ("?",))[0])
        message = (
            "missing API key: send the header Authorization: Bearer <key>"
            if why == "missing"
            else "wrong API key: the key sent is not one of the server's keys"
        )
        body: dict[str, object]
        if scope["path"].startswith("/v1/"):  # the OpenAI clients read error.message / error.code
            body = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            }
        else:
            body = {"detail": message, "error": "unauthorized"}
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
