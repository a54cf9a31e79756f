"""Per-user limits: a sliding-window rate limit, and one message at a time per user.

Both live in the server process (asyncio, one event loop). With several replicas, route each user to one
replica (sticky by ``user_id``) or move both to the shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator

PRUNE_AT = 10_000  # users tracked before idle ones are dropped


class RateLimiter:
    """At most ``limit`` messages per user in any ``window_s`` seconds (``limit`` 0: no limit)."""

    def __init__(self, limit: int, window_s: float):
        self.limit, self.window_s = limit, window_s
        self._hits: dict[str, deque[float]] = {}

    def check(self, user: str, now: float) -> int | None:
        """Record a message and return None, or return the seconds to wait (Retry-After) without recording."""
        if self.limit <= 0:
            return None
        hits = self._hits.setdefault(user, deque())
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(1, math.ceil(hits[0] + self.window_s - now))
        hits.append(now)
        if len(self._hits) > PRUNE_AT:
            self._hits = {u: h for u, h in self._hits.items() if h and h[-1] > now - self.window_s}
        return None


class UserLocks:
    """One message at a time per user, in arrival order: a user's second message waits for the first
    reply, so its prompt holds that exchange (as on WhatsApp, where messages are read in order)."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[None]:
        lock, waiting = self._locks.get(user, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[user] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._locks[user]
            if waiting <= 1:
                del self._locks[user]
            else:
                self._locks[user] = (lock, waiting - 1)
