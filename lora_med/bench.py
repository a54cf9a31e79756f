"""``lora-med bench`` (being written)."""

import click


@click.command("bench")
def bench_command() -> None:
    """Latency and perplexity benchmarks (not implemented yet)."""
    raise click.ClickException("bench is not implemented yet")
