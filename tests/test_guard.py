"""The emergency guard (configs/emergency.yaml) on tests/data/guard_cases.yaml, and the matcher under it.

Run with -s to see recall and false alarms per list (or: python -m lora_med.serve.guard
tests/data/guard_cases.yaml).
"""

from __future__ import annotations

import time
import unicodedata
from pathlib import Path

import pytest
import yaml

from lora_med.errors import ConfigError
from lora_med.serve.guard import Guard, evaluate
from lora_med.serve.matcher import RuleSet, key, normalize, within_one

REPO = Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((REPO / "tests" / "data" / "guard_cases.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard(REPO / "configs" / "emergency.yaml")


def test_case_lists_are_big_enough():
    emergency = [m for k, v in CASES.items() if k.endswith("emergency") for m in v]
    ordinary = [m for k, v in CASES.items() if k.endswith("ordinary") for m in v]
    assert len(emergency) >= 60 and len(ordinary) >= 60
    assert len(set(emergency)) == len(emergency) and len(set(ordinary)) == len(ordinary)
    assert any(len(m) > 150 for m in emergency) and any(len(m) > 150 for m in ordinary)  # long messages too


def test_recall_and_false_alarms(guard):
    results = evaluate(guard, CASES)
    print()
    for name, r in results.items():
        print(f"  {name:20s} {r['measures']:12s} {r['flagged']:3d}/{r['messages']:3d} = {100 * r['rate']:5.1f}%")
    missed = {n: r["wrong"] for n, r in results.items() if r["wrong"]}
    assert not missed, missed  # every emergency flagged, no ordinary message flagged


def test_spelling_does_not_change_the_decision(guard):
    """Accents dropped, SHOUTED, or the phonetic swaps patients make: the same answer."""

    def strip(s: str) -> str:
        return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))

    swaps = (("qu", "k"), ("ll", "y"), ("ch", "x"), ("ci", "si"), ("v", "b"))
    for messages in CASES.values():
        for m in messages:
            want = guard.check(m) is not None
            variants = [strip(m), m.upper(), m.lower()]
            for a, b in swaps:
                variants.append(m.replace(a, b))
            assert all((guard.check(v) is not None) == want for v in variants), m


def test_reply_is_the_emergency_instruction_never_a_booking_question(guard):
    for m in ("me duele el pecho", "se trago lavandina", "me quiero morir", "mi hijo esta convulsionando"):
        hit = guard.check(m)
        assert hit is not None
        assert "118" in hit.reply and "sala de emergencias" in hit.reply
        lowered = hit.reply.lower()
        assert not any(w in lowered for w in ("cita", "agend", "nombre", "carnet", " ci ", "fecha de nacimiento"))
    rules = {r.name for r in guard.rules.rules}
    assert {
        "chest_pain",
        "breathing",
        "bleeding",
        "fainting",
        "stroke",
        "seizure",
        "poisoning",
        "allergy",
        "fever_stiff_neck",
        "suicidal",
    } <= rules  # the signs the clinic's fact sheet lists


def test_long_message_is_fast(guard):
    text = (
        "Hola buenas tardes, quería consultar por los horarios de la doctora y los precios de la consulta, "
        "también si trabajan con seguros y dónde queda la clínica exactamente. "
    ) * 6
    text = text[:1000]
    guard.rules.hits.cache_clear()
    t = time.perf_counter()
    assert guard.check(text) is None
    assert time.perf_counter() - t < 0.5  # about 1 ms on a quiet CPU; generous for a shared machine


@pytest.mark.parametrize(
    "a, b",
    [
        ("quiero", "kiero"),
        ("cita", "sita"),
        ("pecho", "pexo"),
        ("desmayo", "desmallo"),
        ("respirar", "rrespirar"),
        ("convulsiones", "combulsiones"),
        ("hinchado", "inchado"),
        ("inconsciente", "inconsiente"),
        ("vez", "bes"),
    ],
)
def test_phonetic_key(a, b):
    assert key(normalize(a)) == key(normalize(b)) or within_one(key(normalize(a)), key(normalize(b)))


@pytest.mark.parametrize(
    "a, b, close",
    [
        ("respirar", "respriar", True),
        ("sangrando", "sangrado", True),
        ("dolor", "color", True),
        ("infarto", "infartos", True),
        ("pecho", "techos", False),
        ("morir", "mover", False),
    ],
)
def test_within_one(a, b, close):
    assert within_one(a, b) == close


def test_normalize():
    assert normalize("¿Me DUELE el Pécho?!  ") == "me duele el pecho"
    assert normalize("Ñandú, CAÑADA") == "nandu canada"


def test_rule_syntax_errors_are_listed():
    with pytest.raises(ConfigError) as e:
        RuleSet.from_spec(
            [{"near": ["@nope"]}, {"seq": "a b"}, {"foo": 1}, {"near": ["x"], "window": -1}], {"ok": ["a"]}, "test.yaml"
        )
    text = "\n".join(e.value.problems)
    assert "unknown concept '@nope'" in text and "one word per alternative" in text
    assert "exactly one of 'near' or 'seq'" in text and "window/gap" in text


def test_rule_modes_and_numbers():
    rs = RuleSet.from_spec(
        [
            {"name": "order", "seq": ["no", "puedo", "respir*"], "gap": 1},
            {"name": "many", "seq": ["tome", "#5", "pastillas"], "gap": 1},
            {"name": "near", "near": ["pecho", "dolor"], "window": 2},
        ],
        {},
        "t",
    )
    assert rs.first("no puedo casi respirar").name == "order"
    assert rs.first("puedo no respirar") is None  # seq keeps the order
    assert rs.first("me tome 20 pastillas").name == "many"
    assert rs.first("me tome 2 pastillas") is None
    assert rs.first("dolor de pecho").name == "near"
    assert rs.first("pecho hoy y ayer y dolor") is None  # farther than the window


def test_bad_guard_file(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("reply: llama a alguien\nrules: [{name: x, near: [pecho]}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="118"):
        Guard(p)
    p.write_text("reply: llama al 118. {advice}\nrules: [{name: x, near: [pecho]}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no line for rule"):
        Guard(p)


def test_history_lets_a_past_sign_through_only_without_a_sign_of_now(guard, tmp_path):
    """The `history` section is what lets a check-up request about a past sign reach the model; a word of now,
    or a sign it does not cover (poisoning), keeps the emergency reply."""
    spec = yaml.safe_load((REPO / "configs" / "emergency.yaml").read_text(encoding="utf-8"))
    del spec["history"]
    p = tmp_path / "no-history.yaml"
    p.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    without = Guard(p)
    for m in (
        "el año pasado tuve un infarto y necesito mi control",
        "mi hija tuvo convulsiones de bebe, quiero control con el neurologo",
    ):
        assert without.check(m) is not None and guard.check(m) is None, m
    for m in (
        "el año pasado tuve un infarto y ahora necesito control porque me duele el pecho",
        "el año pasado tuve un infarto, hoy otra vez, necesito control",
        "el mes pasado me recetaron pastillas y me tome toda la caja, necesito receta",
    ):
        assert guard.check(m) is not None, m


def test_bad_history_section(tmp_path):
    base = "reply: llama al 118. {advice}\nrules: [{name: x, near: [pecho]}]\nadvice: {x: ya}\n"
    p = tmp_path / "e.yaml"
    p.write_text(base + "history: {past: [{near: [pasado]}]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'history' must have 'signs'"):
        Guard(p)
    p.write_text(
        base + "history: {signs: [y], past: [{near: [pasado]}], routine: [{near: [control]}], "
        "now: [{near: [ahora]}]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="names no rule: y"):
        Guard(p)
