"""``lora-med merge-export``: merge the adapter, export through Optimum, build the engine's decode graph, prove
each against PyTorch.

Modules: main (the command: checks, steps, manifest), merge (adapter -> merged model, checked), optimum
(Optimum's standard graph and its precisions), decode_graph (the engine's graph), precision (int8/fp16
recipes and the one way graphs are saved), parity (every graph against PyTorch: the gate).
"""

__all__ = ["merge_export"]


def __getattr__(name: str):
    # Loaded on use: importing one export module (precision, decode_graph) need not load Optimum and PEFT.
    if name == "merge_export":
        from .main import merge_export

        return merge_export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
