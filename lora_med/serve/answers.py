"""Replies built from the clinic's facts with the templates of ``configs/replies.yaml``.

``info`` answers what a message asks about the clinic (hours, a day, a month's holidays, prices, its name and
address, phones, insurance, payment, laboratory, results, a doctor or a specialty, "¿tienen X?"), at most three
sentences, each true by construction. ``flow`` is the reply for where a conversation stands (the booking's step, identity checks,
greetings): what replaces a model reply the checker rejected.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError
from .booking import Booking, describe_slot
from .config import read_yaml
from .dates import MONTHS, WEEKDAYS, clock, find_dates, find_month, find_times, fold, part_of_day, spoken_date
from .facts import Doctor, Facts, describe_days, describe_doctor_hours, describe_interval, describe_shift
from .lexicon import tokens

NEEDED = {
    "info": (
        "hours hours_day closed_day time_closed address phones doctor doctors doctor_day_yes doctor_day_no "
        "doctor_part_no doctor_part_yes doctor_specialty not_offered emergency_room specialties price prices "
        "price_control payment insurance insurer_yes insurer_no lab lab_closed_day lab_time results "
        "results_interpret emergency_number unknown"
    ),
    "booking": (
        "ask_specialty ask_doctor offer lead_doctor problem_past problem_closed problem_day problem_day_specialty "
        "problem_time no_slots ask_contact ask_phone ask_name confirm confirmed"
    ),
    "flows": "verify_identity reschedule cancel cancelled rescheduled lab_results",
    "chat": "greeting thanks other",
}
# Templates a replies file may leave out (this wording is used then): added after the required ones, so that an
# existing replies file keeps working.
OPTIONAL = {
    "info": {
        "clinic_name": "Somos el {name}.",
        "holidays_month": "{days} la clínica está cerrada por feriado.",
        "no_holidays_month": "En {month} no hay feriados: la clínica atiende en su horario de siempre.",
    },
}

_W = {
    "price": r"cuanto|cuesta|cuestan|precio|precios|costo|cuestan|cobran|vale|valen|sale|gratis|tarifa",
    "payment": r"pagar|pago|pagos|qr|tarjeta|efectivo|transferencia",
    "insurance": r"seguro|seguros|asegurado|asegurada|cubre|cobertura",
    "address": r"direccion|donde|ubica\w*|queda|quedan|calle|calles|micro|linea|parqueo|estacionamiento|parking|ciudad"
    r"|llegar|llego|taxi|trufi|maps|mapa|gps|anillo|avenida|zona|barrio",
    # "¿ustedes están en el Plan 3000?", "la clínica es la que está en la Banzer?": where it is, asked with a guess
    "place": r"(?:ustedes|clinica|centro|consultorio)\b[^?]{0,40}\b(?:esta|estan|queda|quedan)\s+(?:en|por|sobre|cerca)"
    r"|^\W*(?:y\s+)?(?:estan|quedan)\s+(?:en|por|sobre|cerca)",
    # the clinic's name: "¿cómo se llama la clínica?", "¿cuál es el nombre de la clínica?"
    "name": r"(?:llama|llaman|nombre)\s+(?:(?:de\s+)?(?:la|el|su)\s+|del\s+|de\s+)?(?:clinica|centro|consultorio|ustedes)",
    "holiday": r"feriados?|festivos?",
    "phone": r"numero|numeros|telefono|celular|whatsapp|wsp|fijo|contacto|llamar|llamo",
    "emergency": r"emergencia|emergencias|urgencia|urgencias|118|ambulancia",
    "results": r"resultado|resultados",
    "interpret": r"grave|normal|alto|alta|bajo|baja|significa|malo|preocupar\w*",
    "lab": r"ayunas|ayuno|muestra|muestras",
    "hours": r"horario|horarios|hora|abren|abre|cierran|cierra|abiertos|abierto|atienden|atiende|feriado|feriados|temprano",
    "doctor_q": r"dias|dia|atiende|atienden|llama|quien|horario|especialidad|viene|vienen|esta|estar|hay|tienen|tiene|cual|que|q",
    "asks_specialty": r"especialidad|que especialidad|q especialidad",
    "specialties": r"especialidades|especialistas|que doctores|que medicos",
}
# Several things priced together: "en total", "todo junto", "los dos", "¿cuánto sería todo?", "sumando".
_TOTAL = re.compile(r"\b(?:total|todo junto|todo|junto|juntos|los dos|las dos|ambos|ambas|los tres|las tres|sum\w*)\b")
_RX = {k: re.compile(rf"\b(?:{v})\b") for k, v in _W.items()}


class Answers:
    """The templates of one file, filled from one facts file."""

    def __init__(self, facts: Facts, path: str | Path):
        spec = read_yaml(path, "--replies")
        problems = []
        for section, keys in NEEDED.items():
            got = spec.get(section)
            if not isinstance(got, dict):
                got = {}
            for k in keys.split():
                if not isinstance(got.get(k), str) or not got[k].strip():
                    problems.append(f"{path} {section}.{k}: missing; give the reply's template as text")
        if problems:
            raise ConfigError(f"{path}: {len(problems)} reply template(s) missing", problems)
        self.t = {s: {**OPTIONAL.get(s, {}), **spec[s]} for s in NEEDED}
        self.facts = facts
        raw = facts.raw
        f = facts
        self.base = {
            "clinic": f.short_name,
            "whatsapp": raw["phones"].get("whatsapp", ""),
            "landline": raw["phones"].get("landline", ""),
            "emergency": str(raw["emergency"]["number"]),
            "specialties": _join([s.name for s in f.specialties.values()]),
        }
        try:  # every template must fill from these facts: a typo in a {name} shows at start, not mid-conversation
            self.flow(Booking(), "chat", "answered", "hola", datetime(2026, 1, 5, 9))
            self.info("horario precio direccion telefono seguro laboratorio resultados", datetime(2026, 1, 5, 9))
            for key, fields in (("clinic_name", "name"), ("holidays_month", "days"), ("no_holidays_month", "month")):
                self._say("info", key, **{fields: ""})  # an optional template given in the file: its fields
        except KeyError as e:
            raise ConfigError(f"{path}: a template names {e}, which no reply has; see docs/facts.md") from None

    def _say(self, section: str, key: str, **fields) -> str:
        text = self.t[section][key].format(**{**self.base, **fields})
        return text[:1].upper() + text[1:]

    # ------------------------------------------------------------------ info answers

    def info(self, message: str, now: datetime) -> str | None:
        """The answer to what ``message`` asks about the clinic, or None when it asks nothing the facts hold."""
        f, facts = fold(message), self.facts
        toks = tokens(message)
        has = {k: bool(rx.search(f)) for k, rx in _RX.items()}
        specs = list(dict.fromkeys(h.id for h in facts.find("specialty", toks)))
        docs = [facts.doctor(h.id) for h in facts.find_doctors(toks) if not h.id.startswith("?")]
        missing = [h.id for h in facts.find("not_offered", toks)]
        items = list(dict.fromkeys(h.id for h in facts.find("price", toks)))
        insurers = list(dict.fromkeys(h.id for h in facts.find("insurer", toks)))
        lab = bool(facts.find("lab", toks)) or has["lab"]
        dates = find_dates(message, now.date())
        times = find_times(message)
        out: list[str] = []
        if has["results"] and (has["interpret"] or re.search(r"\bsalio\b.*\d", f)):
            return self._say("info", "results_interpret")
        if missing and not specs and not docs:
            if "emergencia" in fold(missing[0]):
                return self._say("info", "emergency_room")
            return self._say("info", "not_offered", thing=missing[0])
        if has["emergency"] and (has["phone"] or "118" in f):
            return self._say("info", "emergency_number")
        if has["price"] and (items or specs or docs or "consulta" in f or "control" in f):
            out.append(self._prices(items, specs, docs, f))
        elif (specs or docs) and not has["insurance"] and (has["doctor_q"] or has["hours"] or "?" in message):
            out.append(self._doctor(specs, docs, dates, message, f, now))
        elif has["specialties"]:
            out.append(self._say("info", "specialties"))
        if insurers or has["insurance"]:
            out.append(self._insurance(insurers))
        if has["payment"] and not has["insurance"]:
            out.append(self._say("info", "payment", payment=_join(facts.raw["payment"])))
        if has["results"] or facts.find("culture", toks):
            lab_ = facts.raw["laboratory"]
            hours = str(lab_["results_hours"]).replace("-", " a ")
            out.append(
                self._say(
                    "info",
                    "results",
                    results_hours=hours,
                    cultures_hours=lab_.get("cultures_hours", ""),
                    delivery=lab_["delivery"],
                )
            )
        elif lab and not out:
            out.append(self._lab(dates, times))
        month = find_month(message, now.date()) if has["holiday"] and not out else None
        if month:
            out.append(self._holidays(*month))
        if not out and (has["hours"] or dates or times):
            out.append(self._hours(dates, times, now))
        if has["name"]:
            out.append(self._say("info", "clinic_name", name=facts.name))
        if has["address"] or has["place"] or has["name"]:
            a = facts.raw["address"]
            out.append(
                self._say(
                    "info",
                    "address",
                    street=a["street"],
                    between=a.get("between", ""),
                    city=a["city"],
                    parking_text=str(a.get("parking", "")).capitalize(),
                    transit=a.get("transit", ""),
                )
            )
        if has["phone"] and not has["emergency"]:
            out.append(self._say("info", "phones"))
        out = [s for s in dict.fromkeys(out) if s]
        return " ".join(out[:3]) if out else None

    def unknown(self) -> str:
        return self._say("info", "unknown")

    def _prices(self, items: list[str], specs: list[str], docs: list, f: str) -> str:
        facts = self.facts
        if "gratis" in f and "control" in items:
            return self._say("info", "price_control", bs=facts.prices["control"].bs)
        ids = list(items)
        for s in specs + [d.specialty for d in docs if d]:
            pid = facts.specialties[s].price
            if pid not in ids and not (pid == "especialidad" and "control" in ids):
                ids.append(pid)
        asked = bool(ids)  # what the patient named (not the whole price list given when nothing is named)
        if not ids:
            ids = list(dict.fromkeys(s.price for s in facts.specialties.values()))
        parts = [
            f"{_article(facts.prices[i].name)} {facts.prices[i].name} cuesta Bs {facts.prices[i].bs}" for i in ids[:4]
        ]
        if asked and 2 <= len(ids) <= 4 and _TOTAL.search(f):  # "¿cuánto sería en total?": the sum, not only each
            parts.append(f"en total Bs {sum(facts.prices[i].bs for i in ids)}")
        return self._say("info", "prices", items="; ".join(parts))

    def _doctor(self, specs: list[str], docs: list, dates: list, message: str, f: str, now: datetime) -> str:
        facts = self.facts
        spec = facts.specialties[docs[0].specialty if docs else specs[0]]
        chosen: list[Doctor] = [docs[0]] if docs else list(spec.doctors)
        day = next((d for d in dates if d.weekday is not None and not d.year_given), None)
        part = part_of_day(message)
        if day is not None:
            works = [
                d for d in chosen if (facts.doctor_hours(d, day.day) if day.day else facts.doctor_hours(d, day.weekday))
            ]
            when = _when(day)
            if works:
                hours = facts.doctor_hours(works[0], day.day or day.weekday)
                assert hours is not None  # works: the doctors with hours on that day
                return self._say(
                    "info", "doctor_day_yes", doctor=_the(works[0]), day=when, hours=describe_interval(hours)
                )
            doc = chosen[0]
            return self._say(
                "info", "doctor_day_no", doctor=_the(doc), day=when, schedule=describe_doctor_hours(facts, doc)
            )
        if part and len(chosen) == 1:
            doc = chosen[0]
            key = "doctor_part_yes" if doc.shift is None or doc.shift.startswith(part[:4]) else "doctor_part_no"
            if doc.hours and doc.shift is None and (doc.hours[0] < 13 * 60) != (part == "mañana"):
                key = "doctor_part_no"
            return self._say("info", key, doctor=_the(doc), schedule=describe_doctor_hours(facts, doc))
        if docs and _RX["asks_specialty"].search(f):
            return self._say(
                "info",
                "doctor_specialty",
                doctor=_the(docs[0]),
                specialty=spec.name,
                schedule=describe_doctor_hours(facts, docs[0]),
            )
        if len(chosen) == 1:
            return self._say(
                "info",
                "doctor",
                specialty=spec.name,
                doctor=_the(chosen[0]),
                schedule=describe_doctor_hours(facts, chosen[0]),
            )
        return self._say(
            "info",
            "doctors",
            specialty=spec.name,
            doctors=_join([f"{_the(d)} ({describe_doctor_hours(facts, d)})" for d in chosen]),
        )

    def _insurance(self, insurers: list[str]) -> str:
        ins = self.facts.raw["insurance"]
        taken = _join(self.facts.insurers_taken)
        if insurers and insurers[0].startswith("+"):
            return self._say("info", "insurer_yes", insurer=insurers[0][1:], bring=ins.get("bring", "tu CI"))
        if insurers:
            return self._say(
                "info",
                "insurer_no",
                insurer=_with_article(insurers[0][1:]),
                otherwise=ins.get("otherwise", ""),
                taken=taken,
            )
        return self._say(
            "info", "insurance", taken=taken, bring=ins.get("bring", "tu CI"), otherwise=ins.get("otherwise", "")
        )

    def _lab(self, dates: list, times: list) -> str:
        facts, lab = self.facts, self.facts.raw["laboratory"]
        fields = dict(
            days=describe_days(facts.lab_days), start=clock(facts.lab_hours[0]), end=clock(facts.lab_hours[1])
        )
        day = next((d for d in dates if d.weekday is not None and not d.year_given), None)
        if day is not None and (day.weekday not in facts.lab_days or (day.day and facts.holiday(day.day))):
            return self._say("info", "lab_closed_day", day=_when(day), **fields)
        if times and not (facts.lab_hours[0] <= times[0].minutes < facts.lab_hours[1]):
            return self._say("info", "lab_time", time=clock(times[0].minutes), **fields)
        return self._say("info", "lab", fasting=lab["fasting"], **fields)

    def _hours(self, dates: list, times: list, now: datetime) -> str:
        facts = self.facts
        general = self._say("info", "hours", weekdays=self._week_text(), saturday=self._saturday_text())
        day = next((d for d in dates if d.weekday is not None and not d.year_given), None)
        if day is not None:
            when = _when(day)
            hours = facts.open_hours(day.day) if day.day and not day.plural else facts.open_hours(day.weekday)
            if hours is None:
                holiday = facts.holiday(day.day) if day.day else None
                return self._say(
                    "info", "closed_day", day=when, why=f" por {holiday}" if holiday else "", reopen=general
                )
            if times and not hours[0] <= times[0].minutes <= hours[1]:
                return self._say(
                    "info",
                    "time_closed",
                    time=clock(times[0].minutes),
                    open_text=f"{when} atendemos {describe_interval(hours)}",
                )
            return self._say("info", "hours_day", day=when, hours=describe_interval(hours))
        if times:
            t = times[0].minutes
            if not any(h[0] <= t <= h[1] for h in facts.hours.values()):
                return self._say(
                    "info", "time_closed", time=clock(t), open_text=general[0].lower() + general[1:].rstrip(".")
                )
        return general

    def _holidays(self, year: int, month: int) -> str:
        """The month's holidays ("El viernes 1 de enero (Año Nuevo) y ... la clínica está cerrada por feriado."),
        then the usual hours."""
        general = self._say("info", "hours", weekdays=self._week_text(), saturday=self._saturday_text())
        days = [f"el {spoken_date(d)} ({name})" for d, name in self.facts.holidays_in(year, month)]
        if not days:
            return self._say("info", "no_holidays_month", month=MONTHS[month - 1]) + " " + general
        return self._say("info", "holidays_month", days=_join(days)) + " " + general

    def _week_text(self) -> str:
        week = {self.facts.hours.get(d) for d in range(5)}
        only = next(iter(week))
        if len(week) == 1 and only is not None:
            return describe_interval(only)
        return "; ".join(
            f"el {WEEKDAYS[d]} {describe_interval(h)}" for d, h in sorted(self.facts.hours.items()) if d < 5
        )

    def _saturday_text(self) -> str:
        h = self.facts.hours.get(5)
        return f"los sábados {describe_interval(h)}" if h else "los sábados está cerrada"

    # ------------------------------------------------------------------ the flow's replies

    def flow(self, b: Booking, action: str, status: str, message: str, now: datetime) -> str:
        """The reply for where the conversation stands, from the facts."""
        if action == "schedule_appointment":
            return self.booking(b, status, now)
        if status == "verifying_identity":
            return self._say("flows", "verify_identity")
        if action == "reschedule_appointment":
            return self._say("flows", "rescheduled" if status == "confirmed" else "reschedule")
        if action == "cancel_appointment":
            return self._say("flows", "cancelled" if status == "confirmed" else "cancel")
        if action == "lab_results":
            return self._say(
                "flows",
                "lab_results",
                delivery_short="están listos en "
                + str(self.facts.raw["laboratory"]["results_hours"]).replace("-", " a ")
                + " horas",
            )
        if action == "clinic_info":
            return self.info(message, now) or self.unknown()
        f = fold(message)
        if re.search(r"\bgracias\b", f):
            return self._say("chat", "thanks")
        if re.search(r"\b(hola|buen[oa]s?|saludos|ola)\b", f):
            return self._say("chat", "greeting")
        return self.info(message, now) or self._say("chat", "other")

    def booking(self, b: Booking, status: str, now: datetime) -> str:
        facts = self.facts
        if b.problem and b.problem.kind == "not_offered":
            return self._say("info", "not_offered", thing=b.problem.thing)
        step = b.step(facts)
        if b.problem or step == "slot":
            return self._offer(b, now)
        if step == "specialty":
            return self._say("booking", "ask_specialty")
        if step == "doctor":
            assert b.specialty is not None  # step() asks for the specialty until there is one
            spec = facts.specialties[b.specialty]
            doctors = _join(
                [
                    f"{_the(d)} ({describe_shift(d) if d.shift else describe_doctor_hours(facts, d)})"
                    for d in spec.doctors
                ]
            )
            return self._say("booking", "ask_doctor", specialty=spec.name, doctors=doctors)
        summary = self.summary(b)
        if step == "contact":
            if not b.phone:
                if not b.patient_name:
                    return self._say("booking", "ask_contact", summary=summary)
                return self._say("booking", "ask_phone", first_name=b.patient_name.split()[0])
            return self._say("booking", "ask_name")
        if status == "confirmed":
            return self._say("booking", "confirmed", summary=summary)
        return self._say("booking", "confirm", summary=summary, name=b.patient_name, phone=_phone(b.phone))

    def summary(self, b: Booking) -> str:
        # past the "slot" step (the only caller): the specialty, day and hour are chosen
        assert b.specialty is not None and b.date is not None and b.time is not None
        doc = self.facts.doctor(b.doctor) if b.doctor else None
        spec = self.facts.specialties[b.specialty].name
        return (
            f"{spec} {describe_slot(self.facts, doc, b.date, b.time, True).replace('el ', 'para el ', 1)}"
            if doc
            else spec
        )

    def _offer(self, b: Booking, now: datetime) -> str:
        facts = self.facts
        docs = b.candidates(facts)
        p = b.problem
        lead = ""
        if p is not None:
            day = spoken_date(p.day) if p.day else ""
            doc = facts.doctor(p.doctor) if p.doctor else None
            if p.kind == "past":
                lead = self._say("booking", "problem_past", day=day)
            elif p.kind == "closed":
                lead = self._say("booking", "problem_closed", day=day, why=f" por {p.thing}" if p.thing else "")
            elif p.kind == "day" and doc:
                lead = self._say(
                    "booking", "problem_day", doctor=_the(doc), day=day, schedule=describe_doctor_hours(facts, doc)
                )
            elif p.kind == "day":
                lead = self._say(
                    "booking",
                    "problem_day_specialty",
                    day=day,
                    specialty=facts.specialties[b.specialty].name if b.specialty else "",
                )
            elif p.kind == "time":
                # the day's hours; none when the hour was asked of a doctor who does not work that day
                day_hours = facts.doctor_hours(doc, p.day) if doc and p.day else None
                if doc and p.day and day_hours:
                    who, hours = _the(doc), f"el {spoken_date(p.day)} " + describe_interval(day_hours)
                elif doc:
                    who, hours = _the(doc), describe_doctor_hours(facts, doc)
                else:
                    h = facts.open_hours(p.day) if p.day else None
                    who, hours = (
                        "la clínica",
                        (f"el {spoken_date(p.day)} " + describe_interval(h)) if h and p.day else self._week_text(),
                    )
                assert p.minutes is not None  # a "time" problem always carries the hour asked for
                lead = self._say("booking", "problem_time", time=clock(p.minutes), who=who, hours=hours)
        elif len(docs) == 1 and b.date is None:
            lead = self._say(
                "booking", "lead_doctor", doctor=_the(docs[0]), schedule=describe_doctor_hours(facts, docs[0])
            )
        start = b.date if (p is None or p.kind == "time") else (p.day if p and p.day and p.day >= now.date() else None)
        slots = facts.slots(docs, now, day=start, near=b.near if b.time is None else None, part=b.part)
        if not slots:
            return lead + self._say("booking", "no_slots")
        many = len({d.name for d in docs}) > 1
        text = describe_slot(facts, slots[0][0], slots[0][1], slots[0][2], many or not lead)
        if len(slots) > 1:
            same = slots[1][1] == slots[0][1] and (not many or slots[1][0] == slots[0][0])
            second = (
                f"a las {clock(slots[1][2])}"
                if same
                else describe_slot(facts, slots[1][0], slots[1][1], slots[1][2], many)
            )
            if same and many:
                second += f" con {_the(slots[1][0])}"
            text += f" o {second}"
        return self._say("booking", "offer", lead=lead, slots=text)


def _when(d) -> str:
    """ "el sábado 5 de diciembre" for a day, "los sábados" for a weekday."""
    return f"el {spoken_date(d.day)}" if d.day and not d.plural else f"los {_plural(WEEKDAYS[d.weekday])}"


def _the(doc: Doctor) -> str:
    return ("la " if doc.name.startswith("Dra") else "el ") + doc.name


def _join(names: list[str]) -> str:
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " y " + names[-1] if names else ""


def _plural(day: str) -> str:
    return day + "s" if day in ("sábado", "domingo") else day


def _article(name: str) -> str:
    first = fold(name.split()[0])
    return "la" if first.endswith("a") and not first.endswith("ma") else "el"


def _with_article(name: str) -> str:
    return name if name.lower().startswith(("la ", "el ")) else "la " + name


def _phone(phone: str | None) -> str:
    p = phone or ""
    return f"{p[:4]} {p[4:]}" if p.startswith("+591") else p
