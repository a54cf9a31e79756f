"""``ConversationStore`` over PostgreSQL: one database shared by several ``lora-med serve`` processes.

Same interface and guarantees as ``SQLiteStore`` (:mod:`lora_med.serve.store`):

* ``begin`` picks the user's open conversation (a new one after ``idle_s`` of silence or on ``restart``),
  stores the message as a user turn and reads the answered history, in ONE transaction;
* ``answer`` stores the reply (``reply_to`` = the user turn; one reply per turn, a unique index);
* nothing committed is lost on ``kill -9`` of a server process: a commit returns only once PostgreSQL has
  flushed its WAL (``synchronous_commit=on``, the default); a killed client's open transaction is rolled
  back by the server and its row locks released at once (the socket closes).

Several processes: ``begin`` first upserts the user's row in ``users`` (``INSERT ... ON CONFLICT DO
UPDATE``), which takes that row's lock until commit. So two ``begin`` calls for the same user, from any
processes, run one after the other: the second sees the first's conversation and turn (READ COMMITTED
gives each statement a fresh snapshot, taken after the lock was granted), never opens a second
conversation, and gets the higher turn id. A partial unique index (one open conversation per user) backs
this up in the schema itself. Different users never wait for each other.

The schema creates and upgrades itself: ``schema_version`` holds the versions applied; ``MIGRATIONS`` is
the list of steps, applied in one transaction under an advisory lock, so two processes starting together
do not race. A database written by a newer lora-med is refused (ConfigError), as SQLiteStore does.

While the database is down or the pool is exhausted a call fails within ``wait_s`` with ``StoreUnavailable``
(the server answers 503 with Retry-After; ``/health/ready`` says 503 too); the pool replaces broken
connections once the database is back. Connections use READ COMMITTED whatever the database's default.

SQL is plain and portable where it can be (``ON CONFLICT``, ``RETURNING`` and partial indexes work in
SQLite 3.35+ too); PostgreSQL-only: ``GENERATED ... AS IDENTITY``, ``DOUBLE PRECISION`` (REAL is 4 bytes
in PostgreSQL: unix times would be rounded to about 2 minutes), ``pg_advisory_xact_lock``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from ..errors import ConfigError
from .store import Opened, StoreUnavailable, Turn

try:
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # the postgres extra is not installed: PostgresStore() says how to get it
    psycopg = None  # type: ignore[assignment]

MIGRATIONS: list[list[str]] = [
    # 1: the SQLiteStore schema, plus users (the per-user lock row) and one open conversation per user
    [
        """CREATE TABLE users (
            user_id   TEXT PRIMARY KEY,
            last_seen DOUBLE PRECISION NOT NULL          -- unix time of the last begin
        )""",
        """CREATE TABLE conversations (
            id          TEXT PRIMARY KEY,                 -- conv_<user_id>_<8 hex>
            user_id     TEXT NOT NULL REFERENCES users (user_id),
            started     DOUBLE PRECISION NOT NULL,
            last_active DOUBLE PRECISION NOT NULL,
            closed_by   TEXT CHECK (closed_by IN ('idle', 'restart'))
        )""",
        "CREATE INDEX conversations_user ON conversations (user_id, last_active)",
        "CREATE UNIQUE INDEX conversations_open ON conversations (user_id) WHERE closed_by IS NULL",
        """CREATE TABLE turns (
            id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id),
            role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content         TEXT NOT NULL,
            ts              DOUBLE PRECISION NOT NULL,
            reply_to        BIGINT UNIQUE REFERENCES turns (id),  -- assistant turns: the user turn answered
            action          TEXT,
            status          TEXT,
            source          TEXT,                                  -- model | facts | guard | fallback | flow
            request_id      TEXT
        )""",
        "CREATE INDEX turns_conversation ON turns (conversation_id, id)",
    ],
    # 2, 3, ...: append new lists here; never edit a released step.
]
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x6C6F7261  # "lora": the advisory lock key held while migrating


class PostgresStore:
    """``ConversationStore`` in PostgreSQL. Thread-safe: each call takes a pooled connection."""

    def __init__(
        self,
        dsn: str,
        *,
        history_turns: int = 64,
        pool_size: int = 4,
        connect_timeout: float = 10,
        wait_s: float = 3,
        lock_timeout_s: float = 10,
    ):
        """Connect, create or upgrade the schema.

        Args:
            dsn: libpq connection string or URI (``postgresql://user:pw@host:5432/db``).
            history_turns: most recent answered exchanges loaded per message.
            pool_size: connections kept at most (the server runs as many store threads).
            connect_timeout: for the first connection (and libpq's connect_timeout).
            wait_s: a call waits at most this long for a pooled connection, then raises StoreUnavailable
                (while the database is down every call waits this long: keep it short).
            lock_timeout_s: a statement waiting longer than this for a lock fails instead of hanging.
        Raises:
            ConfigError: psycopg is not installed, the server cannot be reached, or the database has a newer
                schema.
        """
        if psycopg is None:
            raise ConfigError(
                "--store postgresql://...: needs psycopg 3 and psycopg-pool; pip install 'lora-med[postgres]'"
            )
        self.history_turns = history_turns
        options = f"-c lock_timeout={int(lock_timeout_s * 1000)} -c idle_in_transaction_session_timeout=60000"
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=wait_s,
            name="lora-med-store",
            kwargs={
                "autocommit": True,
                "application_name": "lora-med serve",
                "options": options,
                "connect_timeout": max(1, int(connect_timeout)),
            },
            configure=_configure,
            check=ConnectionPool.check_connection,
        )  # broken by a server restart: replaced
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
            self._migrate()
        except (PoolTimeout, psycopg.OperationalError) as e:
            self._pool.close()
            raise ConfigError(
                f"--store {_safe(dsn)}: cannot connect to PostgreSQL ({str(e).strip()}); check the URL, the "
                "server and its pg_hba.conf"
            ) from None
        except BaseException:
            self._pool.close()
            raise

    # -- schema

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied DOUBLE PRECISION NOT NULL)"
            )
            version = _scalar(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the PostgreSQL database was written by a newer lora-med (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}); upgrade lora-med or use another database"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v - 1]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied) VALUES (%s, %s)", (v, time.time()))

    # -- ConversationStore

    def begin(
        self, user_id: str, message: str, *, now: float, idle_s: float, restart: bool, request_id: str = ""
    ) -> Opened:
        try:
            return self._begin(user_id, message, now=now, idle_s=idle_s, restart=restart, request_id=request_id)
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise StoreUnavailable(f"{type(e).__name__}: {str(e).strip()[:200]}") from None

    def answer(
        self, conversation_id: str, turn_id: int, reply: str, *, action: str, status: str, source: str, now: float
    ) -> None:
        try:
            self._answer(conversation_id, turn_id, reply, action=action, status=status, source=source, now=now)
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise StoreUnavailable(f"{type(e).__name__}: {str(e).strip()[:200]}") from None

    def _begin(
        self, user_id: str, message: str, *, now: float, idle_s: float, restart: bool, request_id: str
    ) -> Opened:
        with self._pool.connection() as conn, conn.transaction():
            # The user's row lock: held until commit, so begin calls for one user run one at a time.
            conn.execute(
                "INSERT INTO users (user_id, last_seen) VALUES (%s, %s) "
                "ON CONFLICT (user_id) DO UPDATE SET last_seen = EXCLUDED.last_seen",
                (user_id, now),
            )
            row = conn.execute(
                "SELECT id, last_active FROM conversations WHERE user_id = %s AND closed_by IS NULL", (user_id,)
            ).fetchone()
            new = row is None or restart or now - row[1] > idle_s
            if new:
                if row is not None:
                    conn.execute(
                        "UPDATE conversations SET closed_by = %s WHERE id = %s",
                        ("restart" if restart else "idle", row[0]),
                    )
                conv = f"conv_{user_id}_{secrets.token_hex(4)}"
                conn.execute(
                    "INSERT INTO conversations (id, user_id, started, last_active) VALUES (%s, %s, %s, %s)",
                    (conv, user_id, now, now),
                )
                history: list[Turn] = []
            else:
                assert row is not None  # not new: the user's open conversation
                conv = row[0]
                history = self._history(conn, conv)
                # GREATEST: a replica whose clock is behind never moves last_active back
                conn.execute(
                    "UPDATE conversations SET last_active = GREATEST(last_active, %s) WHERE id = %s", (now, conv)
                )
            turn_id = _scalar(
                conn.execute(
                    "INSERT INTO turns (conversation_id, role, content, ts, request_id) "
                    "VALUES (%s, 'user', %s, %s, %s) RETURNING id",
                    (conv, message, now, request_id),
                )
            )
            return Opened(conv, new, history, int(turn_id))

    def _answer(
        self, conversation_id: str, turn_id: int, reply: str, *, action: str, status: str, source: str, now: float
    ) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO turns (conversation_id, role, content, ts, reply_to, action, status, source) "
                "VALUES (%s, 'assistant', %s, %s, %s, %s, %s, %s)",
                (conversation_id, reply, now, turn_id, action, status, source),
            )
            conn.execute(
                "UPDATE conversations SET last_active = GREATEST(last_active, %s) WHERE id = %s", (now, conversation_id)
            )

    def _history(self, conn: psycopg.Connection, conv: str) -> list[Turn]:
        rows = conn.execute(
            "SELECT u.content, a.content, a.action, a.status FROM turns u JOIN turns a ON a.reply_to = u.id "
            "WHERE u.conversation_id = %s AND u.role = 'user' ORDER BY u.id DESC LIMIT %s",
            (conv, self.history_turns),
        ).fetchall()
        out: list[Turn] = []
        for user, reply, action, status in reversed(rows):
            out += [Turn("user", user), Turn("assistant", reply, action, status)]
        return out

    def health(self, timeout: float = 2.0) -> dict:
        """For a readiness probe: one round trip on a pooled connection, within ``timeout`` seconds.

        Returns {"ok": bool, "schema": int | None, "ms": float, "pool": {...}, "error": str (when not ok)}.
        """
        t0 = time.perf_counter()
        try:
            with self._pool.connection(timeout=timeout) as conn, conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
                version = _scalar(conn.execute("SELECT MAX(version) FROM schema_version"))
            ok, error = version == SCHEMA_VERSION, None if version == SCHEMA_VERSION else f"schema {version}"
        except (PoolTimeout, psycopg.Error) as e:
            ok, version, error = False, None, f"{type(e).__name__}: {str(e).strip()[:200]}"
        stats = self._pool.get_stats()
        out = {
            "ok": ok,
            "kind": "postgresql",
            "schema": version,
            "ms": round(1000 * (time.perf_counter() - t0), 2),
            "pool": {k: stats.get(k, 0) for k in ("pool_size", "pool_available", "requests_waiting")},
        }
        if error:
            out["error"] = error
        return out

    def close(self) -> None:
        self._pool.close()


def _scalar(cur: psycopg.Cursor[Any]) -> Any:
    """The one value of a query that always returns one row (an aggregate, an INSERT ... RETURNING)."""
    row = cur.fetchone()
    assert row is not None  # such a query always has its row
    return row[0]


def _configure(conn: psycopg.Connection) -> None:
    """READ COMMITTED whatever the database's default: begin relies on each statement's fresh snapshot after the
    user's row lock (under REPEATABLE READ/SERIALIZABLE a second writer for the user would fail instead)."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED


def _safe(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **params)
