"""The intents' learned layer (lora_med/serve/intent_model.py, configs/intents-model.safetensors): what it reads
of a new request, where the rules still decide, and its file. Its accuracy comes from blind rounds held out
(scripts/build_intent_model.py prints it; docs/serve.md keeps it), never from here."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from lora_med.errors import ConfigError
from lora_med.serve.intent_model import IntentModel
from lora_med.serve.intents import Intents
from lora_med.serve.store import Turn

from .conftest import REPO

INTENTS = REPO / "configs" / "intents.yaml"


@pytest.fixture(scope="module")
def intents() -> Intents:
    return Intents(INTENTS)


def test_a_request_told_without_the_rules_words_is_read_by_the_learned_layer(intents):
    """Each of these opens a request the rules miss or misread (written for this test, never trained on)."""
    rules = Intents(INTENTS, learned=False)
    cases = {
        "pal dentista mañana temprano se puede?": "schedule_appointment",
        "ya esta lo de la orina de mi hija?": "lab_results",
        "ya no necesito la consulta del jueves, me la borran porfa": "cancel_appointment",
        "me pasas mi eco de ayer por wsp?": "lab_results",
    }
    for message, action in cases.items():
        assert intents.decide(message, []).action == action, message
        assert rules.decide(message, []).action != action, message  # the rules alone would not
    assert intents.decide("buenas noches, gracias por todo", []).action == "chat"


def test_inside_a_flow_under_way_the_rules_decide(intents):
    """An identity and an hour continue the rescheduling under way (the learned layer alone reads them as
    clinic questions); a new request the rules name still switches the flow."""
    history = [
        Turn("user", "necesito cambiar mi cita del martes"),
        Turn("assistant", "Claro, ¿me das tu nombre completo, tu CI y tu fecha de nacimiento?", "reschedule_appointment",
             "verifying_identity"),
    ]  # fmt: skip
    for message in ("6543210 SC, naci el 3 de mayo de 1985", "a las 3 de la tarde"):
        assert intents.model.predict(message) != "reschedule_appointment", message
        assert intents.decide(message, history).action == "reschedule_appointment", message
    assert intents.decide("mejor cancelala nomas", history).action == "cancel_appointment"


def test_an_intent_file_without_a_learned_layer_uses_its_rules(tmp_path):
    spec = yaml.safe_load(INTENTS.read_text(encoding="utf-8"))
    del spec["learned"]
    (tmp_path / "intents.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    rules = Intents(tmp_path / "intents.yaml")
    assert rules.model is None
    assert rules.decide("ya esta lo de la orina de mi hija?", []).action == "chat"


def test_the_model_file_is_refused_unless_it_is_the_pinned_one(tmp_path):
    spec = yaml.safe_load(INTENTS.read_text(encoding="utf-8"))
    shipped = (REPO / "configs" / "intents-model.safetensors").read_bytes()
    (tmp_path / "intents-model.safetensors").write_bytes(shipped[:-8] + b"\0" * 8)
    (tmp_path / "intents.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Intents(tmp_path / "intents.yaml")
    assert "is not the" in str(e.value) and "build_intent_model.py --pin" in str(e.value)
    # another safetensors file (the triage's model) pinned by its own hash: not an intent model
    other = tmp_path / "other.safetensors"
    other.write_bytes((REPO / "configs" / "triage-model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="not a lora-med intent model"):
        IntentModel.load(other, None)
    spec["learned"] = {"sha256": "x"}
    (tmp_path / "intents.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Intents(tmp_path / "intents.yaml")
    assert any("'learned' must name the model 'file'" in p for p in e.value.problems)


@pytest.mark.slow
def test_the_shipped_model_is_rebuilt_byte_for_byte_from_its_sources(tmp_path):
    """Deterministic: the blind rounds' labels give the shipped file's bytes, and the pin in intents.yaml."""
    spec = importlib.util.spec_from_file_location("build_intent_model", REPO / "scripts" / "build_intent_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "intents-model.safetensors"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == (REPO / "configs" / "intents-model.safetensors").read_bytes()
    model = IntentModel.load(out, yaml.safe_load(INTENTS.read_text(encoding="utf-8"))["learned"]["sha256"])
    assert model.meta["held_out"]["model"] > model.meta["held_out"]["rules"]
