"""``lora-med bench``: held-out perplexity and reply latency against the full fine-tune, with CI gates.

Modules: main (the command, ``--paired``), latency (timing every backend through the engine or its peers),
shapes (random-weight models of real models' shapes: speed only), report (Markdown, JSON, plots).
"""

__all__ = ["bench"]


def __getattr__(name: str):
    # Loaded on use: importing one bench module (shapes, report) need not load every stage bench drives.
    if name == "bench":
        from .main import bench

        return bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
