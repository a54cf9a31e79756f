"""``lora-med serve``: the seed guide's ``/chat/`` app on an exported model.

``serve(cfg)`` runs it (blocking); ``create_app(cfg, engine=None, store=None)`` returns the FastAPI app.
Modules: config (settings), app (routes) and server (the /chat/ request path), openai_api (/v1), auth, http
(body limits), schemas, turn (what a message's turn says), store and postgres (conversation memory), intents
(action and status), triage/ (emergency / caution / none before the model, carry-over, advice), matcher (the
rules both use), batcher (admission and continuous batching), release (streamed text, checked), replier (model
folder, prompts, engine calls), limits (rate limit, per-user order), metrics, logs; the clinic's facts
(docs/facts.md): facts (the file), referee (what they do to a turn), booking, answers, checker, audit, dates,
lexicon.
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
