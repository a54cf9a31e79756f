"""The clinic's facts: the file and the fact sheet agree, mistakes in the file are named, and the pieces built on
it (dates, the booking, the info answers, the reply checker, the training-data audit) say what the facts say.
No server here (tests/test_facts_serve.py runs one)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import date, datetime

import pytest

from lora_med.errors import ConfigError
from lora_med.serve.answers import Answers
from lora_med.serve.audit import audit
from lora_med.serve.booking import read_booking
from lora_med.serve.checker import Context
from lora_med.serve.dates import clock, find_dates, find_times
from lora_med.serve.facts import describe_days, load_facts
from lora_med.serve.intents import Decision, Intents
from lora_med.serve.referee import load_referee
from lora_med.serve.store import Turn

from .conftest import REPO

CLINIC = REPO / "configs/clinic.yaml"
OTHER = REPO / "tests/data/clinic_other.yaml"
NOW = datetime(2026, 12, 3, 0, 0)  # a Thursday


@pytest.fixture(scope="module")
def facts():
    return load_facts(CLINIC)


@pytest.fixture(scope="module")
def referee():
    return load_referee(
        CLINIC, REPO / "configs/replies.yaml", [str(REPO / "data/medical_conversations.json")], NOW.isoformat()
    )


# --------------------------------------------------------------------------- the file and the fact sheet


def test_the_fact_sheet_says_what_the_facts_file_holds(facts):
    sheet = (REPO / "data/FACTSHEET.md").read_text(encoding="utf-8")
    lines = sheet.splitlines()
    for spec in facts.specialties.values():
        for doc in spec.doctors:
            line = next((x for x in lines if doc.name in x), "")
            assert spec.name in line, f"{doc.name} is not listed under {spec.name} in the fact sheet"
            days = describe_days(doc.days).removeprefix("de ").removeprefix("los ")
            assert days.replace("sábados", "sábado").replace("miércoles", "miércoles") in line.replace(
                "sábados", "sábado"
            ), (doc.name, days)
            if doc.shift:
                assert doc.shift in line
            elif doc.hours:
                assert f"{clock(doc.hours[0])}-{clock(doc.hours[1])}" in line
    for item in facts.prices.values():
        assert f"Bs {item.bs}" in sheet, item.name
        assert item.name.split()[0].split("(")[0].lower() in sheet.lower()
    for _wd, (a, b) in facts.hours.items():
        assert f"{clock(a)} a {clock(b)}" in sheet
    assert f"{clock(facts.lab_hours[0])}-{clock(facts.lab_hours[1])}" in sheet
    for name, (a, b) in facts.shifts.items():
        assert f"{name} {clock(a)}-{clock(b)}" in sheet
    for insurer in facts.insurers_taken:
        assert insurer in sheet
    assert "Caja Nacional de Salud" in sheet and "NOT covered" in sheet
    for phone in facts.raw["phones"].values():
        assert phone in sheet
    assert facts.raw["address"]["street"] in sheet
    assert "NO emergency room" in sheet and facts.raw["emergency"]["number"] in sheet
    for way in ("efectivo", "QR", "transferencia"):
        assert way in sheet


def test_a_facts_file_with_mistakes_is_refused_naming_each(tmp_path):
    text = CLINIC.read_text(encoding="utf-8")
    text = text.replace('lunes: "07:30-19:00"', 'lunes: "7.30 a 19"', 1)
    text = text.replace("days: [martes, jueves]", "days: [martis, jueves]")
    text = text.replace("bs: 60,", "bs: sesenta,")
    text = text.replace(
        "price: especialidad\n    doctors:\n      - {name: Dr. Jorge",
        "price: cardio\n    doctors:\n      - {name: Dr. Jorge",
    )
    bad = tmp_path / "clinic.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_facts(bad)
    message = str(e.value) + "\n".join(getattr(e.value, "problems", []) or [])
    full = message + " ".join(map(str, e.value.args))
    assert "hours.lunes" in full and "HH:MM-HH:MM" in full
    assert "specialties.cardiologia.doctors[0].days" in full and "'martis' is not a weekday" in full
    assert "prices.hemograma.bs" in full
    assert "specialties.cardiologia.price" in full
    with pytest.raises(ConfigError, match="--facts"):
        load_facts(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- dates and times


@pytest.mark.parametrize(
    "text,day,minutes",
    [
        ("mañana en la mañana", "2026-12-04", None),
        ("pasado mañana a las 4", "2026-12-05", 16 * 60),
        ("el martes a las 10 y media", "2026-12-08", 10 * 60 + 30),
        ("el 3 de mayo a las 9", "2027-05-03", 9 * 60),
        ("para el 9/12, 15:30", "2026-12-09", 15 * 60 + 30),
        ("el jueves", "2026-12-10", None),
        ("a las 7 y media de la noche", None, 19 * 60 + 30),
        ("a las 8 de la mañana", None, 8 * 60),
        # "tipo N", "a eso de las N", "como a las N": about that hour, read like any bare hour
        ("el viernes tipo 10", "2026-12-04", 10 * 60),
        ("tipo 4 de la tarde", None, 16 * 60),
        ("a eso de las 9", None, 9 * 60),
        # a day of the month alone: the next one with that number, today included
        ("para el 15 como a las 11", "2026-12-15", 11 * 60),
        ("el 2 a las 9 y media", "2027-01-02", 9 * 60 + 30),
        ("pal 3 en la tarde", "2026-12-03", None),
    ],
)
def test_spanish_dates_and_hours_resolve_against_the_reference_day(text, day, minutes):
    dates = [d for d in find_dates(text, NOW.date()) if d.day]
    times = find_times(text)
    assert (dates[0].day.isoformat() if dates else None) == day
    assert (times[0].minutes if times else None) == minutes


def test_bare_numbers_are_not_times():
    assert find_times("Bs 150, 15 minutos antes, resultados en 24-48 h, CI 6543210") == []


@pytest.mark.parametrize(
    "text", ["tiene diabetes tipo 2", "mi hijo tiene tipo 12 años", "le subió el 15 por ciento", "el 10% de descuento"]
)
def test_a_number_that_counts_something_is_not_a_day_or_an_hour(text):
    assert find_times(text) == [] and [d for d in find_dates(text, NOW.date()) if d.day] == []


# --------------------------------------------------------------------------- the booking


def _booking(facts, *messages, replies=None):
    replies = replies or [None] * len(messages)
    return read_booking(facts, list(zip(messages, replies)), NOW)


def test_the_booking_gathers_what_the_patient_gives_over_the_turns(facts):
    b = _booking(facts, "quiero cita con pediatría", "el lunes a las 9", "Soy Lucía Pérez Rojas, mi cel 7 123 4567")
    assert b.params() == {
        "specialty": "pediatria",
        "doctor": "Dra. Carmen Vaca",
        "date": "2026-12-07",
        "time": "09:00",
        "patient_name": "Lucía Pérez Rojas",
        "phone": "+59171234567",
        "ci": None,
        "birth_date": None,
    }
    b = _booking(facts, "cita con medicina general", "en la tarde el viernes", "CI 6543210 SC, nací el 12/08/1990")
    assert b.doctor == "Dr. Luis Fernández" and b.date == date(2026, 12, 4)
    assert b.ci == "6543210 SC" and b.birth_date == date(1990, 8, 12)


@pytest.mark.parametrize(
    "messages,kind",
    [
        (["cita con el cardiólogo", "el lunes"], "day"),  # Dr. Salinas: martes y jueves
        (["cita con pediatría", "el martes a las 4 de la tarde"], "time"),  # 8:00-13:00
        (["cita con el dentista", "el domingo"], "closed"),
        (["cita con el dentista", "el 25 de diciembre"], "closed"),  # Navidad
        (["cita con traumatología", "mañana a las 9"], "time"),  # tardes only
        (["quiero cita con el neurólogo"], "not_offered"),
    ],
)
def test_a_date_or_hour_that_cannot_be_booked_is_not_taken_and_says_why(facts, messages, kind):
    b = _booking(facts, *messages)
    assert b.problem is not None and b.problem.kind == kind
    assert b.time is None
    if kind in ("day", "closed"):
        assert b.date is None


def test_a_day_the_patient_turns_down_is_not_chosen(facts):
    # Dra. Vaca (pediatría) works Monday to Friday: the Tuesday turned down is not taken, the Thursday is
    b = _booking(facts, "cita con pediatría", "el martes no me sirve, mejor el jueves a las 9")
    assert (b.date, b.time) == (date(2026, 12, 10), 9 * 60)
    # the Monday booked before is dropped, and the Saturday wanted instead is not booked (no pediatrics then)
    b = _booking(facts, "cita con pediatría", "el lunes a las 10", "no, el lunes no puedo, el sábado nomás")
    assert b.date is None and b.problem is not None and b.problem.kind == "day"
    b = _booking(facts, "cita con el cardiólogo", "ni el martes ni el jueves, el viernes")  # Salinas: martes, jueves
    assert b.date is None and b.problem is not None and b.problem.day == date(2026, 12, 4)
    b = _booking(facts, "cita con el cardiólogo", "el jueves a las 10 no?")  # asking, not turning it down
    assert (b.date, b.time) == (date(2026, 12, 10), 10 * 60)


def test_among_several_hours_the_one_wanted_is_taken_not_the_one_told_as_a_limit(facts):
    b = _booking(
        facts, "cita con medicina general", "el viernes, entro a trabajar a las 11 así que tiene que ser a las 9"
    )
    assert (b.date, b.time, b.doctor) == (date(2026, 12, 4), 9 * 60, "Dra. Patricia Rojas")
    b = _booking(facts, "cita con medicina general", "el viernes a las 10 porque a las 12 entro al turno")
    assert b.time == 10 * 60
    # Dra. Vaca's last start is 12:30: the 12:45 wanted is not booked, nor the 13:15 the patient leaves school at
    b = _booking(facts, "cita con pediatría", "el viernes 11, salgo del colegio a la 1 y cuarto, tiene que ser 12:45")
    assert b.date == date(2026, 12, 11) and b.time is None
    assert b.problem is not None and (b.problem.kind, b.problem.minutes) == ("time", 12 * 60 + 45)


def test_a_name_is_stored_without_its_lead_in_and_with_the_phone_that_follows_it(facts):
    b = _booking(facts, "cita con pediatría", "el lunes a las 9", "sería Julián Romero Saucedo")
    assert b.patient_name == "Julián Romero Saucedo"
    b = _booking(facts, "cita con traumatología", "para el 9 tipo 4", "Rodrigo Saucedo Antelo")  # a day number alone
    assert (b.date, b.time, b.patient_name) == (date(2026, 12, 9), 16 * 60, "Rodrigo Saucedo Antelo")
    # before any day is chosen: a full name followed by the phone gives both
    b = _booking(facts, "cita con dermatología", "Marcela Ortiz Vargas, celular 76543210")
    assert (b.patient_name, b.phone, b.date) == ("Marcela Ortiz Vargas", "+59176543210", None)
    b = _booking(facts, "cita con pediatría", "Medicina General, 76543210")  # names what, not who
    assert b.patient_name is None
    b = _booking(facts, "cita con pediatría", "¿cómo se llama la clínica?")  # asks a name, gives none
    assert b.patient_name is None


def test_a_slot_offered_in_the_reply_before_is_taken_by_its_place(facts):
    reply = (
        "Te puedo ofrecer el martes 8 de diciembre a las 10:00 o el jueves 10 de diciembre a las 9:00. ¿Cuál prefieres?"
    )
    b = _booking(facts, "cita con cardiología", "la segunda", replies=[None, reply])
    assert (b.date, b.time) == (date(2026, 12, 10), 9 * 60)


@pytest.mark.parametrize(
    "messages,params",
    [
        # a day told as when something happened is not the one wanted; "la próxima semana el jueves"; "d la" = "de la"
        (
            [
                "cita con traumatología",
                "se cayó de la bici el sábado, quisiera la próxima semana el jueves a las 4 d la tarde",
            ],
            {"date": "2026-12-10", "time": "16:00"},
        ),
        (
            ["cita con pediatría", "la fiebre fue el lunes y sigue, mejor el viernes al mediodía"],
            {"date": "2026-12-04", "time": "12:00"},
        ),
        # a day said to be a holiday is not wanted; the day told instead ("entonces", "mejor") wins
        (
            ["cita con pediatría", "cierto que el 25 es feriado, entonces el miércoles 23 a las 10"],
            {"date": "2026-12-23"},
        ),
        (["cita con pediatría", "el lunes 7 o mejor el martes 8 a las 9"], {"date": "2026-12-08", "time": "09:00"}),
        # a lone hour told as a limit is not booked; the day is
        (["cita con pediatría", "el viernes, salgo de clases a las 10"], {"date": "2026-12-04", "time": None}),
        (["cita con pediatría", "el viernes, trabajo hasta las 11"], {"date": "2026-12-04", "time": None}),
        # the patient's name past a relative; the surname Rojas is not the doctor
        (
            ["cita con pediatría", "el lunes a las 9", "a nombre de mi hija Valeria Soliz Rojas, cel 76655443"],
            {"patient_name": "Valeria Soliz Rojas", "doctor": "Dra. Carmen Vaca", "phone": "+59176655443"},
        ),
        # a phone corrected: the name stored stays, the words of the correction are no name
        (
            [
                "cita con dermatología el sábado 12 a las 10, soy Lidia Arce Flores, cel 71112223",
                "ay perdon me confundi, el numero correcto es 71112224",
            ],
            {"patient_name": "Lidia Arce Flores", "phone": "+59171112224"},
        ),
    ],
)
def test_the_day_hour_and_name_wanted_are_told_from_the_others_the_message_mentions(facts, messages, params):
    got = _booking(facts, *messages).params()
    assert {k: got[k] for k in params} == params, got


def test_the_hours_a_reply_tells_are_not_slots_it_offers(referee):
    b = _booking(referee.facts, "cita con medicina general")
    reply = referee.answers.booking(b, "collecting_info", NOW)
    assert "de 7:30 a 13:00" in reply and "de 14:00 a 19:00" in reply, reply  # each doctor's shift, with its hours
    b = _booking(referee.facts, "cita con medicina general", "el primero disponible", replies=[None, reply])
    assert b.time is None and b.date is None  # not the 7:30 the shift starts at


def test_a_question_then_a_booking_request_opens_the_booking(referee):
    message = "¿el cardiólogo viene el martes? quiero el jueves 10 a las 9"
    view = referee.plan(message, [], Decision("clinic_info", "answered"))
    assert view.action == "schedule_appointment", view.reply
    assert (view.params["date"], view.params["time"]) == ("2026-12-10", "09:00")
    history = [
        Turn("user", message),
        Turn("assistant", "¿Me das tu nombre?", "schedule_appointment", "collecting_info"),
    ]
    view = referee.plan(
        "Rosa Quispe Mamani, telf 7-1234567", history, Decision("schedule_appointment", "collecting_info")
    )
    assert (view.params["patient_name"], view.params["phone"]) == ("Rosa Quispe Mamani", "+59171234567")


def test_an_hour_asked_of_a_doctor_who_does_not_work_the_booked_day_gives_the_doctor_s_week(referee):
    # the day (Monday, Dra. Méndez's) stays booked; Dr. Salinas works on Tuesdays and Thursdays only
    b = _booking(
        referee.facts,
        "quiero una cita con la Dra. Sofía Méndez el lunes a las 10",
        "mejor con el Dr. Jorge Salinas a las 10",
    )
    assert b.problem is not None and b.problem.kind == "time" and b.problem.day == date(2026, 12, 7)
    reply = referee.answers.booking(b, "collecting_info", NOW)
    assert "A las 10:00 no es posible" in reply and "martes y jueves" in reply, reply


# --------------------------------------------------------------------------- info answers and flow replies


@pytest.mark.parametrize(
    "question,must,must_not",
    [
        ("¿a qué hora abren los sábados?", ["8:00", "13:00"], []),
        ("¿cuánto cuesta la consulta con la ginecóloga?", ["Bs 250"], ["Bs 150"]),
        ("¿aceptan seguro de la CNS?", ["No trabajamos"], ["Sí"]),
        ("¿tienen endocrinólogo?", ["no tenemos Endocrinología"], ["Salinas", "Sí"]),
        ("¿el cardiólogo atiende los lunes?", ["No", "martes y jueves"], ["Sí"]),
        ("¿la dermatóloga atiende el sábado?", ["Sí", "Suárez"], []),
        ("¿cuál es el número de WhatsApp?", ["+591 71234567"], []),
        ("¿hasta qué hora toman muestras en el laboratorio?", ["11:00"], []),
        # a doctor with a shift is told with the shift's hours; several prices asked together, with their sum
        ("¿desde qué hora atiende el Dr. Fernández?", ["por las tardes", "14:00 a 19:00"], []),
        ("¿cuánto me sale un perfil lipídico y una glucosa, todo junto?", ["Bs 90", "Bs 30", "en total Bs 120"], []),
    ],
)
def test_info_answers_are_built_from_the_facts(referee, question, must, must_not):
    reply = referee.answers.info(question, NOW)
    assert reply and all(m in reply for m in must) and not any(m in reply for m in must_not), reply
    assert not referee.checker.check(reply, Context(question), style=False)
    assert 1 <= len(re.findall(r"[.!?](?:\s|$)", reply)) <= 3


@pytest.mark.parametrize(
    "message,must",
    [
        # an hours question, whatever its verb, is not a booking
        ("¿y mañana hasta qué hora van a estar atendiendo?", ["viernes 4 de diciembre", "19:00"]),
        # holidays of a month named: that month's, from the facts
        ("¿qué feriados tienen en mayo? para planificar", ["1 de mayo", "Día del Trabajo"]),
        ("¿este mes cierran algún feriado?", ["25 de diciembre", "Navidad"]),
        ("¿hay algún feriado en marzo?", ["En marzo no hay feriados"]),
        # where the clinic is, asked with a guess or for a ride: the real address
        ("¿ustedes son los que están por el segundo anillo? voy en radiotaxi", ["Cañada del Carmen N.º 245"]),
        # the clinic's name: its name and address, never a medicine reply
        ("¿cuál es el nombre de la clínica? para ponerlo en el GPS", ["Centro Médico CAÑADA DEL CARMEN", "245"]),
    ],
)
def test_questions_about_the_clinic_itself_are_answered_from_the_facts(referee, message, must):
    decision = Intents(REPO / "configs/intents.yaml").decide(message, [])
    view = referee.plan(message, [], decision)
    assert view.action == "clinic_info" and view.reply, (decision, view.reply)
    assert all(m in view.reply for m in must), view.reply
    assert not referee.checker.check(view.reply, Context(message), style=False)


def test_the_same_templates_answer_with_another_clinic_s_facts():
    other = Answers(load_facts(OTHER), REPO / "configs/replies.yaml")
    assert "Bs 210" in other.info("¿cuánto cuesta el cardiólogo?", NOW)
    assert "Villca" in other.info("¿quién es el cardiólogo?", NOW)
    assert "cerrada" in other.info("¿atienden los sábados?", NOW)
    assert "no tenemos Odontología" in other.info("¿tienen dentista?", NOW)


# --------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    "message,reply,reason",
    [
        (
            "quiero cita con cardiología",
            "Con gusto, la Dra. Patricia Rojas te atiende el martes a las 10:00.",
            "doctor",
        ),
        ("quiero cita con pediatría", "La Dra. Carmen Vaca atiende el sábado a las 9:00.", "day"),
        ("quiero cita con traumatología", "El Dr. Marco Antonio Quiroga tiene el lunes a las 9:00.", "time"),
        ("¿a qué hora abren?", "Atendemos de lunes a viernes de 8:00 a 20:00.", "time"),
        ("¿cuánto cuesta la consulta general?", "La consulta general cuesta Bs 250.", "price"),
        ("¿aceptan seguro de la CNS?", "Sí.", "insurer"),
        ("¿con qué seguros trabajan?", "Trabajamos con la Caja Nacional de Salud.", "insurer"),
        ("¿cuál es el teléfono?", "Llámanos al 77889900.", "phone"),
        ("¿tienen endocrinólogo?", "Sí, el Dr. Jorge Salinas te puede atender.", "specialty"),
        ("hola", "La Dra. Elena Suábado a las 8:00.", "doctor"),
        ("hola", "¡Hola! ¿En qué te puedo ayudar con tu cita de hoy", "cut_off"),
        ("hola", "¡Hola! Bienvenido al Centro Médico. Bienvenido al Centro Médico.", "garbled"),
        ("quiero una cita", "Llama al 118 de inmediato.", "emergency_talk"),
        ("quiero cita con cardiología", "¡Claro! ¿Me das tu nombre completo y tu celular?", "flow"),  # no day yet
        ("quiero cita con pediatría", "Con gusto. ¿Me das tu CI y tu fecha de nacimiento?", "flow"),
        ("quiero cita con pediatría", "¡Listo, el Dr.", "cut_off"),
        ("quiero cita con pediatría", "¡Listo, como pagar en CAÑADA DEL CARMEN.", "flow"),  # nothing is done yet
        ("gracias, eso era todo", "¡Hola! Con gusto te ayudo a las 9:30. ¿Cuál prefieres?", "flow"),  # no booking
        ("hola", "¿Me das tu nombre completo y tu nombre y tu celular?", "garbled"),
        # the model's stock refusal, to a patient who asked about no medicine
        ("¿me pasas el nombre de la clínica?", "No puedo recomendar medicamentos; un médico debe evaluarte.", "flow"),
    ],
)
def test_the_checker_rejects_a_reply_that_contradicts_the_facts(referee, facts, message, reply, reason):
    b = read_booking(facts, [(message, None)], NOW)
    ctx = Context(message, message, b, "schedule_appointment" if b.specialty else "chat", "collecting_info", NOW.date())
    found = referee.checker.check(reply, ctx)
    assert reason in {f.reason for f in found}, found


@pytest.mark.parametrize(
    "message,reply",
    [
        ("quiero cita con cardiología", "El Dr. Jorge Salinas atiende los martes y jueves. ¿Qué día prefieres?"),
        (
            "¿atienden el domingo?",
            "Los domingos y feriados estamos cerrados. De lunes a viernes atendemos de 7:30 a 19:00.",
        ),
        ("¿aceptan la CNS?", "No trabajamos con la Caja Nacional de Salud; puedes atenderte como particular."),
        (
            "cita con medicina general",
            "Tengo hoy a las 16:00 con el Dr. Luis Fernández o mañana a las 9:00 con la Dra. Patricia Rojas. ¿Cuál prefieres?",
        ),
        ("¿cuánto cuestan el hemograma y la glucosa?", "El hemograma cuesta Bs 60 y la glucosa Bs 30, en total Bs 90."),
        ("¿qué le doy a mi hijo para la fiebre?", "No puedo recomendar medicamentos; un médico debe evaluarlo."),
    ],
)
def test_the_checker_keeps_a_reply_that_agrees_with_the_facts(referee, facts, message, reply):
    b = read_booking(facts, [(message, None)], NOW)
    ctx = Context(message, message, b, "schedule_appointment" if b.specialty else "chat", "collecting_info", NOW.date())
    assert referee.checker.check(reply, ctx, style=False) == []
    found = referee.checker.check(reply, ctx)
    assert not found or {f.reason for f in found} == {"garbled"}  # a word the model never saw ("total")


def test_a_rejected_model_reply_is_replaced_by_the_flow_s_reply_from_the_facts(referee):
    history = [
        Turn("user", "quiero cita con cardiología"),
        Turn("assistant", "¿Qué día?", "schedule_appointment", "collecting_info"),
    ]
    view = referee.plan("el martes por favor", history, Decision("schedule_appointment", "collecting_info"))
    assert view.reply is None and view.params["doctor"] == "Dr. Jorge Salinas" and view.params["date"] == "2026-12-08"
    kept = "Perfecto, el martes con el Dr. Jorge Salinas. ¿A qué hora prefieres?"
    assert referee.finish(view, kept)[:2] == (kept, "model")
    reply, source, findings = referee.finish(view, "Perfecto, el martes con la Dra. Sofía Méndez.")
    assert source == "facts" and findings[0].reason == "doctor"
    assert "Salinas" in reply and "Méndez" not in reply and "8 de diciembre" in reply


# --------------------------------------------------------------------------- training data held to the facts


@pytest.mark.slow
def test_the_shipped_data_agrees_with_the_facts(facts):
    for name in ("medical_conversations.json", "medical_conversations_eval.json"):
        assert audit(REPO / "data" / name, facts) == []


@pytest.mark.slow
def test_data_check_names_each_turn_that_contradicts_the_facts(tmp_path):
    rows = json.loads((REPO / "data/medical_conversations.json").read_text(encoding="utf-8"))[:40]
    rows[3] = {"user": "¿Cuánto cuesta la consulta general?", "assistant": "La consulta general cuesta Bs 200."}
    rows[7] = {
        "messages": [
            {"role": "user", "content": "Quiero cita con cardiología"},
            {"role": "assistant", "content": "Con gusto. El Dr. Jorge Salinas atiende los lunes y viernes."},
        ]
    }
    rows[9] = {"user": "¿Quién es el traumatólogo?", "assistant": "Es la Dra. Carmen Vaca, de Traumatología."}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "lora_med", "data", "check", str(bad), "--facts", str(CLINIC)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "3 assistant turn(s) contradict" in r.stderr and "Traceback" not in r.stderr
    for row, reason in ((4, "price"), (8, "day"), (10, "doctor")):
        assert re.search(rf"row {row} \(index {row - 1}\) assistant turn 1: {reason}:", r.stdout), r.stdout
