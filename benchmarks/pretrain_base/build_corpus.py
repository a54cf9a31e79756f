"""Build a small general-Spanish corpus from packages on the public registries.

Why these sources: the machines have no model hub and no web access, only the Debian
archive and PyPI. Debian ships Spanish manuals, help pages, man pages and fortune
cookies; PyPI's chatterbot-corpus ships short Spanish dialogues. None of it is medical,
and the clinic conversations in data/ are deliberately NOT used (the base must be
general Spanish so the LoRA fine-tune is what teaches the clinic domain).

Output (in --work-dir, not committed):
  corpus/train.jsonl, corpus/heldout.jsonl  one JSON object per document:
      {"source": ..., "text": ...}            prose document (paragraphs joined by "\n")
      {"source": ..., "turns": [...]}         dialogue (each turn will end with EOS)
  corpus/stats.json                          characters per source, versions, licences
and benchmarks/pretrain_base/SOURCES.md (provenance table, committed).

Usage:  python build_corpus.py --work-dir /tmp/pretrain_base
"""

import argparse
import glob
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import unicodedata
import zipfile
from html.parser import HTMLParser

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))

# Debian package -> (glob of text files inside the unpacked package, extractor, licence).
# Licences were read from each package's /usr/share/doc/<pkg>/copyright ("Files: *").
DEB_SOURCES = {
    "libreoffice-help-es": ("usr/share/libreoffice/help/es/**/*.html", "html", "MPL-2.0"),
    "gimp-help-es": (
        "usr/share/gimp/2.0/help/es/**/*.html",
        "html",
        "GFDL-NIV-1.2+ (copyright file in gimp-help-common)",
    ),
    "debian-handbook": ("usr/share/doc/debian-handbook/html/es-ES/**/*.html", "html", "GPL-2.0+ or CC-BY-SA-3.0"),
    "debian-reference-es": ("usr/share/debian-reference/*.es.html", "html", "GPL-2+"),
    "freedombox-doc-es": ("usr/share/freedombox/manual/es/**/*.html", "html", "AGPL-3+"),
    "debian-edu-doc-es": ("usr/share/doc/debian-edu-doc-es/*.html", "html", "GPL-2+"),
    "maint-guide-es": ("usr/share/doc/maint-guide-es/html/*.html", "html", "GPL-2.0+ / MIT"),
    "aptitude-doc-es": ("usr/share/doc/aptitude/html/es/*.html", "html", "GPL-2+"),
    "manpages-es": ("usr/share/man/es/**/*.gz", "man", "GPL-3+"),
    "fortunes-es": ("usr/share/games/fortunes/es/*.fortunes", "fortune", "GPL-2+"),
}
PIP_SOURCE = ("chatterbot-corpus", "1.3.3", "BSD-3-Clause (PyPI classifier: BSD License)")

# Function words: a line counts as Spanish when it has enough of these and more of them
# than of the English ones (GIMP/LibreOffice help has untranslated English passages).
ES_WORDS = set(
    [
        "de",
        "la",
        "que",
        "el",
        "en",
        "y",
        "a",
        "los",
        "se",
        "del",
        "las",
        "un",
        "por",
        "con",
        "no",
        "una",
        "su",
        "para",
        "es",
        "al",
        "lo",
        "como",
        "más",
        "o",
        "pero",
        "sus",
        "le",
        "ya",
        "este",
        "sí",
        "porque",
        "esta",
        "entre",
        "cuando",
        "muy",
        "sin",
        "sobre",
        "también",
        "me",
        "hasta",
        "hay",
        "donde",
        "quien",
        "desde",
        "todo",
        "nos",
        "durante",
        "todos",
        "uno",
        "les",
        "ni",
        "contra",
        "otros",
        "ese",
        "eso",
        "ante",
        "ellos",
        "e",
        "esto",
        "mí",
        "antes",
        "algunos",
        "qué",
        "unos",
        "yo",
        "otro",
        "otras",
        "otra",
        "él",
        "tanto",
        "esa",
        "estos",
        "mucho",
        "quienes",
        "nada",
        "muchos",
        "cual",
        "poco",
        "ella",
        "estar",
        "estas",
        "algunas",
        "algo",
        "nosotros",
        "mi",
        "mis",
        "tú",
        "te",
        "ti",
        "tu",
        "tus",
        "puede",
        "pueden",
        "debe",
        "si",
        "son",
        "está",
        "están",
        "ser",
        "tiene",
        "hace",
        "cómo",
        "cuál",
        "usted",
        "ha",
        "han",
        "fue",
        "era",
    ]
)
EN_WORDS = set(
    [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "with",
        "as",
        "on",
        "this",
        "be",
        "are",
        "by",
        "or",
        "from",
        "an",
        "at",
        "which",
        "you",
        "your",
        "can",
        "not",
        "will",
        "if",
        "use",
        "when",
        "there",
        "these",
        "have",
        "has",
    ]
)
TOC_RE = re.compile(r"^(\d+(\.\d+)*|[A-Z](\.\d+)+)\.?\s")
WORD_RE = re.compile(r"[a-záéíóúüñ]+")
BOILERPLATE_RE = re.compile(
    r"(copyright|©|licen[cs]ia|license|gnu free documentation|todos los derechos|"
    r"https?://|www\.|@[a-z0-9-]+\.)",
    re.I,
)


# ---------------------------------------------------------------- fetching
def fetch(work):
    """Download the .deb files and the wheel, unpack them, return {name: version}."""
    debs, unpack = os.path.join(work, "debs"), os.path.join(work, "unpacked")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(unpack, exist_ok=True)
    versions = {}
    missing = [p for p in DEB_SOURCES if not glob.glob(os.path.join(debs, p + "_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for pkg in DEB_SOURCES:
        deb = sorted(glob.glob(os.path.join(debs, pkg + "_*.deb")))[-1]
        versions[pkg] = subprocess.run(
            ["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        dest = os.path.join(unpack, pkg)
        if not os.path.isdir(dest):
            subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    name, ver, _ = PIP_SOURCE
    whl = os.path.join(work, "pip")
    if not glob.glob(os.path.join(whl, "*.whl")):
        subprocess.run(["pip", "download", "--no-deps", f"{name}=={ver}", "-d", whl], check=True)
    dest = os.path.join(unpack, name)
    if not os.path.isdir(dest):
        zipfile.ZipFile(glob.glob(os.path.join(whl, "*.whl"))[0]).extractall(dest)
    versions[name] = ver
    return versions


# ---------------------------------------------------------------- extractors
class _HTMLText(HTMLParser):
    """Collect text, starting a new paragraph at every block-level tag."""

    BLOCK = {
        "p",
        "div",
        "li",
        "dt",
        "dd",
        "td",
        "th",
        "tr",
        "br",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "table",
        "ul",
        "ol",
        "section",
        "blockquote",
        "title",
    }
    # <pre> blocks are code/terminal listings; inline <code>/<tt> is kept, or sentences
    # would be left with holes ("modificar los ficheros , , y").
    SKIP = {"script", "style", "head", "nav", "pre"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras, self.buf, self.skip = [], [], 0

    def _flush(self):
        if self.buf:
            self.paras.append("".join(self.buf))
            self.buf = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        if tag in self.BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if not self.skip:
            self.buf.append(data)


def html_paragraphs(path):
    p = _HTMLText()
    with open(path, encoding="utf-8", errors="replace") as f:
        p.feed(f.read())
    p._flush()
    return p.paras


ROFF_ESC = re.compile(
    r"\\(f\[[A-Z]*\]|f[A-Z1-4P]|\*\[[^\]]*\]|\*\(..|\*.|s[-+]?\d+|&|"
    r"\(..|\[[^\]]*\]|.)"
)
ROFF_NAMED = {
    "(aq": "'",
    "(dq": '"',
    "(em": "—",
    "(en": "–",
    "(co": "©",
    "(bu": "•",
    "[aq]": "'",
    "[dq]": '"',
    "[em]": "—",
    "[en]": "–",
    "-": "-",
    "e": "\\",
    "(rs": "\\",
    " ": " ",
    "~": " ",
}


def man_paragraphs(path):
    """Plain text from a gzipped man page: keep prose lines, drop roff requests.

    Requests that carry visible text (.SH, .B, .I, .BR, .IR, ...) keep their argument;
    every other request (.TP, .PP, .nf, .de ...) is a paragraph break.
    """
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    paras, buf = [], []

    def unescape(s):
        s = s.split('\\"')[0]  # roff comment
        return ROFF_ESC.sub(lambda m: ROFF_NAMED.get(m.group(1), ""), s)

    for line in lines:
        if line.startswith((".", "'")):
            m = re.match(r"[.'](SH|SS|B|I|BR|IR|RB|RI|BI|IB|SM)\s+(.*)", line)
            if m and m.group(1) in ("SH", "SS"):
                paras.append(" ".join(buf))
                buf = []
                continue  # section headings (NOMBRE, SINOPSIS...) are boilerplate
            if m:
                buf.append(unescape(m.group(2).replace('"', "")))
            else:
                paras.append(" ".join(buf))
                buf = []
            continue
        if not line.strip():
            paras.append(" ".join(buf))
            buf = []
        else:
            buf.append(unescape(line))
    paras.append(" ".join(buf))
    return paras


def fortune_docs(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [c for c in re.split(r"^%\s*$", f.read(), flags=re.M)]


# ---------------------------------------------------------------- cleaning
def normalise(s):
    s = unicodedata.normalize("NFC", html.unescape(s))
    s = s.replace("\u00a0", " ").replace("\u00ad", "")
    return re.sub(r"\s+", " ", s).strip()


def looks_spanish(s, min_words=4):
    """Heuristic: long enough, mostly letters, more Spanish than English function words."""
    if len(s) < 25 or BOILERPLATE_RE.search(s):
        return False
    if TOC_RE.match(s) and len(s) < 100:  # table-of-contents entries ("12.1.3. Bucles")
        return False
    letters = sum(c.isalpha() for c in s)
    if letters / len(s) < 0.7:  # code, tables, key combos, paths
        return False
    words = WORD_RE.findall(s.lower())
    if len(words) < min_words:
        return False
    es = sum(w in ES_WORDS for w in words)
    en = sum(w in EN_WORDS for w in words)
    return es >= 2 and es > 2 * en and es / len(words) >= 0.15


def build(work):
    versions = fetch(work)
    unpack = os.path.join(work, "unpacked")
    seen = set()  # exact dedup of normalised paragraphs across the whole corpus
    docs = []

    def keep(p):
        key = hashlib.md5(p.lower().encode()).digest()
        if key in seen:
            return False
        seen.add(key)
        return True

    for pkg, (pattern, kind, _lic) in DEB_SOURCES.items():
        files = sorted(glob.glob(os.path.join(unpack, pkg, pattern), recursive=True))
        for path in files:
            if kind == "fortune":
                # each fortune is its own short document; keep its line breaks as spaces
                for c in fortune_docs(path):
                    t = normalise(c)
                    if looks_spanish(t, min_words=3) and keep(t):
                        docs.append({"source": pkg, "text": t})
                continue
            raw = html_paragraphs(path) if kind == "html" else man_paragraphs(path)
            paras = [t for t in map(normalise, raw) if looks_spanish(t) and keep(t)]
            if paras:
                docs.append({"source": pkg, "text": "\n".join(paras)})

    # chatterbot: each conversation is a list of turns; keep them as turns so that
    # pretrain.py can end every turn with EOS exactly as DialoGPT does.
    name = PIP_SOURCE[0]
    for path in sorted(glob.glob(os.path.join(unpack, name, "chatterbot_corpus/data/spanish/*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conv in data.get("conversations", []):
            turns = [normalise(str(t)) for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2 and keep(" | ".join(turns)):
                docs.append({"source": name, "turns": turns})

    # held-out: ~2% of prose documents, chosen by a hash of the text so the split is
    # stable across runs; dialogues all stay in training (evaluation is general prose).
    def is_heldout(d):
        return "text" in d and int(hashlib.md5(d["text"].encode()).hexdigest(), 16) % 50 == 0

    out = os.path.join(work, "corpus")
    os.makedirs(out, exist_ok=True)
    stats = {}
    with open(os.path.join(out, "train.jsonl"), "w") as ftr, open(os.path.join(out, "heldout.jsonl"), "w") as fho:
        for d in docs:
            n = len(d["text"]) if "text" in d else sum(len(t) for t in d["turns"])
            s = stats.setdefault(d["source"], {"docs": 0, "train_chars": 0, "heldout_chars": 0})
            s["docs"] += 1
            split = "heldout" if is_heldout(d) else "train"
            s[split + "_chars"] += n
            (fho if split == "heldout" else ftr).write(json.dumps(d, ensure_ascii=False) + "\n")
    licences = {**{k: v[2] for k, v in DEB_SOURCES.items()}, PIP_SOURCE[0]: PIP_SOURCE[2]}
    for k in stats:
        stats[k].update(version=versions[k], licence=licences[k])
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    write_sources_md(stats)
    return stats


def write_sources_md(stats):
    rows = sorted(stats.items(), key=lambda kv: -kv[1]["train_chars"])
    tot_tr = sum(s["train_chars"] for _, s in rows)
    tot_ho = sum(s["heldout_chars"] for _, s in rows)
    lines = [
        "# Sources of the pretraining corpus",
        "",
        "Generated by `build_corpus.py` (do not edit by hand). Characters are counted after",
        "markup stripping, NFC normalisation, the Spanish-line filter and deduplication.",
        "Debian packages: Debian 12 (bookworm) archive, fetched with `apt-get download`;",
        "licence = the `Files: *` stanza of the package's `copyright` file.",
        "PyPI: `pip download --no-deps chatterbot-corpus==1.3.3` (only `data/spanish/*.yml`).",
        "The clinic conversations in `data/` are NOT used.",
        "",
        "| source | registry | version | licence | docs | train chars | held-out chars |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for k, s in rows:
        reg = "PyPI" if k == PIP_SOURCE[0] else "Debian"
        lines.append(
            f"| {k} | {reg} | {s['version']} | {s['licence']} | {s['docs']} | "
            f"{s['train_chars']:,} | {s['heldout_chars']:,} |"
        )
    lines.append(f"| **total** | | | | {sum(s['docs'] for _, s in rows)} | {tot_tr:,} | {tot_ho:,} |")
    lines += [
        "",
        "The corpus text is not redistributed in this repository; only the model",
        "weights trained on it are. See `models/gpt2-es-tiny/README.md` for licence notes.",
    ]
    with open(os.path.join(HERE, "SOURCES.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/tmp/pretrain_base")
    args = ap.parse_args()
    stats = build(args.work_dir)
    print(json.dumps(stats, indent=1, ensure_ascii=False))
