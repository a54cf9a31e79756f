"""The clinic's facts (``configs/clinic.yaml``): read, checked, and asked.

Everything the server states about the clinic comes from here: opening hours per weekday and holidays,
specialties and their doctors (days and hours), prices, payment, insurers taken and not taken, the laboratory,
what the clinic does not offer. ``Facts`` answers the questions the reply checker and the booking ask
("does this doctor work on that day, at that hour?", "which slots are next?") and finds the clinic's things in
text (:mod:`lora_med.serve.lexicon`). A file with a mistake is refused with every problem named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import read_yaml
from .dates import WEEKDAYS, clock, fold, weekday_index
from .lexicon import Hit, Lexicon, Token

TITLES = frozenset({"dr", "dra", "doctor", "doctora", "doc", "doctorcito", "doctorcita"})
BEFORE_NAME = frozenset({"con", "el", "la", "al", "del"})

Interval = tuple[int, int]  # minutes after midnight, [start, end]


@dataclass(frozen=True)
class Doctor:
    name: str  # as written in the facts: "Dra. Patricia Rojas"
    specialty: str  # the specialty's id
    days: frozenset[int]  # weekdays, 0 = lunes
    hours: Interval | None  # None: the clinic's hours that day
    shift: str | None  # "mañanas" / "tardes" when hours come from a shift
    given: tuple[str, ...]  # folded given names: ("patricia",)
    surname: str  # folded: "rojas"

    @property
    def short(self) -> str:
        """ "Dra. Rojas"."""
        title = self.name.split()[0] if fold(self.name.split()[0]).rstrip(".") in TITLES else ""
        return f"{title} {self.name.split()[-1]}".strip()


@dataclass(frozen=True)
class Specialty:
    id: str
    name: str
    price: str  # a price item's id
    doctors: tuple[Doctor, ...]


@dataclass(frozen=True)
class Item:
    id: str
    name: str
    bs: int


@dataclass
class Facts:
    """A checked facts file. ``raw`` keeps the file's own mapping for the reply templates."""

    path: Path
    raw: dict
    name: str
    short_name: str
    timezone: str
    hours: dict[int, Interval]  # weekday -> opening hours (absent: closed)
    holidays: dict[str, str]  # "MM-DD" or "YYYY-MM-DD" -> name
    shifts: dict[str, Interval]
    appointment_minutes: int
    specialties: dict[str, Specialty]
    prices: dict[str, Item]
    lab_days: frozenset[int]
    lab_hours: Interval
    insurers_taken: list[str]
    insurers_not_taken: list[str]
    not_offered: list[str]
    phones: list[str]  # every number the clinic gives, digits only
    lexicons: dict[str, Lexicon] = field(default_factory=dict)

    # ------------------------------------------------------------------ questions

    @property
    def doctors(self) -> list[Doctor]:
        return [d for s in self.specialties.values() for d in s.doctors]

    def doctor(self, name: str) -> Doctor | None:
        return next((d for d in self.doctors if d.name == name), None)

    def holiday(self, d: date) -> str | None:
        return self.holidays.get(d.isoformat()) or self.holidays.get(d.strftime("%m-%d"))

    def holidays_in(self, year: int, month: int) -> list[tuple[date, str]]:
        """The holidays of one month, in order: (day, name)."""
        out = []
        for k, name in self.holidays.items():
            try:
                d = date.fromisoformat(k if len(k) == 10 else f"{year}-{k}")  # the form is checked at load
            except ValueError:
                continue  # "02-29" in a year without one
            if (d.year, d.month) == (year, month):
                out.append((d, name))
        return sorted(out)

    def open_hours(self, d: date | int) -> Interval | None:
        """The clinic's hours on a day (a date: holidays closed) or a weekday."""
        if isinstance(d, date):
            return None if self.holiday(d) else self.hours.get(d.weekday())
        return self.hours.get(d)

    def doctor_hours(self, doc: Doctor, d: date | int) -> Interval | None:
        """A doctor's hours on a day or weekday: the clinic's hours cut to the doctor's, or None (not working)."""
        wd = d.weekday() if isinstance(d, date) else d
        clinic = self.open_hours(d)
        if wd not in doc.days or clinic is None:
            return None
        if doc.hours is None:
            return clinic
        start, end = max(clinic[0], doc.hours[0]), min(clinic[1], doc.hours[1])
        return (start, end) if start < end else None

    def bookable(self, doc: Doctor, d: date | int, minutes: int) -> bool:
        """An appointment with ``doc`` may start on ``d`` (a day or a weekday) at ``minutes``."""
        h = self.doctor_hours(doc, d)
        return h is not None and h[0] <= minutes <= h[1] - self.appointment_minutes

    def slots(
        self,
        doctors: list[Doctor],
        now: datetime,
        *,
        day: date | None = None,
        near: int | None = None,
        part: str | None = None,
        count: int = 2,
    ) -> list[tuple[Doctor, date, int]]:
        """The next ``count`` bookable starts with any of ``doctors``, from ``day`` (or today) on: the first
        one at or after ``near`` (a requested hour) where the day allows, and within ``part`` (mañana/tarde)
        where asked; the second at least 90 minutes later, or on a later day."""
        step = 30
        start_day = max(day or now.date(), now.date())
        found: list[tuple[Doctor, date, int]] = []
        for k in range(60):
            d = start_day + timedelta(days=k)
            options = []
            for doc in doctors:
                h = self.doctor_hours(doc, d)
                if h is None:
                    continue
                t = -(-h[0] // step) * step
                while t <= h[1] - self.appointment_minutes:
                    ahead = d > now.date() or t >= now.hour * 60 + now.minute + 60  # an hour's notice today
                    if ahead and (part is None or (t < 13 * 60) == (part == "mañana")):
                        options.append((t, doc))
                    t += step
            if near is not None:  # the requested hour first, then the ones closest to it
                options.sort(key=lambda x: (abs(x[0] - near), x[0]))
            else:
                options.sort(key=lambda x: x[0])
            for t, doc in options:
                if not found or found[-1][1] != d or abs(t - found[-1][2]) >= 90:
                    found.append((doc, d, t))
                if len(found) == count:
                    return sorted(found, key=lambda x: (x[1], x[2]))
        return found

    # ------------------------------------------------------------------ finding things in text

    def find(self, kind: str, toks: list[Token]) -> list[Hit]:
        """Hits of ``kind`` (specialty, not_offered, price, insurer, lab, culture) in ``toks``."""
        return self.lexicons[kind].find(toks)

    def find_doctors(self, toks: list[Token]) -> list[Hit]:
        """Doctors named in ``toks`` (hit id: the doctor's name; ``?`` + the word for an unknown "Dr. X").
        A surname counts after a title ("Dr. Salinas", "la dra mendez"), with the given names ("Patricia
        Rojas"), after "con"/"el"/"la", or alone when capitalized and not inside another name ("Quispe Rojas"
        is a patient)."""
        hits = []
        for i, t in enumerate(toks):
            for doc in self.doctors:
                if not _same(t.norm, doc.surname):
                    continue
                j = i - 1
                while j >= 0 and toks[j].norm in doc.given:
                    j -= 1
                prev = toks[j] if j >= 0 else None
                full = j < i - 1
                if full or (prev is not None and (prev.norm in TITLES or prev.norm in BEFORE_NAME)):
                    hits.append(Hit(doc.name, j + 1 if full else i, i))
                elif t.text[:1].isupper() and (
                    prev is None
                    or prev.sentence != t.sentence
                    or (not prev.text[:1].isupper() and prev.norm not in ("de", "del", "y"))
                ):
                    hits.append(Hit(doc.name, i, i))
                break
            else:
                j = i - 1
                while j >= 0 and any(toks[j].norm in d.given for d in self.doctors):
                    j -= 1  # "Dra. Elena Suábado": a known given name before an unknown surname
                titled = j >= 0 and toks[j].norm in ("dr", "dra") and t.text[:1].isupper()
                if titled and not any(t.norm in d.given or _same(t.norm, d.surname) for d in self.doctors):
                    hits.append(Hit("?" + t.text, j, i))
        return hits


def _same(word: str, surname: str) -> bool:
    from .matcher import within_one

    return word == surname or (len(surname) >= 5 and within_one(word, surname))


# ---------------------------------------------------------------------- reading and checking the file

_INTERVAL = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _interval(value: Any, where: str, problems: list[str]) -> Interval | None:
    m = _INTERVAL.match(str(value)) if isinstance(value, str) else None
    if not m:
        problems.append(f'{where}: {value!r} is not an interval of hours; write "HH:MM-HH:MM" (e.g. "07:30-19:00")')
        return None
    a, b = int(m.group(1)) * 60 + int(m.group(2)), int(m.group(3)) * 60 + int(m.group(4))
    if not (0 <= a < b <= 24 * 60) or int(m.group(2)) > 59 or int(m.group(4)) > 59:
        problems.append(f"{where}: {value!r} must start before it ends, within one day")
        return None
    return a, b


def _days(value: Any, where: str, problems: list[str]) -> frozenset[int]:
    """["lunes", "jueves"] or "lunes a viernes"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\S+)\s+a\s+(\S+)\s*", value)
        names = [m.group(1), m.group(2)] if m else [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        m, names = None, value
    else:
        problems.append(f'{where}: give weekdays, as a list ([lunes, jueves]) or a range ("lunes a viernes")')
        return frozenset()
    idx = [weekday_index(n) for n in names]
    bad = [n for n, i in zip(names, idx) if i is None]
    if bad:
        problems.append(f"{where}: {', '.join(map(repr, bad))} is not a weekday; use {', '.join(WEEKDAYS)}")
        return frozenset()
    days = [i for i in idx if i is not None]  # every one of them: the others were reported above
    if m:
        a, b = days
        return frozenset(range(a, b + 1)) if a <= b else frozenset()
    return frozenset(days)


def _mapping(spec: dict, key: str) -> dict:
    """``spec[key]`` when it is a mapping, else an empty one (the checks that follow report what is missing)."""
    v = spec.get(key)
    return v if isinstance(v, dict) else {}


def _text(spec: dict, key: str, where: str, problems: list[str]) -> str:
    v = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(v, str) or not v.strip():
        problems.append(f"{where}.{key}: missing; give it as text")
        return ""
    return v.strip()


def _words(spec: dict, where: str, problems: list[str], *, required: bool = True) -> list[str]:
    v = spec.get("words") if isinstance(spec, dict) else None
    if v is None and not required:
        return []
    if not isinstance(v, list) or not v or not all(isinstance(w, str) and w.strip() for w in v):
        problems.append(f"{where}.words: give the words patients use for it, as a list")
        return []
    return v


def load_facts(path: str | Path) -> Facts:
    """Read and check a facts file.

    Raises:
        ConfigError: the file is missing, not YAML, or any fact is malformed (all problems listed, each with
            its key and the fix).
    """
    from .config import resolve_path

    spec = read_yaml(path, "--facts")
    where = str(path)
    p: list[str] = []
    clinic = _mapping(spec, "clinic")
    if not clinic:
        p.append(f"{where} clinic: give the clinic's name, short_name and timezone")
    name = _text(clinic, "name", f"{where} clinic", p) if clinic else ""
    short = str(clinic.get("short_name") or name)
    tz = str(clinic.get("timezone") or "America/La_Paz")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        p.append(f"{where} clinic.timezone: {tz!r} is not a timezone; use an IANA name such as America/La_Paz")

    hours: dict[int, Interval] = {}
    raw_hours = spec.get("hours")
    if not isinstance(raw_hours, dict) or not raw_hours:
        p.append(f'{where} hours: give the opening hours per weekday (lunes: "07:30-19:00", domingo: closed)')
        raw_hours = {}
    for day, value in raw_hours.items():
        wd = weekday_index(str(day))
        if wd is None:
            p.append(f"{where} hours.{day}: not a weekday; use {', '.join(WEEKDAYS)}")
        elif value not in (None, "closed", False):
            iv = _interval(value, f"{where} hours.{day}", p)
            if iv:
                hours[wd] = iv

    holidays = {}
    for k, v in (spec.get("holidays") or {}).items():
        k = str(k)
        if not re.fullmatch(r"(\d{4}-)?\d{2}-\d{2}", k):
            p.append(f"{where} holidays.{k}: write the day as MM-DD (every year) or YYYY-MM-DD (once)")
        holidays[k] = str(v)

    shifts = {}
    for k, v in (spec.get("shifts") or {}).items():
        iv = _interval(v, f"{where} shifts.{k}", p)
        if iv:
            shifts[str(k)] = iv

    minutes = spec.get("appointment_minutes", 30)
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 5 <= minutes <= 240:
        p.append(f"{where} appointment_minutes: give a whole number of minutes between 5 and 240")
        minutes = 30

    prices: dict[str, Item] = {}
    lex: dict[str, Lexicon] = {k: Lexicon() for k in ("specialty", "not_offered", "price", "insurer", "lab", "culture")}
    for pid, item in (spec.get("prices") or {}).items():
        w = f"{where} prices.{pid}"
        bs = item.get("bs") if isinstance(item, dict) else None
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 0:
            p.append(f"{w}.bs: give the price in bolivianos as a whole number")
            continue
        prices[str(pid)] = Item(str(pid), _text(item, "name", w, p), bs)
        lex["price"].add(str(pid), _words(item, w, p))
    if not prices:
        p.append(f"{where} prices: list the prices (name, bs, words)")

    specialties: dict[str, Specialty] = {}
    for sid, s in (spec.get("specialties") or {}).items():
        w = f"{where} specialties.{sid}"
        if not isinstance(s, dict):
            p.append(f"{w}: give name, words, price and doctors")
            continue
        sname = _text(s, "name", w, p)
        lex["specialty"].add(str(sid), [sname, *_words(s, w, p)])
        if s.get("price") not in prices:
            p.append(f"{w}.price: {s.get('price')!r} is not one of prices: {', '.join(prices)}")
        docs = []
        for i, d in enumerate(s.get("doctors") or []):
            dw = f"{w}.doctors[{i}]"
            dname = _text(d, "name", dw, p)
            days = _days(d.get("days") if isinstance(d, dict) else None, f"{dw}.days", p)
            h, shift = None, None
            hv = d.get("hours") if isinstance(d, dict) else None
            if hv in shifts:
                h, shift = shifts[hv], str(hv)
            elif hv is not None:
                h = _interval(hv, f"{dw}.hours", p) if not (isinstance(hv, str) and "-" not in hv) else None
                if isinstance(hv, str) and "-" not in hv:
                    p.append(
                        f"{dw}.hours: {hv!r} is not a shift ({', '.join(shifts) or 'none declared'}) or HH:MM-HH:MM"
                    )
            words = [fold(x).strip(".") for x in dname.split()]
            titled = words[0] in TITLES
            parts = words[1:] if titled else words
            if len(parts) < 2:
                p.append(f"{dw}.name: give the title, given name and surname (e.g. Dra. Patricia Rojas)")
                continue
            docs.append(Doctor(dname, str(sid), days, h, shift, tuple(parts[:-1]), parts[-1]))
        if not docs:
            p.append(f"{w}.doctors: list at least one doctor (name, days, hours)")
        specialties[str(sid)] = Specialty(str(sid), sname, str(s.get("price")), tuple(docs))
    if not specialties:
        p.append(f"{where} specialties: list the specialties with their doctors")

    lab = _mapping(spec, "laboratory")
    lab_days = _days(lab.get("days"), f"{where} laboratory.days", p)
    lab_hours = _interval(lab.get("hours"), f"{where} laboratory.hours", p) or (0, 0)
    for k in ("fasting", "results_hours", "delivery"):
        if lab.get(k) in (None, ""):
            p.append(f"{where} laboratory.{k}: missing")
    lex["lab"].add("lab", [lab.get("name") or "laboratorio", *_words(lab, f"{where} laboratory", p)])
    lex["culture"].add("culture", lab.get("cultures_words") or ["cultivo"])

    ins = _mapping(spec, "insurance")
    taken: list[str] = []
    not_taken: list[str] = []
    for group, out in (("taken", taken), ("not_taken", not_taken)):
        for i, x in enumerate(ins.get(group) or []):
            w = f"{where} insurance.{group}[{i}]"
            n = _text(x, "name", w, p)
            lex["insurer"].add(("+" if group == "taken" else "-") + n, [n, *_words(x, w, p)])
            out.append(n)
    if not taken:
        p.append(f"{where} insurance.taken: list the insurers the clinic works with (or [] and say so in otherwise)")

    for i, x in enumerate(spec.get("not_offered") or []):
        w = f"{where} not_offered[{i}]"
        n = _text(x, "name", w, p)
        lex["not_offered"].add(n, [n, *_words(x, w, p)])

    phones = _mapping(spec, "phones")
    if not phones:
        p.append(f"{where} phones: give the clinic's numbers (whatsapp, landline)")
    emergency = _mapping(spec, "emergency")
    if not str(emergency.get("number") or "").strip():
        p.append(f"{where} emergency.number: give the ambulance number (118 in Bolivia)")
    for k in ("street", "city"):
        if not (spec.get("address") or {}).get(k):
            p.append(f"{where} address.{k}: missing")
    pay = spec.get("payment")
    if not isinstance(pay, list) or not pay:
        p.append(f"{where} payment: list the ways to pay")
    if p:
        raise ConfigError(f"{where}: {len(p)} problem(s) in the clinic's facts; fix them and start again", p)
    numbers = [re.sub(r"\D", "", str(v)) for v in phones.values()] + [re.sub(r"\D", "", str(emergency["number"]))]
    facts = Facts(
        path=resolve_path(path),
        raw=spec,
        name=name,
        short_name=short,
        timezone=tz,
        hours=hours,
        holidays=holidays,
        shifts=shifts,
        appointment_minutes=minutes,
        specialties=specialties,
        prices=prices,
        lab_days=lab_days,
        lab_hours=lab_hours,
        insurers_taken=taken,
        insurers_not_taken=not_taken,
        not_offered=[str(x.get("name")) for x in spec.get("not_offered") or []],
        phones=numbers,
        lexicons=lex,
    )
    return facts


def describe_days(days: frozenset[int] | set[int]) -> str:
    """ "de lunes a viernes", "los martes y jueves", "los lunes, miércoles y viernes"."""
    ds = sorted(days)
    if len(ds) >= 3 and ds == list(range(ds[0], ds[-1] + 1)):
        return f"de {WEEKDAYS[ds[0]]} a {WEEKDAYS[ds[-1]]}"
    names = [_plural(WEEKDAYS[d]) for d in ds]
    return "los " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " y " + names[-1])


def _plural(day: str) -> str:
    return day + "s" if day in ("sábado", "domingo") else day


def describe_interval(iv: Interval) -> str:
    return f"de {clock(iv[0])} a {clock(iv[1])}"


def describe_shift(doc: Doctor) -> str:
    """ "por las tardes, de 14:00 a 19:00" (a doctor with a shift; their hours are the shift's)."""
    assert doc.shift is not None and doc.hours is not None  # load_facts sets both from the shift
    return f"por las {doc.shift}, {describe_interval(doc.hours)}"


def describe_doctor_hours(facts: Facts, doc: Doctor) -> str:
    """ "de lunes a viernes por las mañanas, de 7:30 a 13:00", "los martes y jueves", "de lunes a viernes de 8:00 a
    13:00". A shift is told with its hours: "por las tardes" alone leaves the patient asking from when."""
    days = describe_days(doc.days)
    if doc.shift:
        return f"{days} {describe_shift(doc)}"
    if doc.hours:
        return f"{days} {describe_interval(doc.hours)}"
    return days
