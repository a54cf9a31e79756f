"""The ``lora-med`` command line: every command in one place. Each builds its config (``config.py``: YAML,
then flags on top) and calls the one function Python users call too.

Heavy libraries (torch, transformers, PEFT) load only inside a command, so ``--help``, ``--version`` and
``data check`` start fast. User mistakes surface as ``LoraMedError``: printed as ``error: ...`` with
exit code 2, no traceback.
"""

from __future__ import annotations

import _thread
import errno
import json
import signal
import sys
import threading

import click

from . import __version__, settings
from . import data as data_mod
from .config import (
    DEFAULT_BASE,
    DEFAULT_DATA,
    DEFAULT_EVAL,
    BenchConfig,
    ExportConfig,
    ServeConfig,
    TrainConfig,
    shipped,
)
from .errors import LoraMedError

CONFIG = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (keys = the option names); flags override it.",
)


class _Group(click.Group):
    """Keeps the command line as typed, so that messages name each flag the way the user spelled it."""

    raw_args: list[str] = []

    def main(self, args=None, *a, **kw):
        _Group.raw_args = list(args) if args is not None else sys.argv[1:]
        return super().main(args, *a, **kw)


def _load(cls, config_file, kwargs: dict, **extra):
    flags = {**settings.flag_values(kwargs, cls), **extra}
    return settings.load_config(cls, config_file, flags, argv=_Group.raw_args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-med")
def cli() -> None:
    """Fine-tune small chat models with LoRA, export them to ONNX Runtime, benchmark and serve them.

    \b
    lora-med data check data/medical_conversations.json
    lora-med train --config configs/default.yaml
    lora-med merge-export adapters/clinic-lora
    lora-med bench --run adapters/clinic-lora --export exports/clinic-lora-cpu-fp32
    """


# --------------------------------------------------------------------------- data check


@cli.group()
def data() -> None:
    """Inspect conversation files."""


@data.command("check")
@click.argument("files", metavar="[FILE]...", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--tokenizer",
    "tokenizer_name",
    default=None,
    help="Tokenizer (hub id or folder) for token-length stats; default: the shipped base's.",
)
@click.option(
    "--max-length",
    "--max_length",
    "max_length",
    type=click.IntRange(min=8),
    default=256,
    show_default=True,
    help="The training --max-length: conversations longer than this are cut; a last reply longer fails.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "dialogpt", "chat-template"]),
    default="auto",
    show_default=True,
    help="How conversations are formatted (as in training).",
)
@click.option(
    "--facts",
    "facts_file",
    default=None,
    help="The clinic's facts (e.g. configs/clinic.yaml): also list every assistant turn that contradicts them; "
    "without FILE, checks the shipped training and held-out files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check(
    files: tuple[str, ...], tokenizer_name: str | None, max_length: int, fmt: str, facts_file: str | None, as_json: bool
) -> None:
    """Validate FILE: counts, turns, token lengths, cuts, duplicates and every problem.

    Exits 2 when the file has problems that would make `lora-med train` fail (malformed rows, a last reply
    longer than --max-length) or, with --facts, assistant turns that contradict the clinic's facts (each named
    by file, row and turn); duplicates are warnings.

    \b
    lora-med data check data/medical_conversations.json
    lora-med data check mine.jsonl --max-length 128 --json
    lora-med data check mine.json --tokenizer microsoft/DialoGPT-medium
    lora-med data check --facts configs/clinic.yaml
    """
    from . import models  # torch: loaded only when a tokenizer is needed

    if not files and not facts_file:
        raise click.UsageError("give FILE (a conversation file), or --facts to check the shipped data")
    paths = list(files) or [str(shipped(DEFAULT_DATA)), str(shipped(DEFAULT_EVAL))]
    facts = None
    if facts_file:
        from .serve.facts import load_facts

        facts = load_facts(facts_file)
    tok = None
    name = tokenizer_name or (DEFAULT_BASE if shipped(DEFAULT_BASE).is_dir() else None)
    if name:
        try:
            tok = models.load_tokenizer(models.resolve_base(name if tokenizer_name else str(shipped(name))))
        except LoraMedError as e:
            raise LoraMedError(f"--tokenizer {name}: {str(e).removeprefix(f'--base {name}: ')}") from None
    reports = []
    for file in paths:
        report = data_mod.check(file, tok, max_length=max_length, fmt=fmt)
        if facts is not None:
            from .serve.audit import audit

            report["facts"] = str(facts.path)
            report["contradictions"] = audit(file, facts)
        reports.append(report)
        if not as_json:
            _print_check(report)
    if as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, ensure_ascii=False))
    # contradictions are listed one per finding; count the turns they are in
    bad = [
        (r["file"], len(r["problems"]), len({c.split(": ")[0] for c in r.get("contradictions", [])})) for r in reports
    ]
    if any(p for _, p, _ in bad):
        raise LoraMedError(
            "; ".join(f"{f}: {p} problem(s) that would make training fail" for f, p, _ in bad if p) + " (listed above)"
        )
    if any(c for _, _, c in bad):
        raise LoraMedError(
            "; ".join(f"{f}: {c} assistant turn(s) contradict {facts_file}" for f, _, c in bad if c)
            + " (listed above); correct the data or the facts"
        )


def _print_check(report: dict) -> None:
    click.echo(f"{report['file']}  (sha256 {report['sha256'][:12]})")
    click.echo(
        f"  conversations     {report['conversations']}  ({report['single_exchange']} single exchange, "
        f"{report['multi_turn']} multi-turn, {report['with_system']} with a system message)"
    )
    t = report["turns"]
    click.echo(f"  turns per conv    min {t['min']}  p50 {t['p50']}  max {t['max']}")
    if "tokens" in report:
        t = report["tokens"]
        click.echo(f"  tokens ({t['format']})  p50 {t['p50']}  p95 {t['p95']}  max {t['max']}  total {t['total']}")
        click.echo(f"  cut at max-length {report['max_length']}: {report['cut_by_max_length']} conversation(s)")
    else:
        click.echo("  tokens            (no tokenizer: pass --tokenizer for token lengths)")
    click.echo(f"  duplicates        {len(report['duplicates'])}")
    sections = [("problems", report["problems"]), ("warnings", report["warnings"])]
    if "contradictions" in report:
        sections.append(("contradictions", report["contradictions"]))
    for title, rows in sections:
        if rows:
            click.echo(f"  {title} ({len(rows)}):")
            for row in rows:
                click.echo(f"    - {row}")
        else:
            click.echo(f"  {title:<17} none")


# --------------------------------------------------------------------------- train


@cli.command()
@CONFIG
@click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="Print the memory estimate for the settings and exit "
    "(works for --device cuda on a machine without a GPU; the base may hold only config.json and a tokenizer).",
)
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@settings.click_options(TrainConfig, seed_names=("batch_size", "learning_rate", "max_length", "grad_accum"))
def train(config_file: str | None, plan_only: bool, as_json: bool, **kwargs) -> None:
    """Fine-tune a base model on conversations with LoRA, QLoRA or a full fine-tune.

    \b
    lora-med train --config configs/default.yaml
    lora-med train --method full --epochs 3 --batch_size 4 --learning_rate 5e-5
    lora-med train --base microsoft/DialoGPT-medium --device cuda --vram-gb 8 --plan
    lora-med train --resume adapters/clinic-lora
    """
    from .train.main import train as run_train

    cfg = _load(TrainConfig, config_file, kwargs)
    if plan_only:
        result = run_train(cfg, plan_only=True)
        click.echo(json.dumps(result, indent=2) if as_json else _plan_text(result))
    else:
        run_train(cfg)


def _plan_text(p: dict) -> str:
    skip = ("total_gb", "budget_gb", "needed_gb")
    parts = [k[:-3] for k in p if k.endswith("_gb") and k not in skip]
    lines = [
        f"Memory plan: {p['method']} on {p['device']} ({p['precision']}), micro-batch {p['batch_size']} x "
        f"grad-accum {p['grad_accum']}"
        + (f" x {p['world_size']} processes" if p.get("world_size", 1) > 1 else "")
        + f" (effective {p['effective_batch']}), sequence {p['seq_len']} tokens",
        f"  parameters {p['params']:,}, trainable {p['trainable']:,}",
        f"  levers: {', '.join(p['levers']) or 'none'} (attention {p['attention']}, optimizer {p['optim']}"
        + (f", loss chunks of {p['loss_chunk']} tokens" if p.get("loss_chunk") else "")
        + ")",
        f"  at the peak ({p['peak_at']}):",
    ]
    lines += [f"    {k:<18} {p[k + '_gb']:8.3f} GB" for k in parts if p[k + "_gb"]]
    lines.append(
        f"    {'total':<18} {p['total_gb']:8.3f} GB" + (f"  (budget {p['budget_gb']} GB)" if p["budget_gb"] else "")
    )
    if p.get("moments"):
        lines.append("  each moment of a step:")
        lines += [f"    {k:<34} {v:8.3f} GB" for k, v in p["moments"].items()]
    if p.get("choice"):
        lines.append(f"  --vram-gb: {p['choice']['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- merge-export


@cli.command("merge-export")
@click.argument("run_dir_arg", metavar="RUN_DIR", required=False)
@CONFIG
@settings.click_options(ExportConfig)
def merge_export(run_dir_arg: str | None, config_file: str | None, **kwargs) -> None:
    """Merge training run RUN_DIR and export it to ONNX Runtime, behind a parity gate.

    Writes merged/ (transformers), onnx/ (Optimum's graph, for stock ORTModelForCausalLM) and engine/ (the
    engine's decode graph: what `lora-med serve` and bench's engine-* rows run; GPT-2 models).

    \b
    lora-med merge-export adapters/clinic-lora
    lora-med merge-export adapters/clinic-lora --quantize int8
    lora-med merge-export adapters/clinic-lora --device cuda --dtype fp16
    """
    from .export.main import merge_export as run_export

    run_export(_load(ExportConfig, config_file, kwargs, **({"run_dir": run_dir_arg} if run_dir_arg else {})))


# --------------------------------------------------------------------------- bench


@cli.command()
@CONFIG
@settings.click_options(BenchConfig)
def bench(config_file: str | None, **kwargs) -> None:
    """Held-out perplexity and reply latency of every backend, in one report, behind a gate.

    engine-* rows time lora-med's engine on each export's decode graph (what serve runs), beside the peers
    measured with transformers' generate() (torch-*, ort-*).

    \b
    lora-med bench --config configs/paired.yaml
    lora-med bench --run adapters/clinic-lora --full-run adapters/clinic-full --export exports/clinic-lora-cpu-fp32
    lora-med bench --shape dialogpt-medium --max-latency-s 0
    """
    from .bench.main import bench as run_bench

    run_bench(_load(BenchConfig, config_file, kwargs))


# --------------------------------------------------------------------------- serve


@cli.command()
@click.argument("export_dir", required=False)
@CONFIG
@settings.click_options(ServeConfig)
def serve(export_dir: str | None, config_file: str | None, **kwargs) -> None:
    """Serve the seed guide's POST /chat/ on EXPORT_DIR (a merge-export output or a model folder).

    \b
    lora-med serve exports/clinic-lora-cpu-fp32
    lora-med serve exports/clinic-lora-cpu-fp32 --port 8080 --db /var/lib/clinic/chat.db
    curl -s -X POST http://127.0.0.1:8000/chat/ -H 'Content-Type: application/json' \\
         -d '{"user_id": "+59170123456", "message": "Hola, necesito una cita"}'
    """
    from .serve import serve as run_serve

    run_serve(_load(ServeConfig, config_file, kwargs, **({"model": export_dir} if export_dir else {})))


def main() -> None:
    _CtrlC.install()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LoraMedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:
        # Ctrl-C while C code calls back into Python (torch's ONNX tracer) surfaces as SystemError ("returned a
        # result with an exception set") caused by the KeyboardInterrupt: still an abort, not a crash.
        if _interrupted(e):
            click.echo("aborted", err=True)
            sys.exit(130)
        # The system refusing a path or a write (a name too long, a full disk, a read-only filesystem) is the
        # user's to fix wherever it surfaces; anything else is a bug in lora-med and keeps its traceback.
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            click.echo(f"error: {e.filename}: {e.strerror}; {_USER_ERRNOS[e.errno]}", err=True)
            sys.exit(2)
        raise


class _CtrlC:
    """Ctrl-C that is never lost. CPython drops a KeyboardInterrupt raised inside a finalizer ("Exception ignored
    in ... __del__"), and during a merge the first Python code to run after a Ctrl-C is often one (a garbage
    collection inside a long C call): the command went on and wrote its output. A dropped interrupt is raised
    again shortly after, from a timer, unless another Ctrl-C is already stopping the command (its cleanup must
    not be interrupted)."""

    raised = dropped = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:  # main() runs more than once in one process in the tests
            return
        cls.installed = True
        default = sys.unraisablehook

        def hook(unraisable) -> None:
            if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
                cls.dropped += 1
                threading.Timer(0.05, cls._again).start()  # not from here: the hook would drop it again
                return
            default(unraisable)

        sys.unraisablehook = hook
        signal.signal(signal.SIGINT, cls._handler)

    @classmethod
    def _handler(cls, signum, frame):
        cls.raised += 1
        raise KeyboardInterrupt

    @classmethod
    def _again(cls) -> None:
        if cls.raised == cls.dropped:  # every Ctrl-C so far was dropped: none is stopping the command
            _thread.interrupt_main()


def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the causes of ``e``."""
    cause: BaseException | None = e
    for _ in range(16):  # a chain, not a cycle
        cause = cause.__cause__ or cause.__context__ if cause is not None else None
        if cause is None:
            return False
        if isinstance(cause, KeyboardInterrupt):
            return True
    return False


_USER_ERRNOS = {
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
}
