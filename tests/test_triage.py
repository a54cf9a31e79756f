"""The triage (configs/triage.yaml, lora_med/serve/triage): tiers, categories, advice, carry-over, the learned
layer's file, and the matcher under the rules.

The phrasings are in tests/data/triage_phrasings.yaml (written by hand for these tests, never trained on) and
tests/data/guard_cases.yaml (the former guard's lists; rounds 1-4). Measured figures come from blind rounds
(benchmarks/triage/run.py), never from here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
import yaml

from lora_med.errors import ConfigError
from lora_med.serve.intents import Intents
from lora_med.serve.matcher import RuleSet, key, normalize, within_one
from lora_med.serve.metrics import Metrics
from lora_med.serve.store import Turn
from lora_med.serve.triage import Triage
from lora_med.serve.triage.learned import LearnedModel
from lora_med.serve.triage.normalize import read
from lora_med.serve.turn import Dialog

REPO = Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((REPO / "tests" / "data" / "guard_cases.yaml").read_text(encoding="utf-8"))
PHRASINGS = yaml.safe_load((REPO / "tests" / "data" / "triage_phrasings.yaml").read_text(encoding="utf-8"))
LISTED_CATEGORIES = {
    "chest_pain", "breathing", "stroke", "bleeding_wound", "bleeding_pregnancy", "bleeding_postpartum",
    "vomiting_or_coughing_blood", "unconscious", "seizure", "poisoning_overdose", "anaphylaxis", "suicidal", "burn",
    "head_injury", "electrocution", "drowning", "bite_swelling", "infant_fever", "baby_lethargic_not_feeding",
    "dehydration_severe", "hypoglycaemia", "fever_stiff_neck_confusion", "pregnancy_danger", "acute_abdomen",
}  # fmt: skip


@pytest.fixture(scope="module")
def triage() -> Triage:
    return Triage(REPO / "configs" / "triage.yaml")


@pytest.fixture(scope="module")
def dialog(triage) -> Dialog:
    return Dialog(triage, Intents(REPO / "configs" / "intents.yaml"), None, Metrics(lambda: 0, lambda: 0))


def fits(triage: Triage, got: str | None, want: str) -> bool:
    """The advice given fits ``want``: its own line, its parent's, or the generic instruction."""
    return got is None or got == want or triage.rules.categories[got].parent == want


# --------------------------------------------------------------------------- tiers and categories


def test_every_listed_category_has_rules_advice_and_five_phrasings(triage):
    assert set(triage.rules.categories) >= LISTED_CATEGORIES
    for name in triage.rules.categories:
        if name not in ("bleeding_unclear", "confusion", "help_call", "hyperglycaemia", "severe_hypertension"):
            assert len(PHRASINGS["emergency"].get(name, [])) >= 5, name


@pytest.mark.parametrize("category", sorted(PHRASINGS["emergency"]))
def test_each_category_is_an_emergency_with_advice_that_fits(triage, category):
    for message in PHRASINGS["emergency"][category]:
        a = triage.assess(message)
        assert a.tier == "emergency", (message, a)
        assert fits(triage, a.category, category), (message, a.category)
        reply = triage.emergency_reply(a.category)
        assert "118" in reply and "sala de emergencias" in reply
        assert triage.advice.advice(a.category) in reply


@pytest.mark.parametrize("tier", ["caution", "none"])
def test_signs_told_as_past_mild_or_a_question_are_not_emergencies(triage, tier):
    for message in PHRASINGS[tier]:
        assert triage.assess(message).tier == tier, (message, triage.assess(message))


def test_a_sign_that_is_over_long_past_treated_or_taught_is_no_emergency_and_the_request_is_served(dialog):
    for message in PHRASINGS["not_emergency"]:
        plan = dialog.decide(message, [])
        assert plan.extra["triage"] in ("caution", "none"), (message, plan.extra)
        assert plan.action != "emergency" and plan.action == plan.extra["intent"], (message, plan.action)
        assert plan.reply is None or "118" not in plan.reply.split(".")[0], message  # served, not referred


def test_a_burn_with_a_sign_of_the_airway_stays_an_emergency(triage):
    for message in (
        "se quemo con la garrafa y tiene la voz ronquita, un poquito nomas",  # "un poquito" does not lower it
        "hace un rato se quemo con agua hirviendo, poquito, pero respiro el humo y ahora tose negro",
    ):
        a = triage.assess(message)
        assert a.tier == "emergency" and a.category == "burn_airway", (message, a)
    mild = triage.assess("me queme un poquito el dedo con la olla, ya no me duele").tier
    assert mild != "emergency"  # a small burn alone is still lowered
    assert "mild" not in triage.assess("tiene la voz ronquita").findings.modifiers  # ronquita is no ronchita


def test_the_former_guard_lists(triage):
    """Every emergency of the former guard's lists stays one; no ordinary message becomes one (a sign told as
    past is a caution now, so recall_first_emergency's message may be either)."""
    for name, messages in CASES.items():
        for m in messages:
            tier = triage.assess(m).tier
            if name == "recall_first_emergency":
                assert tier in ("caution", "emergency"), m
            elif name.endswith("emergency"):
                assert tier == "emergency", (name, m)
            else:
                assert tier != "emergency", (name, m)


def test_spelling_does_not_change_the_tier(triage):
    """Accents dropped, SHOUTED, or the phonetic swaps patients make: the same tier."""

    def strip(s: str) -> str:
        return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))

    swaps = (("qu", "k"), ("ll", "y"), ("ch", "x"), ("ci", "si"), ("v", "b"))
    messages = [m for ms in PHRASINGS["emergency"].values() for m in ms] + PHRASINGS["none"]
    for m in messages:
        want = triage.assess(m).tier == "emergency"
        for v in (strip(m), m.upper(), *(m.replace(a, b) for a, b in swaps)):
            assert (triage.assess(v).tier == "emergency") == want, (m, v)


def test_format_characters_do_not_hide_a_sign(triage):
    for cf in ("\u200b", "\u00ad", "\u2060", "\ufeff", "\u200d", "\u200e"):
        for m in (f"me duele mucho el pe{cf}cho", f"mi hijo esta convul{cf}sionando", f"se tra{cf}go lavan{cf}dina"):
            assert triage.assess(m).tier == "emergency", repr(m)
        assert normalize(f"pe{cf}cho") == "pecho" and read(f"pe{cf}cho") == "pecho"


def test_numbers_with_units_are_read():
    assert "lecturafiebre" in read("tiene 38,5 de fiebre") and "lecturafiebre" not in read("tiene 37,2 de fiebre")
    assert "lecturafiebrealta" in read("fiebre de 39.5")
    assert "lecturafiebre" not in read("tiene 38 años y fiebre")  # an age, not a temperature
    assert "lecturaglucosabaja" in read("el azúcar en 40") and "lecturaglucosabaja" not in read("glucosa 110")
    assert "lecturaglucosabaja" in read("el glucómetro dice LO") and "lecturaglucosabaja" not in read("no lo sé")
    assert "lecturaembarazo lecturapretermino" in read("tengo 30 semanas") and "lecturaembarazo" not in read(
        "hace 30 semanas"
    )
    assert "lecturamenor3meses" in read("mi bebé de 3 semanitas") and "lecturamenor3meses" in read("bebe de dos meses")
    assert "lecturamenor3meses" not in read("mi bebé de 5 meses") and "lecturalactante" in read("mi bebé de 5 meses")
    assert "lecturapresionmuyalta" in read("la presion en 16/11") and "lecturapresionmuyalta" not in read("el 16/11")
    assert "lecturaano" in read("tuvo un infarto en 2019") and "lecturaano" in read("desde el 2015 tiene asma")
    assert "lecturaano" not in read("la consulta cuesta en 2000 bs") and "lecturaano" not in read("tome 2019 pastillas")


def test_numbers_decide_categories(triage):
    assert triage.assess("mi bebe de 2 meses tiene 38,3").category == "infant_fever"
    assert triage.assess("mi hijo de 2 años tiene 38,3, hay pediatra hoy?").tier != "emergency"
    assert triage.assess("mi mama diabetica tiene el azucar en 40 y esta sudando").category == "hypoglycaemia"
    assert triage.assess("tengo 30 semanas y se me rompio la fuente").category == "pregnancy_danger"


# --------------------------------------------------------------------------- advice


def test_advice_table_never_pairs(triage):
    adv = triage.advice
    never = {
        "unconscious": "siéntate",
        "hypoglycaemia": "nada de comer ni de beber",
        "dehydration_severe": "nada de comer ni de beber",
        "bleeding_pregnancy": "presiona la herida",
    }
    for category, phrase in never.items():
        assert phrase not in adv.advice(category).lower()
        assert adv.forbidden(category, phrase) is not None  # the table lists the pair
    assert "adrenalina" not in adv.advice("bite_swelling") and "suicid" not in adv.advice("baby_lethargic_not_feeding")
    for message, category, phrase in (
        ("mi mama se desmayo y no despierta", "unconscious", "sient"),
        ("mi hijo tiene diarrea, ya no hace pis y tiene los ojos hundidos", "dehydration_severe", "nada de comer"),
        ("mi abuelo diabetico esta sudando y confundido, se puso insulina", "hypoglycaemia", "nada de comer"),
        ("estoy embarazada de 20 semanas y estoy sangrando mucho", "bleeding_pregnancy", "herida"),
        ("me mordio una vibora en el pie", "bite_swelling", "adrenalina"),
        ("mi bebe no quiere mamar y esta muy decaido", "baby_lethargic_not_feeding", "suicid"),
    ):
        a = triage.assess(message)
        assert a.category == category, (message, a.category)
        assert phrase not in triage.emergency_reply(a.category).lower()


@pytest.mark.parametrize(
    "message, reading",
    [
        # a chest pain line ("siéntate") for someone electrocuted
        (
            "a mi primo le dio un corrientazo en la obra y ahora le duele el pecho y el corazon le late raro",
            "electrocution",
        ),
        ("le dio el toque del enchufe a mi esposa y dice que le aprieta el pecho", "electrocution"),
        # a chest pain or breathing line for a baby who does not feed
        ("mi bebe de 1 mes no se prende al pecho, esta floja y casi no moja el panal", "baby_lethargic_not_feeding"),
        ("la wawa de 3 semanas no quiere el pecho, se queja y respira rapidito", "baby_lethargic_not_feeding"),
        # "nada de comer ni de beber" (stroke) for low sugar
        ("mi abuelo diabetico tiene la boca torcida y habla raro, el azucar le salio 50", "hypoglycaemia"),
        # "presiona la herida" for a pregnant woman who bleeds
        ("estoy embarazada de 5 meses y me corte la mano con un vidrio, sangra mucho", "bleeding_pregnancy"),
        # an adrenaline autoinjector for a snakebite
        ("me mordio una vibora y se me esta hinchando la cara y los labios", "bite_swelling"),
        # a seated position for someone who does not wake
        ("a mi papa le dolia el pecho y ahora no despierta, respira raro", "unconscious"),
        # only mentioned (no sign rule of that category fires): the line of the sign found would be unsafe
        ("estaba arreglando el tomacorriente y ahora le duele el pecho y suda frio", "electrocution"),
        ("mi bebe de 4 meses llora y se toca el pecho, le duele, casi no moja el panal", "baby_lethargic_not_feeding"),
        (
            "estoy embarazada de 6 meses y hoy en la cocina mientras picaba cebolla con el cuchillo nuevo me hice un "
            "tajo hondo y sangra a chorros",
            "bleeding_pregnancy",
        ),  # fmt: skip
        ("a mi papa le duele el pecho y ahora cuesta despertarlo", "unconscious"),
        ("vi una vibora en el patio y ahora tengo la cara y los labios hinchados", "bite_swelling"),
    ],
)
def test_a_line_goes_out_only_where_it_is_safe_for_every_reading_of_the_message(triage, message, reading):
    """The `never` table decides: a category's line is sent only when it is safe for every category the message
    may be about (signs, caution signs, mentions); otherwise the generic instruction."""
    a = triage.assess(message)
    assert a.tier == "emergency", (message, a)
    assert reading in a.findings.readings, (message, a.findings)
    reply = triage.emergency_reply(a.category)
    for r in a.findings.readings:
        assert triage.advice.forbidden(r, reply) is None, (message, a.category, r)


def test_fitting_is_the_table_applied_to_the_readings(triage):
    adv = triage.advice
    assert adv.fitting("chest_pain", {"chest_pain"}) == "chest_pain"
    assert adv.fitting("chest_pain", {"chest_pain", "breathing"}) == "chest_pain"  # no never pair between them
    assert adv.fitting("chest_pain", {"chest_pain", "electrocution"}) is None  # "siéntate"
    assert adv.fitting("breathing", {"breathing", "baby_lethargic_not_feeding"}) is None  # "erguido"
    assert adv.fitting("stroke", {"stroke", "hypoglycaemia"}) is None  # "nada de comer"
    assert adv.fitting("bleeding_wound", {"bleeding_wound", "bleeding_pregnancy"}) is None  # "presiona la herida"
    assert adv.fitting("anaphylaxis", {"anaphylaxis", "bite_swelling"}) is None  # "adrenalina"
    assert adv.fitting("acute_abdomen", {"acute_abdomen", "dehydration_severe"}) is None  # "ni bebas" / sips
    assert adv.fitting("electrocution", {"electrocution", "chest_pain"}) == "electrocution"
    assert adv.fitting(None, {"chest_pain"}) is None
    for cat in triage.rules.categories:  # the generic lines are safe for every category
        assert adv.forbidden(cat, adv.generic) is None and adv.forbidden(cat, adv.generic_caution) is None


def test_two_categories_that_do_not_cover_each_other_get_only_the_generic_instruction(triage):
    a = triage.assess("mi hijo se corto las venas y se tomo todas las pastillas")  # bleeding + suicidal + poisoning
    assert a.tier == "emergency" and a.category is None
    assert triage.emergency_reply(None).endswith(triage.advice.generic)
    assert "118" in triage.emergency_reply(None) and "No manejes" in triage.advice.generic


def test_an_advice_line_the_never_table_forbids_is_refused(tmp_path):
    for name in ("triage.yaml", "triage-model.safetensors"):
        (tmp_path / name).write_bytes((REPO / "configs" / name).read_bytes())
    spec = yaml.safe_load((REPO / "configs" / "triage-advice.yaml").read_text(encoding="utf-8"))
    spec["categories"]["unconscious"]["advice"] = "Siéntalo y dale agua."
    spec["generic"] = "Que se siente tranquilo y llama al 118."
    (tmp_path / "triage-advice.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    assert any("unconscious.advice" in p and "never" in p for p in e.value.problems)
    assert any("'generic'" in p and "fit all" in p for p in e.value.problems)


def test_a_category_may_not_cover_one_its_line_is_forbidden_for(tmp_path):
    """`covers` says a line fits another category too; the `never` table must agree (no adrenaline for a bite)."""
    for name in ("triage-advice.yaml", "triage-model.safetensors"):
        (tmp_path / name).write_bytes((REPO / "configs" / name).read_bytes())
    spec = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))
    spec["categories"]["anaphylaxis"]["covers"] = ["breathing", "bite_swelling"]
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    assert any("anaphylaxis.advice" in p and "bite_swelling" in p and "covers" in p for p in e.value.problems)


def test_company_releases_must_be_a_yes_or_no(tmp_path):
    for name in ("triage-advice.yaml", "triage-model.safetensors"):
        (tmp_path / name).write_bytes((REPO / "configs" / name).read_bytes())
    spec = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))
    spec["categories"]["farewell"]["company_releases"] = "si"
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    assert any("'farewell'" in p and "company_releases" in p and "true or false" in p for p in e.value.problems)


# --------------------------------------------------------------------------- protected words, the matcher


@pytest.mark.parametrize(
    "message, not_category",
    [
        ("mi bebe no quiere mamar", "suicidal"),  # mamar is one letter from matar
        ("te quiero contar que mi hijo ya esta mejor", "suicidal"),  # contar / cortar
        ("tengo dolor fuerte de muela, hay dentista?", "suicidal"),  # fuerte / muerte, muela / muera
        ("mi hijo trago mucha agua del grifo", "poisoning_overdose"),  # agua / aguja
        ("se me cayo el cabello, hay dermatologo?", "trauma"),  # cabello / caballo
        ("me pico un zancudo y tengo una roncha", "anaphylaxis"),  # roncha / ronca
        ("necesito panales y una crema para el pecho del bebe", "chest_pain"),  # panales / punal (a stabbing pain)
        ("en la posta dijeron que se desmayo por el calor", "poisoning_overdose"),  # posta / pasta (the drug)
        ("me corre un calambre por el brazo cuando hago ejercicio", "suicidal"),  # corre / corte, brazo / brazos
    ],
)
def test_protected_words_are_never_read_as_a_danger_word(triage, message, not_category):
    f = triage.assess(message).findings
    assert not_category not in f.signs | f.cautions, message


def test_protected_words_match_only_themselves():
    rs = RuleSet.from_spec([{"name": "die", "near": ["matar|cortar"]}], {}, "t", ["mamar"])
    assert rs.first("lo quiero matar") is not None and rs.first("quiero mamar") is None
    assert rs.first("me voy a cortar") is not None and rs.first("me voy a kortar") is not None  # spelling kept
    assert RuleSet.from_spec([{"near": ["matar"]}], {}, "t").first("mamar") is not None  # without the list
    with pytest.raises(ConfigError, match="protected"):
        RuleSet.from_spec([{"near": ["matar"]}], {}, "t", "mamar")


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


# --------------------------------------------------------------------------- carry-over, the turn


def _after(turns: list[tuple[str, str]]) -> list[Turn]:
    out = []
    for message, action in turns:
        out += [Turn("user", message), Turn("assistant", "...", action, "x")]
    return out


def assert_emergency(triage, *messages: str) -> None:
    for message in messages:
        assert triage.assess(message).tier == "emergency", message


def assert_not_emergency(triage, *messages: str) -> None:
    for message in messages:
        assert triage.assess(message).tier != "emergency", message


def assert_released(dialog, history: list[Turn], *messages: str) -> None:
    """Each message, after ``history`` (a carried emergency), ends it: not an emergency, and released."""
    for message in messages:
        plan = dialog.decide(message, history)
        assert plan.action != "emergency" and plan.extra["triage_released"], message


def test_an_emergency_carries_over_until_the_patient_is_attended(triage, dialog):
    history = _after([("mi papa tiene dolor de pecho fuerte y suda frio", "emergency")])
    for message in (
        "no tenemos plata para la ambulancia, mejor dame una ficha para mañana con el cardiologo",
        "ya se le esta pasando un poco creo, esperamos a mañana?",
        "todavia no llega la ambulancia",
        "cuanto cuesta la consulta?",
    ):
        plan = dialog.decide(message, history)
        assert plan.action == "emergency" and plan.extra["triage_carried"], message
        assert "118" in plan.reply and not any(w in plan.reply.lower() for w in ("agend", "carnet", "fecha de nac"))
        assert triage.advice.advice("chest_pain") in plan.reply  # the carried category's advice
    booking = dialog.decide("mejor dame una ficha para mañana", history)
    assert booking.extra["intent"] == "schedule_appointment"  # the request is kept in params


def test_the_carried_emergency_ends_when_they_are_attended(dialog):
    history = _after([("mi hijo esta convulsionando", "emergency"), ("dame cita", "emergency")])
    assert_released(
        dialog, history, "ya estamos en el hospital", "ya llego la ambulancia, se lo estan llevando", "ya lo atendieron"
    )
    released = history + _after([("ya lo atendieron en emergencias", "chat")])
    plan = dialog.decide("quiero una cita con el pediatra para el lunes", released)
    assert plan.action == "schedule_appointment" and plan.extra["triage"] == "none" and plan.reply is None


def test_being_brought_to_a_hospital_or_treated_there_ends_the_carried_emergency(dialog):
    history = _after([("a mi tio le mordio una vibora en el chaco y se le hincha la pierna", "emergency")])
    assert_released(
        dialog,
        history,
        "ya lo trasladaron al hospital de Warnes",
        "lo llevaron a la clinica del norte, le estan poniendo suero",
        "ya la internaron, le estan pasando oxigeno",
    )
    for message in (
        "todavia no llegamos al hospital, no hay movilidad",
        "lo llevaron al hospital pero no lo atienden",
        "quiero una ficha para mañana",
    ):
        plan = dialog.decide(message, history)
        assert plan.action == "emergency" and plan.extra["triage_carried"], message


def test_signs_told_while_in_care_release_and_a_plan_to_come_here_does_not(dialog):
    """A carried emergency is released by a message that says they are in care even when it names signs (the
    same emergency being treated); being driven to a hospital by someone else counts; bringing the patient to
    this clinic (no emergency room) does not."""
    history = _after([("me duele muchisimo la barriga abajo a la derecha y tengo fiebre", "emergency")])
    assert_released(
        dialog,
        history,
        "ya estoy internado, dicen que es apendicitis y me van a operar",
        "ya nos llevo el vecino en su auto al hospital de niños, ya le pusieron oxigeno",
    )
    for message in ("tienen pediatra ahora? lo llevo a su clinica", "me duele mas, estoy en mi casa"):
        plan = dialog.decide(message, history)
        assert plan.action == "emergency", message
    # without a carried emergency, signs beside a hospital word are still an emergency
    assert dialog.decide("estoy en el hospital y me duele el pecho fuerte, sudo frio", []).action == "emergency"


def test_a_child_named_with_a_possessive_is_not_the_writer_s_childhood(triage):
    """ "de niño" / "cuando era chico" tell the writer's past; "de mi wawa" names the child it is about."""
    burn = "se volco la olla de agua hirviendo encima de mi wawa de 1 año, tiene ampollas grandes en el pecho"
    assert triage.assess(burn).tier == "emergency"
    assert triage.assess("de niño me queme la mano, quiero ver la cicatriz con el dermatologo").tier == "caution"
    # a sign told in the present after a rescue is now
    drowning = "casi se ahoga en el rio, ya lo sacaron y respira rapidito y le sale espuma por la boca"
    assert triage.assess(drowning).tier == "emergency"


def test_a_farewell_inside_a_cancellation_is_an_emergency_and_a_trip_is_not(triage):
    farewell = "queria cancelar mi cita del viernes porque ya no voy a estar, deje todo arreglado para mis hijos"
    assert triage.assess(farewell).tier == "emergency" and fits(triage, triage.assess(farewell).category, "suicidal")
    for ordinary in (
        "cancelo mi cita del viernes porque ya no voy a estar en santa cruz, viajo a cochabamba, gracias",
        "deje todo listo para la cirugia, que documentos llevo?",
        "ya no voy a estar disponible el lunes, gracias, me cambia la cita?",
    ):
        assert triage.assess(ordinary).tier == "none", ordinary


def test_diminutives_about_to_faint_and_a_discharge(triage):
    """A parent's diminutives name the same signs; feeling about to faint is now; a discharge ends the episode."""
    seizure = "la wawa se puso a temblar con los ojitos para arriba y echa espumita por la boca"
    assert triage.assess(seizure).tier == "emergency"
    assert triage.assess("mi bebe tiene los ojitos rojos y con lagañas, quiero pediatra").tier == "none"
    ectopic = (
        "mi prueba salio positiva hace 2 semanas, hoy dolor horrible abajo a la derecha, siento q me voy a desmayar"
    )
    assert triage.assess(ectopic).tier == "emergency"
    assert triage.assess("a veces cuando me paro rapido siento que me voy a desmayar, quiero cardiologo").tier != (
        "emergency"
    )
    discharged = "a mi papa lo dieron de alta despues de un derrame, ahora necesita fisioterapia, tienen?"
    assert triage.assess(discharged).tier == "caution"


def test_care_told_in_many_ways_releases_a_carried_emergency(dialog):
    history = _after([("mi hijo no despierta y respira raro", "emergency")])
    assert_released(
        dialog,
        history,
        "estoy en la posta, me pusieron una inyeccion y suero",
        "el pediatra de guardia ya la reviso, se queda en observacion",
        "los paramedicos ya le pusieron suero con glucosa aqui en la casa",
        "un bombero le dio oxigeno y ahora vamos en la ambulancia",
    )
    for message in ("mi hermana me va a llevar al hospital mas tarde", "no tenemos suero en casa, que le doy?"):
        assert dialog.decide(message, history).action == "emergency", message


def test_a_word_one_typo_from_a_joke_marker_is_not_a_joke(triage):
    """ "brota" is one letter from "broma": a wound whose blood spurts is no figure of speech."""
    wound = "se corto con un vidrio, corte hondo en la muñeca, la sangre brota y no para aunq aprieto"
    assert triage.assess(wound).tier == "emergency"
    assert triage.assess("me salio un brote en la piel, quiero dermatologo").tier == "none"


def test_a_farewell_after_no_longer_coping_is_an_emergency(triage):
    farewell = "ya no aguanto mas, tengo todo listo para irme, solo queria decir gracias a la doctora del año pasado"
    assert triage.assess(farewell).tier == "emergency"
    # a journey lowers a farewell to the caution line (the request is served), never to an emergency
    assert triage.assess("tengo todo listo para irme de viaje, cancelo mi cita").tier == "caution"


def test_denied_bleeding_and_nothing_wrong_are_not_signs(triage):
    assert triage.assess("cuanto cuesta la eco obstetrica? tengo 8 semanas, sin sangrado ni nada").tier != "emergency"
    assert triage.assess("estoy embarazada de 20 semanas y estoy sangrando mucho").tier == "emergency"
    assert triage.assess("le sangra la herida a chorros y no para").tier == "emergency"


def test_intent_is_kept_whatever_the_tier(dialog):
    plan = dialog.decide("quiero una cita con cardiologia, me duele mucho el pecho ahorita", [])
    assert plan.action == "emergency" and plan.extra == {
        "triage": "emergency",
        "triage_category": "chest_pain",
        "intent": "schedule_appointment",
    }
    plan = dialog.decide("hace un año tuve un infarto, quiero control con el cardiologo", [])
    assert plan.action == "schedule_appointment" and plan.extra["triage"] == "caution" and plan.note


def test_a_model_reply_about_emergencies_is_replaced_by_the_flow_and_counted(dialog, triage):
    metrics = dialog.metrics
    before = metrics.overridden.get()
    plan = dialog.decide("quiero sacar ficha con el pediatra", [])
    done = dialog.finish(plan, "Es una emergencia, llama al 118 de inmediato.")
    assert done.reply == triage.flow_reply("schedule_appointment") and done.source == "flow"
    assert metrics.overridden.get() == before + 1
    assert dialog.finish(plan, "Con gusto, ¿qué día?").reply == "Con gusto, ¿qué día?"
    caution = dialog.decide("la semana pasada me desmaye, ya estoy bien, quiero un chequeo", [])
    done = dialog.finish(caution, "Te espero, llama a la ambulancia.")
    assert done.reply == f"{triage.flow_reply(caution.action)} {caution.note}"


# --------------------------------------------------------------------------- the learned layer's file


def test_model_file_is_checked_when_it_loads(tmp_path):
    model = REPO / "configs" / "triage-model.safetensors"
    pinned = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))["learned"]["sha256"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == pinned
    with pytest.raises(ConfigError, match="sha256"):
        LearnedModel.load(model, "0" * 64)
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="not a lora-med triage model"):
        LearnedModel.load(bad, None)
    with pytest.raises(ConfigError, match="cannot read"):
        LearnedModel.load(tmp_path / "missing.safetensors", None)
    header = json.loads(model.read_bytes()[8 : 8 + int.from_bytes(model.read_bytes()[:8], "little")])
    meta = json.loads(header["__metadata__"]["triage"])
    assert meta["format"] == "lora-med-triage-ngram/1" and 0 < meta["caution_at"] <= meta["emergency_at"] < 1


@pytest.mark.slow
def test_rebuilding_the_learned_layer_gives_the_same_file(tmp_path):
    spec = importlib.util.spec_from_file_location("build_triage_model", REPO / "scripts" / "build_triage_model.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = tmp_path / "model.safetensors"
    assert build.main(["--out", str(out)]) == 0
    assert out.read_bytes() == (REPO / "configs" / "triage-model.safetensors").read_bytes()


def test_versions_name_the_rules_and_the_model(triage):
    v = triage.versions()
    sha = hashlib.sha256((REPO / "configs" / "triage-model.safetensors").read_bytes()).hexdigest()
    assert v["rules"].startswith("triage.yaml@") and v["model"] == f"ngram-lr@{sha[:12]}"


def test_bad_triage_file_lists_its_problems(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))
    spec["reply"] = "llama a alguien"
    spec["categories"]["chest_pain"]["covers"] = ["nope"]
    del spec["flow_replies"]["chat"]
    for name in ("triage-advice.yaml", "triage-model.safetensors"):
        (tmp_path / name).write_bytes((REPO / "configs" / name).read_bytes())
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    assert "unknown categories" in "\n".join(e.value.problems)
    spec["categories"]["chest_pain"]["covers"] = []
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    text = "\n".join(e.value.problems)
    assert "'reply'" in text and "118" in text and "flow_replies" in text and "chat" in text


# --------------------------------------------------------------------------- the round benchmark


def test_round_benchmark_writes_results_and_refuses_a_bad_round(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("triage_run", REPO / "benchmarks" / "triage" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    round_file = tmp_path / "round.yaml"
    round_file.write_text(
        yaml.safe_dump(
            {
                "round": 99,
                "emergency": [{"id": "e1", "category": "seizure", "text": "mi hijo esta convulsionando"}],
                "ordinary": [{"id": "o1", "request": "book", "text": "quiero una cita con el pediatra"}],
                "carry_over": [
                    {
                        "id": "c1",
                        "turns": [
                            {"text": "mi papa se desmayo y no despierta", "expect": "emergency"},
                            {"text": "dame ficha para mañana", "expect": "emergency"},
                            {"text": "ya llego la ambulancia", "expect": "attended"},
                            {"text": "quiero una cita para su control", "expect": "ordinary"},
                        ],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    assert run.main([str(round_file), "--out", str(tmp_path / "out"), "--passes", "1"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert res["emergency"]["caught"] == 1 and res["ordinary"]["emergency"] == 0 and res["ordinary"]["intent_ok"] == 1
    assert res["carry_over"] == {**res["carry_over"], "kept": 1, "released": 1, "resumed": 1, "opened": 1}
    assert res["timing"]["p50_ms"] > 0 and res["triage"]["model"].startswith("ngram-lr@")
    assert "| round |" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    round_file.write_text("emergency: []\n", encoding="utf-8")
    assert run.main([str(round_file), "--out", str(tmp_path / "out2")]) == 2
    assert "'emergency' must be a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_care_told_by_who_gives_it_or_what_they_do_ends_the_carried_emergency(dialog):
    """Being attended is recognised by staff at work, a clinical act done by others, being in a care place or
    the ambulance on its way with them, in wordings no single phrase covers; asking for a doctor, a plan, first
    aid done at home, a blow or "estamos en una emergencia" keep the emergency."""
    history = _after(
        [("mi papa se cayo de la escalera, se golpeo la cabeza y vomito dos veces, esta confundido", "emergency")]
    )
    assert_released(
        dialog,
        history,
        "ahorita una enfermera le esta limpiando la herida y un medico lo esta revisando",
        "ya vinieron los bomberos, le pusieron un collarin y lo subieron a la camilla",
        "estamos con el paramedico, le esta tomando la presion",
        "le estan haciendo puntos en la frente en la posta de mi barrio",
        "lo conectaron al monitor y le estan sacando placas",
        "vamos en la ambulancia con la sirena",
        "sigue en observacion con suero",
        "ya le hicieron una tomografia y dicen que esta estable",
        "llego el 118 y lo estan subiendo",
        "la doctora de turno lo esta examinando ahorita",
    )
    for message in (
        "hay doctor ahorita en su clinica?",
        "estamos en una emergencia ayuda",
        "mi esposo me esta pegando",
        "se escucha la sirena pero no llega",
        "le llevo al doctor?",
        "me esta haciendo falta el aire",
        "el doctor no viene",
        "la enfermera del barrio dice que lo llevemos al hospital",
        "le estoy poniendo hielo en la cabeza",
        "ahorita en el hospital hay neurologo?",
    ):
        plan = dialog.decide(message, history)  # carried, or a new emergency ("me esta haciendo falta el aire")
        assert plan.action == "emergency" and not plan.extra.get("triage_released"), message


def test_a_farewell_told_as_an_ending_is_suicidal_and_a_journey_is_a_caution(triage):
    """A last night or day, no more need of the appointments, everything ready "para irme": an emergency, even
    inside a cancellation and without a word of death; the same words about a journey only get the caution
    line, and plain cancellations nothing."""
    for farewell in (
        "cancelen mis fichas por favor, ya no las voy a necesitar, esta es mi ultima noche, perdonen todo",
        "ya decidi, hoy es mi ultimo dia, gracias por todo lo que hicieron por mi",
        "queria anular el control del martes, ya no lo voy a necesitar, ya tengo todo preparado para irme",
        "no se molesten en llamarme, ya no voy a necesitar nada, cuiden a mis hijos",
        "gracias doctora, ya tengo todo listo para irme, esta noche por fin descanso",
    ):
        assert triage.assess(farewell).tier == "emergency" and fits(
            triage, triage.assess(farewell).category, "suicidal"
        ), farewell
    for journey in (
        "ya tengo todo listo para irme de viaje esta noche, cancelo mi cita, gracias por todo",
        "cancelo la ficha del lunes, me mudo a cochabamba, ya tengo todo listo para irme, gracias",
    ):
        assert triage.assess(journey).tier == "caution", journey
    for plain in (
        "ya no voy a necesitar la cita, ya me siento bien, gracias",
        "es mi ultimo dia de vacaciones, quiero ficha para el lunes",
    ):
        assert triage.assess(plain).tier == "none", plain
    # "terminar con todo" is not a journey: "terminar" is one letter from "terminal"
    assert triage.assess("ya no aguanto mas, hoy voy a terminar con todo").tier == "emergency"


def test_a_nosebleed_that_comes_and_goes_is_a_caution(triage):
    for message in (
        "a veces me sangra la nariz cuando hace frio, poquito y se para sola, tienen otorrino?",
        "de vez en cuando me sale sangre de la nariz y se para sola, quiero consulta",
    ):
        assert triage.assess(message).tier == "caution", message
    assert (
        triage.assess("me sale sangre de la nariz hace una hora y no para, ya empape dos toallas").tier == "emergency"
    )


def test_being_in_the_emergency_room_or_with_the_staff_ends_the_carried_emergency(dialog):
    history = _after([("mi hija tiene fiebre alta, el cuello tieso y esta como perdida, no me reconoce", "emergency")])
    assert_released(
        dialog,
        history,
        "ya estamos con el oxigeno puesto en la sala de emergencias, esta mas tranquila",
        "la tienen en la sala de observacion y los medicos estan con ella",
        "le estan pasando antibiotico por la vena",
        "los enfermeros siguen con ella, le bajaron la fiebre",
    )
    for message in ("no hay nadie en la sala de emergencias", "la llevo a la sala de emergencias?"):
        plan = dialog.decide(message, history)
        assert plan.action == "emergency" and not plan.extra.get("triage_released"), message


def test_two_kinds_of_goodbye_cue_are_suicidal_and_one_is_not(triage):
    """Being gone, a decision taken, things given away, thanks to everyone: any two kinds in one message are a
    suicidal farewell, whatever request carries them; one kind alone is an ordinary goodbye."""
    for farewell in (
        "queria cancelar mi ficha del viernes, ya tome la decision, no me esperen",
        "solo queria agradecer a la doctora, mi celular se lo deje a mi hermano, cuidense",
        "ya no van a saber de mi, gracias por todo lo que hicieron",
        "regale mi ropa y mis cosas, ya esta decidido, cuanto debo de la ultima consulta?",
        "les escribo para decirles que fueron muy buenos conmigo, ya no voy a estar para el control, adios",
    ):
        assert triage.assess(farewell).tier == "emergency" and fits(
            triage, triage.assess(farewell).category, "suicidal"
        ), farewell
    for goodbye in (
        "gracias por todo doctora, ya me siento bien, cancelo la cita del martes",
        "ya tome la decision de operarme, quiero ficha con el cirujano",
        "cuidense mucho, feliz navidad a todo el personal",
        "ya no voy a estar en la ciudad el lunes, me cambia la cita?",
    ):
        assert triage.assess(goodbye).tier != "emergency", goodbye


def test_a_test_named_by_its_body_part_is_no_sign_and_signs_beside_it_still_are(triage):
    """ "ecografía de abdomen" names a test; a rigid belly and vomiting told beside it are an acute abdomen."""
    for question in (
        "cuanto cuesta la ecografia de abdomen?",
        "quiero sacarme una prueba de embarazo en sangre",
        "tienen analisis de orina y de sangre el sabado?",
    ):
        assert triage.assess(question).tier == "none", question
    asked = "cuanto sale la eco de la panza? es para mi papa, la barriga dura como tabla, vomita y no aguanta el dolor"
    assert triage.assess(asked).tier == "emergency"


def test_a_journey_marked_by_exact_words_never_lowers_the_learned_layer(triage):
    """ "bajando" is one typo from "viajando": a journey is read from exact words only, and it lowers only a
    farewell's rules, never the learned layer's verdict."""
    bleeding = "mi cuñada tiene 7 meses y le esta bajando sangre rojo vivo, harto, ya mancho la cama"
    assert "trip" not in triage.assess(bleeding).findings.modifiers
    assert triage.assess(bleeding).tier == "emergency"
    assert (
        triage.assess("me esta bajando harta sangre, estoy de viaje en la paz y tengo 30 semanas").tier == "emergency"
    )


def test_a_common_word_one_typo_from_a_sign_is_protected(triage):
    assert triage.assess("quiero dejar una queja, el guardia me trato mal ayer").tier == "none"
    assert triage.assess("se trago una pila de reloj hace un rato").tier == "emergency"


def test_an_ingestion_weeks_ago_that_ended_is_a_caution_and_days_ago_is_not(triage):
    for message in (
        "el mes pasado mi nieto se trago un arete y lo boto al dia siguiente, ahora esta de lo mas bien, control?",
        "hace 3 semanas mi hijo tomo lavandina, lo vieron en el hospital, quiero control con pediatra",
    ):
        assert triage.assess(message).tier == "caution", message
    assert_emergency(
        triage,
        "hace 2 dias mi esposo tomo veneno para ratas y hoy esta raro",
        "el mes pasado me recetaron pastillas para dormir y anoche me tome toda la caja",
    )


def test_company_ends_a_carried_suicidal_crisis_and_not_a_medical_emergency(dialog):
    suicidal = _after([("ya no aguanto mas, mejor me despido de todos, ya no quiero vivir", "emergency")])
    assert_released(
        dialog,
        suicidal,
        "mi mama esta conmigo ahora, no me deja sola",
        "vino mi amigo, se va a quedar conmigo esta noche",
        "estoy acompañada de mi prima",
        "llego mi hermano, ya no estoy solo",
    )
    for message in ("nadie esta conmigo", "estoy sola, no hay nadie", "mi hermana no contesta, estoy sola"):
        assert dialog.decide(message, suicidal).action == "emergency", message
    chest = _after([("mi papa tiene un dolor fuerte en el pecho y suda frio", "emergency")])
    for message in ("mi hermana esta aqui conmigo", "ya llego mi mama, esta con el"):
        assert dialog.decide(message, chest).action == "emergency", message


def test_kept_in_care_on_treatment_or_on_the_way_ends_the_carried_emergency(dialog):
    history = _after([("a mi hijo le mordio una serpiente en el pie y se le esta hinchando la pierna", "emergency")])
    assert_released(
        dialog,
        history,
        "ahorita lo tienen monitoreado en la sala",
        "ya lo tienen internado y le empezaron el suero",
        "vamos camino al hospital con mi tio en su camioneta",
    )
    for message in ("tenemos que ir al hospital pero no hay movilidad", "el hospital esta lejos, que hago?"):
        assert dialog.decide(message, history).action == "emergency", message


def test_round_twelve_categories_words_that_will_not_come_out_spurting_blood_and_a_deep_burn(triage):
    assert_emergency(
        triage,
        "mi abuela de golpe no le salen las palabras, abre la boca y nada, hace 10 min",
        "a mi papa se le cae la saliva de un costado y no puede levantar la mano",
        "mi esposo se corto con la sierra y la sangre sale saltando del brazo",
        "se le volco la sarten con aceite en el brazo, la piel esta blanca y acartonada y ya no le duele",
    )


def test_goodbye_cues_told_in_other_words(triage):
    farewell = "cancelen mis controles nomas, la doctora siempre fue muy buena conmigo, ya deje mis papeles en orden"
    assert triage.assess(farewell).tier == "emergency" and fits(triage, triage.assess(farewell).category, "suicidal")
    assert triage.assess("la doctora fue muy buena conmigo, quiero otra ficha con ella").tier == "none"


def test_a_question_about_anyone_a_talk_a_discharge_and_greetings_are_not_emergencies(triage):
    assert_not_emergency(
        triage,
        "si a alguien le da un infarto q hay q hacer mientras llega la ambulancia?",
        "somos del colegio, queremos una charla sobre quemaduras, cortes y primeros auxilios para los profes",
        "mi mama salio del hospital despues de su infarto, ya esta en casa, quiero control con cardiologo",
        "todo bien despues de la operacion, saludos a todo el personal",
    )
    # a rescue "después de un rato" is not a discharge
    rescued = "lo sacaron del agua despues de un rato, vomito agua y respira con ruido, esta medio dormido"
    assert triage.assess(rescued).tier == "emergency"


def test_canalized_a_running_drip_going_together_and_not_leaving_their_side(dialog):
    history = _after([("mi hijo vomita todo y tiene diarrea desde ayer, no orina y esta muy decaido", "emergency")])
    assert_released(
        dialog,
        history,
        "en el hospital ya lo canalizaron",
        "ya le esta entrando el suero",
        "vamos juntos con mi esposo a urgencias en un taxi",
    )
    suicidal = _after([("ya no aguanto mas, mejor me despido de todos, ya no quiero vivir", "emergency")])
    plan = dialog.decide("mi hermano vino y no se va a mover de mi lado", suicidal)
    assert plan.action != "emergency" and plan.extra["triage_released"]


def test_round_fourteen_categories(triage, dialog):
    """Means at hand told as where they are, letters to each one, "mejor sin mí", a limb that will not move
    among other words: emergencies. A febrile seizure asked about, one that did not come back, a heat that
    "will kill me": not."""
    assert_emergency(
        triage,
        "jeje no se preocupen por mi, la cuerda ya esta colgada en el patio, era para saber el horario",
        "cuanto cuesta el psicologo? mis hijos estarian mejor sin mi, ya les deje cartas",
        "mi abuelo amanecio y no puede mover para nada la pierna ni el brazo izquierdo",
    )
    assert_not_emergency(
        triage,
        "si a un bebe le da fiebre alta que hay que hacer? es para saber",
        "mi hija convulsiono el mes pasado y no le volvio a dar, quiero control con neurologo",
        "este sol me va a matar, tienen sombra en la fila?",
    )
    assert triage.assess("me siento mal desde hace semanas, ultimamente no quiero vivir").tier == "emergency"
    history = _after([("mi hijo se golpeo la cabeza, vomita y esta muy dormido", "emergency")])
    assert_released(
        dialog,
        history,
        "ya lo tienen en el hospital del norte",
        "el doctor esta a su lado ahora",
        "le estan haciendo una eco en la clinica",
    )


def test_round_fifteen_categories(triage, dialog):
    """A bitten tongue and shaking all over, standing on a bridge, "no es broma" after a laugh, cloths soaked
    without a word of blood, "me voy para siempre": emergencies, even inside a price question. A talk about
    any health subject and "parado" (not "pasado") are not past or signs."""
    assert_emergency(
        triage,
        "cuanto cuesta la consulta? mi papa temblaba enterito y se mordio la lengua, todavia no responde bien",
        "estoy parada en el borde del puente, solo queria decir gracias",
        "me quiero morir jaja no es broma, ya no aguanto",
        "cuanto cobran la sutura? me rebane el dedo con la maquina de cortar carne, ya empape dos toallas y sigue",
        "dejo pagado lo que debo, hoy me voy para siempre, ya no voy a estar para el control",
    )
    assert triage.assess("queremos una charla sobre diabetes e infartos para el club de madres").tier != "emergency"
    assert "past" not in triage.assess("estoy parado en la puerta de la clinica, esta abierto?").findings.modifiers
    history = _after([("me duele horrible la barriga abajo a la derecha con fiebre y vomitos", "emergency")])
    assert_released(
        dialog,
        history,
        "la estan preparando para quirofano",
        "en la guardia ya le dieron algo para el dolor",
    )
    suicidal = _after([("ya no quiero vivir, no le veo sentido a nada", "emergency")])
    assert dialog.decide("estoy con mi hermana, ya estoy a salvo", suicidal).extra.get("triage_released")
    assert dialog.decide("no estoy a salvo, estoy sola", suicidal).action == "emergency"


def test_the_learned_layer_s_emergency_is_not_lowered_by_a_laugh():
    """The union decides: a modifier lowers the rules' signs, never the learned layer's emergency (its
    threshold is set where no held-out ordinary message reaches). A laugh is how an emergency is played down.
    The shipped threshold is set here to the message's own score, so the test does not depend on the weights."""
    message = "jajaja mi suegro dice q esta bien pero no puede sonreir parejo, medio cachete no se le mueve"
    fresh = Triage(REPO / "configs" / "triage.yaml")
    fresh.model.emergency_at = fresh.model.score(read(message))
    a = fresh.assess(message)
    assert "figurative" in a.findings.modifiers  # the rules alone lower it (to none)
    assert (a.tier, a.by) == ("emergency", "model")
    fresh = Triage(REPO / "configs" / "triage.yaml")
    fresh.model.emergency_at = fresh.model.score(read(message)) + 0.01
    assert fresh.assess(message).tier == "none"


def test_round_sixteen_categories(triage, dialog):
    assert_emergency(
        triage,
        "mi nieta nacio hace 3 semanas y esta hirviendo, 38 y medio",
        "queria reservar la eco de 30 semanas pero ahorita veo luces, me duele la cabeza y tengo la cara hinchada",
        "para el jueves ya no estoy, el perro se lo dejo a mi vecina, gracias por todo",
        "no se preocupen, ya no van a tener que aguantarme, el rifle esta cargado",
    )
    assert_not_emergency(
        triage,
        "me operaron de la vesicula el mes pasado y estoy recuperandome bien, quiero mi control",
        "hace dos años tuvo un derrame, ahora camina solito, queremos fisioterapia",
        "ya no estoy tomando las pastillas de la presion, eso esta bien?",
    )
    history = _after([("mi hijo se corto el brazo con un vidrio y sangra mucho", "emergency")])
    plan = dialog.decide("lo llevamos caminando a la clinica? cuanto cobran por suturar", history)
    assert plan.action == "emergency" and plan.extra["triage_carried"]  # "llevamos" is not "llegamos"


def test_round_seventeen_categories(triage):
    """A fainting told with its year and "ahora solo quiere chequeo", a morning cough from the season's smoke, a
    thesis about snakebites, a pill taken after breakfast ("desayuno" is not "desmayo"): none is an emergency."""
    assert_not_emergency(
        triage,
        "mi mama se desmayo el año pasado por la presion, ahora solo quiere un chequeo, hay el lunes?",
        "mi tio tose un poquito por las mañanas por el humo de las quemas, que jarabe me recomienda?",
        "soy estudiante, hago una investigacion sobre quemaduras y mordeduras, puedo hablar con un medico?",
        "tome el remedio despues del desayuno y no en ayunas, hay problema?",
    )
    assert triage.assess("salio del incendio y tose negro, tiene la voz ronca").tier == "emergency"


def test_round_eighteen_categories(triage):
    """Means at hand and suffering are goodbye cues: beside another cue, a farewell; "gracias a Dios" is no
    "adiós"; a blister from a spade rubs, it does not burn; "está bien ahorita" is a recovery."""
    assert_emergency(
        triage,
        "anulen mi control, ya esta todo decidido, las pastillas estan aqui a mi lado",
        "ya no puedo mas, cuando ya no este cuiden a mi perro, a que hora cierran?",
        "para reservar eco de 6 meses? me duele fuerte la boca del estomago y la presion me salio 165/110",
    )
    assert_not_emergency(
        triage,
        "el veneno de ratas esta aqui en la mesa, se lo puede comer el perro? a que veterinaria me recomiendan",
        "reserveme una eco de control, estoy de 24 semanas y todo va bien gracias a dios",
        "que hago si a mi hijo le da una crisis en el colegio? ya esta controlado, esta bien ahorita",
        "me salio una ampolla en la mano de tanto usar la pala y me sigue doliendo un poquito",
    )


def test_round_nineteen_categories(triage):
    """Not keeping even water and not peeing is severe dehydration; a surname ("Choque"), blood drawn for a
    test, and a student's work about a disease are not signs."""
    assert triage.assess("vomito todo, no retengo ni el agua y no meo desde la mañana").tier == "emergency"
    assert_not_emergency(
        triage,
        "ya salieron los resultados? me saque sangre ayer, a nombre de Juan Choque",
        "estoy haciendo una tarea sobre convulsiones y ataques cardiacos, tienen folletos?",
    )
    assert triage.assess("tuvimos un choque en la moto, mi hermano no despierta").tier == "emergency"


def test_a_category_without_lines_speaks_with_its_parent_s(triage, tmp_path):
    """`farewell` has no advice lines of its own: it gets `suicidal`'s. Without a parent with lines, the file is
    refused, naming the category."""
    assert triage.advice.advice("farewell") == triage.advice.advice("suicidal")
    assert triage.advice.caution("farewell") == triage.advice.caution("suicidal")
    for name in ("triage-advice.yaml", "triage-model.safetensors"):
        (tmp_path / name).write_bytes((REPO / "configs" / name).read_bytes())
    spec = yaml.safe_load((REPO / "configs" / "triage.yaml").read_text(encoding="utf-8"))
    del spec["categories"]["farewell"]["parent"]
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Triage(tmp_path / "triage.yaml")
    assert any("'farewell'" in p and "no 'advice'" in p for p in e.value.problems)


def test_round_twenty_categories(triage, dialog):
    """Bolivian words for a child, "toy" for "estoy", fast watery stools with fainting, and the now of an age, a
    therapy or a denied urgency; a sting that swells only where it stung, wanting to talk to someone and "no
    puedo más tarde" are no emergency and no despair."""
    for message in (
        "mi imillita se tomo las pastillas de la presion del abuelo, no se cuantas",
        "el changuito se trago unas pastillas de la abuela, esta medio dormido",
    ):
        assert (triage.assess(message).tier, triage.assess(message).category) == ("emergency", "poisoning_overdose")
    watery = triage.assess("vomito y diarrea como 15 veces desde anoche, me mareo al pararme y tengo calambres")
    assert (watery.tier, watery.category) == ("emergency", "dehydration_severe")
    assert_not_emergency(
        triage,
        "a los 2 años tuvo una convulsion con fiebre, ahora tiene 9 y nunca mas le volvio, quiero un certificado",
        "no es urgente, ando con pena pero no me haria nada, quiero hablar con alguien de psicologia",
        "mi papa tuvo un acv hace dos años y ahora va a sus terapias, quiero ficha con neurologia",
        "le pico una avispa en la pierna, se le hincho ahi nomas, lo puede ver el pediatra?",
    )
    assert triage.assess("para el jueves a las 8 nomas, no puedo mas temprano").tier == "none"
    assert triage.assess("ya no puedo mas con esto, nadie me extrañaria").tier == "emergency"
    history = _after([("me duele la panza fuertisimo del lado derecho y tengo fiebre", "emergency")])
    assert_released(dialog, history, "tamos en urgencias del hospital de niños")


def test_round_twenty_one_categories(triage):
    """A birth told first and much blood further on is a bleed after birth; consciousness not lost and an
    obligation ("tiene que hacer") are no signs and no word of now."""
    late = triage.assess(
        "cuanto sale la consulta? me hicieron cesarea hace dos semanas, todo bien hasta hoy que me empezo a bajar "
        "muchisima sangre y estoy palida"
    )
    assert (late.tier, late.category) == ("emergency", "bleeding_postpartum")
    assert_not_emergency(
        triage,
        "a mi papa le dieron de alta del infarto y tiene que hacer rehabilitacion, quiero ficha",
        "mi hija se pego en la cabeza ayer, no perdio el conocimiento, esta normal, quiero control",
        "el abuelo se resbalo en el baño, no perdio el sentido, anda bien, le pueden dar ficha?",
    )
    assert triage.assess("se golpeo la cabeza y perdio el conocimiento un rato").tier == "emergency"
