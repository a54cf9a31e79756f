"""``lora-med serve``: the seed guide's ``/chat/`` app on an exported model.

``serve(cfg)`` runs it (blocking); ``create_app(cfg, engine=None, store=None)`` returns the FastAPI app.
Modules: config (settings), app (routes, request path), turn (what a message's turn says), store
(conversation memory), intents (action and status), triage/ (emergency / caution / none before the model,
carry-over, advice), matcher (the rules both use), batcher (queue and dynamic batching), replier (model
folder, prompts, engine calls), limits (rate limit, per-user order), metrics, logs.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str):
    # The app pulls in FastAPI, torch and the engine; `from lora_med.serve import ServeConfig` (the CLI,
    # `lora-med serve --help`) should not wait for them.
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
