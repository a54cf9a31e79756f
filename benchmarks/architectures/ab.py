"""Side-by-side timing on a shared machine: the engine and onnxruntime-genai (or several engine precisions)
alternating round by round, each round started once the cores are idle.

`lora-med bench` times one backend after another, so a burst of someone else's work can land on one row and
not the next (fp32 decoding at Qwen2.5-0.5B's shape reads 2 GB per token and triples under a memory-bound
neighbour). Here every round runs each backend once on the same prompt, after waiting (up to a minute) for the
CPU to be >= 85% idle, and the best and median rounds are reported. Random weights, speed only.

    .venv/bin/python benchmarks/architectures/ab.py qwen2.5-0.5b engine-cpu-fp32 genai-cpu-fp32 engine-cpu-int4 genai-cpu-int4
    .venv/bin/python benchmarks/architectures/ab.py dialogpt-medium engine-cpu-fp32 engine-cpu-int8 engine-cpu-int4

    .venv/bin/python benchmarks/architectures/ab.py qwen2.5-0.5b engine-cpu-fp32 genai-cpu-fp32 engine-cpu-int4 genai-cpu-int4 --concurrent 8 --system-tokens 128 --batch1 0 --rounds 2

Per backend: batch 1 (a 32-token prompt, 32 new tokens: total, prompt, per-step; --batch1 0 leaves it out) and,
with --concurrent N, N prompts arriving together with replies of 8..64 tokens, after --system-tokens shared ones
(engine: its stream, the shared start kept in its prefix cache; genai: every mode lora_med.bench.concurrent
times, the best counted). Writes ab.json and ab.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_med.bench import concurrent, genai
from lora_med.bench.shapes import build_shape, shape_facts
from lora_med.engine import GenerationSettings, load_engine
from lora_med.models import cpu_model


def idle_share(window: float = 0.5) -> float:
    def read():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return v[3] + v[4], sum(v)

    i0, t0 = read()
    time.sleep(window)
    i1, t1 = read()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(min_idle: float = 0.85, max_wait: float = 60.0) -> float:
    end, idle = time.time() + max_wait, 0.0
    while time.time() < end:
        idle = idle_share()
        if idle >= min_idle:
            break
    return idle


class Runner:
    """One backend: batch-1 replies and the concurrent workload, timed."""

    def __init__(self, name: str, folder: Path, threads: int, pad: int | None):
        self.name, self.kind = name, "genai" if name.startswith("genai-") else "engine"
        self.pad = pad
        self.model = genai.load(folder) if self.kind == "genai" else load_engine(folder, device="cpu", threads=threads)

    def reply(self, ids: list[int], n: int) -> None:
        if self.kind == "genai":
            genai.decode(self.model, ids, n)
        else:
            self.model.generate([ids], GenerationSettings(max_new_tokens=n, min_new_tokens=n))

    def batch1(self, ids: list[int], n: int) -> dict:
        t0 = time.perf_counter()
        self.reply(ids, 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.reply(ids, n)
        total = time.perf_counter() - t0
        return {"total_s": total, "first_token_s": first, "step_ms": 1000 * (total - first) / (n - 1)}

    def together(self, prompts: list[list[int]], n: int, new_tokens: int, system_tokens: int) -> dict:
        def timer(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return concurrent.measure(self.kind, self.model, timer, prompts, n, new_tokens, 1, self.pad, system_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape")
    ap.add_argument("backends", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=0)
    ap.add_argument("--system-tokens", type=int, default=0, help="the concurrent prompts' shared start")
    ap.add_argument("--batch1", type=int, default=1, help="0: the concurrent workload only")
    ap.add_argument("--work", default=None, help="where the graphs are built [default: a temporary folder]")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="lora-med-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, _, engines, info = build_shape(a.shape, work, "cpu", seed=0, backends=a.backends)
    folders = {f"engine-cpu-{e['precision']}": Path(e["dir"]) for e in engines}
    pads = {}
    for b in (x for x in a.backends if x.startswith("genai-")):
        built = genai.build(model_dir, work / b, b, genai.builder_python(None), a.threads)
        folders[b], pads[b] = work / b, built["pad_token_id"]
    runners = [Runner(b, folders[b], a.threads, pads.get(b)) for b in a.backends]
    facts = shape_facts(a.shape)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, facts["vocab_size"] - 1, 32).tolist()
    prompts = [rng.integers(0, facts["vocab_size"] - 1, n).tolist() for n in (16, 24, 32, 48, 64, 16, 24, 32)]
    for r in runners:  # warm-up: buffers and kernels
        r.reply(prompt, 4)
    rows: dict[str, dict] = {r.name: {"batch1": [], "together": [], "idle": []} for r in runners}
    load = [os.getloadavg()[0]]
    for i in range(a.rounds):
        for r in runners:
            rows[r.name]["idle"].append(round(wait_for_quiet(), 2))
            if a.batch1:
                rows[r.name]["batch1"].append(r.batch1(prompt, a.new_tokens))
            if a.concurrent and i < 2:  # two rounds of the (long) concurrent workload
                rows[r.name]["together"].append(r.together(prompts, a.concurrent, a.new_tokens, a.system_tokens))
        load.append(os.getloadavg()[0])
        print(f"round {i + 1}/{a.rounds} done, load {load[-1]:.2f}", flush=True)
    out = {"shape": info, "threads": a.threads, "new_tokens": a.new_tokens, "rounds": a.rounds, "load_1m": load}
    out["system_tokens"] = a.system_tokens
    out["backends"] = {}
    for name, acc in rows.items():
        res: dict = {
            "idle_before_rounds": acc["idle"],
            "weight_bytes": sum(f.stat().st_size for f in folders[name].glob("model.onnx*")),
        }
        if acc["batch1"]:
            tot = [x["total_s"] for x in acc["batch1"]]
            res.update(
                total_ms_best=1000 * min(tot),
                total_ms_median=1000 * statistics.median(tot),
                first_token_ms_best=1000 * min(x["first_token_s"] for x in acc["batch1"]),
                step_ms_best=min(x["step_ms"] for x in acc["batch1"]),
            )
        if acc["together"]:
            res["together"] = max(acc["together"], key=lambda x: x["tokens_per_s"])
        out["backends"][name] = res
    dst = Path(a.out)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "ab.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (dst / "ab.md").write_text(markdown(out, a.shape), encoding="utf-8")
    print((dst / "ab.md").read_text())


def markdown(r: dict, shape: str) -> str:
    lines = [
        f"# {shape} shape (random weights, speed only): alternating rounds",
        "",
        f"{os.cpu_count()}-core {cpu_model()}, no GPU; {r['threads']} intra-op threads; {r['rounds']} rounds, each backend "
        f"once per round after waiting for >= 85% idle cores; 1-min load average by round: "
        f"{', '.join(f'{x:.2f}' for x in r['load_1m'])}.",
        "",
    ]
    names = list(r["backends"])
    pairs = [
        (e, "genai-" + e[len("engine-") :])
        for e in names
        if e.startswith("engine-") and "genai-" + e[len("engine-") :] in names
    ]
    if any("total_ms_best" in x for x in r["backends"].values()):
        lines += [
            f"Batch 1, a 32-token prompt then {r['new_tokens']} greedy tokens:",
            "",
            "| backend | total ms (best) | total ms (median) | first token ms (best) | ms per step (best) | graph MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, x in r["backends"].items():
            lines.append(
                f"| {name} | {x['total_ms_best']:.0f} | {x['total_ms_median']:.0f} | {x['first_token_ms_best']:.0f} | "
                f"{x['step_ms_best']:.1f} | {x['weight_bytes'] / 1e6:.0f} |"
            )
        if pairs:
            lines += ["", "| engine / genai | total (best) | total (median) |", "|---|---:|---:|"]
            for e, g in pairs:
                a, b = r["backends"][e], r["backends"][g]
                lines.append(
                    f"| {e} / {g} | {a['total_ms_best'] / b['total_ms_best']:.2f}x | "
                    f"{a['total_ms_median'] / b['total_ms_median']:.2f}x |"
                )
    together = {n: x["together"] for n, x in r["backends"].items() if "together" in x}
    if together:
        c0 = next(iter(together.values()))
        lines += [
            "",
            f"{c0['prompts']} prompts arriving together ({c0['prompt_tokens']} prompt tokens"
            + (f", the first {c0['system_tokens']} shared by all" if c0.get("system_tokens") else "")
            + f", replies of {c0['reply_tokens']} tokens, {c0['useful_tokens']} useful), best of 2 rounds:",
            "",
            "| backend | mode | seconds | useful tokens/s |",
            "|---|---|---:|---:|",
        ]
        for n, c in together.items():
            for mode, v in c["modes"].items():
                lines.append(f"| {n} | {mode} | {v['s']:.2f} | {v['tokens_per_s']:.1f} |")
        for e, g in pairs:
            if e in together and g in together:
                ratios = ", ".join(
                    f"{together[e]['tokens_per_s'] / v['tokens_per_s']:.2f}x vs its {m}"
                    for m, v in together[g]["modes"].items()
                )
                lines.append(f"\n{e} / {g}: {ratios}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
