"""Settings declared once, checked the same from flags, YAML and Python.

Every command's settings are a dataclass (``lora_med/config.py``) whose fields carry their help, bounds
and aliases as field metadata (PEFT's style), built with ``setting()``; a field's allowed values are its
type (``Literal["lora", "qlora", "full"]``, or a list of such names).
From that one declaration come the click options (``click_options``), the YAML keys
(``load_config``) and the checks (``check``): a value is coerced and checked by the same code
whether it came from ``--learning-rate 2e-4``, ``learning_rate: 2e-4`` in a YAML file (a string to
PyYAML) or ``TrainConfig(learning_rate="2e-4")``.

Problems name the setting the way the user gave it: ``--r 0`` for a flag, ``r: 0 (in run.yaml)`` for
a YAML key, ``TrainConfig.r=0`` for Python. The origin of each value travels with the config object.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import read_regular

_ORIGINS = "_origins"  # attribute on a config object: field -> ("flag", "--x") | ("yaml", file) | ("default", "")


def setting(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    hidden: bool = False,
    click: dict | None = None,
    hint: typing.Callable[[Any], str | None] | None = None,
) -> Any:
    """A config field with its documentation and checks.

    Args:
        default: the default value (lists are copied per instance).
        help: one line for ``--help``.
        min / max: inclusive bounds; above / below: exclusive bounds (for numbers).
        aliases: extra flag spellings (``--num_train_epochs``); also accepted as YAML keys without dashes.
        hidden: not offered as a flag (e.g. a positional argument).
        click: extra keyword arguments for the click option (e.g. ``flag_value``).
        hint: for a value out of bounds, a likely cause and its fix (a figure in the wrong unit), or None.
    """
    meta = dict(
        help=help,
        min=min,
        max=max,
        above=above,
        below=below,
        aliases=aliases,
        metavar=metavar,
        hidden=hidden,
        click=click or {},
        hint=hint,
    )
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True)
class Spec:
    """A setting as its declaration gives it: the field (help, bounds, aliases in its metadata), the kind of
    value, whether it may be None, and the allowed values (the ``Literal[...]`` of its type, or of its items)."""

    field: dataclasses.Field
    kind: str  # 'int' | 'float' | 'bool' | 'str' | 'list'
    nullable: bool
    choices: tuple | None

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def meta(self) -> Any:
        return self.field.metadata


def _kind(tp) -> tuple[str, bool, tuple | None]:
    """(kind, nullable, choices) of a field's resolved type: ``Literal["a", "b"]`` is text (or whole numbers)
    with those choices; ``list[Literal[...]]`` a list of names with them."""
    args = typing.get_args(tp)
    nullable = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if nullable:
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "list", nullable, typing.get_args(item) if typing.get_origin(item) is typing.Literal else None
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return ("int" if all(type(c) is int for c in choices) else "str"), nullable, choices
    return {int: "int", float: "float", bool: "bool", str: "str"}[tp], nullable, None


def fields(cls) -> list[Spec]:
    """Every setting of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [Spec(f, *_kind(hints[f.name])) for f in dataclasses.fields(cls)]


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "text",
    "list": "a list of names (or one comma-separated string)",
}


def _type_name(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(v), type(v).__name__)


# Values quoted in messages are cut short: a YAML alias bomb (a few hundred bytes that expand to millions of
# nested items) or a 16 MB string must give a one-line message, not a 250 MB one.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 1, 8, 8, 80, 80


def short(value: Any) -> str:
    """``repr(value)`` cut to a readable length."""
    return _REPR.repr(value)


def coerce(value: Any, kind: str, nullable: bool) -> tuple[Any, str | None]:
    """``value`` converted to ``kind``, or the problem with it (the message's tail, after the setting's name).

    Numbers may be given as text ("2e-4": PyYAML reads exponents without a dot as strings).
    """
    if value is None:
        return (None, None) if nullable else (None, f"must be {_TYPE_WORDS[kind]}, not null")
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1"), None
        return None, f"must be true or false, got {_type_name(value)}"
    if kind in ("int", "float"):
        v = value
        if isinstance(v, str):
            text = v.strip().replace("_", "")
            try:
                v = int(text) if kind == "int" and re.fullmatch(r"[+-]?\d+", text) else float(text)
            except ValueError:
                return None, f"must be {_TYPE_WORDS[kind]}, got {short(value)}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None, f"must be {_TYPE_WORDS[kind]}, got {_type_name(value)}"
        if not math.isfinite(v):
            return None, "must be a finite number"
        if kind == "int":
            if v != int(v):
                return None, f"must be a whole number, got {short(value)}"
            return int(v), None
        return float(v), None
    if kind == "str":
        if isinstance(value, Path):
            return str(value), None
        if not isinstance(value, str):
            return None, f"must be text, got {_type_name(value)} ({short(value)}); quote it in YAML"
        return value, None
    # list of names: a list of strings, or one string split at commas ("c_attn" is one module)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return None, f"must be {_TYPE_WORDS['list']}, got {_type_name(value)}"
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        return None, f"must be a list of names, got {_type_name(bad[0])} {short(bad[0])} in it"
    names = [x.strip() for x in items if x.strip()]
    if not names:
        return (None, None) if nullable else (None, "must name at least one item")
    return names, None


def _bounds(value, spec: Spec) -> str | None:
    meta = spec.meta
    if spec.choices is not None:
        values = value if isinstance(value, list) else [value]
        wrong = [v for v in values if v not in spec.choices]
        if wrong:
            return f"use one of {', '.join(map(str, spec.choices))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, above, below = meta["min"], meta["max"], meta["above"], meta["below"]
        if above is not None and below is not None and not above < value < below:
            return f"must be in ({above:g}, {below:g})"
        if lo is not None and below is not None and not lo <= value < below:
            return f"must be in [{lo:g}, {below:g})"
        if above is not None and hi is not None and not above < value <= hi:
            return f"must be in ({above:g}, {hi:g}]"
        if lo is not None and hi is not None and not lo <= value <= hi:
            return f"must be in [{lo:g}, {hi:g}]"
        if lo is not None and value < lo:
            return f"must be >= {lo:g}"
        if hi is not None and value > hi:
            return f"must be <= {hi:g}"
        if above is not None and value <= above:
            return f"must be > {above:g}"
        if below is not None and value >= below:
            return f"must be < {below:g}"
    return None


# --------------------------------------------------------------------------- names as the user gave them


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def name(cfg, field: str) -> str:
    """How the user named setting ``field``: its flag, its YAML key, or the Python field."""
    how, where = getattr(cfg, _ORIGINS, {}).get(field, ("python", ""))
    if how == "flag":
        return where
    if how == "yaml":
        return field
    return f"{type(cfg).__name__}.{field}"


def describe(cfg, field: str, value: Any = dataclasses.MISSING) -> str:
    """The setting and its value as the user gave them: ``--r 0``, ``r: 0 (in x.yaml)``, ``TrainConfig.r=0``."""
    value = getattr(cfg, field) if value is dataclasses.MISSING else value
    how, where = getattr(cfg, _ORIGINS, {}).get(field, ("python", ""))
    flat = isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value[:100])
    shown = (
        ",".join(map(str, value[:20])) + (",..." if len(value) > 20 else "")
        if flat
        else value
        if isinstance(value, (str, int, float, type(None))) and len(str(value)) <= 200
        else short(value)
    )
    if how == "flag":
        return f"{where} {shown}"
    if how == "yaml":
        return f"{field}: {shown} (in {where})"
    return f"{type(cfg).__name__}.{field}={short(value)}"


def check(cfg) -> list[str]:
    """Coerce every setting of ``cfg`` in place to its declared type and check it against its declaration.

    Returns one problem per bad setting (type, choice or bound), each naming the setting as the user gave it.
    """
    problems = []
    for spec in fields(type(cfg)):
        raw = getattr(cfg, spec.name)
        value, problem = coerce(raw, spec.kind, spec.nullable)
        if problem is None and value is not None:
            problem = _bounds(value, spec)
            if problem and spec.meta.get("hint") and (why := spec.meta["hint"](value)):
                problem += f"; {why}"
        if problem:
            problems.append(f"{describe(cfg, spec.name, raw)}: {problem}")
        else:
            setattr(cfg, spec.name, value)
    return problems


def origins(cfg) -> dict:
    return dict(getattr(cfg, _ORIGINS, {}))


def replace(cfg, **changes):
    """``dataclasses.replace`` that keeps where each value came from (changed values count as Python)."""
    new = dataclasses.replace(cfg, **changes)
    kept = {k: v for k, v in origins(cfg).items() if k not in changes}
    object.__setattr__(new, _ORIGINS, kept)
    return new


def as_dict(cfg) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


# --------------------------------------------------------------------------- YAML and flags


def _alias_keys(cls) -> dict[str, str]:
    """Every spelling of every setting (YAML keys and flags without dashes) -> field name."""
    out = {}
    for spec in fields(cls):
        f = spec.field
        for spelling in (f.name, f.name.replace("_", "-"), *(a.lstrip("-") for a in f.metadata["aliases"])):
            out[spelling] = f.name
    return out


def load_config(
    cls,
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    defaults: dict | None = None,
    argv: list[str] | None = None,
):
    """Build config ``cls``: ``defaults`` (e.g. a resumed run's settings), then a YAML file, then flags.

    Nothing is checked here but the keys: ``check`` (called by every command) checks the values, so
    flags, YAML and Python get the same messages.

    Args:
        flags: values typed on the command line (None = not given).
        argv: the command line, to name each flag as typed (an alias such as ``--lora_r`` included); without
            it flags are named by their main spelling.
    Raises:
        ConfigError: the YAML file is unreadable or has keys ``cls`` does not know.
    """
    keys = _alias_keys(cls)
    values: dict[str, Any] = {}
    where: dict[str, tuple[str, str]] = {}
    for k, v in (defaults or {}).items():
        if k in {f.name for f in dataclasses.fields(cls)}:
            values[k] = v
            where[k] = ("run", "")
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml_load(path)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("--config") else f"--config {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings (key: value), got {_type_name(loaded)}")
        unknown = [str(k) for k in loaded if str(k) not in keys]
        if unknown:
            raise ConfigError(
                f"--config {path}: unknown setting(s): {', '.join(unknown)}; known: "
                f"{', '.join(sorted(f.name for f in dataclasses.fields(cls)))}"
            )
        seen: dict[str, str] = {}
        for k, v in loaded.items():
            field = keys[str(k)]
            if field in seen:
                raise ConfigError(f"--config {path}: {seen[field]} and {k} are the same setting; keep one")
            seen[field] = str(k)
            flag_value = _meta(cls, field)["click"].get("flag_value")
            if flag_value is not None and isinstance(v, bool):  # `resume: true` is `--resume` alone
                v = flag_value if v else None
            values[field] = v
            where[field] = ("yaml", str(path))
    typed, conflicts = _typed_flags(cls, argv or [])
    if conflicts:
        raise ConfigError("the same setting given twice with different values; give each once:", conflicts)
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = v
            where[k] = ("flag", typed.get(k, flag_name(k)))
    cfg = cls(**values)
    object.__setattr__(cfg, _ORIGINS, where)
    return cfg


def yaml_load(path: Path):
    import yaml

    raw = read_regular(path, "give a YAML file of settings", limit=16 << 20, error=ConfigError)
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from None


def _meta(cls, field: str) -> Any:
    return next(spec.meta for spec in fields(cls) if spec.name == field)


def _typed_flags(cls, argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """field -> the flag spelling the user typed (the last one, as click takes), and one problem per setting given
    different values under different spellings (``--num_train_epochs 2 --epochs 3``: click would silently keep the
    last; which one the user meant cannot be known). One spelling repeated is an override: the last wins."""
    spelled, kinds = {}, {}
    for spec in fields(cls):
        f, kind, nullable = spec.field, spec.kind, spec.nullable
        for s in (flag_name(f.name), "--" + f.name, *f.metadata["aliases"]):
            spelled[s] = f.name
        spelled["--no-" + f.name.replace("_", "-")] = f.name
        kinds[f.name] = (kind, nullable, f.metadata["click"].get("flag_value"))
    given: dict[str, list[tuple[str, str]]] = {}
    i = 0
    while i < len(argv):
        head, eq, value = argv[i].partition("=")
        i += 1
        if head not in spelled:
            continue
        field = spelled[head]
        kind, nullable, flag_value = kinds[field]
        if kind == "bool":
            value = "false" if head.startswith("--no-") and head not in ("--" + field, flag_name(field)) else "true"
        elif not eq:
            takes = i < len(argv) and (flag_value is None or not argv[i].startswith("-"))
            value = argv[i] if takes else (flag_value or "")
            i += takes
        given.setdefault(field, []).append((head, value))
    conflicts = []
    for field, seen in given.items():
        kind, nullable, _ = kinds[field]
        values = {repr(c[0] if (c := coerce(v, kind, nullable))[1] is None else v) for _, v in seen}
        if len(values) > 1 and len({h for h, _ in seen}) > 1:  # one spelling repeated: the last wins, as in click
            both = " and ".join(h if kind == "bool" else f"{h} {v}" for h, v in seen)
            conflicts.append(f"{both}: one setting ({field}) given different values; keep one")
    return {field: seen[-1][0] for field, seen in given.items()}, conflicts


def click_options(cls, *, seed_names: tuple[str, ...] = ()):
    """Click options for every visible setting of ``cls``, each defaulting to None (= not given), so only
    what the user typed overrides ``--config`` and the defaults. Values reach ``check`` as typed (strings),
    so a bad flag gets the same message as a bad YAML value.

    ``seed_names``: settings that also take the underscore spelling (``--batch_size``, as the seed guide).
    """
    import click

    def decorate(fn):
        for spec in reversed(fields(cls)):
            f, kind, meta = spec.field, spec.kind, spec.meta
            if meta["hidden"]:
                continue
            dashed = flag_name(f.name)
            names = [dashed, *(["--" + f.name] if f.name in seed_names and "_" in f.name else []), *meta["aliases"]]
            default = f.default_factory() if callable(f.default_factory) else f.default
            shown = ",".join(default) if isinstance(default, list) else default
            extra = f" [default: {shown}]" if default not in (None, "", []) else ""
            kw: dict[str, Any] = dict(default=None, help=meta["help"] + extra)
            if kind == "bool":
                names[0] = f"{dashed}/--no-{dashed[2:]}"
            else:
                kw["type"] = str
                kw["metavar"] = meta["metavar"] or (
                    "[" + "|".join(map(str, spec.choices)) + "]"
                    if spec.choices
                    else {"int": "INT", "float": "FLOAT", "str": "TEXT", "list": "A,B,..."}[kind]
                )
            kw.update(meta["click"])
            fn = click.option(*names, f.name, **kw)(fn)
        return fn

    return decorate


def flag_values(kwargs: dict, cls) -> dict:
    """The settings of ``cls`` among a click command's keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}
