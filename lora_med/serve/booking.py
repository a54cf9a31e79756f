"""The booking as the patient gives it: specialty, doctor, date, time, name, phone, CI, date of birth.

Nothing is stored for it: the booking is read again from the stored conversation on every message (its user
turns in order, each read against the reply before it, so "la primera" picks the first slot that reply
offered), so any conversation store with the server's schema serves it. Every date and hour is checked
against the facts: a day the doctor does not work, an hour the clinic or the doctor is not open, a holiday or
a day gone by is not taken, and ``problem`` says why, for the reply to tell the patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import date as Date  # inside Booking, whose field ``date`` hides the type

from .dates import TimeMention, clock, find_dates, find_times, fold, part_of_day
from .facts import Doctor, Facts
from .lexicon import tokens
from .names import read_name

FIELDS = ("specialty", "doctor", "date", "time", "patient_name", "phone", "ci", "birth_date")
_PHONE = re.compile(r"(?<![\d])(?:\+?\s*591[\s-]*)?([67](?:[\s-]?\d){7})(?![\d])")
_DEPARTMENTS = "sc|lp|cb|or|pt|tj|ch|be|pd|pa"
_CI = re.compile(
    rf"\b(?:ci|c\.i\.?|carnet(?: de identidad)?|cedula)\b\D{{0,12}}?(\d{{5,9}})(?:\s*-?\s*({_DEPARTMENTS})\b)?"
    rf"|\b(\d{{5,9}})\s*-?\s*({_DEPARTMENTS})\b"
)
_ANY_DOCTOR = re.compile(
    r"\b(?:primer[oa]?|cualquier[ao]?|el que (?:sea|este|haya))\b.{0,12}\b(?:disponible|doctor|doctora|medico|medica|libre|hay)\b|\bcualquiera\b|\bel que sea\b|\bme da igual\b"
)
_FIRST = re.compile(r"\b(?:la|el)\s+(?:primer[oa]?|1)\b|\bprimera\b")
_SECOND = re.compile(r"\b(?:la|el)\s+(?:segund[oa]|otr[oa]|ultim[oa]|2)\b|\bsegunda\b")
_YES = re.compile(r"^\W*(?:si+|dale|ok[a-z]*|esa|ese|perfecto|bueno|listo|me sirve|esta bien|de acuerdo|claro)\b")


@dataclass(frozen=True)
class Problem:
    """Why what the patient asked for cannot be booked."""

    kind: str  # not_offered | past | closed | day | time
    day: date | None = None
    minutes: int | None = None
    doctor: str | None = None  # the doctor it was checked against, when one was
    thing: str | None = None  # not_offered: what was asked for; closed: the holiday's name


@dataclass
class Booking:
    specialty: str | None = None
    doctor: str | None = None  # the doctor's name as in the facts
    any_doctor: bool = False  # "el primero disponible"
    date: Date | None = None
    time: int | None = None  # minutes after midnight
    part: str | None = None  # mañana | tarde, when asked for
    patient_name: str | None = None
    phone: str | None = None
    ci: str | None = None
    birth_date: Date | None = None
    problem: Problem | None = None  # from the latest message
    near: int | None = None  # the hour asked for last (slots are offered close to it)
    asked_day: Date | None = None  # the day asked for last, even when it could not be taken
    offered: list[tuple[Date, int, str | None]] = field(default_factory=list)  # slots in the reply before

    def params(self) -> dict:
        """The booking's fields for the response's ``params`` (null where not given yet)."""
        return {
            "specialty": self.specialty,
            "doctor": self.doctor,
            "date": self.date.isoformat() if self.date else None,
            "time": f"{self.time // 60:02d}:{self.time % 60:02d}" if self.time is not None else None,
            "patient_name": self.patient_name,
            "phone": self.phone,
            "ci": self.ci,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
        }

    def candidates(self, facts: Facts) -> list[Doctor]:
        """The doctors the booking may still be with."""
        if self.doctor:
            return [d for d in facts.doctors if d.name == self.doctor]
        if self.specialty:
            return list(facts.specialties[self.specialty].doctors)
        return facts.doctors

    def step(self, facts: Facts) -> str:
        """Where the seed's flow stands: specialty -> doctor -> slot -> contact -> confirm."""
        if not self.specialty:
            return "specialty"
        many = len(facts.specialties[self.specialty].doctors) > 1
        if not self.doctor and many and not self.any_doctor and not (self.date and self.time is not None):
            return "doctor"
        if self.date is None or self.time is None:
            return "slot"
        if not self.patient_name or not self.phone:
            return "contact"
        return "confirm"


def read_booking(facts: Facts, exchanges: list[tuple[str, str | None]], now: datetime) -> Booking:
    """The booking after ``exchanges``: (patient message, the reply before it) in order, the last one being the
    message being answered. ``problem`` is the last message's."""
    b = Booking()
    for message, before in exchanges:
        b.problem = None
        _read(facts, b, message, before, now)
    return b


def _read(facts: Facts, b: Booking, message: str, before: str | None, now: datetime) -> None:
    today = now.date()
    step = b.step(facts)
    toks = tokens(message)
    f = fold(message)
    b.offered = _offered(facts, before, today, b) if before else []
    # what: specialty, doctor, or something the clinic does not have
    specs = [h.id for h in facts.find("specialty", toks)]
    docs = [h.id for h in facts.find_doctors(toks) if not h.id.startswith("?")]
    missing = [h.id for h in facts.find("not_offered", toks)]
    if missing and not specs and not docs:
        b.problem = Problem("not_offered", thing=missing[0])
    if specs and specs[-1] != b.specialty:
        b.specialty, b.doctor, b.any_doctor = specs[-1], None, False
    if docs:
        doc = facts.doctor(docs[-1])
        assert doc is not None  # find_doctors' ids without "?" are the names of the facts' doctors
        b.doctor, b.specialty = doc.name, doc.specialty
    if b.specialty and len(facts.specialties[b.specialty].doctors) == 1:
        b.doctor = facts.specialties[b.specialty].doctors[0].name
    if _ANY_DOCTOR.search(f) and not b.doctor:
        b.any_doctor = True
    # contact details and identity
    _contact(facts, b, message, f, step, today)
    # when: the first day the patient does not turn down, and the hour they want (not the one they leave work at)
    dates = [d for d in find_dates(message, today) if d.day and not d.year_given and not d.plural]
    rejected = {d.day for d in dates if _rejected(f, d.start, d.end)}
    if b.date in rejected:
        b.date = None  # "el miércoles no puedo": the day booked before is dropped
    times = [t for t in find_times(message) if not _inside_date(t.start, message, today)]
    part = part_of_day(message)
    if part:
        b.part = part
    day = _wanted_day(f, message, [d for d in dates if d.day not in rejected])
    minutes = _wanted_time(f, times)
    if day is None and minutes is None and b.offered:
        pick = _pick(f, b.offered, step)
        if pick:
            day, minutes, name = pick
            if name and not b.doctor:
                b.doctor = name
    elif day is None and minutes is not None and b.date is None:
        day = next((d for d, t, _ in b.offered if t == minutes), None)
    if day is not None:
        b.asked_day = day
        problem = _day_problem(facts, b, day, today)
        if problem:
            b.problem = b.problem or problem
            b.near = minutes
            return  # an hour given with a day that cannot be taken goes with it
        if b.date != day:
            b.date = day
            if b.time is not None and not any(facts.bookable(d, day, b.time) for d in b.candidates(facts)):
                b.time = None
    if minutes is not None:
        b.near = minutes
        problem = _time_problem(facts, b, minutes)
        if problem:
            b.problem = b.problem or problem
        else:
            b.time = minutes
    _settle_doctor(facts, b)


# Turning a day down: "el miércoles no puedo", "no me sirve el lunes", "no el martes", "ni el jueves".
_SEGMENT = re.compile(r"[,;.!?]|\b(?:pero|xq|porque|por que|pq|ya que|asi que|entonces|mejor)\b")
_REFUSE = (
    r"(?:(?:no|tampoco|nunca)\s+(?:(?:me|nos|le|se|lo|la)\s+)?(?:puedo|podria|podre|podemos|puede|sirve|queda|conviene"
    r"|va|acomoda|llego|alcanzo)\b|imposible\b|tampoco\b)"
)
_REFUSED_AFTER = re.compile(rf"^\s*(?:(?:[\w:]+)\s+){{0,4}}?{_REFUSE}|^\s*no\s*$")
_REFUSED_BEFORE = re.compile(
    rf"(?:{_REFUSE}\s+(?:[\w:]+\s+){{0,2}}?|\b(?:no|ni|menos|excepto|salvo)\s+)(?:el|la|los|este|esta)?\s*$"
)
# words between a day and "no puedo" that move the refusal elsewhere ("el lunes, otro día no puedo")
_ELSEWHERE = re.compile(r"\b(?:otr[oa]s?|resto|demas|mas|solo|nomas|fuera|manana|tarde|noche|temprano)\b")
# a refusal of part of the day only: "el lunes no puedo en la mañana", "el lunes no puedo antes de las 10"
_PARTLY = re.compile(r"\W*(?:en|por|de)?\s*(?:la|las)?\s*(?:manana|tarde|noche|temprano|antes|despues|hasta|a las?\b)")
# An hour told as a limit, not as the one wanted: "salgo del trabajo a las 6", "hasta las 11", "antes de las 10".
_LIMIT = re.compile(
    r"\b(?:salgo|sale|salimos|salir|salida|entro|entra|entramos|entrar|entrada|trabaj\w*|llego|llega|llegar|termino"
    r"|termina|terminar|clases?|colegio|hasta|antes|despues|desde)\b"
)
# The same, said of a lone hour: only a verb of leaving, entering or working ("hasta las 11", "después de las 3"
# alone still say which hour, near enough to book).
_LIMIT_ALONE = re.compile(
    r"\b(?:salgo|sale|salimos|salir|entro|entra|entramos|entrar|trabaj\w*|termino|termina|terminar|clases?)\b"
)
_WANT = re.compile(
    r"\b(?:tiene (?:q|que) ser|tendria (?:q|que) ser|quiero|quisiera|prefiero|que sea|q sea|puede ser|podria ser"
    r"|seria|dame|deme)\b"
)


# A day told as when something happened, not as the one wanted: "se torció el tobillo el domingo", "fue el lunes".
_PAST = re.compile(
    r"\b(?:fue|fui|fuimos|estuve|estuvo|tuve|tuvo|hizo|hice|empezo|empece|comenzo|comence|cayo|cai|golpeo|golpee"
    r"|torcio|torci|doblo|quebro|quebre|rompio|rompi|lastimo|lastime|quemo|queme|salio|sintio|senti|dolio|empeoro"
    r"|amanecio|amaneci|vino|vine|ocurrio|sucedio|\w+(?:aron|ieron))\b"
)
_PAST_ACCENT = re.compile(r"\b\w{2,}ó\b", re.I)  # "se cayó", "empezó": a preterite when the accent is written
_CLITICS = r"^\W*(?:(?:se|me|le|les|nos|lo|la|ya|recien)\s+)*"
# "me dijo que el jueves", "se cayó y quiere que lo vean el martes": the day after "que"/"para" is not the event's
_THAT = re.compile(r"\b(?:q|que|para|pa|pal|quiere|quiero|kiero|quisiera|necesita|necesito)\b")
_SINCE = re.compile(r"\bdesde\s+(?:el|la|este|esta|hace)?\s*$")  # "desde el lunes tiene fiebre"
# A day said to be closed: "el 22 es feriado", "el domingo está cerrado", "el viernes no atienden".
_CLOSED_AFTER = re.compile(
    r"^\W*(?:(?:es|era|sera|seria|esta|estan|cae|va a ser)\s+)?(?:un\s+)?(?:feriado|festivo|cerrad[oa]s?"
    r"|no (?:atiende|atienden|abren|abre|hay atencion|trabajan|se puede)|imposible)\b"
)
# A day told instead of one named before it: "el 22 es feriado, entonces el jueves", "el lunes, mejor el martes".
_INSTEAD = re.compile(r"\b(?:entonces|mejor|mas bien|pero|o sea|en vez|cambi\w*)\b")


def _wanted_day(f: str, message: str, dates: list) -> date | None:
    """The day the patient asks for among those the message names (none turned down): not one told as when
    something happened or as closed; of several, the one told instead of the others, else the first."""
    kept = [d for d in dates if not _past_event(f, message, d.start, d.end) and not _said_closed(f, d.start, d.end)]
    asked = [d for d in kept if not _in_question(f, d.end)]
    if asked and len(asked) < len(kept):  # "atiende miércoles no? kiero pal miércoles 27": the day asked for
        kept = asked
    chosen = kept[0] if kept else None
    for d in kept:
        before = max((o.end for o in dates if o.end <= d.start), default=None)
        if before is not None and _INSTEAD.search(f, before, d.start):
            chosen = d
    return chosen.day if chosen else None


def _past_event(f: str, message: str, start: int, end: int) -> bool:
    """The day at [start, end) is when something happened: a preterite before it in its stretch (with no "que"
    or "para" between), right after it, or "desde" before it."""
    a, b = _segment(f, start, end)
    verbs = [m.end() for m in _PAST.finditer(f, a, start)] + [m.end() for m in _PAST_ACCENT.finditer(message, a, start)]
    if verbs and not _THAT.search(f, max(verbs), start):
        return True
    after = re.compile(_CLITICS + r"(?:" + _PAST.pattern + r")")
    if after.match(f[end:b]) or re.match(_CLITICS + _PAST_ACCENT.pattern, message[end:b], re.I):
        return True
    return bool(_SINCE.search(f, a, start))


def _in_question(f: str, end: int) -> bool:
    """The day ending at ``end`` is in a sentence that ends with "?"."""
    stop = re.compile(r"[.!?\n]").search(f, end)
    return stop is not None and stop.group() == "?"


def _said_closed(f: str, start: int, end: int) -> bool:
    _, b = _segment(f, start, end)
    return bool(_CLOSED_AFTER.match(f[end:b]))


def _segment(f: str, start: int, end: int) -> tuple[int, int]:
    """The stretch of ``f`` around [start, end) between commas, stops and "pero"/"porque"/"mejor"."""
    a = max((m.end() for m in _SEGMENT.finditer(f, 0, start)), default=0)
    b = next((m.start() for m in _SEGMENT.finditer(f, end)), len(f))
    return a, b


def _rejected(f: str, start: int, end: int) -> bool:
    """The day at [start, end) of the folded message is one the patient turns down."""
    a, b = _segment(f, start, end)
    after = _REFUSED_AFTER.match(f[end:b])
    if after and after.group().strip() == "no" and f[b : b + 1] not in (",", ";", "."):
        after = None  # "el lunes a las 10 no?": asking, not turning it down
    if after and not _ELSEWHERE.search(after.group()) and not _PARTLY.match(f, end + after.end(), b):
        return True
    before = _REFUSED_BEFORE.search(f[a:start])
    return before is not None and not _ELSEWHERE.search(before.group())


def _wanted_time(f: str, times: list[TimeMention]) -> int | None:
    """The hour the patient asks for. One hour is that one; among several, the one said as wanted ("tiene que
    ser 18:45", "quiero a las 10"), else the first not told as a limit ("salgo del trabajo a las 6 y media",
    "xq a las 8 entro a trabajar"); none when every one is a limit."""
    if not times:
        return None
    if len(times) == 1:  # one hour told as a limit ("salgo del mercado a las 12 y media") is not the one wanted
        a, b = _segment(f, times[0].start, times[0].end)
        limit = _LIMIT_ALONE.search(f, a, b) and not _WANT.search(f, a, times[0].start)
        return None if limit else times[0].minutes
    limits, wanted = [], []
    for t in times:
        a, b = _segment(f, t.start, t.end)
        if _WANT.search(f, a, t.start):
            wanted.append(t.minutes)
        limits.append(bool(_LIMIT.search(f[a:b])))
    free = [t.minutes for t, limit in zip(times, limits) if not limit]
    return next(iter(wanted or free), None)


def _day_problem(facts: Facts, b: Booking, day: date, today: date) -> Problem | None:
    if day < today:
        return Problem("past", day=day)
    if facts.open_hours(day) is None:
        return Problem("closed", day=day, thing=facts.holiday(day))
    docs = b.candidates(facts)
    if not any(facts.doctor_hours(d, day) for d in docs):
        return Problem("day", day=day, doctor=docs[0].name if len(docs) == 1 else None)
    return None


def _time_problem(facts: Facts, b: Booking, minutes: int) -> Problem | None:
    docs = b.candidates(facts)
    if b.date is not None:
        if any(facts.bookable(d, b.date, minutes) for d in docs):
            return None
        return Problem("time", day=b.date, minutes=minutes, doctor=docs[0].name if len(docs) == 1 else None)
    if any(facts.bookable(d, wd, minutes) for d in docs for wd in range(7) if _works(facts, d, wd)):
        return None
    return Problem("time", minutes=minutes, doctor=docs[0].name if len(docs) == 1 else None)


def _works(facts: Facts, doc: Doctor, wd: int) -> bool:
    return facts.doctor_hours(doc, wd) is not None


def _settle_doctor(facts: Facts, b: Booking) -> None:
    """A specialty with several doctors: the one working at the chosen hour, or in the part of the day asked
    for once a day is chosen."""
    if b.doctor or not b.specialty:
        return
    docs = list(facts.specialties[b.specialty].doctors)
    if b.date and b.time is not None:
        fit = [d for d in docs if facts.bookable(d, b.date, b.time)]
    elif b.date and b.part:
        fit = [d for d in docs if (h := facts.doctor_hours(d, b.date)) and (h[0] < 13 * 60) == (b.part == "mañana")]
    else:
        return
    if len(fit) == 1:
        b.doctor = fit[0].name


def _inside_date(pos: int, message: str, today: date) -> bool:
    return any(d.start <= pos < d.end for d in find_dates(message, today))


_INTERVAL = re.compile(r"\bde\s+\d{1,2}:\d{2}\s+a\s+\d{1,2}:\d{2}")


def _offered(facts: Facts, reply: str, today: date, b: Booking) -> list[tuple[date, int, str | None]]:
    """The slots a reply offered: each hour with the day named before it (or the booking's day)."""
    days = [(d.start, d.day) for d in find_dates(reply, today) if d.day and not d.plural]
    toks = tokens(reply)
    docs = [(toks[h.first].start, h.id) for h in facts.find_doctors(toks) if not h.id.startswith("?")]
    # "de 14:00 a 19:00" tells a doctor's hours, it offers no slot ("el primero" is not 14:00)
    spans = [(m.start(), m.end()) for m in _INTERVAL.finditer(fold(reply))]
    out = []
    for t in find_times(reply):
        if any(a <= t.start < b for a, b in spans):
            continue
        day = next((d for s, d in reversed(days) if s < t.start), b.date or (days[0][1] if days else None))
        doc = next((n for s, n in docs if abs(s - t.start) < 40), None)
        if day is not None:
            out.append((day, t.minutes, doc))
    return out


def _pick(f: str, offered: list, step: str) -> tuple | None:
    if _SECOND.search(f) and len(offered) > 1:
        return offered[1]
    if _FIRST.search(f) or (step == "slot" and re.search(r"\bprimer[oa]? disponible\b", f)):
        return offered[0]
    if _YES.search(f) and len(offered) == 1:
        return offered[0]
    return None


def _contact(facts: Facts, b: Booking, message: str, f: str, step: str, today: date) -> None:
    phone_at = None  # where the (first) phone of this message starts
    for m in _PHONE.finditer(message):
        if not re.search(r"(?:ci|carnet|cedula)\W{0,12}$", f[: m.start()]):
            b.phone = "+591" + re.sub(r"\D", "", m.group(1))
            phone_at = m.start() if phone_at is None else phone_at
    ci = _CI.search(f)
    if ci:
        number, dept = (ci.group(1), ci.group(2)) if ci.group(1) else (ci.group(3), ci.group(4))
        if not (len(number) == 8 and number[0] in "67" and not dept and not ci.group(1)):
            b.ci = f"{number} {dept.upper()}" if dept else number
    for d in find_dates(message, today):
        if d.year_given and d.day and d.day.year < today.year:
            b.birth_date = d.day
    name = read_name(facts, message, step, phone_at)
    if name:
        b.patient_name = name


def describe_slot(facts: Facts, doc: Doctor | None, day: date, minutes: int, with_doctor: bool) -> str:
    """ "el martes 8 de diciembre a las 10:00" (+ " con el Dr. Jorge Salinas")."""
    from .dates import spoken_date

    text = f"el {spoken_date(day)} a las {clock(minutes)}"
    if with_doctor and doc is not None:
        text += f" con {'la' if doc.name.startswith('Dra') else 'el'} {doc.name}"
    return text
