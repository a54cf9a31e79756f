"""The files of ``lora-med bench``: report.md and the plots, drawn from report.json's content.

Also the report's sections taken from the run cards (training cost, the fixed-prompt replies), the engine
rows set beside their peers, and the one-line wording of a gate check, which the Markdown and the command's
output share.
"""

from __future__ import annotations

from pathlib import Path

from ..cards import TrainCard

# Each engine row beside the peer it replaces, with the engine's target for the p50 ratio (None: shown, no target):
# on the CPU the engine against ORTModel + generate() (shipped model) and int8 against PyTorch eager
# (DialoGPT-medium shape); on a GPU against transformers' generate() in fp16, what the seed's app runs.
ENGINE_PEERS = (
    ("engine-cpu-fp32", "ort-cpu-fp32", 0.5),
    ("engine-cpu-int8", "ort-cpu-int8", None),
    ("engine-cpu-int8", "torch-eager", 0.35),
    ("engine-cuda-fp16", "torch-eager-fp16", 0.3),
    ("engine-cuda-fp16", "ort-cuda-fp16", None),
    # onnxruntime-genai's generator on its builder's graph of the same model: the engine at least as fast.
    ("engine-cpu-fp32", "genai-cpu-fp32", 1.0),
    ("engine-cpu-int4", "genai-cpu-int4", 1.0),
    ("engine-cuda-fp16", "genai-cuda-fp16", 1.0),
)
CONCURRENT_TARGET = 2.0  # engine useful tokens/s over genai's best mode, prompts arriving together


def concurrent_vs_genai(latency: list[dict]) -> list[dict]:
    """Each engine row's concurrent throughput over the genai row of the same device and precision (its best
    mode: a static batch, its Engine, or one request at a time)."""
    rows = {r["backend"]: r for r in latency if r.get("concurrent")}
    out = []
    for e, peer, _ in ENGINE_PEERS:
        if e in rows and peer in rows and peer.startswith("genai-"):
            a, b = rows[e]["concurrent"], rows[peer]["concurrent"]
            out.append(
                {
                    "engine": e,
                    "peer": peer,
                    "prompts": a["prompts"],
                    "engine_tokens_per_s": a["tokens_per_s"],
                    "peer_tokens_per_s": b["tokens_per_s"],
                    "peer_mode": b["best_mode"],
                    "ratio": a["tokens_per_s"] / b["tokens_per_s"],
                    "ratio_by_peer_mode": {m: a["tokens_per_s"] / v["tokens_per_s"] for m, v in b["modes"].items()},
                    "target": CONCURRENT_TARGET,
                }
            )
    return out


def engine_vs_peers(latency: list[dict]) -> list[dict]:
    """Each engine row beside its peers measured in the same run: the ratio of their p50 reply times."""
    p50 = {r["backend"]: r["reply_s"]["p50"] for r in latency}
    return [
        {
            "engine": e,
            "peer": peer,
            "engine_p50_s": p50[e],
            "peer_p50_s": p50[peer],
            "ratio": p50[e] / p50[peer],
            "target": target,
        }
        for e, peer, target in ENGINE_PEERS
        if e in p50 and peer in p50
    ]


# --------------------------------------------------------------------------- from the run cards


def training(cards: dict[str, TrainCard]) -> dict | None:
    """Training cost of each run, from its card (paired runs: same data, seed and budget)."""
    if not cards:
        return None
    out = {}
    for flag, card in cards.items():
        m, c = card.metrics, card.raw  # figures as the run recorded them
        out[card.method] = {
            "run": flag,
            "steps": m.get("steps"),
            "tokens_seen": m.get("tokens_seen"),
            "tokens_per_s": m.get("tokens_per_s"),
            "peak_memory_gb": m.get("peak_memory_gb"),
            "peak_memory_kind": m.get("peak_memory_kind"),
            "train_s": c.get("timings", {}).get("train_s"),
            "trainable_params": c.get("parameters", {}).get("trainable"),
            "planned_peak_gb": (c.get("plan") or {}).get("total_gb"),
            "device": c.get("device", {}).get("device"),
        }
    return out


def replies(cards: dict[str, TrainCard]) -> list[dict] | None:
    """The seed guide's base vs fine-tuned replies for the fixed Spanish prompts, from the run cards."""
    by_method = {c.method: c.raw.get("comparison") or [] for c in cards.values()}
    rows = next((r for r in by_method.values() if r), None)
    if not rows:
        return None
    return [
        {
            "prompt": row["prompt"],
            "base": row["base"],
            **{m: (r[i]["fine_tuned"] if i < len(r) else None) for m, r in by_method.items()},
        }
        for i, row in enumerate(rows)
    ]


def gate_line(c: dict) -> str:
    """One gate check in words: passed, or FAILED and by how much (the report, the output and GateError)."""
    fmt = lambda x: f"{x:.4g}"
    if c["passed"]:
        return f"passed {c['gate']}: {c['what']} {fmt(c['value'])}{c['unit']} {c['op']} {fmt(c['limit'])}{c['unit']}"
    return (
        f"FAILED {c['gate']}: {c['what']} {fmt(c['value'])}{c['unit']}, limit {c['op']} {fmt(c['limit'])}{c['unit']} "
        f"(off by {fmt(abs(c['by']))}{c['unit']})"
    )


# --------------------------------------------------------------------------- report files


def markdown(r: dict) -> str:
    """report.md: the tables of report.json, labelled speed-only where the weights are random."""
    label = f" ({r['label']})" if r["label"] else ""
    m, s = r["machine"], r["settings"]
    lines = [f"# lora-med bench: {r['name']}{label}", ""]
    if r["label"]:
        lines += [
            f"**{r['label'].capitalize()}**: randomly initialised weights of the model's exact shape; "
            "latency and memory are real, no quality figure is.",
            "",
        ]
    lines += [
        f"- Machine: {m['cpu']} ({m['cores']} cores, {r['inputs']['threads']} threads used)"
        + (
            f"; GPU {m.get('gpu')} ({m.get('vram_gb')} GB), driver {m.get('driver')}, CUDA {m.get('cuda')}"
            if m.get("gpu")
            else "; no GPU"
        ),
        f"- Load average (1 min) at start / end: {m.get('load_average_1m_start')} / "
        f"{m.get('load_average_1m_end')} on {m['cores']} cores",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- Prompts: {r['inputs']['prompts']}",
        f"- Settings: {s['new_tokens']} new tokens (forced), {s['repeats']} repeats, warm-up {s['warmup']}, greedy",
        "",
    ]
    if r["perplexity"]:
        lines += [
            "## Held-out perplexity (paired: same conversations, format and max length)",
            "",
            "| model | assistant ppl | all-token ppl | assistant tokens |",
            "|---|---:|---:|---:|",
        ]
        for k, v in r["perplexity"].items():
            lines.append(f"| {k} | {v['assistant_ppl']:.3f} | {v['all_ppl']:.3f} | {v['assistant_tokens']} |")
        lines.append("")
    lines += [
        f"## Reply latency{label}",
        "",
        "| backend | device | precision | p50 ms | p95 ms | p99 ms | TTFT p50 ms | decode ms/token | tokens/s | "
        "peak mem GB | speedup vs torch-eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["latency"]:
        rs, sp = x["reply_s"], x["speedup_vs_torch_eager"]
        lines.append(
            f"| {x['backend']} | {x['device']} | {x['precision']} | {rs['p50'] * 1e3:.1f} | {rs['p95'] * 1e3:.1f} | "
            f"{rs['p99'] * 1e3:.1f} | {x['ttft_s']['p50'] * 1e3:.1f} | {x['decode_ms_per_token']:.2f} | "
            f"{x['tokens_per_s']:.1f} | {x['peak_memory_gb']:.3f} | {f'{sp:.2f}x' if sp else '-'} |"
        )
    for s_ in r.get("skipped_backends") or []:
        lines.append(f"| {s_['backend']} | not measured: {s_['reason']} |" + " |" * 9)
    if r["latency"]:
        lines += [
            "",
            f"Peak memory: {r['latency'][0]['peak_memory_kind']}. engine-* rows: lora-med's engine on the "
            "decode graph (what `lora-med serve` runs); the others through transformers' generate().",
        ]
    if r.get("engine_vs_peers"):
        lines += [
            "",
            "## The engine beside its peers (same run)",
            "",
            "Targets: engine-cpu-fp32 <= 0.5x ort-cpu-fp32 (shipped model, 2 CPU cores); "
            "engine-cpu-int8 <= 0.35x torch-eager (DialoGPT-medium shape); engine-cuda-fp16 <= 0.3x "
            "torch-eager-fp16 (GPU); every engine row <= 1.0x onnxruntime-genai's generator (genai-*) at the "
            "same precision.",
            "",
            "| engine | p50 ms | peer | p50 ms | ratio | target |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for c in r["engine_vs_peers"]:
            target = f"<= {c['target']}x" if c["target"] else "-"
            lines.append(
                f"| {c['engine']} | {c['engine_p50_s'] * 1e3:.1f} | {c['peer']} | {c['peer_p50_s'] * 1e3:.1f} | "
                f"**{c['ratio']:.2f}x** | {target} |"
            )
    together = [x for x in r["latency"] if x.get("concurrent")]
    if together:
        c0 = together[0]["concurrent"]
        lines += [
            "",
            f"## {c0['prompts']} prompts arriving together (useful tokens/s)",
            "",
            f"Prompts of {c0['prompt_tokens']} tokens"
            + (
                f", each starting with the same {c0['system_tokens']} (a system prompt)"
                if c0.get("system_tokens")
                else ""
            )
            + f", replies of {c0['reply_tokens']} tokens ({c0['useful_tokens']} useful tokens): the engine retires "
            "each row as its reply ends (continuous batching)"
            + (" and keeps the shared start in its prefix cache" if c0.get("system_tokens") else "")
            + "; onnxruntime-genai runs them as one static batch (padded, until the longest reply ends), through "
            "its Engine (static on the CPU) or one at a time"
            + (" (also rewinding one generator to the shared start)" if c0.get("system_tokens") else "")
            + ", and its best mode counts.",
            "",
            "| backend | mode | seconds | useful tokens/s |",
            "|---|---|---:|---:|",
        ]
        for x in together:
            for mode, v in x["concurrent"]["modes"].items():
                best = " (best)" if mode == x["concurrent"]["best_mode"] and len(x["concurrent"]["modes"]) > 1 else ""
                lines.append(f"| {x['backend']} | {mode}{best} | {v['s']:.2f} | {v['tokens_per_s']:.1f} |")
        for c in r.get("concurrent_vs_genai") or []:
            modes = ", ".join(f"{v:.2f}x vs its {m}" for m, v in c["ratio_by_peer_mode"].items())
            lines.append(
                f"\n{c['engine']} / {c['peer']}: **{c['ratio']:.2f}x** the useful tokens/s of genai's best mode "
                f"({modes}; target >= {c['target']}x)"
            )
    floors = [x for x in r["latency"] if x.get("bandwidth_floor")]
    if floors:
        lines += [
            "",
            "## GPU rows: ms/token and the bandwidth floor",
            "",
            "Floor: weight bytes / the card's memory bandwidth per token (each decoded token reads every weight "
            "once), times the new tokens.",
            "",
            "| backend | decode ms/token | weights GB | card | GB/s | floor ms/token | floor ms/reply | p50 / floor |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for x in floors:
            f = x["bandwidth_floor"]
            if "ms_per_token" in f:
                lines.append(
                    f"| {x['backend']} | {x['decode_ms_per_token']:.2f} | {f['weight_gb']:.3f} | {f['card']} | "
                    f"{f['bandwidth_gb_s']:.0f} | {f['ms_per_token']:.3f} | {f['reply_ms']:.1f} | "
                    f"{f['x_floor']:.1f}x |"
                )
            else:
                lines.append(
                    f"| {x['backend']} | {x['decode_ms_per_token']:.2f} | - | {f['card']} | {f['note']} | | | |"
                )
    batched = [x for x in r["latency"] if x.get("throughput")]
    if batched:
        sizes = list(batched[0]["throughput"])
        lines += [
            "",
            "## Engine throughput by batch (the same prompt, every row forced to the new tokens)",
            "",
            "| backend | "
            + " | ".join(f"batch {b} tok/s" for b in sizes)
            + " | "
            + " | ".join(f"batch {b} ms" for b in sizes)
            + " |",
            "|---|" + "---:|" * (2 * len(sizes)),
        ]
        for x in batched:
            t = x["throughput"]
            lines.append(
                f"| {x['backend']} | "
                + " | ".join(f"{t[b]['tokens_per_s']:.1f}" for b in sizes)
                + " | "
                + " | ".join(f"{t[b]['reply_s'] * 1e3:.1f}" for b in sizes)
                + " |"
            )
    scaled = [x for x in r["latency"] if x["scaling"]]
    if scaled:
        sc0 = scaled[0]["scaling"]
        lines += [
            "",
            f"## Scaling{label}",
            "",
            f"Reply time (ms, median) vs new tokens, {sc0['prompt_tokens']}-token prompt:",
            "",
            "| backend | " + " | ".join(str(n) for n in sc0["new_tokens_s"]) + " | ms/new token | linear R² |",
            "|---|" + "---:|" * (len(sc0["new_tokens_s"]) + 2),
        ]
        for x in scaled:
            sc = x["scaling"]
            lines.append(
                f"| {x['backend']} | "
                + " | ".join(f"{v * 1e3:.1f}" for v in sc["new_tokens_s"].values())
                + f" | {sc['ms_per_new_token']:.2f} | {sc['linear_r2']:.4f} |"
            )
        lines += [
            "",
            f"Reply time (ms, median) vs context tokens, {sc0['context_new_tokens']} new tokens:",
            "",
            "| backend | " + " | ".join(str(c) for c in sc0["context_s"]) + " |",
            "|---|" + "---:|" * len(sc0["context_s"]),
        ]
        for x in scaled:
            lines.append(
                f"| {x['backend']} | " + " | ".join(f"{v * 1e3:.1f}" for v in x["scaling"]["context_s"].values()) + " |"
            )
    if r["training"]:
        lines += [
            "",
            "## Training (from the run cards)",
            "",
            "| method | steps | tokens seen | tokens/s | peak memory GB | train s | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, v in r["training"].items():
            f = lambda x, d=1: "-" if x is None else (f"{x:,.{d}f}" if isinstance(x, float) else f"{x:,}")
            lines.append(
                f"| {k} | {f(v['steps'])} | {f(v['tokens_seen'])} | {f(v['tokens_per_s'])} | "
                f"{f(v['peak_memory_gb'], 3)} | {f(v['train_s'])} | {f(v['trainable_params'])} |"
            )
    if r.get("replies"):
        methods = [k for k in r["replies"][0] if k not in ("prompt", "base")]
        lines += ["", "## Replies (greedy, the fixed Spanish prompts, from the run cards)", ""]
        for row in r["replies"]:
            lines += [f"**USUARIO:** {row['prompt']}", "", f"- base: {row['base']}"]
            lines += [f"- {m}: {row[m]}" for m in methods] + [""]
    lines += ["", "## Gate", ""]
    lines += [f"- {gate_line(c)}" for c in r["gate"]["checks"]] or ["- no gate applied"]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _short(path: str | None) -> str:
    return Path(path).name if path else ""


def _backend_label(x: dict) -> str:
    """A backend and what it ran: "ort-cpu-fp32\n(export-lora-cpu-fp32)"."""
    src = x.get("source", "")
    run = _short(src.split(" (")[0]) if src and not src.startswith("scratch") else ""
    return f"{x['backend']}\n({run})" if run and run != x["backend"] else x["backend"]


def _model_label(key: str, v: dict) -> str:
    """A perplexity row and the run or export it scored: "lora\n(clinic-lora)"."""
    if key.startswith("onnx:"):
        _, folder, precision = key.split(":")
        return f"ONNX {precision}\n({folder})"
    return f"{key}\n({_short(v.get('source'))})" if v.get("source") else key


def plots(r: dict, out: Path) -> None:
    """latency.png, perplexity.png and scaling.png in ``out`` (each only when its figures exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = f"\n({r['label']})" if r["label"] else ""
    if r["latency"]:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        names = [_backend_label(x) for x in r["latency"]]
        p50 = [x["reply_s"]["p50"] * 1e3 for x in r["latency"]]
        p95 = [x["reply_s"]["p95"] * 1e3 for x in r["latency"]]
        bars = ax.bar(names, p50, label="p50")
        ax.bar_label(bars, labels=[f"{v:.1f} ms" for v in p50], fontsize=8, padding=2)
        ax.errorbar(
            names,
            p50,
            yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95)]],
            fmt="none",
            ecolor="k",
            capsize=4,
            label="to p95",
        )
        ax.set_ylabel(f"reply time, ms ({r['settings']['new_tokens']} new tokens)")
        ax.set_title(f"Reply latency per backend: {r['name']}{suffix}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(y=0.15)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
    if r["perplexity"]:
        # A linear axis with the values on the bars: a log axis made 11.34 and 12.00 look the same.
        fig, ax = plt.subplots(figsize=(8, 4.2))
        labels = [_model_label(k, v) for k, v in r["perplexity"].items()]
        xs = range(len(labels))
        for shift, key, what in ((-0.2, "assistant_ppl", "assistant tokens"), (0.2, "all_ppl", "all tokens")):
            vals = [v[key] for v in r["perplexity"].values()]
            bars = ax.bar([x + shift for x in xs], vals, 0.4, label=what)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=7, padding=2, rotation=90)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("held-out perplexity (lower is better)")
        ax.set_title(f"Held-out perplexity: {r['name']}", fontsize=9)
        ax.margins(y=0.2)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=100)
        plt.close(fig)
    scaled = [x for x in r["latency"] if x["scaling"]]
    if scaled:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
        for x in scaled:
            sc = x["scaling"]
            a1.plot(
                [int(k) for k in sc["new_tokens_s"]],
                [v * 1e3 for v in sc["new_tokens_s"].values()],
                "o-",
                label=x["backend"],
            )
            a2.plot(
                [int(k) for k in sc["context_s"]], [v * 1e3 for v in sc["context_s"].values()], "o-", label=x["backend"]
            )
        a1.set_xlabel("new tokens")
        a2.set_xlabel(f"context tokens ({scaled[0]['scaling']['context_new_tokens']} new)")
        a2.set_xscale("log", base=2)
        for a in (a1, a2):
            a.set_ylabel("reply time, ms")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"Scaling: {r['name']}{suffix}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=100)
        plt.close(fig)
