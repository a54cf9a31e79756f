"""A stand-in for one ``lora-med serve`` process, as far as the store sees it: begin, (the model), answer.
Run by tests/test_pgstore.py as a separate process (so it can be killed with SIGKILL).

    python tests/pg_worker.py DSN jobs                 # JSON lines on stdin -> one result line each on stdout
    python tests/pg_worker.py DSN storm --name A --users u1,u2 --threads 3 --ops 200 --log FILE
    python tests/pg_worker.py DSN hang USER MESSAGE    # begin, then hang inside the transaction (to be killed)

storm logs each call AFTER it returned (so after its COMMIT), one JSON line per event, written with one
os.write on an O_APPEND file: a kill -9 loses at most the calls in flight, never a line half written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from lora_med.serve import postgres
from lora_med.serve.postgres import PostgresStore

IDLE_S = 3600.0


def reply_to(message: str) -> str:
    return f"re:{message}"


def jobs(store: PostgresStore) -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        o = store.begin(
            job["user"],
            job["message"],
            now=time.time(),
            idle_s=IDLE_S,
            restart=job.get("restart", False),
            request_id=job.get("request_id", ""),
        )
        store.answer(
            o.conversation_id,
            o.turn_id,
            reply_to(job["message"]),
            action="chat",
            status="answered",
            source="model",
            now=time.time(),
        )
        print(
            json.dumps(
                {
                    "conversation_id": o.conversation_id,
                    "new": o.new,
                    "turn_id": o.turn_id,
                    "history": [[t.role, t.content] for t in o.history],
                }
            ),
            flush=True,
        )


def storm(
    store: PostgresStore, name: str, users: list[str], threads: int, ops: int, log: str, restart_every: int
) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(event: dict) -> None:
        os.write(fd, (json.dumps(event) + "\n").encode())

    def run(t: int) -> None:
        for i in range(ops):
            user = users[(i + t) % len(users)]
            message = f"{name}t{t}s{i}"
            restart = restart_every > 0 and i % restart_every == restart_every - 1
            o = store.begin(user, message, now=time.time(), idle_s=IDLE_S, restart=restart, request_id=message)
            write(
                {
                    "ev": "begin",
                    "user": user,
                    "message": message,
                    "turn_id": o.turn_id,
                    "conv": o.conversation_id,
                    "new": o.new,
                    "restart": restart,
                    "history": [t.content for t in o.history if t.role == "user"],
                }
            )
            store.answer(
                o.conversation_id,
                o.turn_id,
                reply_to(message),
                action="chat",
                status="answered",
                source="model",
                now=time.time(),
            )
            write({"ev": "answer", "turn_id": o.turn_id})

    write({"ev": "start", "pid": os.getpid()})
    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    write({"ev": "done"})
    os.close(fd)


def hang(store: PostgresStore, user: str, message: str) -> None:
    """begin(), stopped after the user turn's INSERT and before COMMIT (the store builds Opened inside the
    transaction block), holding the user's row lock, until killed."""

    def stuck(*args):
        print(json.dumps({"hanging": args[3]}), flush=True)
        time.sleep(3600)

    postgres.Opened = stuck
    store.begin(user, message, now=time.time(), idle_s=IDLE_S, restart=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("mode", choices=["jobs", "storm", "hang"])
    p.add_argument("rest", nargs="*")
    p.add_argument("--name", default="A")
    p.add_argument("--users", default="")
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--ops", type=int, default=100)
    p.add_argument("--log", default="")
    p.add_argument("--restart-every", type=int, default=0)
    a = p.parse_args()
    store = PostgresStore(a.dsn, pool_size=max(2, a.threads))
    try:
        if a.mode == "jobs":
            jobs(store)
        elif a.mode == "storm":
            storm(store, a.name, a.users.split(","), a.threads, a.ops, a.log, a.restart_every)
        else:
            hang(store, *a.rest)
    finally:
        store.close()


if __name__ == "__main__":
    main()
