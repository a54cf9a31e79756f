"""Conversation memory: every turn, behind one small interface.

``ConversationStore`` is all the server uses (two calls per message, plus ``health`` and ``close``).
``SQLiteStore`` is the embedded default: one file in WAL mode with ``synchronous=FULL``, so a committed turn
survives a ``kill -9`` and a power cut, and readers never block the writer; the file and its WAL/SHM files
are created readable by their owner only (0600: they hold patients' names and numbers). Several replicas
share one PostgreSQL database instead (``--store postgresql://...``, :mod:`lora_med.serve.postgres`), with the
same guarantees; ``app.open_store`` picks one from the settings.

A user turn is stored as soon as the message is accepted; the reply is stored with ``reply_to`` pointing
at it. The prompt history holds answered exchanges only: a message whose reply never came (the server was
killed, the request timed out) stays in the file but is left out of later prompts, so the model always
sees user/assistant turns alternating, as in training.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id          TEXT PRIMARY KEY,          -- conv_<user_id>_<8 hex>
    user_id     TEXT NOT NULL,
    started     REAL NOT NULL,             -- unix time
    last_active REAL NOT NULL,
    closed_by   TEXT                       -- idle | restart, once a newer conversation replaced it
);
CREATE INDEX IF NOT EXISTS conversations_user ON conversations (user_id, last_active);
CREATE TABLE IF NOT EXISTS turns (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content         TEXT NOT NULL,
    ts              REAL NOT NULL,
    reply_to        INTEGER REFERENCES turns (id),   -- assistant turns: the user turn answered
    action          TEXT,
    status          TEXT,
    source          TEXT,                            -- assistant turns: model | facts | guard | fallback | flow
    request_id      TEXT
);
CREATE INDEX IF NOT EXISTS turns_conversation ON turns (conversation_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS turns_reply ON turns (reply_to);
"""


@dataclass(frozen=True)
class Turn:
    """A stored turn, as the prompt and the intent layer read it."""

    role: str  # user | assistant
    content: str
    action: str | None = None  # assistant turns: the action sent with them
    status: str | None = None


@dataclass(frozen=True)
class Opened:
    """What ``begin`` returns: the conversation, its earlier answered turns, and the stored user turn."""

    conversation_id: str
    new: bool  # a new conversation started with this message
    history: list[Turn]  # answered exchanges before this message, oldest first
    turn_id: int  # id of the stored user turn (``answer`` replies to it)


class ConversationStore(Protocol):
    """The store interface the server uses."""

    def begin(
        self, user_id: str, message: str, *, now: float, idle_s: float, restart: bool, request_id: str = ""
    ) -> Opened:
        """Pick the user's conversation (a new one after ``idle_s`` of silence or on ``restart``), store the
        message as a user turn, and return the conversation's earlier answered turns, in one transaction."""
        ...

    def answer(
        self, conversation_id: str, turn_id: int, reply: str, *, action: str, status: str, source: str, now: float
    ) -> None:
        """Store the reply to user turn ``turn_id``."""
        ...

    def health(self, timeout: float = 2.0) -> dict:
        """One query, for the readiness probe: ``{"ok": bool, "ms": float, "error": str (when not ok), ...}``."""
        ...

    def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The store cannot be reached now (a shared database down or out of connections): answered 503, retried."""


class SQLiteStore:
    """``ConversationStore`` in one SQLite file (WAL, synchronous=FULL). Safe to call from any one thread at
    a time (the server calls it from its single store thread)."""

    def __init__(self, path: str | Path, *, history_turns: int = 64):
        """Open (or create) the file.

        Args:
            history_turns: most recent answered exchanges loaded per message (the prompt keeps fewer).
        Raises:
            ConfigError: the file is not a SQLite database, holds tables lora-med did not create (another
                application's database), has a newer schema, or cannot be opened.
        """
        self.path = Path(path)
        self.history_turns = history_turns
        self._lock = threading.Lock()
        try:
            _create_private(self.path)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), nothing implicit.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            refuse_foreign_database(self._db, self.path)  # before anything below changes the file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"--db {self.path}: written by a newer lora-med (schema {version}); upgrade "
                    "lora-med or use another --db file"
                )
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except ConfigError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"--db {self.path}: cannot be used as the conversation store ({e}); give a new "
                "file name or a lora-med conversation database"
            ) from None

    def begin(
        self, user_id: str, message: str, *, now: float, idle_s: float, restart: bool, request_id: str = ""
    ) -> Opened:
        with self._lock, self._transaction() as db:
            row = db.execute(
                "SELECT id, last_active FROM conversations WHERE user_id = ? AND closed_by IS NULL "
                "ORDER BY last_active DESC LIMIT 1",
                (user_id,),
            ).fetchone()
            new = row is None or restart or now - row[1] > idle_s
            if new:
                if row is not None:
                    db.execute(
                        "UPDATE conversations SET closed_by = ? WHERE id = ?",
                        ("restart" if restart else "idle", row[0]),
                    )
                conv = f"conv_{user_id}_{secrets.token_hex(4)}"
                db.execute(
                    "INSERT INTO conversations (id, user_id, started, last_active) VALUES (?, ?, ?, ?)",
                    (conv, user_id, now, now),
                )
                history: list[Turn] = []
            else:
                conv = row[0]
                history = self._history(db, conv)
                db.execute("UPDATE conversations SET last_active = ? WHERE id = ?", (now, conv))
            cur = db.execute(
                "INSERT INTO turns (conversation_id, role, content, ts, request_id) VALUES (?, 'user', ?, ?, ?)",
                (conv, message, now, request_id),
            )
            return Opened(conv, new, history, int(cur.lastrowid))

    def answer(
        self, conversation_id: str, turn_id: int, reply: str, *, action: str, status: str, source: str, now: float
    ) -> None:
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO turns (conversation_id, role, content, ts, reply_to, action, status, source) "
                "VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
                (conversation_id, reply, now, turn_id, action, status, source),
            )
            db.execute("UPDATE conversations SET last_active = ? WHERE id = ?", (now, conversation_id))

    def _history(self, db: sqlite3.Connection, conv: str) -> list[Turn]:
        rows = db.execute(
            "SELECT u.content, a.content, a.action, a.status FROM turns u JOIN turns a ON a.reply_to = u.id "
            "WHERE u.conversation_id = ? AND u.role = 'user' ORDER BY u.id DESC LIMIT ?",
            (conv, self.history_turns),
        ).fetchall()
        out: list[Turn] = []
        for user, reply, action, status in reversed(rows):
            out += [Turn("user", user), Turn("assistant", reply, action, status)]
        return out

    def health(self, timeout: float = 2.0) -> dict:
        t0 = time.perf_counter()
        try:
            if not self._lock.acquire(timeout=timeout):
                raise TimeoutError(f"the store was busy for {timeout:g} s")
            try:
                self._db.execute("SELECT id FROM conversations LIMIT 1").fetchall()
            finally:
                self._lock.release()
            out: dict = {"ok": True}
        except (sqlite3.Error, TimeoutError) as e:
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {**out, "kind": "sqlite", "ms": round(1000 * (time.perf_counter() - t0), 2)}

    def _transaction(self):
        return _Transaction(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only; SQLite gives its -wal and -shm files the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass  # an existing database keeps the mode its owner gave it
    except OSError as e:
        raise sqlite3.DatabaseError(e.strerror or str(e)) from None


# What lora-med creates in its file, read from SCHEMA (so a table added there is never taken for a foreign one), and
# sqlite_sequence, SQLite's own table for AUTOINCREMENT.
OWN_OBJECTS = {
    kind.lower(): set(re.findall(rf"CREATE (?:UNIQUE )?{kind} IF NOT EXISTS (\w+)", SCHEMA))
    for kind in ("TABLE", "INDEX")
}
OWN_OBJECTS["table"].add("sqlite_sequence")


def refuse_foreign_database(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that holds tables (or views, triggers, indexes) lora-med did not create: another application's
    database given as ``--db`` would get lora-med's tables added and its journal switched to WAL. Reads only.

    Raises:
        ConfigError: naming the foreign tables.
    """
    rows = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_autoindex_%'").fetchall()
    foreign = sorted(f"{kind} {name}" for kind, name in rows if name not in OWN_OBJECTS.get(kind, set()))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise ConfigError(
            f"--db {path}: holds {shown}, which lora-med did not create: it is another application's database, "
            "and lora-med will not add its tables to it or change its journal mode; give a new file name"
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception: a turn is stored whole or not at all."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
