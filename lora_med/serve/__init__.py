"""``lora-med serve``: the seed guide's ``/chat/`` app on an exported model.

``serve(cfg)`` runs it (blocking); ``create_app(cfg, engine=None, store=None)`` returns the FastAPI app.
Modules: config (settings), app (routes, request path), store (conversation memory), intents (action and
status), guard (emergencies), matcher (the rules both use), batcher (queue and dynamic batching),
replier (model folder, prompts, engine calls), limits (rate limit, per-user order), metrics, logs.
"""

from .app import create_app, serve
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
