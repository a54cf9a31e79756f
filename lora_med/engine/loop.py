"""The generation engine: one token loop for every reply lora-med produces.

``Stream`` (and ``Engine.generate``, a stream that takes all its prompts at once) owns everything that
decides *which* token comes next (greedy or sampling with temperature/top-p, EOS stop, ``min_new_tokens``,
no-repeat n-grams, the left cut of long prompts, batches of prompts of any lengths, prompts joining a
running batch). What computes the logits is a step backend over a KV cache of ``rows`` rows:

- ``open(rows)``: a cache for that many rows;
- ``prefill(at, prompts, max_new_tokens, reuse=None)``: run the prompts into rows ``at``, return the last
  prompt position's logits per prompt (``float32 [len(at), vocab]``); ``reuse[i]``, a prefix-cache entry and
  a token count, gives prompt ``i``'s first positions from that entry (only where ``restores_prefixes``);
- ``step(tokens, active)``: feed one new token to each of the first ``len(tokens)`` rows (only ``active``
  rows advance), return their next logits;
- ``snapshot(row, n)``: copies of a row's first ``n`` cached positions, kept by the prefix cache (only where
  ``restores_prefixes``).

Two backends exist: the ONNX decode graph written by :mod:`lora_med.export.decode_graph`, run by ONNX Runtime
on the CPU or CUDA provider (:mod:`lora_med.engine.ort_backend`), and a Hugging Face causal LM with its KV cache
(:mod:`lora_med.engine.torch_backend`; ``past_key_values``, a token loop, not transformers' ``generate()``): a PyTorch
model, for models that have not been exported yet (the base vs fine-tuned comparison during training), or an
export's standard Optimum graph as ``ORTModelForCausalLM`` (the parity gate's greedy check of that graph).

Host work per token is kept to a few numpy operations over ``[batch, vocab]``: logits arrive as one
float32 array (a view of the backend's output, not a copy where the backend allows), and the only
vocab-sized work is the EOS mask, the n-gram bans (a handful of ids) and one argmax (greedy) or one
softmax plus a partial sort (sampling).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import LoraMedError
from .prefix_cache import Entry, PrefixCache
from .sampling import NGramBans, Sampler


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
            out.append(
                f"min_new_tokens={self.min_new_tokens}: must be between 0 and max_new_tokens ({self.max_new_tokens})"
            )
        if self.do_sample and not self.temperature > 0:
            out.append(f"temperature={self.temperature}: must be > 0 (use do_sample=False for greedy)")
        if self.do_sample and not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.no_repeat_ngram_size < 0:
            out.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size}: must be >= 0 (0 turns it off)")
        return out


Reuse = tuple[Entry, int]  # a prefix-cache entry and how many of its positions a prompt takes


@dataclass(frozen=True)
class RowSettings:
    """One reply's own choices inside a stream (a server's request asking for them); None keeps the stream's.

    ``max_new_tokens`` may only lower the stream's (the prompt budget was set for it). Sampling on
    (``temperature`` > 0 or ``do_sample``) gives the row its own sampler, seeded by ``seed`` when given."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def problems(self, stream: GenerationSettings) -> list[str]:
        out = []
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= stream.max_new_tokens:
            out.append(f"max_new_tokens={self.max_new_tokens}: must be between 1 and {stream.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            out.append(f"temperature={self.temperature}: must be >= 0 (0: greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p}: must be in (0, 1]")
        return out

    def choice(self, stream: GenerationSettings) -> Sampler | str | None:
        """How the row picks tokens: ``"greedy"``, its own Sampler, or None (the stream's way)."""
        sampling = self.do_sample if self.do_sample is not None else stream.do_sample
        if self.temperature is not None:
            sampling = self.temperature > 0 and self.do_sample is not False
        if not sampling:
            return "greedy" if stream.do_sample else None
        if self.temperature is None and self.top_p is None and self.seed is None and stream.do_sample:
            return None
        temperature = self.temperature if self.temperature is not None else stream.temperature
        return Sampler(temperature, self.top_p if self.top_p is not None else stream.top_p, self.seed)


class StepBackend(Protocol):
    """What computes logits for the loop (see the module docstring)."""

    capacity: int
    joins: bool  # rows can be prefilled while others are decoding (continuous batching)
    restores_prefixes: bool  # rows' caches can be copied out (snapshot) and back (prefill's reuse)

    def open(self, rows: int) -> None: ...

    def prefill(
        self, at: list[int], rows: list[list[int]], max_new_tokens: int, reuse: list[Reuse | None] | None = None
    ) -> np.ndarray: ...

    def step(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray: ...

    def snapshot(self, row: int, n: int) -> list[np.ndarray]: ...

    def scope(self) -> contextlib.AbstractContextManager: ...

    def close(self) -> None: ...


class Engine:
    """One generation loop over a step backend. Build it with :func:`load_engine` or :func:`torch_engine`."""

    def __init__(
        self,
        backend: StepBackend,
        *,
        name: str,
        device: str,
        precision: str,
        eos_token_id: int | Sequence[int],
        vocab_size: int,
        info: dict | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self._backend = backend
        # Kept KV caches of finished replies (engine_prefix); only a backend that can restore rows takes one.
        self.prefix_cache = prefix_cache if backend.restores_prefixes else None
        self.name = name
        self.device = device
        self.precision = precision
        self.capacity = int(backend.capacity)
        self.joins = bool(backend.joins)
        # Every token that ends a reply (a chat model's end-of-turn marker beside its EOS: Qwen2.5's <|im_end|>
        # and <|endoftext|>); the first is what idle rows are fed.
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids:
            raise LoraMedError(f"{name}: no end-of-reply token id; the engine needs one to end replies")
        self.eos_token_ids = tuple(dict.fromkeys(int(t) for t in ids))
        self.vocab_size = int(vocab_size)
        self.info = dict(info or {})  # what the engine runs: graph recipe, provider, threads (for reports)
        # A backend holds one KV cache: calls from several threads (a server) take turns; batch them instead.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, capacity={self.capacity})"

    @property
    def eos_token_id(self) -> int:
        """The first end-of-reply id (what idle rows are fed); setting it makes it the only one."""
        return self.eos_token_ids[0]

    @eos_token_id.setter
    def eos_token_id(self, value: int) -> None:
        self.eos_token_ids = (int(value),)

    def generate(
        self, prompts: list[list[int]], settings: GenerationSettings = GenerationSettings()
    ) -> list[list[int]]:
        """New token ids for each prompt (a batch: several prompts, any lengths).

        A row stops at an EOS id (``eos_token_ids``; not included in its ids) or after ``settings.max_new_tokens`` tokens. A prompt
        longer than ``capacity - max_new_tokens`` is cut from the left (the oldest turns go first, as in
        training). This is a :meth:`stream` that takes every prompt at once and steps until all have finished.

        Raises:
            LoraMedError: empty prompt list or prompt, a token id outside the vocabulary, bad settings, or
                ``max_new_tokens`` that leaves no room for a prompt in the capacity.
        """
        done: dict[int, list[int]] = {}
        # The stream checks the settings, add() the prompts (a list that is empty or not a list is add()'s error).
        with self.stream(settings, rows=len(prompts) if isinstance(prompts, (list, tuple)) and prompts else 1) as s:
            handles = s.add(prompts)
            while s.busy:
                done.update((f.handle, f.ids) for f in s.step())
        return [done[h] for h in handles]

    def keep_prefix(self, ids: list[int]) -> int:
        """Put the KV cache of ``ids``, a start every later prompt shares (a server's system prompt), into the
        prefix cache now, so that the first prompts after a start prefill only what follows it. Returns the
        tokens kept: 0 without a prefix cache or for fewer than its minimum."""
        cache = self.prefix_cache
        if cache is None or len(ids) < max(cache.min_tokens, 1):
            return 0
        # One new token: the row's cache then holds exactly ``ids`` (the chosen token is never fed), which is
        # what the finished row leaves in the prefix cache.
        self.generate([list(ids)], GenerationSettings(max_new_tokens=1))
        cache.prompt_tokens -= len(ids)  # not a request: the counters (/metrics) count prompts only
        return len(ids)

    @contextlib.contextmanager
    def keeping_prefixes(self, max_bytes: int) -> Iterator[PrefixCache | None]:
        """A prefix cache of ``max_bytes`` for the block's life, the engine's own restored after it (a benchmark
        of the server's workload on an engine loaded without one); None (no prefix cache in the block) for 0 bytes
        or where the backend cannot restore rows."""
        old = self.prefix_cache
        self.prefix_cache = PrefixCache(max_bytes) if max_bytes > 0 and self._backend.restores_prefixes else None
        try:
            yield self.prefix_cache
        finally:
            self.prefix_cache = old

    @contextlib.contextmanager
    def stream(self, settings: GenerationSettings = GenerationSettings(), *, rows: int) -> Iterator[Stream]:
        """Up to ``rows`` replies in flight at once (continuous batching); see :class:`Stream`.

        The engine is held for the stream's life: other calls wait for it to close.

        Raises:
            LoraMedError: bad settings, or ``rows`` < 1.
        """
        self._check_settings(settings)
        if rows < 1:
            raise LoraMedError(f"{self.name}: a stream needs rows >= 1, got {rows}")
        with self._lock, self._backend.scope():
            self._backend.open(rows)
            yield Stream(self, settings, rows)

    def _check_settings(self, settings: GenerationSettings) -> None:
        problems = settings.problems()
        if settings.max_new_tokens >= 1 and self.capacity - settings.max_new_tokens < 1:
            problems.append(
                f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the engine's "
                f"capacity of {self.capacity} tokens; ask for fewer new tokens or rebuild the decode "
                f"graph with a larger capacity"
            )
        if problems:
            raise LoraMedError(f"{self.name}: cannot generate", problems)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        problems = []
        if not isinstance(prompts, (list, tuple)) or not prompts:
            problems.append("prompts: give a non-empty list of token-id lists (a batch of one is [[ids...]])")
        else:
            for i, p in enumerate(prompts):
                if len(p) == 0:
                    problems.append(
                        f"prompt {i} is empty; a reply needs at least one token (e.g. the EOS that "
                        f"ends the previous turn)"
                    )
                elif min(p) < 0 or max(p) >= self.vocab_size:
                    problems.append(
                        f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}); "
                        f"was it encoded with this model's tokenizer?"
                    )
        if problems:
            raise LoraMedError(f"{self.name}: cannot generate", problems)

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        """float32 ``[len(ids) - 1, vocab]``: row i is the logits after ``ids[:i + 1]``, computed the way decoding
        computes them (the first token as a prompt, then one cached step per token). For parity gates:
        top-1 agreement and logit differences against PyTorch on held-out conversations."""
        if not 2 <= len(ids) <= self.capacity:
            raise LoraMedError(
                f"{self.name}: teacher forcing needs 2 to {self.capacity} (capacity) tokens, got {len(ids)}"
            )
        out = np.empty((len(ids) - 1, self.vocab_size), np.float32)
        with self._lock, self._backend.scope():
            self._backend.open(1)
            out[0] = self._backend.prefill([0], [[int(ids[0])]], len(ids) - 1)[0]
            feed, active = np.empty(1, np.int64), np.ones(1, bool)
            for i in range(1, len(ids) - 1):
                feed[0] = ids[i]
                out[i] = self._backend.step(feed, active)[0]
        return out

    def cache_bytes(self, rows: int) -> int | None:
        """Memory a stream of ``rows`` rows takes for its KV cache (None: the backend does not say)."""
        fn = getattr(self._backend, "cache_bytes", None)
        return int(fn(rows)) if fn is not None else None

    def close(self) -> None:
        """Free the backend (its ONNX Runtime session or model, device buffers); the engine cannot generate after."""
        self._backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- rows in flight


@dataclass(frozen=True)
class Finished:
    """A reply that is complete: its handle (from :meth:`Stream.add`), its new token ids (EOS not included)
    and the mean number of rows in the backend calls that made it (its prefill, then each decode step; 1 for
    a reply made alone)."""

    handle: int
    ids: list[int]
    batch: float


@dataclass
class _Row:
    handle: int
    prompt: list[int]
    reuse: Reuse | None  # (prefix-cache entry, tokens taken from it)
    bans: NGramBans | None
    max_new: int = 0  # this row's new-token limit
    pick: Sampler | str | None = None  # RowSettings.choice: None = the stream's way
    out: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens fed after the prompt (their KV is in the cache)
    last: int = 0  # the token chosen last, fed at the next step
    rows_seen: int = 0  # rows in the backend calls it took part in (its prefill, then decode steps), summed
    steps: int = 0  # those calls


class Stream:
    """Replies in flight over one backend (continuous batching): :meth:`add` prompts whenever rows are free,
    :meth:`step` decodes one token for every unfinished row and returns the replies that finished.

    Every reply goes through the same token choice as :meth:`Engine.generate` (which is a stream that adds
    all its prompts at once). A backend that ``joins`` (the decode graph on the CPU) prefills new prompts into
    free rows of its cache while the other rows wait one step; a finished row's place is free at once, and
    the decode batch is as wide as the highest busy row. Other backends (PyTorch, CUDA graphs) take new
    prompts only when every row has finished: whole batches, as before. Make one with :meth:`Engine.stream`.
    """

    def __init__(self, engine: Engine, settings: GenerationSettings, rows: int):
        self._engine, self._backend = engine, engine._backend
        self.settings = settings
        self.rows = rows
        self._live: dict[int, _Row] = {}  # row index in the backend's cache -> its reply so far
        self._width = 0  # rows the backend decodes (a backend that does not join keeps its batch's width)
        self._finished: list[Finished] = []
        self._handles = 0
        s = settings
        self._sampler = Sampler(s.temperature, s.top_p, s.seed) if s.do_sample else None
        self._stop = frozenset(engine.eos_token_ids)

    @property
    def busy(self) -> bool:
        """Replies are in flight or finished but not yet returned by :meth:`step`."""
        return bool(self._live or self._finished)

    @property
    def live(self) -> int:
        return len(self._live)

    def free(self) -> int:
        """How many prompts :meth:`add` takes now."""
        if self._engine.joins:
            return self.rows - len(self._live)
        return 0 if self._live else self.rows

    def add(self, prompts: list[list[int]], settings: list[RowSettings | None] | None = None) -> list[int]:
        """Prefill ``prompts`` into free rows and choose their first tokens; one handle per prompt.

        A prompt longer than ``capacity - max_new_tokens`` is cut from the left, as in ``generate``.
        ``settings``: per prompt, its own choices (:class:`RowSettings`), or None for the stream's.

        Raises:
            LoraMedError: a bad prompt or row setting (nothing is added), or more prompts than :meth:`free` rows.
        """
        self._engine._check_prompts(prompts)
        settings = list(settings) if settings is not None else [None] * len(prompts)
        bad = [p for rs in settings if rs is not None for p in rs.problems(self.settings)]
        if len(settings) != len(prompts) or bad:
            raise LoraMedError(f"{self._engine.name}: cannot add", bad or ["give one RowSettings (or None) per prompt"])
        if len(prompts) > self.free():
            raise LoraMedError(
                f"{self._engine.name}: {len(prompts)} prompts for {self.free()} free rows; add at most free() prompts"
            )
        budget = self._engine.capacity - self.settings.max_new_tokens
        rows = [[int(t) for t in p[-budget:]] for p in prompts]
        at = [b for b in range(self.rows) if b not in self._live][: len(rows)]
        cache, n = self._engine.prefix_cache, self.settings.no_repeat_ngram_size
        reuse: list[Reuse | None] = [cache.lookup(r) for r in rows] if cache is not None else [None] * len(rows)
        if not self._engine.joins:  # a whole batch: its cache sized to it (CUDA: the captured graph of its size)
            self._backend.open(len(rows))
        logits = self._backend.prefill(at, rows, self.settings.max_new_tokens, reuse=reuse)
        handles = []
        for b, r, re, rs in zip(at, rows, reuse, settings):
            self._live[b] = _Row(
                self._handles,
                r,
                re,
                NGramBans(r, n) if n > 0 else None,
                max_new=rs.max_new_tokens or self.settings.max_new_tokens if rs else self.settings.max_new_tokens,
                pick=rs.choice(self.settings) if rs else None,
                rows_seen=len(rows),  # its prefill ran with the prompts added with it
                steps=1,
            )
            handles.append(self._handles)
            self._handles += 1
        if not self._engine.joins:
            self._width = len(rows)  # every row of the batch decodes until the batch ends (a joining backend's
            # width is the highest busy row, set at each step)
        self._choose(at, logits)
        return handles

    def step(self) -> list[Finished]:
        """One decode step for every unfinished row (none when all have finished); the replies finished
        since the last call, in the order they finished."""
        if self._live:
            if self._engine.joins:
                self._compact()
                self._width = max(self._live) + 1  # rows above the highest busy one cost nothing
            feed = np.full(self._width, self._engine.eos_token_id, np.int64)  # idle rows: EOS, logits ignored
            active = np.zeros(self._width, bool)
            for b, r in self._live.items():
                feed[b], active[b] = r.last, True
                r.fed.append(r.last)
                r.rows_seen += len(self._live)
                r.steps += 1
            logits = self._backend.step(feed, active)
            at = sorted(self._live)
            self._choose(at, logits if len(at) == self._width else logits[at])
        out, self._finished = self._finished, []
        return out

    def tokens(self, handle: int) -> list[int] | None:
        """The new token ids of a reply still in flight so far (a copy); None once it finished or was dropped."""
        for r in self._live.values():
            if r.handle == handle:
                return list(r.out)
        return None

    def _compact(self) -> None:
        """Move the highest busy rows down into the free rows below them (their KV cache copied), so the decode
        batch is as wide as the rows in flight: a long reply in the top row no longer keeps the finished rows
        below it in every step. Only backends that move rows (the CPU decode graph) take part."""
        move = getattr(self._backend, "move_row", None)
        if move is None:
            return
        for dst in [b for b in range(max(self._live)) if b not in self._live]:
            src = max(self._live)
            if src < dst:
                break
            move(src, dst)
            self._live[dst] = self._live.pop(src)

    def drop(self, handle: int) -> None:
        """Stop a reply nobody waits for any more (its row is free at once); unknown handles are ignored."""
        for b, r in list(self._live.items()):
            if r.handle == handle:
                del self._live[b]
        self._finished = [f for f in self._finished if f.handle != handle]

    def _choose(self, at: list[int], logits: np.ndarray) -> None:
        """Pick the next token of rows ``at`` from their logits (``[len(at), vocab]``, rows in that order)."""
        s, eos = self.settings, self._engine.eos_token_ids
        stop = self._stop
        for i, b in enumerate(at):
            r = self._live[b]
            if len(r.out) < s.min_new_tokens:
                logits[i, list(eos)] = -np.inf
            if r.bans is not None:
                r.bans.apply(logits[i])
        if self._sampler is not None:
            nxt = self._sampler.choose(logits)  # the stream samples (rows that asked for greedy are redone below)
        else:
            nxt = logits.argmax(axis=1)
        for i, b in enumerate(at):
            pick = self._live[b].pick
            if isinstance(pick, Sampler):
                nxt[i] = pick.choose(logits[i : i + 1])[0]
            elif pick == "greedy" and self._sampler is not None:
                nxt[i] = int(logits[i].argmax())
        for b, tok in zip(at, nxt.tolist()):
            r = self._live[b]
            ended = tok in stop
            if not ended:
                r.out.append(tok)
                r.last = tok
                if r.bans is not None:
                    r.bans.add(tok)
            if ended or len(r.out) >= r.max_new:
                self._finish(b)

    def _finish(self, b: int) -> None:
        r = self._live.pop(b)
        cache = self._engine.prefix_cache
        if cache is not None:  # keep the row's KV (prompt + the reply tokens fed so far) for the next turn
            tokens = r.prompt + r.fed
            cache.store(
                tokens, self._backend.snapshot(b, len(tokens)), extends=r.reuse[0] if r.reuse is not None else None
            )
        self._finished.append(Finished(r.handle, r.out, r.rows_seen / r.steps))
