"""Measure a triage round: the real triage and intent layer (and, with --serve, a real served export).

    .venv/bin/python benchmarks/triage/run.py ROUND.yaml                         # triage + intents, no model
    .venv/bin/python benchmarks/triage/run.py ROUND.yaml --serve EXPORT_DIR      # through `lora-med serve`

A round (benchmarks/triage/rounds/round-05.yaml shows the format) has `emergency` messages (with a `category`),
`ordinary` messages (with the `request` they make) and `carry_over` conversations (each turn's `expect`:
emergency, attended or ordinary). Measured:

- emergency recall (tier emergency); emergencies answered with a booking or identity question (a booking
  action, or with --serve a reply asking for a date, CI or birth date); advice fit for the categories the round
  labels (the reply's category is the label or its parent / generic / another), and replies whose advice line
  says what the `never` table forbids for the labelled category;
- ordinary messages marked emergency, their caution rate, requests kept (not answered as an emergency) and the
  intent found for each labelled request;
- carry-over: emergencies opened, kept on later turns, released when attended, ordinary turns served after,
  and emergency turns (an opening, or one still unresolved) answered with a booking or identity question;
- with --serve: model replies speaking of emergencies on messages the triage did not mark (after the override:
  should be none) and the override count from /metrics;
- the triage's time per message (p50/p95, every cache cleared before each pass: the cost of words never seen).

Writes results.json and results.md (the row for docs/triage.md's table) to --out, and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lora_med.data import percentile
from lora_med.models import cpu_model
from lora_med.serve.intents import FLOWS, Intents
from lora_med.serve.metrics import Metrics
from lora_med.serve.store import Turn
from lora_med.serve.triage import Triage
from lora_med.serve.turn import Dialog

REQUESTS = {
    "book": "schedule_appointment",
    "info": "clinic_info",
    "cancel": "cancel_appointment",
    "reschedule": "reschedule_appointment",
    "results": "lab_results",
}
# A reply that asks for a booking detail or for identity (what an emergency must never get).
BOOKING_QUESTION = re.compile(
    r"\b(agend\w*|reserv\w*|ficha|turno|qu[eé] d[ií]a|qu[eé] hora|horario|especialidad|carnet|\bCI\b|"
    r"fecha de nacimiento|nombre completo|tu nombre)\b",
    re.I,
)
EMERGENCY_WORDS = re.compile(r"118|emergencia|ambulancia|urgencias", re.I)


def check_round(r: object, path: Path) -> list[str]:
    """Every problem with the round file's shape (so a typo is named, not a traceback)."""
    p = []
    if not isinstance(r, dict):
        return [f"{path}: expected a mapping with emergency, ordinary and carry_over"]
    for key in ("emergency", "ordinary"):
        items = r.get(key)
        if not isinstance(items, list) or not items:
            p.append(f"{path}: '{key}' must be a non-empty list")
            continue
        for i, c in enumerate(items):
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not c["text"].strip():
                p.append(f"{path}: {key}[{i}] needs a 'text'")
    for i, conv in enumerate(r.get("carry_over") or []):
        turns = conv.get("turns") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or not all(
            isinstance(t, dict)
            and isinstance(t.get("text"), str)
            and t.get("expect") in ("emergency", "attended", "ordinary")
            for t in turns
        ):
            p.append(
                f"{path}: carry_over[{i}] needs 'turns', each with 'text' and 'expect' (emergency|attended|ordinary)"
            )
    return p


class Local:
    """The server's own turn logic (``Dialog.decide``: triage verdict, intent, params) without a model: the
    replies the model would write are not measured here."""

    def __init__(self, triage: Triage, intents: Intents):
        self.dialog = Dialog(triage, intents, None, Metrics(queue_depth=lambda: 0, in_flight=lambda: 0))

    def turn(self, message: str, history: list[Turn]) -> dict:
        plan = self.dialog.decide(message, history)
        return {"action": plan.action, "status": plan.status, "reply": plan.reply or "", **plan.extra}


class Served:
    """`lora-med serve EXPORT_DIR` in a subprocess (a fresh database, no rate limit); one user per conversation."""

    def __init__(self, export: str, work: Path, rules: str):
        self.log = work / "server.log"
        args = [sys.executable, "-m", "lora_med", "serve", export, "--host", "127.0.0.1", "--port", "0"]
        args += ["--db", str(work / "round.db"), "--log-file", str(self.log), "--rate-limit", "0", "--emergency", rules]
        self.err = open(work / "server.stderr", "wb")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.err, env=env)
        self.url, self.users = "", 0
        deadline = time.monotonic() + 300
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit("error: the server did not start:\n" + Path(self.err.name).read_text(errors="replace")[-3000:])
            if self.log.exists():
                for line in self.log.read_text(encoding="utf-8").splitlines():
                    if json.loads(line).get("event") == "ready":
                        self.url = f"http://127.0.0.1:{json.loads(line)['port']}"
            time.sleep(0.2)

    def new_user(self) -> str:
        self.users += 1
        return f"+5917{self.users:07d}"

    def turn(self, message: str, user: str) -> dict:
        import httpx

        r = httpx.post(f"{self.url}/chat/", json={"user_id": user, "message": message}, timeout=120)
        if r.status_code != 200:
            sys.exit(f"error: the server answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        return {
            "action": body["action"],
            "status": body["params"]["status"],
            "reply": body["response"],
            **body["params"],
        }

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()


def _asks(out: dict, caught: bool) -> bool:
    """An answer that books or asks for identity (what an emergency must never get)."""
    return (
        out["action"] in FLOWS
        or out["status"] == "verifying_identity"
        or (not caught and BOOKING_QUESTION.search(out["reply"] or "") is not None)
    )


def measure(r: dict, triage: Triage, run) -> dict:
    """Every figure of the module docstring except timing; ``run(message, conversation)`` answers one turn."""
    cats = triage.rules.categories
    em = {"n": 0, "caught": 0, "booking_or_identity": 0, "missed": [], "fit": Counter(), "never": []}
    for c in r["emergency"]:
        out = run(c["text"], None)
        em["n"] += 1
        caught = out["action"] == "emergency"
        em["caught"] += caught
        if _asks(out, caught):
            em["booking_or_identity"] += 1
        if not caught:
            em["missed"].append(
                {"id": c.get("id"), "category": c.get("category"), "tier": out.get("triage"), "text": c["text"]}
            )
            continue
        label, got = c.get("category"), out.get("triage_category")
        if label:
            fits = got is not None and (got == label or (got in cats and cats[got].parent == label))
            em["fit"]["fits" if fits else "generic" if got is None else "other"] += 1
            if label in cats and triage.advice.forbidden(label, out["reply"] or ""):
                em["never"].append({"id": c.get("id"), "category": label, "got": got})
    od = {
        "n": 0,
        "emergency": 0,
        "caution": 0,
        "kept": 0,
        "intent_ok": 0,
        "intent_n": 0,
        "model_spoke": 0,
        "flagged": [],
    }
    for c in r["ordinary"]:
        out = run(c["text"], None)
        od["n"] += 1
        if out["action"] == "emergency":
            od["emergency"] += 1
            od["flagged"].append({"id": c.get("id"), "text": c["text"]})
        else:
            od["kept"] += 1
            od["caution"] += out.get("triage") == "caution"
            if EMERGENCY_WORDS.search(out["reply"] or "") and out.get("triage") != "caution":
                od["model_spoke"] += 1
        if c.get("request") in REQUESTS:
            od["intent_n"] += 1
            od["intent_ok"] += out.get("intent", out["action"]) == REQUESTS[c["request"]]
    co = {"opened": 0, "opened_n": 0, "kept": 0, "kept_n": 0, "released": 0, "released_n": 0, "resumed": 0,
          "resumed_n": 0, "booking_or_identity": 0, "wrong": []}  # fmt: skip
    for conv in r.get("carry_over") or []:
        state: dict = {}
        for i, t in enumerate(conv["turns"]):
            out = run(t["text"], state)
            is_em = out["action"] == "emergency"
            key = (
                "opened"
                if i == 0
                else {"emergency": "kept", "attended": "released", "ordinary": "resumed"}[t["expect"]]
            )
            ok = is_em if t["expect"] == "emergency" else not is_em
            # an emergency turn of a conversation (its opening, or one still unresolved) that books or asks for
            # identity counts like one of the list
            co["booking_or_identity"] += t["expect"] == "emergency" and _asks(out, is_em)
            co[f"{key}_n"] += 1
            co[key] += ok
            if not ok:
                co["wrong"].append(
                    {"id": conv.get("id"), "turn": i, "expect": t["expect"], "action": out["action"], "text": t["text"]}
                )
    return {"emergency": em, "ordinary": od, "carry_over": co}


def timing(r: dict, triage: Triage, passes: int) -> dict:
    """ms per message of the triage (read, rules, model, carry-over check), every cache cleared per pass."""
    messages = [c["text"] for k in ("emergency", "ordinary") for c in r[k]]
    messages += [t["text"] for conv in r.get("carry_over") or [] for t in conv["turns"]]
    times = []
    for _ in range(passes):
        triage.assess.cache_clear()
        triage.rules.rules.hits.cache_clear()
        triage.model.featurizer._word.cache_clear()
        for m in messages:
            t0 = time.perf_counter()
            triage.verdict(m, [])
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return {
        "messages": len(messages),
        "passes": passes,
        "p50_ms": percentile(times, 50),
        "p95_ms": percentile(times, 95),
    }


def markdown_row(name: str, res: dict) -> str:
    em, od, co, tm = res["emergency"], res["ordinary"], res["carry_over"], res["timing"]
    carry = (
        f"{co['opened']}/{co['opened_n']} opened, {co['kept']}/{co['kept_n']} kept, "
        f"{co['released']}/{co['released_n']} released"
    )
    return (
        f"| {name} | {res['when']} | {em['caught']}/{em['n']} = {100 * em['caught'] / em['n']:.1f}% | "
        f"{em['booking_or_identity']} (+{co.get('booking_or_identity', 0)} in conversations) | "
        f"{od['emergency']}/{od['n']} | {od['caution']}/{od['n']} | "
        f"{od['kept']}/{od['n']} | {carry} | {em['fit'].get('fits', 0)}/{sum(em['fit'].values())} fit, "
        f"{em['fit'].get('generic', 0)} generic, {len(em['never'])} never | {tm['p50_ms']:.2f} / {tm['p95_ms']:.2f} ms |"
    )


HEADER = (
    "| round | measured | emergency recall | emergencies answered with booking/identity | ordinary marked emergency "
    "| ordinary caution | ordinary requests kept | carry-over | advice (fit, generic, never-pairs) | triage p50 / p95 |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("round", type=Path, help="the round's YAML file")
    ap.add_argument(
        "--serve", metavar="EXPORT_DIR", help="measure through `lora-med serve EXPORT_DIR` (model replies included)"
    )
    ap.add_argument("--rules", default="configs/triage.yaml", help="triage file [default: configs/triage.yaml]")
    ap.add_argument("--intents", default="configs/intents.yaml", help="intent rules [default: configs/intents.yaml]")
    ap.add_argument("--out", type=Path, help="results folder [default: benchmarks/triage/results/<round file name>]")
    ap.add_argument("--when", default="after", help="label of this measurement in the table (e.g. before, after)")
    ap.add_argument("--passes", type=int, default=5, help="timing passes over the round [default: 5]")
    args = ap.parse_args(argv)
    from lora_med.errors import LoraMedError

    if not args.round.is_file():
        print(f"error: {args.round}: no such file; give a round YAML", file=sys.stderr)
        return 2
    try:
        r = yaml.safe_load(args.round.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        print(f"error: {args.round}: not valid YAML ({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    problems = check_round(r, args.round)
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.passes < 1:
        print("error: --passes must be 1 or more", file=sys.stderr)
        return 2
    try:
        triage, intents = Triage(args.rules), Intents(args.intents)
    except LoraMedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.round.stem if args.round.stem != "round" else args.round.parent.name
    out_dir = args.out or REPO / "benchmarks" / "triage" / "results" / (name + ("-served" if args.serve else ""))
    server = None
    local = Local(triage, intents)
    try:
        if args.serve:
            work = Path(tempfile.mkdtemp(prefix="triage-round-"))
            server = Served(args.serve, work, str(Path(args.rules).resolve()))
            before = server.metric("lora_med_model_replies_overridden_total")

            def run(message: str, state: dict | None) -> dict:
                user = state.setdefault("user", server.new_user()) if state is not None else server.new_user()
                return server.turn(message, user)
        else:

            def run(message: str, state: dict | None) -> dict:
                history = state.setdefault("history", []) if state is not None else []
                out = local.turn(message, history)
                history += [Turn("user", message), Turn("assistant", out["reply"], out["action"], out["status"])]
                return out

        res = measure(r, triage, run)
        if server is not None:
            res["served"] = {
                "export": args.serve,
                "overridden": server.metric("lora_med_model_replies_overridden_total") - before,
                "health_triage": server.health().get("triage"),
            }
    finally:
        if server is not None:
            server.stop()
    res["timing"] = timing(r, triage, args.passes)
    res["when"] = args.when
    res["round"] = {
        "file": str(args.round),
        "round": r.get("round"),
        "author": r.get("author"),
        "written_on": str(r.get("written_on")),
    }
    res["triage"] = triage.versions()
    res["intents"] = intents.version
    res["machine"] = f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    res["mode"] = "served export (model replies included)" if args.serve else "triage + intent layer (no model)"
    for part in res.values():
        if isinstance(part, dict):
            for k, v in part.items():
                if isinstance(v, Counter):
                    part[k] = dict(v)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    row = markdown_row(name, res)
    (out_dir / "results.md").write_text(f"{HEADER}\n{row}\n", encoding="utf-8")
    print(summary(res))
    print(f"\n{HEADER}\n{row}\n\nwritten: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return 0


def summary(res: dict) -> str:
    em, od, co, tm = res["emergency"], res["ordinary"], res["carry_over"], res["timing"]
    lines = [
        f"{res['mode']}; rules {res['triage']['rules']}, model {res['triage']['model']}, "
        f"intents {res.get('intents', 'rules only')}",
        f"emergency recall {em['caught']}/{em['n']} = {100 * em['caught'] / em['n']:.1f}%; "
        f"answered with booking/identity {em['booking_or_identity']}",
        f"ordinary marked emergency {od['emergency']}/{od['n']}; caution {od['caution']}/{od['n']}; "
        f"requests kept {od['kept']}/{od['n']}; intent as labelled {od['intent_ok']}/{od['intent_n']}",
        f"carry-over: opened {co['opened']}/{co['opened_n']}, kept {co['kept']}/{co['kept_n']}, "
        f"released {co['released']}/{co['released_n']}, served after {co['resumed']}/{co['resumed_n']}",
        f"advice: {dict(em['fit'])}; never-pairs broken {len(em['never'])}",
        f"triage time per message: p50 {tm['p50_ms']:.3f} ms, p95 {tm['p95_ms']:.3f} ms "
        f"({tm['messages']} messages x {tm['passes']} passes, caches cleared each pass; {res['machine']})",
    ]
    if "served" in res:
        lines.append(
            f"served: model replies overridden {res['served']['overridden']:g}; ordinary replies still speaking of "
            f"emergencies {od['model_spoke']}"
        )
    for m in em["missed"]:
        lines.append(f"  missed [{m['category']}] ({m['tier']}): {m['text']}")
    for m in od["flagged"]:
        lines.append(f"  ordinary marked emergency: {m['text']}")
    for m in co["wrong"]:
        lines.append(f"  carry-over {m['id']} turn {m['turn']} expected {m['expect']}, got {m['action']}: {m['text']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
