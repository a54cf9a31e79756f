"""The reply checker: every fact a reply states, held against the clinic's facts and the conversation.

It finds doctors, specialties, weekdays and dates, clock times, prices in Bs, insurers and phone numbers, and
reads them the way the sentence puts them together: a doctor must belong to the specialty named beside them
(or asked for) and work on the day named; an hour must be one at which that doctor, the clinic or the
laboratory is open; a price must be the price of what is named or asked; a negation ("no atiende los lunes",
"no trabajamos con la CNS") turns the claim around. A reply is also rejected when it is empty, cut off, garbled
(a word the model never saw in training, in the facts or in the conversation; a repeated fragment), talks of
emergencies to a patient who did not, greets the patient by a name they never gave, or says a booking is
confirmed when it is not. Each problem is a ``Finding`` with its reason (the ``/metrics`` label).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from .booking import Booking
from .dates import clock, find_dates, find_times, fold
from .facts import Doctor, Facts
from .lexicon import Token, negated, tokens
from .matcher import normalize

REASONS = (
    "empty",
    "cut_off",
    "garbled",
    "emergency_talk",
    "doctor",
    "specialty",
    "day",
    "time",
    "price",
    "insurer",
    "phone",
    "name",
    "flow",
)
FACT_REASONS = ("doctor", "specialty", "day", "time", "price", "insurer", "phone", "name")
_EMERGENCY = re.compile(r"\b(?:118|emergencias?|ambulancia|urgencias?)\b")
_PRICE = re.compile(r"\bbs\.?\s*(\d+(?:[.,]\d+)?)|\b(\d+(?:[.,]\d+)?)\s*(?:bs\b|bolivianos)")
_NUMBER = re.compile(r"(?<![\d:/.,-])(\+?\s*\d(?:[\s-]?\d){6,11}|\(\d\)\s*\d{7})(?![\d:/])")
_SHORT_NUMBER = re.compile(r"\b(?:llam[ae]s?|llamar|marca|marcar)\s+(?:al|el)\s+(\d{3,4})\b")
_CONFIRMED = re.compile(
    r"\b(?:quedo|queda|esta|ha quedado)\s+(?:\w+\s+){0,2}(?:confirmad[oa]|agendad[oa]|reservad[oa]|cancelad[oa]|reprogramad[oa])"
    r"|\b(?:cita|consulta|control|turno)\s+(?:confirmad[oa]|agendad[oa]|cancelad[oa]|reprogramad[oa])\b"
)
_ACCEPTS = re.compile(r"\b(?:aceptamos|trabajamos|cubre|cubrimos|atendemos|aceptan|valido|vale)\b")
_AFFIRMS = re.compile(r"\b(?:tenemos|contamos|hay|atiende|atendemos|ofrecemos|hacemos)\b")
_GREETED = re.compile(
    r"(?:^|[¡!.,]\s*)(?:listo|gracias|perfecto|hola|genial|muy bien|claro|excelente),\s+([A-ZÁÉÍÓÚÑ][a-záéíóúñ]+)"
)
_ABBREVIATION_END = re.compile(r"\b(?:Dr|Dra|Sr|Sra|Av|N\.?º|Lic)\.\s*$")
_WHAT_FOR = re.compile(r"\ben (?:que|q) te (?:puedo )?ayud")
_PICK = re.compile(r"\bcual (?:prefieres|te (?:queda|sirve|acomoda|conviene))\b")
_FLOW_ACTIONS = ("schedule_appointment", "reschedule_appointment", "cancel_appointment", "lab_results")
_ASKS_IDENTITY = re.compile(r"\b(?:ci|carnet|cedula|fecha de nacimiento)\b")
_ASKS_CONTACT = re.compile(r"\b(?:nombre|celular|telefono|numero de contacto)\b")
_LAB_WORDS = re.compile(r"\b(?:laboratorio|muestras?|analisis|examen(?:es)?|ayunas)\b")
# A refusal to advise on medicines is an answer only where the patient spoke of medicines or of being unwell; to
# "¿cómo se llama la clínica?" it is the model's stock line, not a reply (the flow's reply from the facts is).
_REFUSES_MEDICINE = re.compile(
    r"\bno (?:te |le )?puedo (?:recomendar|recetar|indicar|sugerir|dar|decir)\w* (?:\w+ )?"
    r"(?:medicamentos?|medicinas?|remedios?|dosis|pastillas?|tratamientos?)\b"
)
_SPEAKS_OF_MEDICINE = re.compile(
    r"\b(?:medicament\w*|medicina\w*|remedio\w*|pastill\w*|pildora\w*|jarabe\w*|dosis|mg|ml|tom\w*|doy|dar|darle"
    r"|recet\w*|antibiotic\w*|ibuprofeno|paracetamol|aspirina|crema\w*|pomada\w*|gotas|inyec\w*|ampolla\w*|vitamina\w*"
    r"|calmante\w*|analgesic\w*|tratamiento\w*|cur\w*|alivi\w*|sirve|hago|hacer|duel\w*|dolor\w*|fiebre|tos"
    r"|sintoma\w*|enferm\w*|mal|malestar|infecc\w*|gripe|resfri\w*)\b"
)


@dataclass(frozen=True)
class Finding:
    reason: str
    detail: str


@dataclass
class Context:
    """What a reply answers: the patient's message, their words so far, the booking, the turn's action."""

    message: str
    user_text: str = ""  # every patient message of the conversation, this one included
    booking: Booking | None = None
    action: str = "chat"
    status: str = "answered"
    today: date | None = None  # None: "hoy" and "mañana" are not checked (training data has no date)


class Checker:
    """Checks replies against ``facts``; ``known``: the words a reply may use besides those of the facts and of
    the conversation (normalized; the model's training data)."""

    def __init__(self, facts: Facts, known: set[str]):
        self.facts = facts
        self.known = known | _words_of(facts.raw)

    def check(self, reply: str, ctx: Context, *, style: bool = True) -> list[Finding]:
        """Every problem of ``reply`` (empty: the reply may be sent). ``style=False`` leaves out what is not a
        fact (garbled, cut off, emergency talk, flow): for training data, which is held to the facts only."""
        if not reply.strip():
            return [Finding("empty", "the reply is empty")]
        toks = tokens(reply)
        out: list[Finding] = []  # facts first: the first finding is the reason /metrics counts
        out += self._doctors(toks, ctx)
        out += self._days_and_times(reply, toks, ctx)
        out += self._prices(reply, toks, ctx)
        out += self._insurers(reply, toks, ctx)
        out += self._phones(reply, ctx)
        out += self._names(reply, ctx)
        if style:
            out += self._style(reply, toks, ctx)
        return out

    # ------------------------------------------------------------------ style

    def _style(self, reply: str, toks: list[Token], ctx: Context) -> list[Finding]:
        out = []
        user = {t.norm for t in tokens(ctx.user_text or ctx.message)}
        unknown = [t.text for t in toks if not t.norm.isdigit() and t.norm not in self.known and t.norm not in user]
        if unknown:
            out.append(Finding("garbled", f"unknown word(s): {', '.join(unknown[:5])}"))
        norms = [t.norm for t in toks]
        twice = [a for a, b in zip(norms, norms[1:]) if a == b and not a.isdigit()]
        # "tu nombre completo y tu nombre": a pair with a word of 4+ letters said twice ("a las" may repeat)
        pairs = [(a, b) for a, b in zip(norms, norms[1:]) if max(len(a), len(b)) >= 4 and not (a + b).isdigit()]
        grams = [tuple(norms[i : i + 3]) for i in range(len(norms) - 2)]
        if twice or len(grams) != len(set(grams)) or len(pairs) != len(set(pairs)):
            out.append(Finding("garbled", f"repeated fragment: {' '.join(twice[:1]) or 'a phrase said twice'}"))
        if not re.search(r"[.!?)…]\s*$", reply.strip()) or _ABBREVIATION_END.search(reply):
            out.append(Finding("cut_off", "the reply ends mid-sentence"))
        out += self._steps(reply, ctx)
        if ctx.action != "emergency" and _EMERGENCY.search(fold(reply)) and not _EMERGENCY.search(fold(ctx.message)):
            out.append(Finding("emergency_talk", "talks of emergencies to a patient who did not"))
        if _REFUSES_MEDICINE.search(fold(reply)) and not _SPEAKS_OF_MEDICINE.search(fold(ctx.user_text or ctx.message)):
            out.append(Finding("flow", "refuses medicine advice to a patient who asked for none"))
        return out

    def _steps(self, reply: str, ctx: Context) -> list[Finding]:
        """The reply held to where the conversation stands (the seed's flows)."""
        out, f = [], fold(reply)
        if ctx.status == "verifying_identity" and not _ASKS_IDENTITY.search(f):
            out.append(Finding("flow", "does not ask for the identity the flow needs first"))
        elif ctx.action in ("chat", "clinic_info") and _ASKS_IDENTITY.search(f) and "?" in reply:
            out.append(Finding("flow", "asks for identity papers nobody needs here"))
        if ctx.action in _FLOW_ACTIONS and ctx.status != "confirmed":
            if re.match(r"\W*listo\b", f):
                out.append(Finding("flow", "says it is done while the flow is not"))
            elif "?" not in reply and ctx.status != "identity_verified":
                out.append(Finding("flow", "does not ask for the flow's next step"))
        if _PICK.search(f) and (not find_times(reply) or ctx.action not in _FLOW_ACTIONS):
            out.append(Finding("flow", "asks which slot without a booking or without offering any"))
        if ctx.booking is not None and ctx.booking.specialty and _WHAT_FOR.search(f):
            out.append(Finding("flow", "asks what the patient wants after they said it"))
        b = ctx.booking
        if b is not None and ctx.action == "schedule_appointment" and "?" in reply:
            step, f = b.step(self.facts), fold(reply)
            if _ASKS_IDENTITY.search(f):
                out.append(Finding("flow", "asks for identity papers, which a new booking does not need"))
            elif _ASKS_CONTACT.search(f) and step in ("specialty", "doctor", "slot"):
                out.append(Finding("flow", f"asks for name or phone before the {step} is set"))
            elif "especialidad" in f and step != "specialty":
                out.append(Finding("flow", "asks for the specialty the patient already gave"))
        if _CONFIRMED.search(fold(reply)) and ctx.status != "confirmed":
            out.append(Finding("flow", "says the booking is done before the patient confirmed it"))
        elif (
            _CONFIRMED.search(fold(reply))
            and b is not None
            and b.step(self.facts) != "confirm"
            and ctx.action == "schedule_appointment"
        ):
            out.append(Finding("flow", "says the booking is done while it still lacks details"))
        return out

    # ------------------------------------------------------------------ who

    def _context_specialties(self, ctx: Context) -> set[str]:
        said = {h.id for h in self.facts.find("specialty", tokens(ctx.message))}
        if ctx.booking is not None and ctx.booking.specialty:
            said.add(ctx.booking.specialty)
        return said

    def _doctors(self, toks: list[Token], ctx: Context) -> list[Finding]:
        facts, out = self.facts, []
        asked = self._context_specialties(ctx)
        missing = [h.id for h in facts.find("not_offered", tokens(ctx.message))]
        specs = facts.find("specialty", toks)
        patient = set(normalize(ctx.booking.patient_name or "").split()) if ctx.booking else set()
        for h in facts.find_doctors(toks):
            if h.first == h.last and toks[h.first].norm in patient:
                continue  # "a nombre de Gladys Ribera de Suárez": the patient, not the doctor
            if h.id.startswith("?"):
                out.append(Finding("doctor", f"{h.id[1:]}: no such doctor at the clinic"))
                continue
            doc = facts.doctor(h.id)
            assert doc is not None  # find_doctors' ids without "?" are the names of the facts' doctors
            beside = {s.id for s in specs if toks[s.first].sentence == toks[h.first].sentence}
            if beside and doc.specialty not in beside:
                out.append(Finding("doctor", f"{doc.name} is not of {', '.join(sorted(beside))}"))
            elif not beside and asked and doc.specialty not in asked:
                out.append(Finding("doctor", f"{doc.name} is not of {', '.join(sorted(asked))}, which was asked for"))
            elif missing and not asked and not any(t.norm == "no" for t in toks):
                out.append(Finding("specialty", f"offers {doc.name} for {missing[0]}, which the clinic does not have"))
        if missing and not asked and re.match(r"\W*si\b", fold(" ".join(t.text for t in toks[:1]))):
            out.append(Finding("specialty", f"answers yes about {missing[0]}, which the clinic does not have"))
        for h in facts.find("not_offered", toks):
            clause = " ".join(t.norm for t in toks if t.clause == toks[h.first].clause)
            if _AFFIRMS.search(clause) and not negated(toks, h.first):
                out.append(Finding("specialty", f"says the clinic has {h.id}"))
        return out

    def _subjects(self, toks: list[Token], at: int, ctx: Context) -> tuple[list[Doctor] | None, str]:
        """Who a day or hour at token ``at`` is about: the doctor named nearest in its sentence, a specialty's
        doctors, the booking's doctor(s); None for the clinic itself (``what``: clinic or lab)."""
        facts = self.facts
        sentence = toks[at].sentence
        docs = [h for h in facts.find_doctors(toks) if not h.id.startswith("?") and toks[h.first].sentence == sentence]
        if docs:
            # "a las 9:00 con la Dra. Rojas": the doctor right after; else the one named before; else after
            after = [h for h in docs if at < h.first <= at + 5]
            before = [h for h in docs if h.first <= at]
            chosen = after[0] if after else before[-1] if before else docs[0]
            doc = facts.doctor(chosen.id)
            assert doc is not None  # find_doctors' ids without "?" are the names of the facts' doctors
            return [doc], "doctor"
        words = " ".join(t.norm for t in toks if t.sentence == sentence)
        if _LAB_WORDS.search(words) and not re.search(r"\b(?:cita|consulta|turno)\b", words):
            return None, "lab"
        specs = [h for h in facts.find("specialty", toks) if toks[h.first].sentence == sentence]
        if specs:
            return list(facts.specialties[specs[0].id].doctors), "doctor"
        b = ctx.booking
        if b is not None and ctx.action in ("schedule_appointment", "reschedule_appointment") and b.specialty:
            return b.candidates(facts), "doctor"
        return None, "clinic"

    # ------------------------------------------------------------------ when

    def _days_and_times(self, reply: str, toks: list[Token], ctx: Context) -> list[Finding]:
        _facts, out = self.facts, []
        at = _token_at(toks)
        dates = [d for d in find_dates(reply, ctx.today) if not d.year_given]
        for d in dates:
            i = at(d.start)
            if i is None:
                continue
            days = _expand(d)
            who, what = self._subjects(toks, i, ctx)
            neg = negated(toks, i)
            for wd in days:
                works = self._open(who, what, wd, d.day if len(days) == 1 else None)
                if works == neg and not (neg and who and len(who) > 1):
                    subject = who[0].name if who and len(who) == 1 else what if who is None else "the specialty"
                    verb = "works" if works else "does not work"
                    out.append(Finding("day", f"{subject} {verb} on {_day_name(wd, d.day)}, the reply says otherwise"))
                    break
        times = find_times(reply)
        k = 0
        while k < len(times):
            t = times[k]
            i = at(t.start)
            nxt = times[k + 1] if k + 1 < len(times) else None
            is_range = nxt is not None and re.fullmatch(
                r"\s*(?:a|-|–|hasta|y)\s*(?:las?\s*)?", reply[t.end : nxt.start]
            )
            if i is None or negated(toks, i):
                k += 2 if is_range else 1
                continue
            who, what = self._subjects(toks, i, ctx)
            day = self._day_for(dates, t.start, reply, ctx)
            if nxt is not None and is_range:
                if not self._known_range((t.minutes, nxt.minutes), who, what):
                    out.append(
                        Finding(
                            "time",
                            f"{clock(t.minutes)} to {clock(nxt.minutes)} is not the hours of {what if who is None else who[0].name}",
                        )
                    )
                k += 2
                continue
            if not self._open_at(t.minutes, who, what, day):
                subject = what if who is None else who[0].name if len(who) == 1 else "the specialty"
                when = f" on {_day_name(day.weekday(), day)}" if isinstance(day, date) else ""
                out.append(Finding("time", f"{subject} is not open at {clock(t.minutes)}{when}"))
            k += 1
        return out

    def _open(self, who: list[Doctor] | None, what: str, wd: int, day: date | None) -> bool:
        facts = self.facts
        if what == "lab":
            return wd in facts.lab_days and not (day and facts.holiday(day))
        if who is None:
            return (facts.open_hours(day) if day else facts.open_hours(wd)) is not None
        return any(facts.doctor_hours(d, day if day else wd) for d in who)

    def _day_for(self, dates: list, pos: int, reply: str, ctx: Context) -> date | int | None:
        before = [d for d in dates if d.start < pos and d.weekday is not None and not d.plural]
        if before:
            d = before[-1]
            return d.day if d.day else d.weekday
        b = ctx.booking
        return b.date if b is not None and b.date and ctx.action == "schedule_appointment" else None

    def _open_at(self, minutes: int, who: list[Doctor] | None, what: str, day) -> bool:
        facts = self.facts
        if what == "lab":
            return facts.lab_hours[0] <= minutes <= facts.lab_hours[1]
        days = [day] if day is not None else list(range(7))
        spans = []
        for d in days:
            if who is None:
                spans.append(facts.open_hours(d))
                spans.append(facts.lab_hours if day is None else None)
            else:
                spans += [facts.doctor_hours(doc, d) for doc in who]
        return any(s and s[0] <= minutes <= s[1] for s in spans)

    def _known_range(self, span: tuple[int, int], who: list[Doctor] | None, what: str) -> bool:
        facts = self.facts
        known = set(facts.hours.values()) | {facts.lab_hours} | set(facts.shifts.values())
        for doc in who or facts.doctors:
            known |= {h for wd in range(7) if (h := facts.doctor_hours(doc, wd))}
            if doc.hours:
                known.add(doc.hours)
        return span in known

    # ------------------------------------------------------------------ prices, insurers, numbers, names

    def _prices(self, reply: str, toks: list[Token], ctx: Context) -> list[Finding]:
        facts, out = self.facts, []
        f = fold(reply)
        at = _token_at(toks)
        for m in _PRICE.finditer(f):
            amount = float((m.group(1) or m.group(2)).replace(",", "."))
            i = at(m.start())
            sentence = toks[i].sentence if i is not None else -1
            named = self._priced(tokens(reply), sentence)
            if not named:
                named = self._priced(tokens(ctx.message), None)
                if ctx.booking is not None and ctx.booking.specialty:
                    named.add(facts.specialties[ctx.booking.specialty].price)
            allowed = {facts.prices[p].bs for p in named} if named else {p.bs for p in facts.prices.values()}
            allowed.add(sum(facts.prices[p].bs for p in named))  # "en total Bs 120"
            if amount not in allowed:
                what = ", ".join(facts.prices[p].name for p in sorted(named)) or "anything at the clinic"
                out.append(Finding("price", f"Bs {amount:g} is not the price of {what}"))
        return out

    def _priced(self, toks: list[Token], sentence: int | None) -> set[str]:
        facts = self.facts
        keep = [t for t in toks if sentence is None or t.sentence == sentence]
        named = {h.id for h in facts.find("price", keep)}
        for h in facts.find("specialty", keep):
            if not named & {"control", "limpieza_dental"}:
                named.add(facts.specialties[h.id].price)
        return named

    def _insurers(self, reply: str, toks: list[Token], ctx: Context) -> list[Finding]:
        facts, out = self.facts, []
        for h in facts.find("insurer", toks):
            taken, neg = h.id.startswith("+"), negated(toks, h.first)
            clause = " ".join(t.norm for t in toks if t.clause == toks[h.first].clause)
            if taken and neg:
                out.append(Finding("insurer", f"says the clinic does not take {h.id[1:]}"))
            elif not taken and not neg and _ACCEPTS.search(clause):
                out.append(Finding("insurer", f"says the clinic takes {h.id[1:]}"))
        asked = facts.find("insurer", tokens(ctx.message))
        unknown_insurer = re.search(r"\bseguros?\b", fold(ctx.message)) and not asked
        if (any(h.id.startswith("-") for h in asked) or unknown_insurer) and re.match(r"\W*si\b", fold(reply)):
            out.append(Finding("insurer", "answers yes about an insurer the clinic does not take"))
        return out

    def _phones(self, reply: str, ctx: Context) -> list[Finding]:
        said = re.sub(r"\D", "", ctx.user_text or ctx.message)
        known = set(self.facts.phones)
        out = []
        for m in list(_NUMBER.finditer(reply)) + list(_SHORT_NUMBER.finditer(fold(reply))):
            digits = re.sub(r"\D", "", m.group(1))
            local = digits[3:] if digits.startswith("591") and len(digits) > 8 else digits
            if local in known or digits in known or local in said or any(k.endswith(local) for k in known):
                continue
            if len(local) in (7, 8) or m.re is _SHORT_NUMBER:
                out.append(Finding("phone", f"{m.group(1).strip()} is not a number of the clinic or of the patient"))
        return out

    def _names(self, reply: str, ctx: Context) -> list[Finding]:
        said = {t.norm for t in tokens(ctx.user_text or ctx.message)}
        doctors = {w for d in self.facts.doctors for w in (*d.given, d.surname)}
        out = []
        for m in _GREETED.finditer(reply):
            n = normalize(m.group(1))
            if n not in said and n not in doctors and n not in _NOT_NAMES:
                out.append(Finding("name", f"calls the patient {m.group(1)}, a name they did not give"))
        return out


_NOT_NAMES = frozenset(["te", "tu", "con", "gusto", "para", "por", "que", "el", "la", "los", "las", "un", "una", "ya"])


def _token_at(toks: list[Token]):
    def at(pos: int) -> int | None:
        for i, t in enumerate(toks):
            if t.start <= pos < t.end:
                return i
        return next((i for i, t in enumerate(toks) if t.start >= pos), None)

    return at


def _expand(d) -> list[int]:
    if d.range_to is not None and d.weekday is not None:
        return list(range(d.weekday, d.range_to + 1)) if d.weekday <= d.range_to else [d.weekday]
    return [d.weekday] if d.weekday is not None else []


def _day_name(wd: int, day: date | None) -> str:
    from .dates import WEEKDAYS

    return f"{WEEKDAYS[wd]} {day.isoformat()}" if isinstance(day, date) else WEEKDAYS[wd]


def _words_of(value) -> set[str]:
    """Every normalized word in a YAML value (the facts' own names and places)."""
    if isinstance(value, dict):
        return set().union(*(_words_of(k) | _words_of(v) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_words_of(v) for v in value)) if value else set()
    return set(normalize(str(value)).split())


def known_words(texts) -> set[str]:
    """The normalized words of ``texts``."""
    out: set[str] = set()
    for t in texts:
        out.update(normalize(t).split())
    return out
