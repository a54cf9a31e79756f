"""lora-med serve: a real uvicorn on a free loopback port, a real SQLite file, the real engine on a tiny
GPT-2 folder (conftest's ``tiny_base``), talked to with httpx.

Two servers start in parallel once per module: ``server`` (ordinary settings, a low rate limit) and
``slow`` (a 1 s batch window, so waiting, 504 and a kill -9 mid-request happen on cue). Admission (503),
the API key, the body limit and the probes are in test_serve_production.py. They run ``lora_med.serve.serve`` in a subprocess (what ``lora-med serve`` calls, without the
CLI's import of the training stack); the server restarted after kill -9 runs through the CLI itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import yaml

from lora_med.data import Message, prompt_ids
from lora_med.errors import ConfigError, LoraMedError
from lora_med.serve.intents import ACTIONS

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
from lora_med.serve.config import check  # noqa: E402

LAUNCH = (
    "import json, sys; from lora_med.serve import ServeConfig, serve; serve(ServeConfig(**json.loads(sys.argv[1])))"
)
SEED_BODY = b'{\n  "user_id": "+59170123456",\n  "message": "Hola, necesito una cita"\n}'  # the guide's Postman body
SEED_USER = "+59170123456"


class Server:
    """A ``serve()`` subprocess; ``port`` is read from its JSON "ready" log line (it listens on port 0)."""

    def __init__(self, model: Path, db: Path, log: Path, cli: bool = False, **settings):
        self.db, self.log = db, log
        cfg = {"model": str(model), "db": str(db), "port": 0, "log_file": str(log), "threads": 1, **settings}
        if cli:  # `lora-med serve EXPORT_DIR --db ... --port 0 ...`
            argv = ["-m", "lora_med", "serve", str(model)]
            argv += [a for k, v in cfg.items() if k != "model" for a in (f"--{k.replace('_', '-')}", str(v))]
        else:
            argv = ["-c", LAUNCH, json.dumps(cfg)]
        self.stderr = log.with_suffix(".stderr")
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err
            )
        self.url = ""

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "ready":
                    self.url = f"http://127.0.0.1:{event['port']}"
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def events(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line.strip()]

    def chat(self, user: str, message: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/chat/", json={"user_id": user, "message": message}, timeout=30, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def turns(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT id, conversation_id, role, content, reply_to, action, status, source FROM turns ORDER BY id"
        ).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def servers(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    main = Server(tiny_base, d / "main.db", d / "main.log", rate_limit=5, batch_wait_ms=20)
    slow = Server(tiny_base, d / "slow.db", d / "slow.log", batch_wait_ms=1000, request_timeout_s=1.5)
    yield {"main": main.wait_ready(), "slow": slow.wait_ready(), "dir": d}
    for s in (main, slow):
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def slow(servers) -> Server:
    return servers["slow"]


def expected_prompt(tokenizer, *texts: str) -> int:
    """Prompt length of a conversation in the training format (dialogpt: every turn + EOS)."""
    roles = ["user", "assistant"] * len(texts)
    return len(prompt_ids([Message(r, t) for r, t in zip(roles, texts)], tokenizer, "dialogpt"))


# --------------------------------------------------------------------------- the seed's request


@pytest.mark.slow
def test_seed_postman_request_byte_for_byte(server):
    r = httpx.post(f"{server.url}/chat/", content=SEED_BODY, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["response", "user_id", "conversation_id", "action", "params"]  # the guide's order
    assert body["user_id"] == SEED_USER
    assert body["conversation_id"].startswith(f"conv_{SEED_USER}_")
    assert body["action"] == "schedule_appointment"
    # the seed's status, who wrote the reply, the triage's tier, the message's intent, and the booking's fields
    # (none given yet)
    assert body["params"]["status"] == "collecting_info" and body["params"]["source"] in ("model", "facts")
    assert body["params"]["triage"] == "none" and body["params"]["intent"] == "schedule_appointment"
    assert {k: v for k, v in body["params"].items() if k not in ("status", "source", "triage", "intent")} == {
        k: None for k in ("specialty", "doctor", "date", "time", "patient_name", "phone", "ci", "birth_date")
    }
    assert isinstance(body["response"], str) and body["response"].strip()


@pytest.mark.slow
def test_multi_turn_memory_prompt_holds_the_first_exchange(server, tiny_tokenizer):
    user = "+59171000001"
    first, second = "Hola, necesito una cita", "con pediatria el lunes"
    r1 = server.chat(user, first)
    r2 = server.chat(user, second)
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["conversation_id"] == r2.json()["conversation_id"]
    assert int(r1.headers["X-Prompt-Tokens"]) == expected_prompt(tiny_tokenizer, first)
    # The second prompt is the whole first exchange plus the new message, in the training format.
    assert int(r2.headers["X-Prompt-Tokens"]) == expected_prompt(tiny_tokenizer, first, r1.json()["response"], second)
    assert r2.json()["action"] == "schedule_appointment"  # the booking flow continues
    mine = [t for t in turns(server.db) if t[1] == r1.json()["conversation_id"]]
    assert [(t[2], t[3]) for t in mine] == [
        ("user", first),
        ("assistant", r1.json()["response"]),
        ("user", second),
        ("assistant", r2.json()["response"]),
    ]
    assert mine[1][4] == mine[0][0] and mine[3][4] == mine[2][0]  # each reply points at its message


@pytest.mark.slow
def test_start_over_opens_a_new_conversation(server):
    user = "+59171000002"
    a = server.chat(user, "quiero una cita").json()["conversation_id"]
    b = server.chat(user, "empecemos de nuevo").json()["conversation_id"]
    c = server.chat(user, "gracias").json()["conversation_id"]
    assert a != b == c


# --------------------------------------------------------------------------- limits and bad bodies


@pytest.mark.parametrize(
    "content, status, names",
    [
        (json.dumps({"user_id": "+59171000003", "message": "x" * 1001}), 422, ["message", "1000"]),
        (json.dumps({"user_id": "abc", "message": "hola"}), 422, ["user_id", "phone"]),
        (json.dumps({"user_id": "+591", "message": "hola"}), 422, ["user_id"]),
        (json.dumps({"message": "hola"}), 422, ["user_id", "missing"]),
        (json.dumps({"user_id": "+59171000003"}), 422, ["message", "missing"]),
        (json.dumps({"user_id": "+59171000003", "message": "   "}), 422, ["message", "blank"]),
        (json.dumps({"user_id": "+59171000003", "message": 123}), 422, ["message"]),
        (json.dumps({"user_id": 59171000003, "message": "hola"}), 422, ["user_id"]),
        (json.dumps(["+59171000003", "hola"]), 422, ["body"]),
        ("{'user_id': '+59171000003'", 422, ["JSON"]),
        ("", 422, ["body", "empty"]),
    ],
)
@pytest.mark.slow
def test_bad_bodies_name_the_field(server, content, status, names):
    r = httpx.post(f"{server.url}/chat/", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for name in names:
        assert name in error
    assert "x" * 50 not in r.text  # the offending message is not echoed back


@pytest.mark.slow
def test_message_of_exactly_the_limit_is_answered(server):
    r = server.chat("+59171000004", "hola " * 200)  # 1000 characters: far over the prompt budget, cut from the left
    assert r.status_code == 200
    assert int(r.headers["X-Prompt-Tokens"]) <= 256 - 40


@pytest.mark.slow
def test_rate_limit_429_with_retry_after_but_never_for_emergencies(server):
    user = "+59171000005"
    for _ in range(5):
        assert server.chat(user, "cuanto cuesta la consulta").status_code == 200
    r = server.chat(user, "cuanto cuesta la consulta")
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert "5 messages per 60 s" in r.json()["detail"]
    r = server.chat(user, "me duele mucho el pecho")
    assert r.status_code == 200 and r.json()["action"] == "emergency"


@pytest.mark.slow
def test_get_on_chat_is_405(server):
    assert httpx.get(f"{server.url}/chat/", timeout=10).status_code == 405


# --------------------------------------------------------------------------- the emergency guard


@pytest.mark.parametrize(
    "message, emergency",
    [
        ("Me duele mucho el pecho y me cuesta respirar", True),
        ("mi hijo esta convulsionando", True),
        ("se desmallo y no despierta", True),
        ("se trago lavandina", True),
        ("ya no quiero vivir", True),
        ("hola kiero una sita xq me duele muxo el pexo", True),
        ("Hola, necesito una cita", False),
        ("los resultados de sangre ya salieron?", False),
        ("tengo presion alta, quiero control con cardiologia", False),
        ("no puedo ir el lunes, me cambias para el miercoles?", False),
    ],
)
@pytest.mark.slow
def test_guard_before_the_model(server, message, emergency):
    before = server.metric("lora_med_engine_requests_total")
    r = server.chat(f"+5917200{zlib.crc32(message.encode()) % 10**4:04d}", message)
    assert r.status_code == 200
    body = r.json()
    after = server.metric("lora_med_engine_requests_total")
    assert body["params"]["intent"] in ACTIONS  # the message's intent is kept whatever the tier
    if emergency:
        assert body["action"] == "emergency" and body["params"]["status"] == "emergency_referred"
        assert body["params"]["triage"] == "emergency"
        assert "118" in body["response"] and "sala de emergencias" in body["response"]
        assert "cita" not in body["response"].lower()  # never a booking question
        assert r.headers["X-Prompt-Tokens"] == "0" and after == before  # the model was not called
    else:
        assert body["action"] != "emergency" and body["params"]["triage"] != "emergency"
        # the model wrote it, or the clinic's facts answered it at once ("¿ya salieron mis resultados?")
        assert after == before + 1 or (body["params"]["source"] == "facts" and r.headers["X-Prompt-Tokens"] == "0")


def build_alarmist_model(tiny_base: Path, out: Path) -> Path:
    """A tiny GPT-2 (the tiny base's tokenizer and shape) whose every reply is " 118 118 ...": its blocks add
    nothing, so the next token depends on the last one only, and its untied output layer maps the prompt's last
    token (EOS) and "18" to " 1", and " 1" to "18". A real model, served by the real engine, that speaks of 118
    whatever the patient says."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(tiny_base)
    one, eighteen = tok.encode(" 118")  # " 1", "18" in the tiny vocabulary
    config = GPT2Config.from_pretrained(tiny_base, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "c_proj.bias")) or "wpe" in name:
                p.zero_()  # each block's output is zero: the residual stream is the token's embedding
        unit = torch.nn.functional.layer_norm(model.transformer.wte.weight, (config.n_embd,))
        head = torch.zeros_like(model.lm_head.weight)
        for src, dst in ((tok.eos_token_id, one), (eighteen, one), (one, eighteen)):
            head[dst] += 10 * unit[src]
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_the_triage_decides_never_the_model(tiny_base, tmp_path):
    """A model that answers every message with 118: on messages the triage did not mark its reply is replaced by
    the flow's own (plus the caution line where the tier says so) and counted; an emergency carries over a
    booking request until the patient is attended, then booking resumes."""
    triage = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))
    model = build_alarmist_model(tiny_base, tmp_path / "alarmist")
    s = Server(
        model, tmp_path / "a.db", tmp_path / "a.log", no_repeat_ngram_size=0, max_new_tokens=6, check_replies=False
    ).wait_ready()
    try:
        user = "+59175550001"
        r = s.chat(user, "Hola, necesito una cita con el pediatra").json()
        assert r["action"] == "schedule_appointment" and r["params"]["triage"] == "none"
        assert r["response"] == " ".join(triage["flow_replies"]["schedule_appointment"].split())
        assert s.metric("lora_med_model_replies_overridden_total") == 1
        caution = s.chat(
            "+59175550002", "hace tres semanas tuve un dolor de pecho que ya se paso, quiero control"
        ).json()
        assert caution["params"]["triage"] == "caution" and caution["action"] == "schedule_appointment"
        assert caution["response"].startswith(" ".join(triage["flow_replies"]["schedule_appointment"].split()))
        assert "118" in caution["response"]  # the triage's own safety-net line, not the model's
        assert s.metric("lora_med_model_replies_overridden_total") == 2
        steps = [
            ("mi papa tiene dolor de pecho fuerte y suda frio", "emergency"),
            ("no tenemos plata para la ambulancia, mejor dame una ficha para mañana", "emergency"),
            ("ya llego la ambulancia, se lo estan llevando", "clinic_info"),  # acknowledged; its intent kept
            ("cuando le den de alta quiero una cita con el cardiologo", "schedule_appointment"),
        ]
        for message, action in steps:
            body = s.chat("+59175550003", message).json()
            assert body["action"] == action, (message, body)
        assert body["params"]["triage"] == "none" and "118" not in body["response"]
        stored = [
            (t[5], t[7])
            for t in turns(tmp_path / "a.db")
            if t[1].startswith("conv_+59175550003") and t[2] == "assistant"
        ]
        expected = [
            ("emergency", "guard"),
            ("emergency", "guard"),
            ("clinic_info", "guard"),
            ("schedule_appointment", "flow"),
        ]
        assert stored == expected
        h = httpx.get(f"{s.url}/health", timeout=10).json()["triage"]
        assert h["rules"].startswith("triage.yaml@") and h["model"].startswith("ngram-lr@")
        ready = next(e for e in s.events() if e["event"] == "ready")
        assert ready["triage_model"] == h["model"] and ready["triage_rules"] == h["rules"]
        intents = httpx.get(f"{s.url}/health", timeout=10).json()["intents"]
        assert intents.startswith("ngram-ovr@") and ready["intents_model"] == intents
    finally:
        s.stop(signal.SIGKILL)


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_twenty_concurrent_requests_all_answered_in_batches(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            users = [f"+5917300{i:04d}" for i in range(20)] + ["+59173009999"] * 3  # one user sends three at once
            return await asyncio.gather(
                *(client.post("/chat/", json={"user_id": u, "message": "quiero una cita"}) for u in users)
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 23
    assert max(float(r.headers["X-Batch-Size"]) for r in responses) > 1  # prompts went to the engine together
    # The user who sent three at once got them answered one after the other, each prompt holding the last.
    same = [r for r in responses[20:]]
    assert len({r.json()["conversation_id"] for r in same}) == 1
    assert sorted(int(r.headers["X-Prompt-Tokens"]) for r in same)[0] < max(
        int(r.headers["X-Prompt-Tokens"]) for r in same
    )
    conv = same[0].json()["conversation_id"]
    rows = [t for t in turns(server.db) if t[1] == conv]
    assert [t[2] for t in rows] == ["user", "assistant"] * 3


# --------------------------------------------------------------------------- queue, timeout, kill -9, restart


@pytest.mark.slow
def test_timeout_504_and_an_emergency_never_waits(slow):
    results: dict[str, httpx.Response] = {}

    def send(key: str, user: str, message: str) -> None:
        results[key] = httpx.post(f"{slow.url}/chat/", json={"user_id": user, "message": message}, timeout=30)

    # A user's second message waits for the first reply (~1 s), then for its own batch window (1 s more):
    # past request_timeout_s (1.5 s) it gets 504, and the message stays stored, unanswered.
    user = "+59174000005"
    with httpx.Client(base_url=slow.url, timeout=30) as client:
        first = threading.Thread(target=send, args=("a", user, "quiero una cita"))
        first.start()
        time.sleep(0.1)
        late_thread = threading.Thread(target=send, args=("late", user, "con pediatria"))
        late_thread.start()
        first.join()
        late_thread.join()
    late = results["late"]
    assert results["a"].status_code == 200
    assert late.status_code == 504 and "request_timeout_s" in late.json()["detail"]
    conv = results["a"].json()["conversation_id"]
    rows = {t[0]: t for t in turns(slow.db) if t[1] == conv}
    pairs = {rows[t[4]][3]: t[3] for t in rows.values() if t[2] == "assistant"}  # message -> its reply
    assert pairs == {"quiero una cita": results["a"].json()["response"]}
    assert "con pediatria" in [t[3] for t in rows.values() if t[2] == "user"]  # stored, unanswered

    # An emergency from a user whose earlier message still waits does not wait for it; the message queued
    # behind them is then answered by the emergency carried over (no model, no booking).
    time.sleep(1.2)  # the late message's batch window closes
    user = "+59174000006"
    with httpx.Client(base_url=slow.url, timeout=30) as client:
        first = threading.Thread(target=send, args=("b", user, "quiero una cita"))
        first.start()
        time.sleep(0.1)
        behind_thread = threading.Thread(target=send, args=("behind", user, "con pediatria"))
        behind_thread.start()
        time.sleep(0.1)
        urgent = client.post("/chat/", json={"user_id": user, "message": "mi hijo se trago lavandina"})
        first_done_before = "b" in results  # the first message still waits for its batch (1 s window)
        first.join()
        behind_thread.join()
    assert urgent.status_code == 200 and urgent.json()["action"] == "emergency"
    assert not first_done_before  # answered while the user's earlier message was still waiting
    assert (
        results["b"].status_code == 200 and urgent.json()["conversation_id"] == results["b"].json()["conversation_id"]
    )
    behind = results["behind"].json()
    assert behind["action"] == "emergency" and behind["params"]["triage_carried"] and "118" in behind["response"]


@pytest.mark.slow
def test_a_client_that_leaves_does_not_break_the_batch(slow):
    time.sleep(1.2)  # let a batch window still open from the test before close (it would answer at once)
    with httpx.Client(base_url=slow.url, timeout=30) as client:
        got: dict[str, object] = {}

        def impatient() -> None:
            try:
                httpx.post(
                    f"{slow.url}/chat/", json={"user_id": "+59174100001", "message": "quiero una cita"}, timeout=0.3
                )  # gives up and closes its connection inside the 1 s batch window
            except httpx.TimeoutException as e:
                got["impatient"] = e

        t = threading.Thread(target=impatient)
        t.start()
        time.sleep(0.05)
        patient = client.post("/chat/", json={"user_id": "+59174100002", "message": "quiero una cita"})
        t.join()
    assert isinstance(got["impatient"], httpx.TimeoutException)
    assert patient.status_code == 200 and patient.json()["response"]
    assert httpx.get(f"{slow.url}/health", timeout=10).json()["in_flight"] == 0


@pytest.mark.slow
def test_kill_9_mid_request_loses_nothing_committed_and_history_survives_restart(servers, tiny_base, tiny_tokenizer):
    slow, user = servers["slow"], "+59175000001"
    first = slow.chat(user, "Hola, necesito una cita")
    assert first.status_code == 200
    conv, reply = first.json()["conversation_id"], first.json()["response"]

    # The second message is stored on arrival, then waits in the 1 s batch window: kill -9 right then.
    outcome: list = []

    def pending() -> None:
        try:
            outcome.append(slow.chat(user, "con pediatria"))
        except httpx.TransportError as e:  # the server died under it: what a client sees
            outcome.append(e)

    t = threading.Thread(target=pending)
    t.start()
    deadline = time.monotonic() + 10
    while not any(r[1] == conv and r[3] == "con pediatria" for r in turns(slow.db)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow.stop(signal.SIGKILL) == -signal.SIGKILL
    t.join()
    assert isinstance(outcome[0], httpx.TransportError)  # killed mid-request, not answered first

    con = sqlite3.connect(slow.db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    rows = [r for r in turns(slow.db) if r[1] == conv]
    assert [(r[2], r[3], r[4]) for r in rows] == [
        ("user", "Hola, necesito una cita", None),
        ("assistant", reply, rows[0][0]),
        ("user", "con pediatria", None),
    ]

    # Restarted on the same file, through the CLI: same conversation; the prompt holds the committed exchange,
    # not the message whose reply never came (the model sees user/assistant alternating, as in training).
    again = Server(tiny_base, slow.db, servers["dir"] / "restart.log", cli=True).wait_ready()
    try:
        r = again.chat(user, "el lunes en la mañana")
        assert r.status_code == 200
        assert r.json()["conversation_id"] == conv
        assert int(r.headers["X-Prompt-Tokens"]) == expected_prompt(
            tiny_tokenizer, "Hola, necesito una cita", reply, "el lunes en la mañana"
        )
        assert r.json()["action"] == "schedule_appointment"
        assert again.stop() in (0, -signal.SIGTERM)  # graceful: requests finished, store closed
        assert any(e.get("event") == "stopped" for e in again.events())
    finally:
        again.stop(signal.SIGKILL)


# --------------------------------------------------------------------------- health, metrics, docs, logs, CLI


@pytest.mark.slow
def test_health_metrics_docs(server):
    h = httpx.get(f"{server.url}/health", timeout=10).json()
    assert h["status"] == "ok" and h["engine"].startswith("engine-") and h["device"] == "cpu"
    assert h["format"] == "dialogpt" and h["prompt_budget"] == 256 - 40
    assert {"uptime_s", "queue_depth", "in_flight", "model"} <= set(h)
    assert h["prefix_cache_mb"] == 0  # a PyTorch model: the prefix cache is the CPU decode graph's
    assert h["batching"] == "whole batches" and h["batch_wait_ms"] == 20  # PyTorch: new prompts wait for a batch
    assert (
        h["triage"]["rules"].startswith("triage.yaml@") and 0 < h["triage"]["caution_at"] <= h["triage"]["emergency_at"]
    )
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for series in (
        'lora_med_requests_total{status="200"}',
        "lora_med_request_seconds_bucket",
        "lora_med_queue_depth",
        "lora_med_batch_size_bucket",
        "lora_med_guard_hits_total{rule=",
        'lora_med_triage_total{tier="emergency"}',
        'lora_med_triage_total{tier="none"}',
        "lora_med_model_replies_overridden_total",
        'lora_med_requests_total{status="422"}',
        'lora_med_requests_total{status="429"}',
    ):
        assert series in text
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 200
    assert "/chat/" in httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.slow
def test_logs_are_json_lines_without_message_text_or_numbers(server):
    lines = server.log.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    chats = [e for e in events if e["event"] == "chat"]
    assert len(chats) > 20 and {"status", "ms", "request_id"} <= set(chats[0])
    text = "\n".join(lines)
    for secret in ("necesito una cita", "pecho", "lavandina", SEED_USER, "71000001"):
        assert secret not in text
    assert '"user": "+*********56"' in text  # masked, last two digits kept


def test_missing_model_is_a_named_error_before_anything_loads(tmp_path):
    from lora_med.serve import ServeConfig, serve

    with pytest.raises(ConfigError, match=r"EXPORT_DIR .*missing: no such folder"):
        serve(ServeConfig(model=str(tmp_path / "missing"), db=str(tmp_path / "x.db")))
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- in-process: store, settings, model


def test_store_idle_restart_and_unanswered_turns(tmp_path):
    from lora_med.serve.store import SQLiteStore

    s = SQLiteStore(tmp_path / "c.db")
    a = s.begin("+59176000001", "hola", now=1000.0, idle_s=1800, restart=False)
    s.answer(a.conversation_id, a.turn_id, "¡Hola!", action="chat", status="answered", source="model", now=1001.0)
    b = s.begin("+59176000001", "sin respuesta", now=1100.0, idle_s=1800, restart=False)  # never answered
    c = s.begin("+59176000001", "sigo aqui", now=1200.0, idle_s=1800, restart=False)
    assert a.new and not b.new and not c.new and a.conversation_id == c.conversation_id
    assert [(t.role, t.content) for t in c.history] == [("user", "hola"), ("assistant", "¡Hola!")]
    d = s.begin("+59176000001", "hola de nuevo", now=1200.0 + 1801, idle_s=1800, restart=False)
    e = s.begin("+59176000001", "empecemos de nuevo", now=3100.0, idle_s=1800, restart=True)
    assert d.new and e.new and len({a.conversation_id, d.conversation_id, e.conversation_id}) == 3
    other = s.begin("+59176000002", "hola", now=3100.0, idle_s=1800, restart=False)
    assert other.new and other.history == []
    s.close()
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert [r[0] for r in con.execute("SELECT closed_by FROM conversations ORDER BY started, rowid")][:3] == [
        "idle",
        "restart",
        None,
    ]


def test_store_refuses_a_file_that_is_not_a_database(tmp_path):
    from lora_med.serve.store import SQLiteStore

    bad = tmp_path / "notes.txt"
    bad.write_text("not a database " * 100)
    with pytest.raises(ConfigError, match="--db"):
        SQLiteStore(bad)


def test_settings_every_problem_listed(tmp_path):
    from lora_med.serve import ServeConfig

    cfg = ServeConfig(
        model="",
        device="tpu",
        port=70000,
        max_batch=0,
        request_timeout_s=-1,
        top_p=2,
        db=str(tmp_path / "no" / "such" / "x.db"),
        intents="nope.yaml",
        max_new_tokens="forty",
    )
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert sorted(e.value.problems) == sorted(
        [
            "ServeConfig.max_new_tokens='forty': must be a whole number, got 'forty'",
            "ServeConfig.device='tpu': use one of auto, cpu, cuda",
            "ServeConfig.port=70000: must be in [0, 65535]",
            "ServeConfig.max_batch=0: must be >= 1",
            "ServeConfig.request_timeout_s=-1: must be > 0",
            "ServeConfig.top_p=2: must be in (0, 1]",
        ]
    )  # types and bounds first
    cfg.device, cfg.port, cfg.max_batch, cfg.request_timeout_s, cfg.top_p = "cpu", 8000, 1, 1.0, 1.0
    cfg.max_new_tokens = "40"  # a numeric string from YAML is a number
    with pytest.raises(ConfigError) as e:
        check(cfg)
    text = "\n".join(e.value.problems)
    for flag in ("EXPORT_DIR", "ServeConfig.db=", "ServeConfig.intents='nope.yaml': file not found"):
        assert flag in text
    assert cfg.max_new_tokens == 40


def test_a_lora_training_run_is_served_with_its_adapter_merged(trained, exported):
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    run = load_replier(ServeConfig(model=str(trained["lora"]), threads=1))
    merged = load_replier(ServeConfig(model=str(exported["fp32"] / "merged"), threads=1))
    assert "adapter merged in memory" in run.source.kind and run.engine.name.startswith("engine-torch")
    history = [Message("user", "Hola, necesito una cita")]
    assert run.generate([run.prompt(history)]) == merged.generate([merged.prompt(history)])
    run.close()
    merged.close()


def test_model_paths(tmp_path, tiny_base):
    from lora_med.serve.replier import resolve_model

    src = resolve_model(str(tiny_base))
    assert src.engine_path == tiny_base and src.fmt == "dialogpt" and "PyTorch" in src.kind
    lora = tmp_path / "run"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")  # an adapter without its run card
    with pytest.raises(LoraMedError, match="not a lora-med training run: run.json is missing"):
        resolve_model(str(lora))
    from lora_med.serve import ServeConfig, create_app

    with pytest.raises(LoraMedError, match="run.json is missing"):
        create_app(ServeConfig(model=str(lora), db=str(tmp_path / "never.db")))
    assert not (tmp_path / "never.db").exists()  # refused before the database is created
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model(str(tmp_path / "missing"))
    half = tmp_path / "half-export"
    half.mkdir()
    (half / "manifest.json").write_text(json.dumps({"kind": "lora-med.export", "status": "running"}))
    with pytest.raises(LoraMedError, match="not complete"):
        resolve_model(str(half))


@pytest.mark.slow
def test_requests_join_the_running_batch_on_the_decode_graph(exported, tiny_base, tmp_path):
    """An export served on its decode graph: concurrent requests share the engine's running batch (continuous
    batching) and each gets the reply the engine gives its prompt alone; follow-ups reuse their conversation's
    KV cache. The graph is the untrained base's with its EOS embedding zeroed (the tiny models end every reply
    at once): replies run to max_new_tokens, so requests overlap."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_med.data import Message
    from lora_med.export.decode_graph import build_decode_graph
    from lora_med.fileio import sha256_file
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    talker = tmp_path / "talker"
    shutil.copytree(tiny_base, talker)
    weights = load_file(talker / "model.safetensors")
    weights["transformer.wte.weight"][0] = 0  # EOS (id 0)'s logit is 0 through the tied head: never the largest
    save_file(weights, talker / "model.safetensors", metadata={"format": "pt"})
    export = tmp_path / "export"
    shutil.copytree(exported["fp32"], export, ignore=shutil.ignore_patterns("engine"))
    build_decode_graph(talker, export / "engine")
    manifest = json.loads((export / "manifest.json").read_text())
    for rel, info in manifest["files"].items():  # the manifest records sizes and hashes: the new graph's
        if rel.startswith("engine/"):
            info.update(bytes=(export / rel).stat().st_size, sha256=sha256_file(export / rel))
    (export / "manifest.json").write_text(json.dumps(manifest))
    alone = load_replier(ServeConfig(model=str(export), threads=1, prefix_cache_mb=0))
    want = alone.decode(alone.generate([alone.prompt([Message("user", "quiero una cita")])])[0])
    alone.close()
    assert want
    # the talker's words are not Spanish: the reply checker is off, so the engine's own replies come back
    srv = Server(export, tmp_path / "g.db", tmp_path / "g.log", rate_limit=0, check_replies=False).wait_ready()
    try:
        h = httpx.get(f"{srv.url}/health", timeout=10).json()
        assert h["batching"] == "continuous" and h["batch_wait_ms"] == 0 and h["prefix_cache_mb"] == 256

        async def run(message: str):
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post("/chat/", json={"user_id": f"+5917600{i:04d}", "message": message})
                        for i in range(12)
                    )
                )

        first = asyncio.run(run("quiero una cita"))
        assert [r.status_code for r in first] == [200] * 12
        assert {r.json()["response"] for r in first} == {want}
        assert max(float(r.headers["X-Batch-Size"]) for r in first) > 1
        reused = srv.metric("lora_med_prompt_tokens_reused_total")
        assert [r.status_code for r in asyncio.run(run("para el lunes"))] == [200] * 12
        assert srv.metric("lora_med_prompt_tokens_reused_total") - reused >= 12 * 5  # the first turns' KV
    finally:
        srv.stop(signal.SIGKILL)


def test_export_folder_serves_its_decode_graph_else_merged(exported, tmp_path):
    """A real merge-export: serve loads its engine/ decode graph (ONNX Runtime) and, without one, its merged/
    model on PyTorch; both through the one engine, with the same replies."""
    import shutil

    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    export = exported["fp32"]
    ort_side = load_replier(ServeConfig(model=str(export), threads=1))
    assert ort_side.source.engine_path == export / "engine" and ort_side.engine.name == "engine-cpu-fp32"
    assert "decode graph" in ort_side.source.kind
    # The same export as merge-export writes it for a base the decode graph does not support: no engine/.
    without = tmp_path / "export"
    shutil.copytree(export, without, ignore=shutil.ignore_patterns("engine"))
    manifest = json.loads((without / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("engine/")}
    manifest["engine"] = {"status": "not built", "reason": "(test) no decode graph for this architecture"}
    (without / "manifest.json").write_text(json.dumps(manifest))
    torch_side = load_replier(ServeConfig(model=str(without), threads=1))
    assert torch_side.source.engine_path == without / "merged" and torch_side.engine.name.startswith("engine-torch")
    max_length = json.loads((export / "manifest.json").read_text())["source"]["max_length"]
    assert ort_side.budget == torch_side.budget == min(max_length, ort_side.engine.capacity) - 40
    history = [
        Message("user", "Hola, necesito una cita"),
        Message("assistant", "¿Para qué especialidad?"),
        Message("user", "pediatria"),
    ]
    prompts = [ort_side.prompt(history), ort_side.prompt(history[-1:])]
    replies = ort_side.generate(prompts)
    assert replies == torch_side.generate(prompts)  # one engine, two backends, same replies
    # The next turn starts with the first prompt and its reply: the decode graph takes them from its prefix cache.
    assert ort_side.engine.prefix_cache is not None and torch_side.engine.prefix_cache is None
    follow = ort_side.prompt(history + [Message("assistant", ort_side.decode(replies[0])), Message("user", "el lunes")])
    reused = ort_side.engine.prefix_cache.reused_tokens
    assert ort_side.generate([follow]) == torch_side.generate([follow])
    assert ort_side.engine.prefix_cache.reused_tokens - reused >= len(prompts[0])
    ort_side.close()
    torch_side.close()


def test_prompt_cut_whole_oldest_turns_first(tiny_base, tiny_tokenizer):
    from lora_med.engine import load_engine
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    eng = load_engine(tiny_base, device="cpu")
    rep = load_replier(ServeConfig(model=str(tiny_base), max_new_tokens=200, cut_block=0), engine=eng)  # budget 56
    assert rep.budget == 56
    turns_ = [Message("user" if i % 2 == 0 else "assistant", f"mensaje numero {i} sobre la cita") for i in range(11)]
    ids = rep.prompt(turns_)
    kept = next(k for k in range(len(turns_)) if prompt_ids(turns_[k:], tiny_tokenizer, "dialogpt") == ids)
    assert len(ids) <= 56 < len(prompt_ids(turns_[kept - 1 :], tiny_tokenizer, "dialogpt"))
    long = [Message("user", "hola " * 100)]
    assert rep.prompt(long) == prompt_ids(long, tiny_tokenizer, "dialogpt")[-56:]
    with pytest.raises(ConfigError, match="--max-new-tokens 250"):
        load_replier(ServeConfig(model=str(tiny_base), max_new_tokens=250), engine=eng)
    eng.close()


def test_a_long_conversation_keeps_its_prompt_start_for_a_few_turns(tiny_base, tiny_tokenizer):
    """cut_block: the start moves in steps of about cut_block tokens, so most turns extend the previous prompt
    (what the prefix cache reuses), and never more than cut_block tokens + one turn go beyond what must."""
    from lora_med.engine import load_engine
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    eng = load_engine(tiny_base, device="cpu")
    make = lambda block: load_replier(
        ServeConfig(model=str(tiny_base), max_new_tokens=156, cut_block=block), engine=eng
    )  # budget 100
    tight, sticky = make(0), make(60)  # a turn (two messages) adds ~26 tokens
    conv = [
        Message("user" if i % 2 == 0 else "assistant", f"mensaje {i}: " + "la cita " * (1 + i % 3)) for i in range(41)
    ]
    size = [len(prompt_ids([m], tiny_tokenizer, "dialogpt")) for m in conv]
    kept_prefix, tight_kept, previous, tight_previous = 0, 0, None, None
    for n in range(1, len(conv) + 1, 2):  # each patient turn: the conversation so far ends with a user message
        history = conv[:n]
        want, got = tight.prompt(history), sticky.prompt(history)
        first = next(k for k in range(n) if prompt_ids(history[k:], tiny_tokenizer, "dialogpt") == got)
        assert len(got) <= 100 and got[-len(want) :] == want[-len(got) :]  # a suffix of the tight cut (or it)
        tight_first = next(k for k in range(n) if prompt_ids(history[k:], tiny_tokenizer, "dialogpt") == want)
        assert sum(size[tight_first:first]) <= 60 + max(size)
        if previous is not None:
            kept_prefix += got[: len(previous)] == previous
            tight_kept += want[: len(tight_previous)] == tight_previous
        previous, tight_previous = got, want
    assert tight_kept == 3  # of 20 follow-up turns: once past the budget (turn 4), every turn moves the start
    assert kept_prefix >= 12
    eng.close()


def test_a_chat_template_conversation_is_cut_in_whole_turns_too(tiny_base):
    """The chat-template path: the whole conversation rendered by the template, oldest turns dropped until it
    fits, and with cut_block the start placed past a multiple of cut_block tokens (a suffix of the tight cut)."""
    from lora_med.data import prompt_ids
    from lora_med.engine import GenerationSettings, load_engine
    from lora_med.models import load_tokenizer
    from lora_med.serve.replier import ModelSource, Replier

    tok = load_tokenizer(str(tiny_base))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    eng = load_engine(tiny_base, device="cpu")
    source = ModelSource(tiny_base, tiny_base, "chat-template", 256, "test")
    settings = GenerationSettings(max_new_tokens=156)  # budget 100
    tight, sticky = (Replier(eng, tok, source, settings, cut_block=b) for b in (0, 60))
    conv = [
        Message("user" if i % 2 == 0 else "assistant", f"mensaje {i}: " + "la cita " * (1 + i % 3)) for i in range(31)
    ]
    starts, tight_starts = [], []
    for n in range(1, len(conv) + 1, 2):
        history = conv[:n]
        want, got = tight.prompt(history), sticky.prompt(history)
        render = [prompt_ids(history[k:], tok, "chat-template") for k in range(n)]
        assert want in render and got in render and len(want) <= 100 and len(got) <= 100
        assert render.index(want) == 0 or len(render[render.index(want) - 1]) > 100  # tight: nothing more fits
        assert render.index(got) >= render.index(want)
        starts.append(render.index(got))
        tight_starts.append(render.index(want))
    kept = lambda xs: sum(a == b for a, b in zip(xs, xs[1:]))  # turns whose start stayed put
    assert starts[0] == 0 and max(starts) > 0
    assert kept(tight_starts) == 1 and kept(starts) == 7  # of 15 follow-ups: the tight cut moves every turn
    eng.close()


@pytest.mark.parametrize(
    "message, action",
    [
        ("Hola, necesito una cita", "schedule_appointment"),
        ("kiero una sita", "schedule_appointment"),
        ("hola kiero sacar una ficha pa mi hijo", "schedule_appointment"),
        ("Quiero cancelar mi cita", "cancel_appointment"),
        ("cansela mi sita porfa", "cancel_appointment"),
        ("no voy a poder ir mañana", "cancel_appointment"),
        ("necesito reprogramar mi cita del jueves", "reschedule_appointment"),
        ("puedo cambiar mi cita para el sábado?", "reschedule_appointment"),
        ("¿Ya están mis resultados de laboratorio?", "lab_results"),
        ("me pueden enviar mis resultados en pdf?", "lab_results"),
        ("¿Cuál es el horario de atención?", "clinic_info"),
        ("¿Cuánto cuesta una consulta con el cardiólogo?", "clinic_info"),
        ("aceptan seguro BISA?", "clinic_info"),
        ("donde keda la clinica", "clinic_info"),
        ("Gracias, hasta luego", None),
    ],
)
def test_intents_with_and_without_accents_and_misspelled(message, action):
    from lora_med.serve.intents import Intents

    assert Intents(REPO / "configs" / "intents.yaml").intent(message) == action


def test_intent_status_follows_the_conversation():
    from lora_med.serve.intents import Intents
    from lora_med.serve.store import Turn

    it = Intents(REPO / "configs" / "intents.yaml")
    h = [
        Turn("user", "Quiero cancelar mi cita"),
        Turn(
            "assistant",
            "Claro. ¿Me das tu nombre, CI y fecha de nacimiento?",
            "cancel_appointment",
            "verifying_identity",
        ),
    ]
    assert it.decide("Quiero cancelar mi cita", []).status == "verifying_identity"
    d = it.decide("Ana Rojas, CI 6543210 SC, 3 de mayo de 1985", h)
    assert (d.action, d.status) == ("cancel_appointment", "collecting_info")
    h += [
        Turn("user", "Ana Rojas, CI 6543210 SC, 3 de mayo de 1985"),
        Turn(
            "assistant",
            "Tu cita es el martes a las 9:00. ¿Confirmo la cancelación?",
            "cancel_appointment",
            "collecting_info",
        ),
    ]
    assert it.decide("si, confirmo", h).status == "confirmed"
    assert it.decide("¿a qué hora abren?", h).action == "clinic_info"  # a question inside the flow
    h += [Turn("user", "si"), Turn("assistant", "Listo, cancelada.", "cancel_appointment", "confirmed")]
    assert it.decide("ok gracias", h).action == "chat"  # the flow ended
    assert (
        it.decide(
            "el martes a las 10",
            [
                Turn("user", "quiero una cita"),
                Turn("assistant", "¿Qué día?", "schedule_appointment", "collecting_info"),
            ],
        ).action
        == "schedule_appointment"
    )


def test_mask():
    from lora_med.serve.logs import mask

    assert mask("+59170123456") == "+*********56"
    assert mask("CI 6543210 SC") == "CI *****10 SC"
    assert mask("+591 7012-3456") == "+*** ****-**56"
    assert mask("127.0.0.1 port 8000") == "127.0.0.1 port 8000"
    assert mask("ci6543210") == "ci*****10"
    assert mask("triage.yaml@350909e685ce sha 0a1234567b") == "triage.yaml@350909e685ce sha 0a1234567b"


class BrokenBackend:
    """A step backend whose device fails: the engine, the app, uvicorn and the store around it are real."""

    capacity, joins, restores_prefixes = 256, True, False

    def scope(self):
        return contextlib.nullcontext()

    def open(self, rows: int) -> None:
        pass

    def prefill(self, at, rows, max_new_tokens, reuse=None):
        raise RuntimeError("the device fell over")

    def step(self, tokens, active):
        raise RuntimeError("the device fell over")

    def snapshot(self, row, n):
        raise RuntimeError("the device fell over")

    def close(self) -> None:
        pass


def BrokenEngine():
    from lora_med.engine import Engine

    return Engine(BrokenBackend(), name="broken", device="cpu", precision="fp32", eos_token_id=0, vocab_size=10**6)


def test_engine_failure_is_an_explicit_500_and_the_server_carries_on(tmp_path, tiny_base):
    from lora_med.serve import ServeConfig, create_app
    from tests.serving import running

    cfg = ServeConfig(model=str(tiny_base), db=str(tmp_path / "b.db"))
    with running(create_app(cfg, engine=BrokenEngine())) as url:
        r = httpx.post(f"{url}/chat/", json={"user_id": "+59177000001", "message": "quiero una cita"}, timeout=30)
        assert r.status_code == 500 and r.json()["detail"].startswith("generation failed (RuntimeError)")
        assert r.headers["X-Request-Id"] in r.json()["detail"]
        r = httpx.post(f"{url}/chat/", json={"user_id": "+59177000001", "message": "me quiero morir"}, timeout=30)
        assert r.status_code == 200 and r.json()["action"] == "emergency"  # the guard never needs the model
        assert 'lora_med_requests_total{status="500"} 1' in httpx.get(f"{url}/metrics", timeout=10).text
    assert [(t[2], t[3]) for t in turns(tmp_path / "b.db")][0] == ("user", "quiero una cita")  # kept, unanswered


def test_example_settings_file_loads():
    from lora_med.serve import ServeConfig
    from lora_med.settings import load_config

    cfg = load_config(ServeConfig, REPO / "configs" / "serve.yaml", {"model": str(REPO / "models" / "gpt2-es-tiny")})
    check(cfg)
    assert cfg.max_batch == 8 and cfg.idle_minutes == 30.0 and cfg.rate_limit == 20


def test_the_system_prompt_is_kept_in_the_prefix_cache_from_the_start(exported):
    """A system prompt opens every prompt: load_replier keeps its KV cache at start, so the first patient after
    a restart prefills only their own message, and gets the reply a replier without the cache gives."""
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    system = "Eres el asistente de citas de la clínica Cañada del Carmen. Responde breve y en español."
    kept = load_replier(ServeConfig(model=str(exported["fp32"]), threads=1, system_prompt=system))
    cold = load_replier(ServeConfig(model=str(exported["fp32"]), threads=1, system_prompt=system, prefix_cache_mb=0))
    plain = load_replier(ServeConfig(model=str(exported["fp32"]), threads=1))
    try:
        start = kept.shared_start()
        assert start == kept.prompt([Message("system", system)])[: len(start)] and len(start) > 8
        prompt = kept.prompt([Message("user", "quiero una cita para pediatría")])
        assert prompt[: len(start)] == start and len(prompt) > len(start)
        cache = kept.engine.prefix_cache
        assert len(cache) == 1 and cache.hits == 0  # kept before any request
        assert kept.generate([prompt]) == cold.generate([prompt])
        assert cache.hits == 1 and cache.reused_tokens == len(start)
        assert plain.shared_start() == [] and len(plain.engine.prefix_cache) == 0  # nothing to keep
    finally:
        for r in (kept, cold, plain):
            r.close()
