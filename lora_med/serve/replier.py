"""Replies: what ``lora-med serve PATH`` loads, the prompt in the training format, and the engine call.

Every reply comes from the project's one generation engine (:mod:`lora_med.engine`); this module only
decides which folder it loads, builds prompts exactly as training formatted conversations
(:func:`lora_med.train.compare.prompt_ids`), cuts them to fit, and decodes the new tokens.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..cards import ExportCard, TrainCard
from ..data import Message, prompt_ids, turn_end_ids
from ..engine import ENGINE_FILE, GenerationSettings, load_engine
from ..engine.torch_backend import torch_engine
from ..errors import ConfigError
from ..integrity import Verified, export_root, verify_export
from ..models import available_memory, load_model, load_tokenizer, resolve_device
from ..settings import describe
from ..weights import weights_problems
from .config import ServeConfig
from .logs import log

MIN_PROMPT_TOKENS = 16  # below this the model cannot even see the patient's message
MEMORY_SHARE = 0.9  # of the memory available at start, what the KV cache (and prefix cache) may take


@dataclass(frozen=True)
class ModelSource:
    """What a serve PATH resolves to."""

    engine_path: Path  # what load_engine gets: a decode-graph folder or an HF model folder
    tokenizer_path: Path
    fmt: str  # the training format: dialogpt | chat-template
    max_length: int | None  # the training run's max_length (prompt + reply), when known
    kind: str  # for /health and logs
    adapter_base: str | None = None  # a LoRA run: the base its adapter is merged onto in memory
    verified: Verified | None = None  # an export: its files proven against the manifest (what it cost)


def resolve_model(path: str) -> ModelSource:
    """Resolve ``lora-med serve PATH``.

    A merge-export folder serves its ``engine/`` decode graph when it has one, else its ``merged/`` model on
    PyTorch through the engine; the training format and length come from its ``manifest.json``. An HF model
    folder (an export's ``merged/``, a full fine-tune run) is served on PyTorch; a ``run.json`` beside it gives
    the format, else DialoGPT's. A LoRA training run is served on PyTorch with its adapter merged onto its base
    in memory.

    Nothing is loaded here, but every file is proven first: an export's files against its manifest's SHA-256
    (those served: the model folder and the tokenizer's), a run's weights whole and in safetensors (a pickle
    ``adapter_model.bin`` is refused by name: loading it can run code).

    Raises:
        ConfigError: PATH is missing, is a LoRA run whose base is gone or whose weights are broken or pickled, or
            holds no model.
        LoraMedError: PATH is an export that did not complete, or one of its files differs from its manifest.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"EXPORT_DIR {path}: no such folder; give a `lora-med merge-export` output "
            "(exports/...) or a Hugging Face model folder"
        )
    if (p / "manifest.json").is_file():
        manifest = ExportCard.read(p)
        source = manifest.source
        engine = p / "engine"
        if (engine / ENGINE_FILE).is_file():
            target, kind = engine, "export decode graph (ONNX Runtime)"
        elif (p / "merged" / "config.json").is_file():
            target, kind = p / "merged", "export merged model (PyTorch)"
        else:
            raise ConfigError(f"EXPORT_DIR {path}: the export has neither engine/ nor merged/; export it again")
        tok = p / "merged" if (p / "merged" / "tokenizer_config.json").is_file() else p / "onnx"
        proven = verify_export(p, manifest.raw, tuple(sorted({target.name, tok.name})))
        return ModelSource(target, tok, source.format, source.max_length, kind, verified=proven)
    if (p / "adapter_config.json").is_file():
        # A LoRA run: its adapter merged onto its base in memory, on PyTorch (merge-export it for the decode graph).
        card = TrainCard.read(p)
        base = card.base
        if base.startswith(("/", ".")) and not Path(base).is_dir():
            raise ConfigError(f"EXPORT_DIR {path}: its base {base} is gone; restore it, or serve a merge-export")
        if problems := card.problems():  # a pickle adapter_model.bin is named here, before any load
            raise runs.problems_error(f"with EXPORT_DIR {path}; nothing was loaded", problems)
        return ModelSource(
            p, p, card.format, card.max_length, "training run, adapter merged in memory (PyTorch)", adapter_base=base
        )
    if (p / "config.json").is_file():
        verified: Verified | None = None
        if root := export_root(p):  # an export's merged/: proven against the export's manifest
            verified = verify_export(root[0], ExportCard.read(root[0]).raw, (root[1],))
        elif problems := weights_problems(p, "model", "model"):
            raise runs.problems_error(f"with EXPORT_DIR {path}; nothing was loaded", problems)
        if (p / "run.json").is_file():  # a full fine-tune run folder records how it was trained
            run = TrainCard.read(p)
            return ModelSource(p, p, run.format, run.max_length, "model folder (PyTorch)", verified=verified)
        return ModelSource(p, p, "dialogpt", None, "model folder (PyTorch)", verified=verified)
    raise ConfigError(f"EXPORT_DIR {path}: neither a merge-export (manifest.json) nor a model folder (config.json)")


class Replier:
    """Prompts in, replies out, through one engine.

    ``generate`` and ``stream`` block (the engine is synchronous): the server's single engine thread holds the
    stream.
    Everything that touches the tokenizer runs on the caller's thread (the event loop).
    """

    def __init__(
        self,
        engine,
        tokenizer,
        source: ModelSource,
        settings: GenerationSettings,
        *,
        cut_block: int,
        system_prompt: str | None = None,
    ):
        self.engine = engine
        self.cut_block = cut_block  # tokens; see prompt()
        # The system message opens every prompt and is never cut (ServeConfig.system_prompt).
        self.system = [Message("system", system_prompt)] if system_prompt else []
        # One message's ids in the DialoGPT format (its text + EOS), cached: each request renders the conversation
        # so far, mostly messages seen before.
        self._message_ids = functools.lru_cache(maxsize=8192)(
            lambda role, content: tuple(prompt_ids([Message(role, content)], tokenizer, "dialogpt"))
        )
        self.tokenizer = tokenizer
        self.source = source
        self.fmt = source.fmt
        self.settings = settings
        window = min(engine.capacity, source.max_length or engine.capacity)
        self.budget = window - settings.max_new_tokens  # prompt tokens that fit beside a full reply
        if self.budget < MIN_PROMPT_TOKENS:
            raise ConfigError(
                f"--max-new-tokens {settings.max_new_tokens}: leaves {self.budget} prompt tokens in "
                f"the model's window of {window}; use at most {window - MIN_PROMPT_TOKENS}"
            )

    def prompt(self, history: list[Message]) -> list[int]:
        """Token ids of the conversation (ending with the patient's message) in the training format, cut
        from the left to the budget: whole oldest turns first, as ``data.encode`` cuts in training, and the
        last message from its left only when it alone is too long.

        With ``cut_block`` > 0 a conversation that outgrows the budget starts at the first turn that begins
        at or after a multiple of ``cut_block`` tokens (counted from the conversation's start) past what must
        go. Its start then stays put while the conversation grows by up to ``cut_block`` tokens, so the
        engine's prefix cache can reuse the earlier turns' KV cache; the price is up to ``cut_block`` tokens
        (plus one turn) more of old context left out than strictly needed. A system prompt comes first and
        stays whatever is cut."""
        msgs = list(history)
        if self.fmt == "dialogpt":
            sizes = [len(self._message_ids(m.role, m.content)) for m in msgs]
            head = [t for m in self.system for t in self._message_ids(m.role, m.content)]
            # Each turn is its own text + EOS, so per-turn ids concatenate to the whole prompt exactly.
            first, total = 0, len(head)
            for i in range(len(msgs) - 1, -1, -1):
                if i < len(msgs) - 1 and total + sizes[i] > self.budget:
                    first = i + 1
                    break
                total += sizes[i]
            first = self._sticky(sizes, first)
            ids = head + [t for m in msgs[first:] for t in self._message_ids(m.role, m.content)]
        else:
            # A chat template renders the whole conversation; drop the oldest turn until it fits.
            first = 0
            ids = prompt_ids(self.system + msgs, self.tokenizer, self.fmt)
            while len(ids) > self.budget and first < len(msgs) - 1:
                first += 1
                ids = prompt_ids(self.system + msgs[first:], self.tokenizer, self.fmt)
            if first and self.cut_block > 0:
                # Where turns start, roughly (the template's own tokens aside): enough to place the cut.
                sizes = [len(self.tokenizer(m.content, add_special_tokens=False)["input_ids"]) + 4 for m in msgs]
                if (start := self._sticky(sizes, first)) != first:
                    ids = prompt_ids(self.system + msgs[start:], self.tokenizer, self.fmt)
        return ids[-self.budget :]

    def shared_start(self) -> list[int]:
        """The token ids every prompt starts with: the system prompt as the training format renders it (the
        common start of two one-message conversations); empty without a system prompt."""
        if not self.system:
            return []
        a, b = (self.prompt([Message("user", text)]) for text in ("a", "b"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:n]

    def _sticky(self, sizes: list[int], first: int) -> int:
        """The first message to keep of a conversation whose oldest ``first`` messages must go: the first
        message starting at or after the next multiple of ``cut_block`` tokens (never past the last message)."""
        if first == 0 or self.cut_block <= 0:
            return first
        pos = list(itertools.accumulate(sizes, initial=0))  # pos[i]: tokens before message i
        target = -(-pos[first] // self.cut_block) * self.cut_block
        return next((i for i in range(first, len(sizes)) if pos[i] >= target), first)

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """New token ids for a batch of prompts (blocking)."""
        return self.engine.generate(prompts, self.settings)

    def stream(self, rows: int):
        """The engine's continuous batch of ``rows`` rows with the serve settings (the server's engine thread)."""
        return self.engine.stream(self.settings, rows=rows)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.engine.close()


def settings_from(cfg: ServeConfig) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )


def load_replier(cfg: ServeConfig, engine=None, source: ModelSource | None = None) -> Replier:
    """The replier for ``cfg.model`` (``source``: its resolution, if already done); loads the engine unless
    one is given (tests, embedding apps).

    Raises:
        ConfigError / LoraMedError: the folder cannot be served (named, with the fix).
    """
    source = source or resolve_model(cfg.model)
    if source.verified is not None:
        log("verified", model=cfg.model, detail=source.verified.line(), **source.verified.as_dict())
    tokenizer = load_tokenizer(str(source.tokenizer_path))
    owned = engine is None  # closed here if the replier cannot be made; a caller's engine stays the caller's
    if engine is None and source.adapter_base:
        engine = _merged_run_engine(source.adapter_base, source, tokenizer, cfg)
    elif engine is None:
        engine = load_engine(
            source.engine_path, device=cfg.device, threads=cfg.threads, prefix_cache_mb=cfg.prefix_cache_mb
        )
    try:
        check_cache_memory(engine, cfg)
        replier = Replier(
            engine, tokenizer, source, settings_from(cfg), cut_block=cfg.cut_block, system_prompt=cfg.system_prompt
        )
        # The system prompt's KV cache, kept from the start: the first patients after a restart (each a new
        # conversation) prefill only their own message, as every later one does.
        if kept := engine.keep_prefix(replier.shared_start()):
            log("prefix_kept", tokens=kept)
        return replier
    except BaseException:
        if owned:
            engine.close()
        raise


def check_cache_memory(engine, cfg: ServeConfig, free: int | None = None) -> None:
    """Refuse a ``--max-batch`` whose KV cache (and the prefix cache beside it) does not fit the memory available
    now (``free`` bytes; read from the system when None), naming the figures and the largest batch that fits. Run
    before the server starts: a cache that cannot be allocated would fail every request and retry forever.

    Raises:
        ConfigError: the cache does not fit.
    """
    need = engine.cache_bytes(cfg.max_batch)
    free = available_memory(engine.device) if free is None else free
    if need is None or free is None:
        return
    kept = int(cfg.prefix_cache_mb * 2**20) if getattr(engine, "prefix_cache", None) is not None else 0
    room = int(free * MEMORY_SHARE) - kept
    if need <= room:
        return
    row, gib = engine.cache_bytes(1), lambda b: f"{b / 2**30:.1f} GiB"
    fits = max(room // row, 0)
    raise ConfigError(
        f"{describe(cfg, 'max_batch')}: the KV cache of {cfg.max_batch:,} rows of {engine.capacity} tokens needs "
        f"{gib(need)} ({row / 2**20:.2f} MiB a row) on {engine.device}"
        + (f", beside the prefix cache's {gib(kept)}" if kept else "")
        + f", but {gib(free)} is available (at most {MEMORY_SHARE:.0%} of it is used); "
        + (f"use --max-batch {fits} or less" if fits else "free some memory (not even one row fits)")
    )


def _merged_run_engine(adapter_base: str, source: ModelSource, tokenizer, cfg: ServeConfig):
    """The engine's PyTorch path over a LoRA run's adapter merged onto its base (PEFT's safe merge)."""
    import torch
    from peft import PeftModel

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = load_model(adapter_base)
    model = PeftModel.from_pretrained(base, str(source.engine_path)).merge_and_unload(safe_merge=True).eval()
    return torch_engine(model.to(device), eos_token_id=turn_end_ids(tokenizer, source.fmt))
