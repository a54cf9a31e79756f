"""The clinic's facts in a real server (uvicorn, SQLite, the engine on conftest's tiny GPT-2): every reply true
to --facts, the booking in ``params``, replacements counted by reason, another clinic's facts file served by
the same model with no code change, and a blind round of questions and bookings (tests/data/)."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from lora_med.serve.checker import Checker, Context
from lora_med.serve.facts import load_facts

from .conftest import REPO
from .test_serve import Server

ROUNDS = sorted((REPO / "tests/data").glob("facts_round_*.yaml"))
OTHER = REPO / "tests/data/clinic_other.yaml"


def _rounds():
    spec = importlib.util.spec_from_file_location("facts_rounds", REPO / "benchmarks/facts/rounds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clinics(exported, tmp_path_factory):
    """One merge-export served twice: with the shipped clinic's facts and with another clinic's."""
    d = tmp_path_factory.mktemp("clinics")
    now = "2026-12-03T09:00"
    shipped = Server(exported["fp32"], d / "s.db", d / "s.log", rate_limit=0, now=now)
    other = Server(exported["fp32"], d / "o.db", d / "o.log", rate_limit=0, facts=str(OTHER), now=now)
    yield {"shipped": shipped.wait_ready(), "other": other.wait_ready()}
    for srv in (shipped, other):
        srv.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def other(clinics):
    return clinics["other"]


@pytest.mark.slow
def test_the_same_export_answers_with_each_clinic_s_facts(clinics):
    question = "¿cuánto cuesta la consulta general?"
    assert "Bs 150" in clinics["shipped"].chat("+59177001111", question).json()["response"]
    assert "Bs 120" in clinics["other"].chat("+59177001111", question).json()["response"]


def test_another_clinic_s_facts_file_is_served_by_the_same_model(other):
    """tests/data/clinic_other.yaml: other doctors, days, hours, prices, insurers and numbers."""
    facts = load_facts(OTHER)
    checker = Checker(facts, set())
    asked = {
        "¿cuánto cuesta la consulta general?": ["Bs 120"],
        "¿quién es el cardiólogo y qué días atiende?": ["Villca", "lunes", "miércoles"],
        "¿atienden los sábados?": ["cerrada"],
        "¿cuál es su whatsapp?": ["68811223"],
        "¿aceptan BISA?": ["No trabajamos"],
        "¿tienen dentista?": ["no tenemos Odontología"],
    }
    shipped = ("CAÑADA", "Salinas", "Bs 150", "Bs 250", "71234567", "7:30")
    for i, (question, must) in enumerate(asked.items()):
        body = other.chat(f"+5917700{i:04d}", question).json()
        reply = body["response"]
        assert all(m in reply for m in must) and not any(s in reply for s in shipped), (question, reply)
        assert checker.check(reply, Context(question), style=False) == []
    user = "+59177009999"
    for message in ("quiero cita con el cardiólogo", "el lunes a las 9", "Soy Rosa Mamani, 71234000"):
        body = other.chat(user, message).json()
    assert body["params"]["doctor"] == "Dr. Andrés Villca" and body["params"]["date"] == "2026-12-07"
    assert body["params"]["time"] == "09:00" and body["params"]["phone"] == "+59171234000"
    assert "Villca" in body["response"] and "7 de diciembre" in body["response"]


def test_params_carry_the_booking_and_who_wrote_the_reply_and_metrics_count_replacements(other):
    user = "+59177008888"
    first = other.chat(user, "hola, quiero una cita").json()
    assert first["action"] == "schedule_appointment" and first["params"]["source"] in ("model", "facts")
    body = other.chat(user, "con pediatría el lunes").json()  # Dra. Torrez: martes y jueves, tardes
    assert body["params"]["source"] == "facts" and body["params"]["specialty"] == "pediatria"
    assert body["params"]["date"] is None and "no atiende el lunes 7 de diciembre" in body["response"]
    assert "martes" in body["response"] and "a las 1" in body["response"]  # the next real slots, in the afternoon
    text = httpx.get(f"{other.url}/metrics", timeout=10).text
    assert 'lora_med_fact_answers_total{why="unavailable"}' in text
    replaced = [line for line in text.splitlines() if line.startswith("lora_med_replaced_total{")]
    kept = other.metric('lora_med_replies_total{source="model"}')
    assert replaced or kept, text  # every model reply was either kept or replaced, by reason
    info = other.chat("+59177007777", "¿a qué hora abren?").json()
    assert info["action"] == "clinic_info" and info["params"] == {
        "status": "answered",
        "source": "facts",
        "triage": "none",  # the triage's tier and the intent ride along on every reply
        "intent": "clinic_info",
    }


@pytest.mark.slow
def test_a_broken_facts_file_stops_serve_before_anything_starts(tiny_base, tmp_path):
    """Checked at start: the problem named by its key and the fix, exit 2, no traceback, no database made."""
    bad = tmp_path / "clinic.yaml"
    bad.write_text(OTHER.read_text(encoding="utf-8").replace('hours: "07:30-10:00"', 'hours: "siete a diez"'))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_med",
            "serve",
            str(tiny_base),
            "--facts",
            str(bad),
            "--db",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "laboratory.hours" in r.stderr and "HH:MM-HH:MM" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("round_file", ROUNDS, ids=lambda p: p.stem)
def test_a_blind_round_every_reply_true_and_the_booking_in_params(tiny_base, tmp_path, round_file):
    """Each tests/data/facts_round_*.yaml, written by someone who read only the fact sheet (round 1: 86 info
    questions and 28 bookings, 14 impossible; round 2: 88 and 30, 15 impossible, another reference day). Every
    info answer holds what it must and nothing it must not, every booking's params hold the fields given so far,
    and every reply agrees with configs/clinic.yaml."""
    rounds = _rounds()
    spec = yaml.safe_load(round_file.read_text(encoding="utf-8"))
    srv = Server(tiny_base, tmp_path / "r.db", tmp_path / "r.log", rate_limit=0, now=str(spec["reference_date"]))
    try:
        results = rounds.play(srv.wait_ready().url, spec, rounds.fact_checker())
    finally:
        srv.stop(signal.SIGKILL)
    summary = rounds.summary(results)
    wrong = [
        (r["id"], r["problems"] + r["facts"])
        for r in results["info"] + results["booking"]
        if r["problems"] or r["facts"]
    ]
    assert summary["items"] >= 60 and not wrong, wrong
