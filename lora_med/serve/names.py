"""The patient's name as a message gives it: after "a nombre de", "me llamo", "soy" ... (past a relative:
"a nombre de mi hijito Mateo Rojas"), or a message (or its first part) that is only a name.

A name is words that look like one: none is a common Spanish word ("perdón me equivoqué, el número es ..."
corrects the phone, it gives no name), and none names a specialty, a doctor or a service of the clinic.
"""

from __future__ import annotations

import re

from .dates import fold
from .facts import Facts
from .lexicon import tokens

_NAME_MARKERS = re.compile(
    r"\b(?:a nombre de|se llama|me llamo|mi nombre es|nombre(?: completo)?(?: es)?:?|soy)\s+", re.I
)
# Who the booking is for, between the marker and the name: "a nombre de mi hijito Mateo", "de mi esposa Ana".
_RELATIVE = re.compile(
    r"(?:(?:mi|su|la|el|del?|nuestr[oa])\s+)?(?:hij[oa]s?|hijit[oa]|wawa|beb[eé]|nene|nena|niñ[oa]|esposo|esposa"
    r"|marido|señora|señor|mam[aá]|mami|mamit[aá]|pap[aá]|papi|papit[oa]|madre|padre|abuel[oa]|abuelit[oa]"
    r"|herman[oa]|hermanit[oa]|sobrin[oa]|niet[oa]|t[ií][oa]|suegr[oa]|pareja|novi[oa]|primo|prima|cuñad[oa])"
    r"\b[\s,:]*",
    re.I,
)
_NAME_STOP = re.compile(
    r"\s*(?:,|;|\d|\+|\by\s+(?:mi|el|su|la)\b|\bmi\b|\bcel\b|\bcelular\b|\bn[uú]mero\b|\btel[eé]fono\b|\btelf\b"
    r"|\bci\b|\bcarnet\b|\bwhats)",
    re.I,
)
# Before a name given alone: "es Ana Rojas", "sería Ana Rojas", "él es Mateo Rojas" (not part of the name).
_LEAD_IN = re.compile(r"^\W*(?:(?:el|él|ella)\s+)?(?:es|soy|ser[ií]a|ser[aá])\s+", re.I)
# Between a name and the phone that follows it: "Ana Rojas Gil, cel 71234567", "Ana Rojas - mi número es 7..."
_TO_PHONE = re.compile(
    r"[\s,;:.-]*(?:(?:y\s+)?(?:mi|su)\s+)?(?:cel\w*|n[uú]mero|tel[eé]fono|telf\w*|whats\w*|wsp|tel)?\.?\s*(?:es\b)?"
    r"[\s,;:.+-]*",
    re.I,
)
# Inside a name these are its own ("María de los Ángeles", "Ana de la Cruz"), not common words.
_PARTICLES = frozenset(["de", "del", "la", "las", "los"])
# Common Spanish words of a chat (folded): a "name" holding one is a sentence ("perdon me equivoque"), not a name.
_COMMON_WORDS = """
    hola buenas buenos buen dia dias tardes noches quiero kiero quisiera necesito cita ficha turno consulta
    gracias si no ok okey dale para pa pal por favor porfa porfavor manana hoy ayer lunes martes miercoles jueves
    viernes sabado domingo el a al en con sin que q doctor doctora dr dra medico medica mejor esta este estoy
    bien mal puede puedo podria ser seria sera es era fue hay tengo tiene tienen mi mis tu su sus me te se le lo
    les nos yo un una unos unas y o u pero porque xq pq como cuando donde ya hija hijo hijita hijito primera
    primero segunda segundo otra otro ultima esa ese eso esto aqui ahi ahora luego despues antes confirmo
    confirmar correcto perfecto listo claro bueno exacto vale entonces tambien tampoco nada todo solo nomas mas
    menos muy perdon perdone disculpa disculpe equivoque equivoco equivocado equivocada error numero celular cel
    telefono telf whatsapp wsp nombre nombres apellido apellidos completo dato datos cambio cambiar corrijo
    corregir digo dije mande envie puse escribi mire oiga ah eh ay jaja va voy vamos ir vengo salgo sale
    paciente mama papa esposo esposa wawa bebe senor senora hora horas tarde temprano semana mes
"""
COMMON = frozenset(_COMMON_WORDS.split())


def read_name(facts: Facts, message: str, step: str, phone_at: int | None) -> str | None:
    """The patient's name in ``message``, or None. Without a marker ("me llamo", "a nombre de"), only a message
    (or its first part) that is nothing but a name of two to five words, and only when the flow asked for it
    (``step`` contact or confirm) or when the phone follows it ("Ana Rojas Gil, cel 71234567"). A lead-in
    ("es", "sería", "él es") is not part of the name. ``phone_at``: where the message's phone starts."""
    m = _NAME_MARKERS.search(message)
    if m and re.search(r"\b(?:como|cual|que|q)\s+$", fold(message[: m.start()])):
        m = None  # "¿cómo se llama la clínica?" asks a name, it does not give one
    if m:
        start = m.end()
        rel = _RELATIVE.match(message, start)
        start = rel.end() if rel else start
        rest = message[start:]
        cut = _NAME_STOP.search(rest)
        words = [w.strip(".!?") for w in (rest[: cut.start()] if cut else rest).split() if w.strip(".!?")]
        if 1 <= len(words) <= 6 and _looks_like_name(words):
            return " ".join(words)
    lead = _LEAD_IN.match(message)
    start = lead.end() if lead else 0
    cut = _NAME_STOP.search(message, start)
    end = cut.start() if cut else len(message)
    then_phone = phone_at is not None and bool(_TO_PHONE.fullmatch(message[end:phone_at]))
    if step not in ("contact", "confirm") and not then_phone:
        return None
    words = [w.strip(".!?") for w in message[start:end].split() if w.strip(".!?")]
    if not (2 <= len(words) <= 5 and _looks_like_name(words)):
        return None
    toks = tokens(" ".join(words))
    if facts.find("specialty", toks) or facts.find("not_offered", toks) or facts.find_doctors(toks):
        return None  # "Medicina General, 71234567" names what, not who
    return " ".join(words)


def _looks_like_name(words: list[str]) -> bool:
    """Letters only, none a common word (the particles of a name aside), at least one that is not a particle."""
    if not all(w.replace("-", "").isalpha() for w in words):
        return False
    folded = [fold(w) for w in words]
    own = [w for w in folded if w not in _PARTICLES]
    return bool(own) and not any(w in COMMON for w in own)
