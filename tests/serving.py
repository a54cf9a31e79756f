"""Helpers for the server tests: an app run by a real uvicorn in this process, and a slow device.

``SlowBackend`` wraps the tiny model's real step backend: each call waits ``delay_s`` first (a slow device)
and, with ``endless``, EOS is never chosen, so every reply runs to its token limit. The engine, the app,
uvicorn and the store around it are real; only the device's speed is set, so waits and cancellations
happen on cue.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np


class SlowBackend:
    def __init__(self, inner, eos: int, delay_s: float, endless: bool = True):
        self.inner, self.eos, self.delay_s, self.endless = inner, eos, delay_s, endless
        self.capacity, self.joins = inner.capacity, inner.joins
        self.restores_prefixes = False  # keeps no prefix cache: every prompt is prefilled whole
        self.steps = 0

    def scope(self):
        return self.inner.scope()

    def open(self, rows: int) -> None:
        self.inner.open(rows)

    def _slow(self, logits: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        self.steps += 1
        if self.endless:
            logits[:, self.eos] = -np.inf
        return logits

    def prefill(self, at, rows, max_new_tokens, reuse=None):
        return self._slow(self.inner.prefill(at, rows, max_new_tokens, reuse=None))

    def snapshot(self, row, n):
        raise NotImplementedError("restores_prefixes is False: the engine never asks")

    def step(self, tokens, active):
        return self._slow(self.inner.step(tokens, active))

    def close(self) -> None:
        self.inner.close()


def slow_engine(model_dir, delay_s: float = 0.02, endless: bool = True):
    from lora_med.engine import Engine, load_engine

    real = load_engine(model_dir, device="cpu", threads=1)
    backend = SlowBackend(real._backend, real.eos_token_id, delay_s, endless)
    return Engine(
        backend,
        name="engine-slow",
        device="cpu",
        precision="fp32",
        eos_token_id=real.eos_token_id,
        vocab_size=real.vocab_size,
    )


@contextlib.contextmanager
def running(app):
    """``app`` under a real uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
        sock.close()
