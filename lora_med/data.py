"""Conversation data: load and validate files, format them for causal LMs, split them.

Two row forms are accepted, in a JSON array or in JSONL (one object per line):

* ``{"user": "...", "assistant": "..."}``: the seed guide's form, one exchange;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: an optional
  leading system message, then user/assistant turns alternating, ending with the assistant.

Loading is strict: every problem in a file is collected and raised once as a ``DatasetError``
naming the file, the row (index or line number) and the field. Whatever bytes a file holds, the
loader raises nothing but ``DatasetError`` (tests/test_data_fuzz.py proves it with hypothesis).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FORMATS
from .errors import ConfigError, DatasetError
from .fileio import read_regular

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 40  # problems listed in one error; the rest are counted
# Characters one message may hold. A tokenizer given a 200 MB string asks for gigabytes at once (and aborts the
# process); 100,000 characters is ~25,000 tokens, beyond the window of every model lora-med trains.
MAX_MESSAGE_CHARS = 100_000

# UTF-8 text decoded as Latin-1/Windows-1252 turns "é" into "Ã©", "Ñ" into "Ã‘", "¿" into "Â¿" and
# "—" into "â€”". A lead byte Ã/Â followed by a continuation-byte character never occurs in Spanish.
_CP1252_CONT = "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
_MOJIBAKE = re.compile(f"[\u00c2\u00c3][{_CP1252_CONT}]|\u00e2\u20ac")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """One validated conversation; ``where`` says where it came from (for error messages)."""

    messages: tuple[Message, ...]
    where: str

    @property
    def turns(self) -> int:
        """User and assistant messages (a system message is not a turn)."""
        return sum(m.role != "system" for m in self.messages)

    def key(self) -> tuple:
        """Identity for duplicate detection: same roles and same text, ignoring case and spacing."""
        return tuple((m.role, " ".join(m.content.split()).casefold()) for m in self.messages)

    def to_row(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


@dataclass
class Dataset:
    """A loaded file: its conversations, its SHA-256 and what was noticed but is not fatal."""

    path: Path
    conversations: list[Conversation]
    sha256: str
    duplicates: list[str]


# --------------------------------------------------------------------------- loading


def load_conversations(path: str | Path) -> Dataset:
    """Load and validate a conversation file (JSON array or JSONL).

    Raises:
        DatasetError: the file is missing, not UTF-8, not valid JSON/JSONL, or any row is malformed.
    """
    path = Path(path)
    raw = _read_bytes(path)
    text = _decode(path, raw)
    rows = _parse_rows(path, text)
    conversations: list[Conversation] = []
    problems: list[str] = []
    for where, row in rows:
        conv, row_problems = _parse_row(row, where)
        problems.extend(row_problems)
        if conv is not None:
            conversations.append(conv)
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more")
        raise DatasetError(
            f"{path}: {len(problems)} problem(s) found; fix them and run `lora-med data check {shlex.quote(str(path))}`",
            shown,
        )
    if not conversations:
        raise DatasetError(f"{path}: the dataset is empty; add at least one conversation")
    return Dataset(path, conversations, hashlib.sha256(raw).hexdigest(), find_duplicates(conversations))


def find_duplicates(conversations: Iterable[Conversation]) -> list[str]:
    seen: dict[tuple, str] = {}
    found = []
    for conv in conversations:
        k = conv.key()
        if k in seen:
            found.append(f"{conv.where} duplicates {seen[k]}")
        else:
            seen[k] = conv.where
    return found


def _read_bytes(path: Path) -> bytes:
    # A regular file only, and bounded: a FIFO or /dev/zero given as data must not hang or fill memory.
    return read_regular(path, "pass the path of a .json or .jsonl conversation file", error=DatasetError)


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):  # Windows editors add one; it is harmless
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(
            f"{path}:{line}:{col}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save the file with UTF-8 encoding"
        ) from None


def _parse_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError(f"{path}: the dataset is empty; add at least one conversation")
    jsonl = path.suffix.lower() == ".jsonl" or (path.suffix.lower() != ".json" and stripped[0] == "{")
    if jsonl:
        rows = []
        # Lines end at \n only: str.splitlines() would also cut at U+2028, U+0085 and other characters
        # that valid JSON strings may hold unescaped.
        lines = text.split("\n")
        for lineno, line in enumerate(lines, start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            # Only the file's unterminated last line can have been cut by a copy; a broken line elsewhere is broken.
            last = lineno == len(lines)
            rows.append((f"{path}:{lineno}", _loads(path, line, lineno, may_be_cut=last)))
        return rows
    data = _loads(path, text, None)
    if not isinstance(data, list):
        hint = " (one object per line is JSONL: name the file .jsonl)" if isinstance(data, dict) else ""
        raise DatasetError(f"{path}: top level must be a JSON array of conversations, got {_type_name(data)}{hint}")
    return [(f"{path} row {i + 1} (index {i})", row) for i, row in enumerate(data)]


def _loads(path: Path, text: str, lineno: int | None, may_be_cut: bool = True) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno if lineno is not None else e.lineno
        ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        truncated = (
            " (the file looks truncated)"
            if ends_early and may_be_cut
            else " (this line is cut short or malformed; fix or remove it)"
            if ends_early
            else ""
        )
        raise DatasetError(f"{path}:{line}:{e.colno}: invalid JSON: {e.msg}{truncated}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer with 5000 digits, or [[[[... nested too deep
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        raise DatasetError(f"{where}: invalid JSON: {type(e).__name__}: {str(e)[:120]}") from None


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_text(obj: dict, field: str, where: str) -> str | None:
    """The problem with ``obj[field]`` as conversation text, or None if it is fine."""
    if field not in obj:
        return f"{where}: field '{field}' is missing"
    value = obj[field]
    if value is None:
        return f"{where}: field '{field}' is null; give it the text"
    if not isinstance(value, str):
        return f"{where}: field '{field}' must be a string, got {_type_name(value)}"
    if not value:
        return f"{where}: field '{field}' is empty"
    if len(value) > MAX_MESSAGE_CHARS:
        return (
            f"{where}: field '{field}' is too long: {len(value):,} characters, more than the {MAX_MESSAGE_CHARS:,} "
            "a message may hold (no model lora-med trains reads that much); shorten it or split it into turns"
        )
    if not value.strip():
        return f"{where}: field '{field}' is whitespace-only"
    if _LONE_SURROGATE.search(value):
        return f"{where}: field '{field}' holds an invalid \\ud800-style escape (a lone surrogate)"
    if not any(ch.isprintable() and not ch.isspace() for ch in value):
        return (
            f"{where}: field '{field}' holds only control characters (such as NUL), no text; give it the text "
            "(the file may be binary or damaged there)"
        )
    m = _MOJIBAKE.search(value)
    if m:
        return (
            f"{where}: field '{field}' looks like mojibake ({m.group()!r} in {_excerpt(value, m.start())!r}): "
            "UTF-8 text was decoded as Latin-1/Windows-1252 somewhere; re-export it as UTF-8"
        )
    return None


def _excerpt(text: str, at: int) -> str:
    return text[max(0, at - 15) : at + 15]


def _parse_row(row: Any, where: str) -> tuple[Conversation | None, list[str]]:
    if not isinstance(row, dict):
        return None, [f"{where}: expected an object with 'user'/'assistant' or 'messages', got {_type_name(row)}"]
    has_pair = "user" in row or "assistant" in row
    if "messages" in row and has_pair:
        return None, [f"{where}: has both 'messages' and 'user'/'assistant'; use one form per row"]
    if "messages" not in row and not has_pair:
        return None, [f"{where}: needs 'user' and 'assistant' fields, or a 'messages' list"]
    if has_pair:
        problems = [p for f in ("user", "assistant") if (p := _check_text(row, f, where))]
        if problems:
            return None, problems
        return Conversation((Message("user", row["user"]), Message("assistant", row["assistant"])), where), []
    return _parse_messages(row["messages"], where)


def _parse_messages(msgs: Any, where: str) -> tuple[Conversation | None, list[str]]:
    if not isinstance(msgs, list):
        return None, [f"{where}: field 'messages' must be a list, got {_type_name(msgs)}"]
    if not msgs:
        return None, [f"{where}: field 'messages' is empty"]
    problems: list[str] = []
    messages: list[Message] = []
    for j, m in enumerate(msgs):
        w = f"{where} messages[{j}]"
        if not isinstance(m, dict):
            problems.append(f"{w}: expected an object with 'role' and 'content', got {_type_name(m)}")
            continue
        role = m.get("role")
        if "role" not in m or role is None:
            problems.append(f"{w}: field 'role' is {'missing' if 'role' not in m else 'null'}")
            continue
        if role not in ROLES:
            problems.append(f"{w}: unknown role {role!r}; use 'system', 'user' or 'assistant'")
            continue
        p = _check_text(m, "content", w)
        if p:
            problems.append(p)
            continue
        messages.append(Message(role, m["content"]))
    if problems:
        return None, problems
    # Structure: [system] user assistant user assistant ... assistant
    body = messages[1:] if messages[0].role == "system" else messages
    for j, m in enumerate(body):
        index = j + (len(messages) - len(body))
        expected = "user" if j % 2 == 0 else "assistant"
        if m.role == "system":
            return None, [f"{where} messages[{index}]: a system message may only come first"]
        if m.role != expected:
            return None, [
                f"{where} messages[{index}]: roles must alternate user/assistant starting with user; "
                f"got '{m.role}' where '{expected}' was expected"
            ]
    if not body or body[-1].role != "assistant":
        return None, [f"{where}: the conversation must end with an assistant turn (it is what the model learns)"]
    return Conversation(tuple(messages), where), []


# --------------------------------------------------------------------------- formatting


@dataclass(frozen=True)
class Example:
    """A tokenised conversation. ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    turns_cut: int  # whole turns dropped from the left to fit max_length
    tokens_cut: int  # tokens dropped in all


def resolve_format(fmt: str, tokenizer, flag: str = "--format") -> str:
    """``auto`` picks the tokenizer's chat template where it has one, else DialoGPT style."""
    if fmt not in FORMATS:
        raise ConfigError(f"{flag}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "chat-template" if getattr(tokenizer, "chat_template", None) else "dialogpt"
    if fmt == "chat-template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{flag} chat-template: this tokenizer has no chat template; use dialogpt")
    return fmt


def segments(conv: Conversation, tokenizer, fmt: str) -> list[tuple[list[int], bool]]:
    """Token segments of a conversation, each flagged True if it is assistant output.

    DialoGPT style: every turn's text followed by EOS, as DialoGPT was trained (the EOS ending an
    assistant turn is assistant output: it is how the model learns to stop).
    Chat template: the template rendered turn by turn; an assistant segment is what the template
    adds after the generation prompt (its text and end-of-turn markers).
    """
    if fmt == "dialogpt":
        eos = tokenizer.eos_token_id
        return [(_ids(tokenizer, m.content.strip()) + [eos], m.role == "assistant") for m in conv.messages]
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    out: list[tuple[list[int], bool]] = []
    prev = ""
    for k in range(1, len(msgs) + 1):
        full = tokenizer.apply_chat_template(msgs[:k], tokenize=False)
        if msgs[k - 1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[: k - 1], tokenize=False, add_generation_prompt=True)
            pieces = [(prompt, False), (full, True)]
        else:
            pieces = [(full, False)]
        for text, is_assistant in pieces:
            if not text.startswith(prev):
                raise ConfigError(
                    "the tokenizer's chat template does not render turns as prefixes of each "
                    "other, so assistant tokens cannot be located; use --format dialogpt"
                )
            out.append((_ids(tokenizer, text[len(prev) :]), is_assistant))
            prev = text
    return [s for s in out if s[0]]


def _ids(tokenizer, text: str) -> list[int]:
    # Only input_ids: GPT-2 tokenizers also return token_type_ids, which GPT-2 would add to its input.
    return tokenizer(text, add_special_tokens=False, return_token_type_ids=False)["input_ids"]


def encode(
    conv: Conversation, tokenizer, *, max_length: int, fmt: str = "dialogpt", train_on: str = "assistant"
) -> Example:
    """Tokenise one conversation, label it, and cut it from the left to ``max_length``.

    The oldest turns go first; the last assistant turn is always kept whole. Labels cover the
    assistant segments (``train_on="assistant"``) or every token (``train_on="all"``).

    Raises:
        DatasetError: the last assistant turn alone is longer than ``max_length``.
    """
    segs = segments(conv, tokenizer, fmt)
    total = sum(len(ids) for ids, _ in segs)
    full = total
    turns_cut = 0
    # Drop whole turns from the left, keeping at least the last exchange.
    while total > max_length and len(segs) > 2:
        total -= len(segs.pop(0)[0])
        turns_cut += 1
    last_len = len(segs[-1][0])
    if last_len > max_length:
        raise DatasetError(
            f"{conv.where}: the last assistant turn is {last_len} tokens, more than "
            f"max_length {max_length}; raise --max-length or shorten that reply"
        )
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_assistant in segs:
        input_ids += ids
        labels += ids if (is_assistant or train_on == "all") else [-100] * len(ids)
    if len(input_ids) > max_length:  # cut inside the oldest remaining turn
        input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    return Example(input_ids, labels, turns_cut, full - len(input_ids))


def encode_all(
    conversations: list[Conversation], tokenizer, *, max_length: int, fmt: str, train_on: str = "assistant"
) -> tuple[list[Example], int]:
    """Encode every conversation. Returns the examples and how many of them were cut."""
    examples = [encode(c, tokenizer, max_length=max_length, fmt=fmt, train_on=train_on) for c in conversations]
    return examples, sum(e.tokens_cut > 0 for e in examples)


# --------------------------------------------------------------------------- split


def split(
    conversations: list[Conversation], eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation], list[int]]:
    """Deterministic train/eval split. Returns (train, eval, eval indices into the input)."""
    n = len(conversations)
    if n < 2:
        raise DatasetError(f"cannot split {n} conversation(s) into train and eval; give --eval-data or more rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    eval_idx = sorted(order[:n_eval])
    chosen = set(eval_idx)
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    return train, [conversations[i] for i in eval_idx], eval_idx


# --------------------------------------------------------------------------- check


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def check(path: str | Path, tokenizer=None, *, max_length: int = 256, fmt: str = "auto") -> dict:
    """Statistics, problems and warnings of a conversation file, for ``lora-med data check``.

    ``problems`` are what would make training fail with these settings (a last reply longer than
    ``max_length``); ``warnings`` (duplicates) do not stop training.

    Raises:
        DatasetError: the file is malformed (every problem listed).
    """
    ds = load_conversations(path)
    convs = ds.conversations
    turns = [c.turns for c in convs]
    report: dict[str, Any] = {
        "file": str(ds.path),
        "sha256": ds.sha256,
        "conversations": len(convs),
        "single_exchange": sum(t == 2 for t in turns),
        "multi_turn": sum(t > 2 for t in turns),
        "with_system": sum(c.messages[0].role == "system" for c in convs),
        "turns": {"min": min(turns), "p50": percentile(turns, 50), "max": max(turns)},
        "duplicates": ds.duplicates,
        "problems": [],  # what would make `lora-med train` fail with these settings
        "warnings": [f"duplicate: {d}" for d in ds.duplicates],
    }
    if tokenizer is not None:
        fmt = resolve_format(fmt, tokenizer)
        lengths, cut, too_long = [], 0, []
        for c in convs:
            n = sum(len(ids) for ids, _ in segments(c, tokenizer, fmt))
            lengths.append(n)
            try:
                cut += encode(c, tokenizer, max_length=max_length, fmt=fmt).tokens_cut > 0
            except DatasetError as e:
                too_long.append(str(e))
        report["tokens"] = {
            "format": fmt,
            "p50": percentile(lengths, 50),
            "p95": percentile(lengths, 95),
            "max": max(lengths),
            "total": sum(lengths),
        }
        report["max_length"] = max_length
        report["cut_by_max_length"] = cut
        report["problems"] = too_long
    return report


def prompt_ids(history: list[Message], tokenizer, fmt: str) -> list[int]:
    """Token ids of ``history`` (ending with a user turn) followed by what opens an assistant turn."""
    if fmt == "dialogpt":
        # Every turn ends with EOS; the reply is what follows the last one.
        conv = Conversation(tuple(history), "prompt")
        return [t for ids, _ in segments(conv, tokenizer, fmt) for t in ids]
    msgs = [{"role": m.role, "content": m.content} for m in history]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_token_type_ids=False)["input_ids"]


def turn_end_ids(tokenizer, fmt: str) -> list[int]:
    """The token ids that end an assistant turn in ``fmt``, as training labels them: EOS, and with a chat template
    the special token the template writes right after the assistant's text when that is not EOS (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>). A reply generated from a prompt of this format stops at any of them."""
    out = [tokenizer.eos_token_id]
    if fmt != "chat-template":
        return out
    text = "lora-med"
    msgs = [{"role": "user", "content": "hola"}, {"role": "assistant", "content": text}]
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    reply = full[len(prompt) :] if full.startswith(prompt) else full
    if text in reply:
        after = _ids(tokenizer, reply[reply.index(text) + len(text) :])
        if after and after[0] in tokenizer.all_special_ids and after[0] not in out:
            out.append(after[0])
    return out
