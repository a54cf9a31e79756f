"""Text as the triage reads it: invisible characters gone, accents folded, numbers with units read.

Patients write "pe\u200bcho" (a zero-width space pasted from another app), "38,5 de fiebre", "el azúcar en 40",
"tengo 30 semanas", "mi bebé de 3 semanitas", "la presión 16/11". The rules and the learned layer see plain
words, so a number is read into a word beside it (``lectura...``) that rules can name:

- ``lecturafiebre`` (38.0 or more: with a decimal, or with a word of fever or temperature), ``lecturafiebrealta``
  (39.5 or more), ``lecturafebricula`` (37.5 to 37.9);
- ``lecturaglucosabaja`` (a sugar reading under 70 mg/dl, or a meter showing LO), ``lecturaglucosaalta`` (300+);
- ``lecturapresionmuyalta`` (160/110 or more; "16/11" is read as 160/110), ``lecturapresionalta`` (140/90),
  ``lecturapresionbaja`` (systolic under 90); ``lecturasaturacionbaja`` (oxygen 92% or less);
- ``lecturamenor3meses``: a baby's age under 3 months ("3 semanitas", "40 días", "mes y medio"), and
  ``lecturalactante`` under a year;
- ``lecturaembarazo`` and ``lecturapretermino``: weeks or months of pregnancy (under 37 weeks: preterm);
- ``lecturaano``: a year told as a date ("en 2019", "el 2020", "desde el 2015"): an event in the past.

Number words before a unit are read as digits first ("dos meses" -> "2 meses").
"""

from __future__ import annotations

import re
import unicodedata

from ..matcher import normalize as words_only

_NUMBER_WORDS = {
    "un": 1, "uno": 1, "una": 1, "dos": 2, "tres": 3, "cuatro": 4, "cinco": 5, "seis": 6, "siete": 7,
    "ocho": 8, "nueve": 9, "diez": 10, "once": 11, "doce": 12, "trece": 13, "catorce": 14, "quince": 15,
    "dieciseis": 16, "diecisiete": 17, "dieciocho": 18, "diecinueve": 19, "veinte": 20, "veinticinco": 25,
    "treinta": 30, "cuarenta": 40, "cincuenta": 50, "sesenta": 60, "cien": 100,
}  # fmt: skip
_UNITS = r"(?:dias?|diitas?|semanas?|semanitas?|mes(?:es)?|mese?[cs]itos?|anos?|anitos?|horas?|minutos?|pastillas?)"
_NUMBER_WORD = re.compile(rf"\b({'|'.join(_NUMBER_WORDS)})(?=\s+(?:y medio\s+)?{_UNITS}\b)")

_BABY = r"(?:bebe|bebes|bebito|bebita|bb|wawa|wawita|guagua|guaguita|nene|nena|hijo|hija|hijito|hijita|nieto|nieta|" \
        r"nietito|nietita|sobrino|sobrina|recien nacid[oa]|nino|nina|ninito|ninita|chiquito|chiquita|criatura)"  # fmt: skip
_PREGNANT = re.compile(r"embaraz|gestacion|prenatal|encinta|panza|barriga|placenta|fuente|bolsa|parto|bebe se mueve")
_AGE = re.compile(
    r"\b(\d{1,3})(?:\s+y medio)?\s*(dias?|diitas?|semanas?|semanitas?|sem|mes(?:es)?|mese?[cs]itos?)\b(?:\s+y medio\b)?"
    r"(?!\s+de (?:tratamiento|reposo|atraso))"
)
_AGE_WORDS = re.compile(r"\brecien nacid[oa]s?\b")
_PAST = re.compile(
    r"(?:hace|desde hace|cada|por|dentro de|durante|hasta|despues de|en|hace unos|hace unas|unos|unas)\s*$"
)
_FEVER_CONTEXT = re.compile(r"fiebr|temperatura|calentur|termometr|grado|calient|afiebr|febril|[°º]")
_TEMPERATURE = re.compile(
    r"(?<![\d/.,])(3[5-9]|4[0-3])(?:\s*[.,]\s*(\d))?(?![\d/])(?!\s*(?:anos?|semanas?|dias?|mes|kilos?|kg|minutos?|"
    r"min|horas?|pastillas?|mg|ml|%|lectura|veces|cm|metros|bs|pesos))"
)
_GLUCOSE = re.compile(
    r"\b(?:azucar|glucosa|glicemia|glucemia|glucometro|glicosa|dextro|hgt)\b\D{0,25}?(?<![\d.,])(\d{2,3})(?![\d/])"
)
_GLUCOSE_LO = re.compile(r"(?i:azucar|glucosa|glucometro|glicemia)[^.]{0,40}?\b(LO|LOW|low|Low)\b")
_GLUCOSE_HI = re.compile(r"(?i:azucar|glucosa|glucometro|glicemia)[^.]{0,40}?\b(HI|HIGH|high)\b")
_PRESSURE = re.compile(r"(?<![\d/])(\d{2,3})\s*(?:/|sobre|con)\s*(\d{1,3})(?![\d/])")
_PRESSURE_CONTEXT = re.compile(r"presion|tension|arterial|\bpa\b")
_YEAR = re.compile(
    r"\b(?:en|el|del|desde|durante|ano|anio)\s+(?:el\s+|del\s+)?(?:19[5-9]\d|20\d\d)\b"
    r"(?!\s*(?:bs|bolivianos?|pesos|dolares|\$|mg|ml|metros|kilos?|pastillas?))"
)
_SATURATION = re.compile(r"\b(?:saturacion|saturando|satura|saturaba|oxigeno|oximetro|spo2|sat)\b\D{0,20}?(\d{2,3})\b")


def strip_format(text: str) -> str:
    """``text`` without Unicode format characters (category Cf: zero-width spaces and joiners, soft hyphens,
    byte-order marks, direction marks), which hide a word from any matcher without changing how it looks."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def fold(text: str, lower: bool = True) -> str:
    """Lower case, accents and tildes dropped (ñ -> n), format characters removed; punctuation kept."""
    text = strip_format(text)
    text = unicodedata.normalize("NFKD", text.casefold() if lower else text)
    return "".join(c for c in text if not unicodedata.combining(c))


def read(text: str) -> str:
    """``text`` as words (letters and digits, single spaces) with its readings inserted (module docstring)."""
    raw = fold(text, lower=False)  # a meter's "LO" is told from the word "lo" by its case
    t = fold(text)
    t = _NUMBER_WORD.sub(lambda m: str(_NUMBER_WORDS[m.group(1)]), t)
    t = re.sub(r"(?<![\d\s])(\s*)\bmes y medio\b", r"\1 1 mes y medio", t)
    t = _read_pressure(t)
    t = _GLUCOSE.sub(lambda m: _mark(m, _glucose(int(m.group(1)))), t)
    if _GLUCOSE_LO.search(raw):
        t += " lecturaglucosabaja"
    if _GLUCOSE_HI.search(raw):
        t += " lecturaglucosaalta"
    t = _SATURATION.sub(lambda m: _mark(m, "lecturasaturacionbaja" if 50 <= int(m.group(1)) <= 92 else ""), t)
    t = _read_ages(t)
    t = _YEAR.sub(lambda m: f"{m.group(0)} lecturaano", t)
    context = _FEVER_CONTEXT.search(t) is not None
    # "38,3" is a temperature on its own; a whole "38" only beside a word of fever ("38 años" is an age)
    t = _TEMPERATURE.sub(lambda m: _temperature(m) if context or m.group(2) else m.group(0), t)
    return words_only(t)


def _mark(m: re.Match, marker: str) -> str:
    return f"{m.group(0)} {marker}" if marker else m.group(0)


def _glucose(value: int) -> str:
    if value < 70:
        return "lecturaglucosabaja"
    return "lecturaglucosaalta" if value >= 300 else ""


def _read_pressure(t: str) -> str:
    def one(m: re.Match) -> str:
        s, d = int(m.group(1)), int(m.group(2))
        context = _PRESSURE_CONTEXT.search(t[max(0, m.start() - 40) : m.start()]) is not None
        if s < 30 and d < 20:  # "16/11": centimetres of mercury, as many patients write it
            if not context:
                return m.group(0)  # "12/08" without a word of pressure is a date
            s, d = s * 10, d * 10
        if not (70 <= s <= 260 and 30 <= d <= 160 and s > d) or not (context or s >= 90):
            return m.group(0)
        if s >= 160 or d >= 110:
            return _mark(m, "lecturapresionmuyalta")
        if s >= 140 or d >= 90:
            return _mark(m, "lecturapresionalta")
        return _mark(m, "lecturapresionbaja" if s < 90 else "")

    return _PRESSURE.sub(one, t)


def _read_ages(t: str) -> str:
    """Baby ages under 3 months and weeks/months of pregnancy (which one: the words just before, and the
    message's words of pregnancy)."""
    pregnant = _PREGNANT.search(t) is not None

    def one(m: re.Match) -> str:
        n, unit = int(m.group(1)), m.group(2)
        days = n * (1 if unit.startswith("di") else 7 if unit.startswith("sem") else 30)
        if "y medio" in m.group(0):
            days += 15 if unit.startswith("mes") else 3
        before = t[max(0, m.start() - 40) : m.start()]
        after = t[m.end() : m.end() + 25]
        gestation = _mark(m, "lecturaembarazo lecturapretermino" if _weeks(n, unit, days) < 37 else "lecturaembarazo")
        baby = _mark(m, "lecturalactante lecturamenor3meses" if days < 90 else "lecturalactante" if days < 365 else "")
        if re.search(r"naci(?:o|do|da|eron|mos)\s+hace\s*$", before):
            return baby  # "nació hace 40 días": an age, though told with "hace"
        if re.search(r"(?:eco\w*|control\w*|chequeo|prenatal)\s+de\s*$", before) and 4 <= days <= 300:
            return gestation  # "eco de 32 semanas", "ecografía de 7 meses"
        if _PAST.search(before) or re.match(r"\s*(?:seguid|sin |que |atras)", after):
            return m.group(0)  # "hace 3 semanas", "cada 3 meses": a time, not an age
        if re.match(r"\s*(?:de embarazo|de gestacion|embarazada)", after) or re.search(
            r"(?:embarazada de|estoy de|esta de|estas de|toy de|toi de)\s*$", before
        ):
            return gestation if 4 <= days <= 300 else m.group(0)
        if re.search(rf"{_BABY}(?:\s+(?:de|tiene|ya|con|que|q|solo|apenas|recien|cumple|cumplio)){{0,3}}\s*$", before):
            return baby  # "mi bebé de 3 semanas", "la wawa ya tiene 2 meses"
        if re.match(r"\s*(?:de nacid|de vida|de edad|nacid)", after):
            return baby
        loose = re.search(r"(?:tengo|tiene|cumplo|cumple|con|voy por|va por|ya)\s*$", before)
        if loose and (pregnant or unit.startswith("sem")) and 4 <= days <= 300:
            return gestation
        if re.search(_BABY, before[-35:]):
            return baby  # "mi guagua tiene calentura y tiene 1 mes y medio"
        return m.group(0)

    t = _AGE.sub(one, t)
    return _AGE_WORDS.sub(lambda m: f"{m.group(0)} lecturalactante lecturamenor3meses", t)


def _weeks(n: int, unit: str, days: int) -> float:
    return n * 4.3 if unit.startswith("mes") else days / 7


def _temperature(m: re.Match) -> str:
    value = int(m.group(1)) + (int(m.group(2)) / 10 if m.group(2) else 0.0)
    if value >= 39.5:
        return f"{m.group(0)} lecturafiebre lecturafiebrealta"
    if value >= 38.0:
        return f"{m.group(0)} lecturafiebre"
    return f"{m.group(0)} lecturafebricula" if value >= 37.5 else m.group(0)
