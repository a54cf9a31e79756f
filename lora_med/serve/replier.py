"""Replies: what ``lora-med serve PATH`` loads, the prompt in the training format, and the engine call.

Every reply comes from the project's one generation engine (:mod:`lora_med.engine`); this module only
decides which folder it loads, builds prompts exactly as training formatted conversations
(:func:`lora_med.train.compare.prompt_ids`), cuts them to fit, and decodes the new tokens.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..data import Message, prompt_ids, turn_end_ids
from ..engine import ENGINE_FILE, GenerationSettings, load_engine
from ..engine.torch_backend import torch_engine
from ..errors import ConfigError
from ..models import load_model, load_tokenizer, resolve_device
from .config import ServeConfig

MIN_PROMPT_TOKENS = 16  # below this the model cannot even see the patient's message


@dataclass(frozen=True)
class ModelSource:
    """What a serve PATH resolves to."""

    engine_path: Path  # what load_engine gets: a decode-graph folder or an HF model folder
    tokenizer_path: Path
    fmt: str  # the training format: dialogpt | chat-template
    max_length: int | None  # the training run's max_length (prompt + reply), when known
    kind: str  # for /health and logs
    adapter_base: str | None = None  # a LoRA run: the base its adapter is merged onto in memory


def resolve_model(path: str) -> ModelSource:
    """Resolve ``lora-med serve PATH``.

    A merge-export folder serves its ``engine/`` decode graph when it has one, else its ``merged/`` model on
    PyTorch through the engine; the training format and length come from its ``manifest.json``. An HF model
    folder (an export's ``merged/``, a full fine-tune run) is served on PyTorch; a ``run.json`` beside it gives
    the format, else DialoGPT's. A LoRA training run is served on PyTorch with its adapter merged onto its base
    in memory.

    Raises:
        ConfigError: PATH is missing, is a LoRA run whose base is gone, or holds no model.
        LoraMedError: PATH is an export that did not complete.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"EXPORT_DIR {path}: no such folder; give a `lora-med merge-export` output "
            "(exports/...) or a Hugging Face model folder"
        )
    if (p / "manifest.json").is_file():
        source = runs.load_card(p, "export").get("source", {})
        engine = p / "engine"
        if (engine / ENGINE_FILE).is_file():
            target, kind = engine, "export decode graph (ONNX Runtime)"
        elif (p / "merged" / "config.json").is_file():
            target, kind = p / "merged", "export merged model (PyTorch)"
        else:
            raise ConfigError(f"EXPORT_DIR {path}: the export has neither engine/ nor merged/; export it again")
        tok = p / "merged" if (p / "merged" / "tokenizer_config.json").is_file() else p / "onnx"
        return ModelSource(target, tok, source.get("format") or "dialogpt", source.get("max_length"), kind)
    if (p / "adapter_config.json").is_file():
        # A LoRA run: its adapter merged onto its base in memory, on PyTorch (merge-export it for the decode graph).
        card = runs.load_card(p, "train")
        base = card["base"]["name_or_path"]
        if base.startswith(("/", ".")) and not Path(base).is_dir():
            raise ConfigError(f"EXPORT_DIR {path}: its base {base} is gone; restore it, or serve a merge-export")
        return ModelSource(
            p,
            p,
            card["data"]["format"],
            card["data"]["max_length"],
            "training run, adapter merged in memory (PyTorch)",
            adapter_base=base,
        )
    if (p / "config.json").is_file():
        fmt, max_length = "dialogpt", None
        run = p / "run.json"  # a full fine-tune run folder records how it was trained
        if run.is_file():
            try:
                card = json.loads(run.read_text(encoding="utf-8")).get("data", {})
                fmt, max_length = card.get("format") or fmt, card.get("max_length")
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"EXPORT_DIR {path}: run.json is not valid JSON; restore it or serve the "
                    "model from a folder without it"
                ) from None
        return ModelSource(p, p, fmt, max_length, "model folder (PyTorch)")
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
    tokenizer = load_tokenizer(str(source.tokenizer_path))
    if engine is None and source.adapter_base:
        engine = _merged_run_engine(source, tokenizer, cfg)
    elif engine is None:
        engine = load_engine(
            source.engine_path, device=cfg.device, threads=cfg.threads, prefix_cache_mb=cfg.prefix_cache_mb
        )
    return Replier(
        engine, tokenizer, source, settings_from(cfg), cut_block=cfg.cut_block, system_prompt=cfg.system_prompt
    )


def _merged_run_engine(source: ModelSource, tokenizer, cfg: ServeConfig):
    """The engine's PyTorch path over a LoRA run's adapter merged onto its base (PEFT's safe merge)."""
    import torch
    from peft import PeftModel

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = load_model(source.adapter_base)
    model = PeftModel.from_pretrained(base, str(source.engine_path)).merge_and_unload(safe_merge=True).eval()
    return torch_engine(model.to(device), eos_token_id=turn_end_ids(tokenizer, source.fmt))
