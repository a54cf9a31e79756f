"""Spanish dates and times as patients and replies write them, resolved against a reference day.

"mañana", "pasado mañana", "hoy", "el martes", "este sábado", "la próxima semana el lunes", "el jueves 10 de
diciembre", "3 de mayo", "9/12", "15/03/1990"; "a las 10", "10 y media", "a las 3 de la tarde", "15:30",
"7 y media de la noche", "tipo 11" (about 11), "el 29" (the next 29th). Hours 1-6 with no "de la mañana" are
afternoon (a clinic's "a las 4" is 16:00).
Everything works on ``fold(text)``: the text lower-cased without accents, character for character, so every
match's place is its place in the original text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, timedelta

WEEKDAYS = ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo")
MONTHS = (
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "octubre",
    "noviembre",
    "diciembre",
)
_WD = "lunes|martes|miercoles|jueves|viernes|sabado|domingo"
_MONTH_RE = "|".join(MONTHS) + "|setiembre"
# "d la tarde" (chat writing) is "de la tarde".
_PART = r"(?:\s+(?:de|d|en|por)\s+la?s?\s*(manana|tarde|noche)|\s*(am|pm|a\.m\.|p\.m\.))?"
# A number followed by one of these counts something: "tipo 2 años", "el 15 de fiebre" are not an hour or a day.
_UNIT_AFTER = re.compile(
    r"\s*(?:%|anos?\b|anitos?\b|kilos?\b|kg\b|grados?\b|bs\b|bolivianos?\b|pesos\b|minutos?\b|min\b|horas?\b"
    r"|dias?\b|semanas?\b|mes(?:es)?\b|cm\b|mg\b|ml\b|veces\b|personas?\b|por ciento\b|de (?:fiebre|temperatura"
    r"|presion|glucosa|azucar)\b)"
)
# "diabetes tipo 2", "sangre tipo 0": a type, not "around" an hour
_TYPE_BEFORE = re.compile(r"\b(?:diabetes|sangre|grupo|sanguineo|factor|clase|nivel)\s+$")
_ABOUT = re.compile(r"\btipo\s+$")


def fold(text: str) -> str:
    """Lower case without accents, one character for each character of ``text`` (positions are kept)."""
    out = []
    for c in text:
        base = unicodedata.normalize("NFKD", c.lower())
        out.append(next((b for b in base if not unicodedata.combining(b)), c.lower()[:1] or " ")[:1])
    return "".join(out)


def weekday_index(name: str) -> int | None:
    """0 for lunes ... 6 for domingo (accents and a plural s optional), or None."""
    folded = [fold(w) for w in WEEKDAYS]
    n = fold(name)
    for candidate in (n, n[:-1] if n.endswith("s") else n):
        if candidate in folded:
            return folded.index(candidate)
    return None


def hhmm(minutes: int) -> str:
    """``HH:MM`` (params)."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def clock(minutes: int) -> str:
    """``H:MM`` (replies, as the fact sheet writes hours: 7:30, 19:00)."""
    return f"{minutes // 60}:{minutes % 60:02d}"


def spoken_date(d: date) -> str:
    """``martes 8 de diciembre``."""
    return f"{WEEKDAYS[d.weekday()]} {d.day} de {MONTHS[d.month - 1]}"


def parse_hhmm(text: str) -> int | None:
    """Minutes after midnight of ``HH:MM`` (or None)."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(text))
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59:
        return None
    return int(m.group(1)) * 60 + int(m.group(2))


@dataclass(frozen=True)
class TimeMention:
    minutes: int
    start: int  # character offsets in the text
    end: int


@dataclass(frozen=True)
class DateMention:
    day: date | None  # the calendar day, when the text pins one ("el martes", "3 de mayo", "mañana")
    weekday: int | None  # 0-6 when a weekday is named or known from the day
    start: int
    end: int
    year_given: bool = False  # "15/03/1990": a date of birth, not an appointment
    plural: bool = False  # "los lunes": a schedule, not one day
    range_to: int | None = None  # "de lunes a viernes": the last weekday of the range


def _hour(h: int, minutes: int, part: str | None) -> int | None:
    if part in ("tarde", "noche", "pm", "p.m.") and h < 12:
        h += 12
    elif part is None and 1 <= h <= 6:
        h += 12  # "a las 4": the afternoon (a clinic is not open at 4 in the morning)
    if h > 24 or minutes > 59:
        return None
    return h * 60 + minutes


_TIME_PATTERNS = (
    # 15:30, 9:00, 10h30, 7:30 de la noche
    re.compile(rf"(?<![\d/.:])(\d{{1,2}})(?::|h)(\d{{2}})(?![\d/]){_PART}"),
    # a las 10, las 3 y media de la tarde, a la 1 y cuarto, 10 y media, tipo 11 ("a eso de las 11" is "las 11")
    re.compile(
        rf"(?:\bla?s?\s+|\btipo\s+|(?<![\d/.:])(?=\d{{1,2}}\s+y\s+(?:media|cuarto)))(\d{{1,2}})(?![\d/:.])"
        rf"(?:\s+y\s+(media|cuarto)|\s+menos\s+(cuarto))?{_PART}"
    ),
    # 3 pm, 9am
    re.compile(r"(?<![\d/.:])(\d{1,2})\s*(am|pm)\b"),
)

_NOON = re.compile(r"\bmedio\s*dia\b")


def find_times(text: str) -> list[TimeMention]:
    """Clock times in ``text``, in order (a bare number is not a time: "15 minutos", "Bs 150"); "mediodía" is
    12:00."""
    f = fold(text)
    found: dict[int, TimeMention] = {m.start(): TimeMention(12 * 60, m.start(), m.end()) for m in _NOON.finditer(f)}
    for i, pattern in enumerate(_TIME_PATTERNS):
        for m in pattern.finditer(f):
            if any(t.start <= m.start(1) < t.end for t in found.values()):
                continue
            h = int(m.group(1))
            about = _ABOUT.search(f, 0, m.start(1)) if i == 1 else None
            if about and (_TYPE_BEFORE.search(f, 0, about.start()) or _UNIT_AFTER.match(f, m.end(1))):
                continue  # "diabetes tipo 2", "tipo 30 años": not an hour
            if i == 0:
                minutes, part = int(m.group(2)), m.group(3) or m.group(4)
                if h >= 13:
                    part = "x"
            elif i == 1:
                minutes = {"media": 30, "cuarto": 15}.get(m.group(2) or "", 0)
                if m.group(3):
                    h, minutes = h - 1, 45
                part = m.group(4) or m.group(5)
            else:
                minutes, part = 0, m.group(2)
            value = _hour(h, minutes, part) if part != "x" else (h * 60 + minutes if minutes < 60 else None)
            if value is not None and h <= 24:
                found[m.start(1)] = TimeMention(value, m.start(1), m.end())
    return [found[k] for k in sorted(found)]


_DATE_PATTERNS = {
    "dmy": re.compile(r"(?<![\d:])(\d{1,2})[/.-](\d{1,2})(?:[/.-](\d{2,4}))?(?![\d:])"),
    "long": re.compile(
        rf"(?:\b(?:el\s+)?(?:{_WD})\s+)?\b(\d{{1,2}})(?:ro|o)?\s+(?:de\s+)?({_MONTH_RE})\b(?:\s+(?:de|del)\s+(\d{{4}}))?"
    ),
    "weekday": re.compile(rf"\b({_WD})(s?)\b(?:\s+(\d{{1,2}})\b(?!\s*(?::|y media|de? la|am|pm|hs?\b)))?"),
    "relative": re.compile(r"\b(pasado\s+manana|manana|hoy)\b"),
    # "el 29", "para el 29", "pal 29", "el dia 29": a day of the month alone
    "day": re.compile(r"\b(?:el|pal)\s+(?:dia\s+)?(\d{1,2})(?![\d/:.,]\d)(?![\da-z])"),
}
# after a bare day: an hour ("el 10 y media", "el 3 de la tarde"), not a day
_CLOCK_AFTER = re.compile(r"\s*(?::|h\b|hs\b|y media|y cuarto|menos cuarto|de? la (?:manana|tarde|noche)|am\b|pm\b)")
_MORNING_BEFORE = re.compile(r"(?:\b(?:la|las|en|por|de|esta|esa)\s+)$")
_NEXT_WEEK = re.compile(r"(?:proxima|otra|siguiente)\s+semana|semana\s+que\s+viene")


def _year_for(day: int, month: int, today: date) -> date | None:
    for year in (today.year, today.year + 1):
        try:
            d = date(year, month, day)
        except ValueError:
            return None
        if d >= today:
            return d
    return None


def find_dates(text: str, today: date | None = None) -> list[DateMention]:
    """Dates and weekdays in ``text``, in order. Without ``today`` only what needs no reference is resolved
    (weekday names and dates with a year); "mañana" as tomorrow is told from "en la mañana" (the morning)."""
    f = fold(text)
    out: list[DateMention] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return not any(a < y and x < b for x, y in taken)

    for m in _DATE_PATTERNS["long"].finditer(f):
        day, month = int(m.group(1)), MONTHS.index(m.group(2).replace("setiembre", "septiembre")) + 1
        year = int(m.group(3)) if m.group(3) else None
        d = _make(year, month, day) if year else (_year_for(day, month, today) if today else None)
        out.append(DateMention(d, d.weekday() if d else None, m.start(), m.end(), year is not None))
        taken.append((m.start(), m.end()))
    for m in _DATE_PATTERNS["dmy"].finditer(f):
        if not free(m.start(), m.end()):
            continue
        day, month = int(m.group(1)), int(m.group(2))
        y = m.group(3)
        year = (int(y) + (1900 if int(y) > 30 else 2000) if len(y) == 2 else int(y)) if y else None
        if not (1 <= month <= 12 and 1 <= day <= 31):
            continue
        d = _make(year, month, day) if year else (_year_for(day, month, today) if today else None)
        if d is not None:
            out.append(DateMention(d, d.weekday(), m.start(), m.end(), year is not None))
            taken.append((m.start(), m.end()))
    for m in _DATE_PATTERNS["weekday"].finditer(f):
        if not free(m.start(), m.end()):
            continue
        wd = weekday_index(m.group(1))
        assert wd is not None  # the pattern only matches weekday names
        plural = bool(m.group(2)) and m.group(1) not in ("lunes", "martes", "miercoles", "jueves")
        plural = plural or bool(re.search(r"\blos\s+$", f[max(0, m.start() - 5) : m.start()]))
        rng = re.match(rf"\s+(?:a|hasta|al)\s+({_WD})\b", f[m.end() :])
        plural = plural or rng is not None
        d = None
        if today is not None and not plural:
            if m.group(3):
                d = _weekday_with_number(wd, int(m.group(3)), today)
            elif _NEXT_WEEK.search(f[max(0, m.start() - 40) : m.end() + 30]):
                d = today + timedelta(days=7 - today.weekday() + wd)  # in the next calendar week
            else:
                d = today + timedelta(days=(wd - today.weekday()) % 7 or 7)  # the next one after today
        out.append(
            DateMention(
                d,
                wd,
                m.start(),
                m.end(),
                plural=plural,
                range_to=weekday_index(rng.group(1)) if rng else None,
            )
        )
        taken.append((m.start(), m.end() + (rng.end() if rng else 0)))
    for m in _DATE_PATTERNS["day"].finditer(f):
        n = int(m.group(1))
        if today is None or not 1 <= n <= 31 or not free(m.start(), m.end()):
            continue
        if _UNIT_AFTER.match(f, m.end()) or _CLOCK_AFTER.match(f, m.end()):
            continue  # "el 15 de fiebre", "el 3 de la tarde"
        d = _weekday_with_number(None, n, today)  # the next day with that number, today included
        if d is not None:
            out.append(DateMention(d, d.weekday(), m.start(), m.end()))
            taken.append((m.start(), m.end()))
    for m in _DATE_PATTERNS["relative"].finditer(f):
        if not free(m.start(), m.end()):
            continue
        word = m.group(1)
        if word == "manana" and _MORNING_BEFORE.search(f[max(0, m.start() - 8) : m.start()]):
            continue  # "en la mañana", "las mañanas": the morning
        if today is None:
            continue
        d = today + timedelta(days={"hoy": 0, "manana": 1}.get(word, 2))
        out.append(DateMention(d, d.weekday(), m.start(), m.end()))
    return sorted(out, key=lambda x: x.start)


def _weekday_with_number(wd: int | None, day: int, today: date) -> date | None:
    """ "el lunes 7": day 7 of this month or a following one (the one falling on that weekday, if any)."""
    candidates = []
    for k in range(0, 3):
        month, year = (today.month - 1 + k) % 12 + 1, today.year + (today.month - 1 + k) // 12
        d = _make(year, month, day)
        if d is not None and d >= today:
            candidates.append(d)
    matching = [d for d in candidates if wd is None or d.weekday() == wd]
    found = matching or candidates
    return found[0] if found else None


def _make(year: int | None, month: int, day: int) -> date | None:
    try:
        return date(year or 2000, month, day)
    except ValueError:
        return None


_MONTH_ALONE = re.compile(
    rf"\b(?:(este|esta)\s+mes|(?:el\s+)?(?:(?:proximo|siguiente)\s+mes|mes\s+(?:que\s+viene|siguiente))|({_MONTH_RE}))\b"
)


def find_month(text: str, today: date) -> tuple[int, int] | None:
    """(year, month) of a month the text names on its own: "en enero" (the next January, or this one while it
    lasts), "este mes", "el próximo mes"; None when none is named or the month is only part of a date ("el 3
    de mayo")."""
    f = fold(text)
    spans = [(d.start, d.end) for d in find_dates(text, today)]
    for m in _MONTH_ALONE.finditer(f):
        if any(a <= m.start() < b for a, b in spans):
            continue
        if m.group(1):
            return today.year, today.month
        if m.group(2):
            month = MONTHS.index(m.group(2).replace("setiembre", "septiembre")) + 1
            return (today.year if month >= today.month else today.year + 1), month
        nxt = today.month % 12 + 1
        return (today.year + (nxt == 1)), nxt
    return None


def part_of_day(text: str) -> str | None:
    """ "mañana" or "tarde" when the text asks for a part of the day ("en la mañana", "por las tardes"; not "a las
    7 de la mañana", which only says which 7)."""
    m = re.search(r"\b(?:en|por|esta|a)\s+la?s?\s*(manana|tarde)s?\b|\b(temprano)\b", fold(text))
    if not m:
        return None
    return "mañana" if (m.group(1) or m.group(2)) in ("manana", "temprano") else "tarde"


def now_in(tz: str, fixed: str | None = None) -> datetime:
    """The clinic's time now (naive, in its timezone), or the fixed moment ``fixed`` (YYYY-MM-DD[THH:MM])."""
    if fixed:
        return datetime.fromisoformat(fixed)
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(tz)).replace(tzinfo=None)
