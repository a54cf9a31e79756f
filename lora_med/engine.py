"""The generation engine: one token loop for every reply lora-med produces.

``Engine.generate`` owns everything that decides *which* token comes next (greedy or sampling with
temperature/top-p, EOS stop, ``min_new_tokens``, no-repeat n-grams, the left cut of long prompts,
batches of prompts of any lengths). What computes the logits is a step backend with two calls:

- ``prefill(rows, max_new_tokens)``: run the prompts, keep their KV cache, return the last prompt
  position's logits per row (``float32 [batch, vocab]``);
- ``step(tokens)``: feed one new token per row, return the next logits.

Two backends exist: the ONNX decode graph written by :mod:`lora_med.decode_graph`, run by ONNX Runtime
on the CPU or CUDA provider (:mod:`lora_med.engine_ort`), and a Hugging Face causal LM with its KV cache
(``past_key_values``; a token loop, not transformers' ``generate()``): a PyTorch model, for models that have
not been exported yet (the base vs fine-tuned comparison during training), or an export's standard Optimum
graph as ``ORTModelForCausalLM`` (the parity gate's greedy check of that graph).

Host work per token is kept to a few numpy operations over ``[batch, vocab]``: logits arrive as one
float32 array (a view of the backend's output, not a copy where the backend allows), and the only
vocab-sized work is the EOS mask, the n-gram bans (a handful of ids) and one argmax (greedy) or one
softmax plus a partial sort (sampling).
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from .engine_prefix import PrefixCache
from .errors import LoraMedError
from .models import load_model, resolve_device

ENGINE_FILE = "engine.json"  # written by decode_graph.build_decode_graph beside model.onnx


@dataclass(frozen=True)
class GenerationSettings:
    """How replies are chosen. Defaults: greedy, up to 40 new tokens, no repetition control."""

    max_new_tokens: int = 40  # new tokens per row at most (EOS ends a row earlier)
    min_new_tokens: int = 0  # EOS is suppressed until a row has this many new tokens (bench forces exact lengths)
    do_sample: bool = False  # False: greedy (argmax; the first id wins a tie, as torch.argmax)
    temperature: float = 1.0  # sampling only: logits are divided by it before top-p
    top_p: float = 1.0  # sampling only: keep the smallest set of top tokens whose probability reaches top_p
    no_repeat_ngram_size: int = 0  # > 0: a token that would repeat an n-gram of prompt + reply is banned
    seed: int | None = None  # sampling is reproducible by seed (numpy PCG64); None draws fresh entropy

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if not 0 <= self.min_new_tokens <= max(self.max_new_tokens, 0):
            out.append(f"min_new_tokens={self.min_new_tokens}: must be between 0 and max_new_tokens "
                       f"({self.max_new_tokens})")
        if self.do_sample and not self.temperature > 0:
            out.append(f"temperature={self.temperature}: must be > 0 (use do_sample=False for greedy)")
        if self.do_sample and not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.no_repeat_ngram_size < 0:
            out.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size}: must be >= 0 (0 turns it off)")
        return out


class StepBackend(Protocol):
    """What computes logits for the loop (see the module docstring)."""

    capacity: int

    def prefill(self, rows: list[list[int]], max_new_tokens: int) -> np.ndarray: ...

    def step(self, tokens: np.ndarray) -> np.ndarray: ...

    def scope(self) -> contextlib.AbstractContextManager: ...

    def close(self) -> None: ...


class Engine:
    """One generation loop over a step backend. Build it with :func:`load_engine` or :func:`torch_engine`."""

    def __init__(self, backend: StepBackend, *, name: str, device: str, precision: str, eos_token_id: int,
                 vocab_size: int, info: dict | None = None, prefix_cache: PrefixCache | None = None):
        self._backend = backend
        # Kept KV caches of finished replies (engine_prefix); only a backend that can restore rows takes one.
        self.prefix_cache = prefix_cache if getattr(backend, "restores_prefixes", False) else None
        self.name = name
        self.device = device
        self.precision = precision
        self.capacity = int(backend.capacity)
        self.eos_token_id = int(eos_token_id)
        self.vocab_size = int(vocab_size)
        self.info = dict(info or {})  # what the engine runs: graph recipe, provider, threads (for reports)
        # A backend holds one KV cache: calls from several threads (a server) take turns; batch them instead.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, capacity={self.capacity})"

    def generate(self, prompts: list[list[int]],
                 settings: GenerationSettings = GenerationSettings()) -> list[list[int]]:
        """New token ids for each prompt (a batch: several prompts, any lengths).

        A row stops at EOS (not included in its ids) or after ``settings.max_new_tokens`` tokens. A prompt
        longer than ``capacity - max_new_tokens`` is cut from the left (the oldest turns go first, as in
        training).

        Raises:
            LoraMedError: empty prompt list or prompt, a token id outside the vocabulary, bad settings, or
                ``max_new_tokens`` that leaves no room for a prompt in the capacity.
        """
        rows = self._check(prompts, settings)
        s = settings
        batch = len(rows)
        eos = self.eos_token_id
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        feed = np.empty(batch, dtype=np.int64)
        bans = _NGramBans(rows, s.no_repeat_ngram_size) if s.no_repeat_ngram_size > 0 else None
        chooser = _Sampler(s) if s.do_sample else None
        cache = self.prefix_cache
        fed: list[list[int]] = [[] for _ in range(batch)]  # tokens fed after the prompt whose KV is valid
        with self._lock, self._backend.scope():
            if cache is not None:
                reuse = [cache.lookup(r) for r in rows]
                logits = self._backend.prefill(rows, s.max_new_tokens, reuse=reuse)
            else:
                logits = self._backend.prefill(rows, s.max_new_tokens)
            for t in range(s.max_new_tokens):
                if t < s.min_new_tokens:
                    logits[:, eos] = -np.inf
                if bans is not None:
                    bans.apply(logits, done)
                nxt = chooser.choose(logits) if chooser is not None else logits.argmax(axis=1)
                was_done = done.copy()
                for b in range(batch):
                    if done[b]:
                        continue
                    tok = int(nxt[b])
                    if tok == eos:
                        done[b] = True
                    else:
                        out[b].append(tok)
                        if bans is not None:
                            bans.add(b, tok)
                if done.all() or t == s.max_new_tokens - 1:
                    break
                # Finished rows keep a fixed shape by feeding EOS; their logits are ignored.
                np.copyto(feed, nxt, casting="unsafe")
                feed[done] = eos
                if cache is not None:  # a row's own token (or the EOS that ended it) is written at its position
                    for b in np.flatnonzero(~was_done):
                        fed[b].append(int(feed[b]))
                logits = self._backend.step(feed)
            if cache is not None:
                for b in range(batch):
                    tokens = rows[b] + fed[b]
                    cache.store(tokens, self._backend.snapshot(b, len(tokens)),
                                extends=reuse[b][0] if reuse[b] is not None else None)
        return out

    def _check(self, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
        problems = settings.problems()
        budget = self.capacity - settings.max_new_tokens
        if settings.max_new_tokens >= 1 and budget < 1:
            problems.append(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the engine's "
                            f"capacity of {self.capacity} tokens; ask for fewer new tokens or rebuild the decode "
                            f"graph with a larger capacity")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            problems.append("prompts: give a non-empty list of token-id lists (a batch of one is [[ids...]])")
        else:
            for i, p in enumerate(prompts):
                if len(p) == 0:
                    problems.append(f"prompt {i} is empty; a reply needs at least one token (e.g. the EOS that "
                                    f"ends the previous turn)")
                elif min(p) < 0 or max(p) >= self.vocab_size:
                    problems.append(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}); "
                                    f"was it encoded with this model's tokenizer?")
        if problems:
            raise LoraMedError(f"{self.name}: cannot generate", problems)
        return [[int(t) for t in p[-budget:]] for p in prompts]

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        """float32 ``[len(ids) - 1, vocab]``: row i is the logits after ``ids[:i + 1]``, computed the way decoding
        computes them (the first token as a prompt, then one cached step per token). For parity gates:
        top-1 agreement and logit differences against PyTorch on held-out conversations."""
        if not 2 <= len(ids) <= self.capacity:
            raise LoraMedError(f"{self.name}: teacher forcing needs 2 to {self.capacity} (capacity) tokens, "
                               f"got {len(ids)}")
        out = np.empty((len(ids) - 1, self.vocab_size), np.float32)
        with self._lock, self._backend.scope():
            out[0] = self._backend.prefill([[int(ids[0])]], len(ids) - 1)[0]
            feed = np.empty(1, np.int64)
            for i in range(1, len(ids) - 1):
                feed[0] = ids[i]
                out[i] = self._backend.step(feed)[0]
        return out

    def close(self) -> None:
        """Free the backend (sessions, device buffers). The engine cannot generate afterwards."""
        self._backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- token choice


class _NGramBans:
    """transformers' NoRepeatNGramLogitsProcessor, kept incrementally: for each row, the (n-1)-token
    prefixes seen so far (prompt included) map to the tokens that followed them."""

    def __init__(self, rows: list[list[int]], n: int):
        self.n = n
        self.seqs = [list(r) for r in rows]
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in rows]
        for b, seq in enumerate(self.seqs):
            for i in range(len(seq) - n + 1):
                self.seen[b].setdefault(tuple(seq[i:i + n - 1]), set()).add(seq[i + n - 1])

    def add(self, b: int, tok: int) -> None:
        seq = self.seqs[b]
        seq.append(tok)
        if len(seq) >= self.n:
            self.seen[b].setdefault(tuple(seq[len(seq) - self.n:-1]), set()).add(tok)

    def apply(self, logits: np.ndarray, done: np.ndarray) -> None:
        for b, seq in enumerate(self.seqs):
            if done[b] or len(seq) + 1 < self.n:
                continue
            banned = self.seen[b].get(tuple(seq[len(seq) - self.n + 1:]))
            if banned:
                logits[b, list(banned)] = -np.inf


class _Sampler:
    """Temperature, then top-p (nucleus), then one draw per row, as transformers' warpers in that order."""

    CANDIDATES = 1024  # top-p looks at this many top tokens first and sorts the whole vocabulary only if needed

    def __init__(self, s: GenerationSettings):
        self.temperature = float(s.temperature)
        self.top_p = float(s.top_p)
        self.rng = np.random.default_rng(s.seed)

    def choose(self, logits: np.ndarray) -> np.ndarray:
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b in range(logits.shape[0]):
            out[b] = self._one(logits[b])
        return out

    def _one(self, row: np.ndarray) -> int:
        x = row.astype(np.float64) / self.temperature
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        if self.top_p < 1.0:
            ids = self._nucleus(p)
            p = p[ids] / p[ids].sum()
        else:
            ids = None
        pick = int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"))
        pick = min(pick, p.shape[0] - 1)
        return int(ids[pick]) if ids is not None else pick

    def _nucleus(self, p: np.ndarray) -> np.ndarray:
        """Ids of the smallest top set whose mass reaches top_p (a token is kept while the mass above it is
        below top_p, the rule of transformers' TopPLogitsWarper), most probable first."""
        k = min(self.CANDIDATES, p.shape[0])
        cand = np.argpartition(-p, k - 1)[:k] if k < p.shape[0] else np.arange(p.shape[0])
        if p[cand].sum() < self.top_p and k < p.shape[0]:
            cand = np.arange(p.shape[0])
        order = cand[np.argsort(-p[cand], kind="stable")]
        above = np.cumsum(p[order]) - p[order]
        return order[above < self.top_p]


# --------------------------------------------------------------------------- PyTorch backend


class _TorchBackend:
    """A Hugging Face causal LM with its KV cache: prompts left-padded with an attention mask and
    per-row positions, then one token per row per step (``past_key_values``). The model is a PyTorch
    module, or an ``ORTModelForCausalLM`` (same call, tensors in and out; no parameters, no train mode)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.capacity = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))
        self.is_module = isinstance(model, torch.nn.Module)
        if self.is_module:
            param = next(model.parameters())
            self.device, self.dtype = param.device, param.dtype
        else:
            self.device, self.dtype = torch.device(model.device), None
        # transformers' models compute the head for the last position only; Optimum's graph has no such input.
        self.keep = {"logits_to_keep": 1} if self.is_module else {}
        self.cache = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        # Replies are made in eval mode (dropout off) and without autograd; the caller's mode is restored,
        # so a comparison reply in the middle of training does not leave the model in eval mode.
        was_training = self.is_module and self.model.training
        if self.is_module:
            self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.cache = None
            if was_training:
                self.model.train()

    def prefill(self, rows: list[list[int]], max_new_tokens: int) -> np.ndarray:
        batch, width = len(rows), max(len(r) for r in rows)
        ids = torch.zeros((batch, width), dtype=torch.long)
        # The mask covers the whole reply up front; each step exposes one more column of it (a view).
        mask = torch.zeros((batch, width + max_new_tokens), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):width + max_new_tokens] = 1
        self.mask = mask.to(self.device)
        pos = (self.mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        self.pos = pos[:, -1:].clone()
        self.length = width
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask[:, :width], position_ids=pos,
                         use_cache=True, **self.keep)
        self.cache = out.past_key_values
        return self._logits(out.logits)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.pos += 1
        self.length += 1
        ids = torch.from_numpy(tokens).view(-1, 1).to(self.device)
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :self.length], position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return self._logits(out.logits)

    def _logits(self, logits) -> np.ndarray:
        # [batch, 1, vocab] -> float32 numpy (a view on the CPU in fp32; one copy from a GPU)
        return logits[:, -1, :].float().cpu().numpy()

    def close(self) -> None:
        self.cache = None
        self.model = None


def _precision_of(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def torch_engine(model, *, eos_token_id: int, name: str | None = None) -> Engine:
    """The engine's loop over an in-memory Hugging Face causal LM (a PEFT model with its adapter works too).

    Used for the base vs fine-tuned comparison replies during training, before any export exists, and as
    the PyTorch side of comparisons. The model is put in eval mode for each ``generate`` call and its
    previous mode restored afterwards.
    """
    backend = _TorchBackend(model)
    device = backend.device.type
    precision = _precision_of(backend.dtype)
    vocab = int(model.config.vocab_size)
    return Engine(backend, name=name or f"engine-torch-{device}-{precision}", device=device, precision=precision,
                  eos_token_id=eos_token_id, vocab_size=vocab,
                  info={"backend": "torch", "model_type": getattr(model.config, "model_type", None)})


def optimum_engine(model, *, eos_token_id: int, name: str | None = None, precision: str = "fp32") -> Engine:
    """The engine's loop over an export's standard Optimum graph (``ORTModelForCausalLM``, KV cache on).

    The parity gate checks that graph's cached path with it: the same loop, token choice and stopping as
    every other reply, with Optimum's graph computing the logits.
    """
    backend = _TorchBackend(model)
    device = backend.device.type
    return Engine(backend, name=name or f"engine-optimum-{device}-{precision}", device=device, precision=precision,
                  eos_token_id=eos_token_id, vocab_size=int(model.config.vocab_size),
                  info={"backend": "onnxruntime (Optimum ORTModelForCausalLM)",
                        "provider": getattr(model, "provider", None)})


# --------------------------------------------------------------------------- loading


def load_engine(path, *, device: str = "auto", threads: int | None = None, spin: bool = True,
                prefix_cache_mb: float = 0) -> Engine:
    """An engine for a folder.

    Args:
        path: a decode-graph folder (``model.onnx`` + ``engine.json``, as written by
            :func:`lora_med.decode_graph.build_decode_graph`), run by ONNX Runtime; or a Hugging Face
            causal-LM folder (``config.json`` + ``model.safetensors``), run by PyTorch through the same loop.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: intra-op threads (ONNX Runtime session, or torch for a PyTorch folder); None: library default.
        spin: ONNX Runtime only: False stops idle threads spinning (see ``engine_ort.session_options``).
        prefix_cache_mb: memory for finished replies' KV caches, so that a prompt starting with an earlier
            prompt and its reply (a conversation's next turn) prefills only the rest (``engine_prefix``); 0: off.
            The decode graph on the CPU only; elsewhere it is ignored.

    Raises:
        LoraMedError: the folder holds neither, or the device does not fit the graph's precision.
    """
    folder = Path(path)
    if (folder / ENGINE_FILE).is_file():
        from .engine_ort import ort_engine  # here, not at the top: engine_ort imports Engine from this module

        info = json.loads((folder / ENGINE_FILE).read_text(encoding="utf-8"))
        return ort_engine(folder, info, device=device, threads=threads, spin=spin, prefix_cache_mb=prefix_cache_mb)
    if (folder / "config.json").is_file():
        dev = _resolve(device, resolve_device)
        if threads:
            torch.set_num_threads(int(threads))
        model = load_model(str(folder)).to(dev)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else model.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise LoraMedError(f"{folder}/config.json has no eos_token_id; the engine needs one to end replies")
        return torch_engine(model, eos_token_id=int(eos))
    raise LoraMedError(f"{folder}: neither a decode graph ({ENGINE_FILE} + model.onnx; build one with "
                       f"lora_med.decode_graph.build_decode_graph) nor a Hugging Face model folder (config.json + "
                       f"model.safetensors)")


def _resolve(device: str, resolve_device) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise LoraMedError(f"device={device!r}: use auto, cpu or cuda")
    return resolve_device(device)
