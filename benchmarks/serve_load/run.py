"""Load test for ``lora-med serve``: 1, 8 and 32 concurrent clients against a live server on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load/run.py --model exports/clinic-lora-cpu-fp32

starts ``lora-med serve MODEL`` on a free loopback port (a fresh SQLite file, no rate limit), warms it
up, then for each concurrency level runs that many clients. ``--workload clinic`` (the default): each client
is a stream of patients, each holding one held-out conversation (data/medical_conversations_eval.json, its
user turns in order, a new user_id per conversation); ``--workload long``: each client is one patient sending
every held-out user turn in one conversation that grows to hundreds of turns. A client sends the next message
as soon as the previous reply arrives. A level stops after ``--requests`` requests or ``--duration-s`` seconds,
whichever comes first. Only user turns the triage does not answer as an emergency are sent, so every request
reaches the model.

Reported per level: p50/p95/p99/max latency, throughput (answered requests per second), errors by kind
(HTTP status or transport error), the engine's mean batch size, the server process's CPU (cores busy)
and peak/mean RSS. After the run the server's database is checked: one stored reply per 200 response
("nothing lost"). The load generator runs on the same machine and takes CPU from the server: the
report says how much. Results: ``--out`` (results.json + results.md).

Targets: 0 accepted requests lost or unanswered; throughput with 8 clients >= 3x one client's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lora_med.data import load_conversations, percentile
from lora_med.models import device_info, library_versions
from lora_med.serve.triage import Triage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import burst, openai_level

DEFAULT_MODEL = "exports/clinic-lora-cpu-fp32"
MAX_REQUESTS, MAX_DURATION_S, MAX_CLIENTS = 20_000, 900, 256  # hard bounds: this is a benchmark, not a flood


WORKLOADS = {
    "clinic": "each client a stream of patients: one held-out conversation per patient (its user turns in order, "
    "a new user_id each), as the clinic sees them",
    "long": "each client one patient sending every held-out user turn in one conversation that grows to hundreds "
    "of turns (a stress test of the long-conversation cut and the prefix cache)",
    "openai-stream": "as clinic, through the OpenAI-compatible API streamed (POST /v1/chat/completions, stream: "
    "true; the client keeps the conversation): time to first token and to the last",
}


NAMES = [
    "María",
    "Juan",
    "Rosa",
    "Carlos",
    "Ana",
    "Luis",
    "Elena",
    "Jorge",
    "Lucía",
    "Pedro",
    "Carmen",
    "Miguel",
    "Sofía",
    "Diego",
    "Teresa",
    "Andrés",
    "Patricia",
    "Fernando",
    "Julia",
    "Raúl",
]
SURNAMES = [
    "Quispe",
    "Mamani",
    "Flores",
    "Gutiérrez",
    "Vargas",
    "Rojas",
    "Choque",
    "Condori",
    "Rodríguez",
    "López",
    "Torrez",
    "Cruz",
    "Gonzales",
    "Medina",
    "Pérez",
    "Aguilar",
    "Villca",
    "Limachi",
    "Sánchez",
    "Ramos",
]


def conversations(workload: str) -> list[list[str]]:
    """The user turns that reach the model (the triage's emergencies left out), grouped per patient conversation:
    the held-out conversations ("clinic"), or all their turns in one list ("long")."""
    triage = Triage(REPO / "configs" / "triage.yaml")
    convs = load_conversations(REPO / "data" / "medical_conversations_eval.json").conversations
    per = [
        [m.content for m in c.messages if m.role == "user" and triage.assess(m.content).tier != "emergency"]
        for c in convs
    ]
    per = [turns for turns in per if turns]
    if workload == "long":
        return [list(dict.fromkeys(t for turns in per for t in turns))]
    return per


def shaped_export(export: Path, shape: str, precision: str, work: Path) -> Path:
    """A copy of ``export`` (its manifest and tokenizer) whose engine/ is a decode graph of a model of ``shape``
    with random weights: speed only. Its replies are random tokens, most outside the tokenizer's vocabulary
    (decoded to little or nothing; the server then sends the intent's fallback), and rarely EOS: every reply
    runs to max_new_tokens, the engine's worst case."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_med.bench.shapes import SHAPES
    from lora_med.export.decode_graph import build_decode_graph

    out = work / f"{shape}-random"
    (out / "merged").mkdir(parents=True)
    for f in (export / "merged").iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy2(f, out / "merged" / f.name)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**SHAPES[shape])).save_pretrained(work / "weights", safe_serialization=True)
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    build_decode_graph(
        work / "weights", out / "engine", precision=precision, capacity=manifest["source"].get("max_length") or 256
    )
    manifest["files"] = {}  # not a merge-export's files: nothing to check sizes against
    manifest["shape"] = {"name": shape, "weights": "random (speed only)"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


class ServerProcess:
    """``lora-med serve`` in a subprocess, on 127.0.0.1 and a free port (read from its "ready" log line)."""

    def __init__(self, model: str, work: Path, settings: dict[str, str]):
        self.db, self.log = work / "load.db", work / "server.log"
        args = [
            sys.executable,
            "-m",
            "lora_med",
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(self.db),
            "--log-file",
            str(self.log),
            "--rate-limit",
            "0",
        ]
        for k, v in settings.items():
            args += [f"--{k.replace('_', '-')}", v]
        self.stderr = open(work / "server.stderr", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        self.url = ""

    def wait_ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists():
                for line in self.log.read_text(encoding="utf-8").splitlines():
                    event = json.loads(line)
                    if event.get("event") == "ready":
                        self.url = f"http://127.0.0.1:{event['port']}"
                        return self.url
            if self.proc.poll() is not None:
                sys.exit(
                    f"error: the server exited ({self.proc.returncode}):\n"
                    + Path(self.stderr.name).read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)
        self.stop()
        sys.exit("error: the server was not ready within 300 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


class Sampler:
    """CPU seconds and RSS of one process (the server), sampled every 0.2 s on a thread."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.rss: list[int] = []
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self.cpu0, self.t0 = sum(self.proc.cpu_times()[:2]), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss.append(self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self.wall_s = time.perf_counter() - self.t0


async def level(url: str, clients: int, max_requests: int, max_s: float, convs: list[list[str]], tag: str) -> dict:
    """Run ``clients`` concurrent clients until ``max_requests`` are sent or ``max_s`` passes. Each client
    walks the conversations from its own starting point (one patient, a new user_id, per conversation) and
    sends a patient's next message as soon as the previous reply arrives."""
    results: list[dict] = []
    sent = 0
    deadline = time.perf_counter() + max_s

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        for n in itertools.count():
            user = f"+591{tag}{i:03d}{n:05d}"  # 12 digits: phone-like
            turns = list(convs[(i + n) % len(convs)])
            if len(convs) == 1:  # "long": each patient starts at a different message
                turns = turns[i % len(turns) :] + turns[: i % len(turns)]
            # The held-out set has 56 conversations, replayed by many patients here; the engine's prefix cache
            # would reuse one patient's identical conversation for the next. Real patients differ: each says who
            # they are first, so only a patient's own earlier turns are reused.
            turns[0] = (
                f"Hola, soy {NAMES[(i * 7 + n) % len(NAMES)]} {SURNAMES[(i + n * 5) % len(SURNAMES)]}. " + turns[0]
            )
            for text in turns:
                if sent >= max_requests or time.perf_counter() >= deadline:
                    return
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/chat/", json={"user_id": user, "message": text})
                    results.append(
                        {
                            "ms": 1000 * (time.perf_counter() - t),
                            "kind": str(r.status_code),
                            "batch": float(r.headers.get("X-Batch-Size", 0) or 0),
                        }
                    )
                except httpx.HTTPError as e:
                    results.append({"ms": 1000 * (time.perf_counter() - t), "kind": type(e).__name__, "batch": 0})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["kind"] == "200"]
    lat = [r["ms"] for r in ok]
    return {
        "clients": clients,
        "requests": len(results),
        "answered_200": len(ok),
        "duration_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2) if wall else 0.0,
        "p50_ms": round(percentile(lat, 50), 1) if lat else None,
        "p95_ms": round(percentile(lat, 95), 1) if lat else None,
        "p99_ms": round(percentile(lat, 99), 1) if lat else None,
        "max_ms": round(max(lat), 1) if lat else None,
        "errors": dict(Counter(r["kind"] for r in results if r["kind"] != "200")),
        "mean_batch": round(sum(r["batch"] for r in ok) / len(ok), 2) if ok else None,
    }


def check_store(db: Path) -> dict:
    """Replies stored vs user turns stored (a 200 response is sent only after its reply is committed)."""
    con = sqlite3.connect(db)
    try:
        users = con.execute("SELECT COUNT(*) FROM turns WHERE role = 'user'").fetchone()[0]
        replies = con.execute("SELECT COUNT(*) FROM turns WHERE role = 'assistant'").fetchone()[0]
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    return {"user_turns": users, "replies": replies, "integrity": integrity}


def prompt_tokens(url: str) -> tuple[float, float]:
    """(prompt tokens, of which taken from the engine's prefix cache) so far, from the server's /metrics."""
    found = {"lora_med_prompt_tokens_total": 0.0, "lora_med_prompt_tokens_reused_total": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found["lora_med_prompt_tokens_total"], found["lora_med_prompt_tokens_reused_total"]


def markdown(report: dict) -> str:
    m, w = report["machine"], report["workload"]
    lines = [
        f"# lora-med serve load test: {report['model']}",
        "",
        f"{report['health'].get('engine')} on {report['health'].get('device')}, {m.get('cpu')}, "
        f"{m.get('cores')} cores; load generator on the same machine. {report['when']}.",
        "",
        f"Server settings: {json.dumps(report['server_settings'])}.",
        "",
        f"Workload `{w['name']}`: {w['what']}; {w['conversations']} conversation(s), {w['messages']} held-out "
        "user turns that reach the model.",
        "",
        "| clients | requests | answered | throughput (req/s) | p50 ms | p95 ms | p99 ms | max ms | mean batch "
        "| prompt tokens from the prefix cache | server CPU (cores) | generator CPU (cores) | server RSS peak MB "
        "| errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    if report["workload"]["name"] == "openai-stream":
        lines[-2] = lines[-2].replace("| mean batch ", "| first token p50 ms | first token p95 ms ")
        lines[-1] = lines[-1].replace(
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", "| ---: " * 10 + "|", 1
        )
    for r in report["levels"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        if report["workload"]["name"] == "openai-stream":
            r = {**r, "mean_batch": f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']}"}
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['answered_200']} | {r['throughput_rps']} "
            f"| {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['mean_batch']} "
            f"| {r.get('prompt_reused_pct')}% | {r['server_cpu_cores']} | {r.get('generator_cpu_cores')} "
            f"| {r['server_rss_peak_mb']} | {errors} |"
        )
    b = report.get("burst")
    if b:
        lines += [
            "",
            f"Burst: {b['clients']} clients sending one /chat/ message each at once ({b['emergencies']} emergencies), "
            f"request_timeout_s {report['health'].get('request_timeout_s')}: {b['accepted']} accepted, "
            f"{b['accepted_answered_200']} of them answered; {b['refused_503']} refused with 503, "
            f"{b['refused_past_the_bound']} of those past the expected-wait bound; emergencies refused: "
            f"{b['emergencies_refused']}; answered p50 {b['p50_ms']} ms, p95 {b['p95_ms']} ms, max {b['max_ms']} ms "
            f"(all in {b['duration_s']} s). Outcomes: {b['outcomes']}.",
        ]
    t = report["targets"]
    lines += [
        "",
        f"- Lost or unanswered: {t['lost']} (target 0); a stored reply for every 200: "
        f"{t['replies_stored_for_every_200']}; store: {report['store']}.",
        f"- Throughput with 8 clients / 1 client: {t['scaling_8_vs_1']}x (target >= 3x): "
        f"{'met' if t['scaling_met'] else 'not met'}."
        if t["scaling_8_vs_1"] is not None
        else "- Throughput with 8 clients / 1 client: not measured (needs levels 1 and 8).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"what to serve (default {DEFAULT_MODEL})")
    ap.add_argument("--url", help="use a server already running on 127.0.0.1 instead of starting one")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument(
        "--workload",
        default="clinic",
        choices=sorted(WORKLOADS),
        help="; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()),
    )
    ap.add_argument("--requests", type=int, default=300, help="requests per level at most")
    ap.add_argument("--duration-s", type=float, default=120, help="seconds per level at most")
    ap.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting (e.g. max_batch=16); repeatable",
    )
    ap.add_argument(
        "--shape",
        choices=("dialogpt-medium",),
        help="serve a decode graph of this shape with random weights (speed only) instead of --model's; "
        "--model gives the tokenizer and the prompt budget",
    )
    ap.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="--shape's graph (default int8)")
    ap.add_argument(
        "--burst",
        type=int,
        default=0,
        help="after the levels, N clients sending one /chat/ message each at once (every tenth an emergency)",
    )
    ap.add_argument("--out", help="results folder (default benchmarks/results/serve-load-<model>-<device>-<workload>)")
    a = ap.parse_args(argv)

    levels = [int(c) for c in a.clients.split(",") if c.strip()]
    problems = []
    if not levels or not all(1 <= c <= MAX_CLIENTS for c in levels):
        problems.append(f"--clients {a.clients}: each level in 1..{MAX_CLIENTS}")
    if not 0 <= a.burst <= MAX_CLIENTS:
        problems.append(f"--burst {a.burst}: must be in 0..{MAX_CLIENTS}")
    if not 1 <= a.requests <= MAX_REQUESTS:
        problems.append(f"--requests {a.requests}: must be in 1..{MAX_REQUESTS}")
    if not 0 < a.duration_s <= MAX_DURATION_S:
        problems.append(f"--duration-s {a.duration_s}: must be in (0, {MAX_DURATION_S}]")
    if a.url and urlparse(a.url).hostname not in ("127.0.0.1", "localhost"):
        problems.append(f"--url {a.url}: this load generator only targets 127.0.0.1")
    settings = dict(s.split("=", 1) for s in a.set if "=" in s)
    if len(settings) != len(a.set):
        problems.append("--set: use KEY=VALUE, e.g. --set max_batch=16")
    if not a.url and not Path(a.model).is_dir() and not (REPO / a.model).is_dir():
        problems.append(
            f"--model {a.model}: no such folder; make the shipped export with `lora-med train --config "
            "configs/default.yaml && lora-med merge-export adapters/clinic-lora`, or pass a model folder "
            "(e.g. models/gpt2-es-tiny)"
        )
    if a.shape and (
        a.url or not (Path(a.model) / "manifest.json").is_file() and not (REPO / a.model / "manifest.json").is_file()
    ):
        problems.append(
            f"--shape {a.shape}: needs --model to be a merge-export (its tokenizer and prompt budget), and no --url"
        )
    if problems:
        print("error: " + "\n  - ".join(["invalid arguments", *problems]), file=sys.stderr)
        return 2

    convs = conversations(a.workload)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    server = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        model = a.model if Path(a.model).is_dir() else str(REPO / a.model)
        if a.shape:
            print(f"building a {a.shape}-shape {a.precision} decode graph (random weights, speed only)", flush=True)
            model = str(shaped_export(Path(model), a.shape, a.precision, work))
        server = ServerProcess(model, work, settings)
        url = server.wait_ready()
    try:
        health = httpx.get(f"{url}/health", timeout=30).json()
        warm = asyncio.run(level(url, 1, a.warmup, 60, convs, "0"))  # first calls allocate and warm caches
        streamed = a.workload == "openai-stream"
        model_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] if streamed else ""

        def run_level(c: int, tag: str) -> dict:
            if streamed:
                return asyncio.run(openai_level(url, model_id, c, a.requests, a.duration_s, convs, tag))
            return asyncio.run(level(url, c, a.requests, a.duration_s, convs, tag))

        results = []
        for i, c in enumerate(levels):
            before = prompt_tokens(url)
            me, t_me = psutil.Process(), time.perf_counter()
            cpu_me = sum(me.cpu_times()[:2])
            if server:
                with Sampler(server.proc.pid) as sampler:
                    r = run_level(c, str(i + 1))
                rss = sampler.rss or [0]
                r["server_cpu_cores"] = round(sampler.cpu_s / sampler.wall_s, 2)
                r["server_rss_peak_mb"] = round(max(rss) / 2**20, 1)
                r["server_rss_mean_mb"] = round(sum(rss) / len(rss) / 2**20, 1)
            else:  # a server started elsewhere: its process is not ours to sample
                r = run_level(c, str(i + 1))
                r["server_cpu_cores"] = r["server_rss_peak_mb"] = r["server_rss_mean_mb"] = None
            # The generator shares the machine: what it took is what the server could not have.
            r["generator_cpu_cores"] = round((sum(me.cpu_times()[:2]) - cpu_me) / (time.perf_counter() - t_me), 2)
            total, reused = (b - a for a, b in zip(before, prompt_tokens(url)))
            r["prompt_tokens"], r["prompt_tokens_reused"] = int(total), int(reused)
            r["prompt_reused_pct"] = round(100 * reused / total, 1) if total else None
            ttft = f", first token p50 {r['ttft_p50_ms']} ms p95 {r['ttft_p95_ms']} ms" if streamed else ""
            print(
                f"{c:3d} clients: {r['answered_200']}/{r['requests']} answered, {r['throughput_rps']} req/s, "
                f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms{ttft}, errors {r['errors'] or 'none'}",
                flush=True,
            )
            results.append(r)
        bursts = asyncio.run(burst(url, a.burst, convs)) if a.burst else None
        if bursts:
            print(f"burst of {a.burst}: {json.dumps({k: v for k, v in bursts.items() if k != 'outcomes'})}", flush=True)
    finally:
        if server:
            server.stop()
    store = check_store(server.db) if server else None
    chat_levels = [] if streamed else results  # /v1 is stateless: only /chat/ stores turns
    answered = (
        sum(r["answered_200"] for r in chat_levels)
        + warm["answered_200"]
        + (bursts or {}).get("accepted_answered_200", 0)
    )
    lost = sum(v for r in results for k, v in r["errors"].items() if not k.isdigit())  # no HTTP response at all
    by = {r["clients"]: r["throughput_rps"] for r in results}
    scaling = round(by[8] / by[1], 2) if by.get(1) and 8 in by else None
    report = {
        "model": (a.model if not a.url else a.url)
        + (f" at {a.shape} shape, {a.precision}, random weights (speed only)" if a.shape else ""),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "health": health,
        "server_settings": {"rate_limit": "0", **settings},
        "workload": {
            "name": a.workload,
            "what": WORKLOADS[a.workload],
            "conversations": len(convs),
            "messages": sum(map(len, convs)),
        },
        "limits": {"requests_per_level": a.requests, "duration_s_per_level": a.duration_s},
        "levels": results,
        "burst": bursts,
        "store": store,
        "targets": {
            "lost": lost,
            "scaling_8_vs_1": scaling,
            "scaling_met": bool(scaling and scaling >= 3),
            "replies_stored_for_every_200": (store["replies"] == answered) if store else None,
        },
        "machine": {**device_info("cpu"), "load_avg": os.getloadavg()},
        "versions": library_versions(),
    }
    out = (
        Path(a.out)
        if a.out
        else REPO
        / "benchmarks"
        / "results"
        / (
            f"serve-load-{a.shape + '-shape' if a.shape else Path(a.model.rstrip('/')).name}-"
            f"{health.get('device', 'cpu')}-{a.workload}"
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")
    print(
        f"lost/unanswered: {lost}; 8 vs 1 client throughput: {scaling}x; store: {store}\nwrote {out}/results.json, "
        f"{out}/results.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
