"""``lora-med merge-export`` (being written)."""

import click


@click.command("merge-export")
def merge_export_command() -> None:
    """Merge a training run and export it to ONNX Runtime (not implemented yet)."""
    raise click.ClickException("merge-export is not implemented yet")
