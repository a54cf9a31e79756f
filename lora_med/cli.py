"""The ``lora-med`` command line. Each command builds its config dataclass and calls one function.

User mistakes surface as ``LoraMedError``: printed as ``error: ...`` with exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import LoraMedError
from .options import config_options, overrides_from
from .runcard import load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-med")
def cli() -> None:
    """Fine-tune small chat models with LoRA, export them to ONNX Runtime, and benchmark them."""


@cli.group()
def data() -> None:
    """Inspect conversation files."""


@data.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", "tokenizer_name", default=None,
              help="Tokenizer (hub id or folder) for token-length stats; default: the shipped base.")
@click.option("--max-length", "--max_length", "max_length", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "dialogpt", "chat-template"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check(file: str, tokenizer_name: str | None, max_length: int, fmt: str, as_json: bool) -> None:
    """Validate FILE and print counts, turns, token lengths, duplicates and every problem found."""
    from .data import check
    from .models import DEFAULT_BASE, load_tokenizer, resolve_base

    from pathlib import Path

    from .models import REPO_ROOT

    # Token statistics need a tokenizer: the one named, else the shipped base's when it is there.
    shipped = REPO_ROOT / DEFAULT_BASE
    name = tokenizer_name or (DEFAULT_BASE if (Path(DEFAULT_BASE).is_dir() or shipped.is_dir()) else None)
    tok = load_tokenizer(resolve_base(name)) if name else None
    report = check(file, tok, max_length=max_length, fmt=fmt)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    click.echo(f"{report['file']}  (sha256 {report['sha256'][:12]})")
    click.echo(f"  conversations     {report['conversations']}  ({report['single_exchange']} single exchange, "
               f"{report['multi_turn']} multi-turn, {report['with_system']} with a system message)")
    click.echo(f"  turns per conv    min {report['turns']['min']}  p50 {report['turns']['p50']}  max {report['turns']['max']}")
    if "tokens" in report:
        t = report["tokens"]
        click.echo(f"  tokens ({t['format']})  p50 {t['p50']}  p95 {t['p95']}  max {t['max']}  total {t['total']}")
        click.echo(f"  cut at max-length {report['max_length']}: {report['cut_by_max_length']} conversation(s)")
    else:
        click.echo("  tokens            (no tokenizer: pass --tokenizer for token lengths)")
    click.echo(f"  duplicates        {len(report['duplicates'])}")
    if report["problems"]:
        click.echo(f"  problems ({len(report['problems'])}):")
        for p in report["problems"]:
            click.echo(f"    - {p}")
    else:
        click.echo("  problems          none")


from .train import TrainConfig  # noqa: E402


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings; flags override it.")
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory estimate for the settings and exit.")
@config_options(TrainConfig,
                extra={"resume": dict(is_flag=False, flag_value="auto", metavar="[RUN_DIR]",
                                      help="Continue an interrupted run: the --output folder, or RUN_DIR.")},
                aliases={"epochs": [], "batch_size": ["--batch_size"], "learning_rate": ["--learning_rate"],
                         "grad_accum": ["--grad_accum", "--gradient-accumulation"], "max_length": ["--max_length"],
                         "eval_data": ["--eval_data"]})
def train(config_file: str | None, plan_only: bool, **kwargs) -> None:
    """Fine-tune a base model on conversations with LoRA, QLoRA or a full fine-tune."""
    from .train import train as run_train

    overrides = overrides_from(kwargs, TrainConfig)
    saved = {}
    if overrides.get("resume"):
        # Resume starts from the run's own settings; a flag given again must agree with them.
        cfg = load_config(TrainConfig, config_file, overrides)
        card = cfg.output_dir() / "run.json"
        if card.is_file():
            try:
                saved = json.loads(card.read_text(encoding="utf-8")).get("config", {})
            except ValueError:
                saved = {}  # train() reports the unreadable card
    cfg = load_config(TrainConfig, config_file, overrides, defaults=saved)
    result = run_train(cfg, plan_only=plan_only)
    if plan_only:
        click.echo(json.dumps(result, indent=2))


from .bench import bench_command  # noqa: E402
from .export import merge_export_command  # noqa: E402

cli.add_command(merge_export_command, "merge-export")
cli.add_command(bench_command, "bench")


from .serve.config import ServeConfig  # noqa: E402


@cli.command("serve")
@click.argument("export_dir", required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings; flags override it.")
@config_options(ServeConfig)
def serve_command(export_dir: str | None, config_file: str | None, **kwargs) -> None:
    """Serve the seed guide's POST /chat/ on EXPORT_DIR (a merge-export output or a model folder)."""
    from .serve import serve

    overrides = overrides_from(kwargs, ServeConfig)
    if export_dir:
        overrides["model"] = export_dir
    serve(load_config(ServeConfig, config_file, overrides))


def main() -> None:
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
