"""Click options generated from a config dataclass, so each setting is declared once."""

from __future__ import annotations

import dataclasses
import inspect
import re

import click


def _field_help(cls) -> dict[str, str]:
    """Help text of each config field: the comment after it in the dataclass (one place for docs)."""
    found = re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)
    return dict(found)


def config_options(cls, extra: dict[str, dict] | None = None, aliases: dict[str, list[str]] | None = None):
    """Click options for every field of config dataclass ``cls``. Every option defaults to None
    (unset), so only what the user typed overrides ``--config`` and the dataclass defaults."""
    helps, extra, aliases = _field_help(cls), extra or {}, aliases or {}

    def decorate(f):
        for fld in reversed(dataclasses.fields(cls)):
            dashed = "--" + fld.name.replace("_", "-")
            names = [dashed, *aliases.get(fld.name, []), fld.name]
            kind = str(fld.type)
            default = fld.default if fld.default is not dataclasses.MISSING else None
            kw = dict(default=None, help=f"{helps.get(fld.name, '')} [default: {default}]")
            if kind == "bool":
                names[0] = f"{dashed}/--no-{dashed[2:]}"
                kw["default"] = None
            elif kind.startswith("list"):
                kw["callback"] = lambda ctx, p, v: [t.strip() for t in v.split(",") if t.strip()] if v else None
                kw["metavar"] = "A,B,..."
            elif kind.startswith("int"):
                kw["type"] = int
            elif kind.startswith("float"):
                kw["type"] = float
            kw.update(extra.get(fld.name, {}))
            f = click.option(*names, **kw)(f)
        return f

    return decorate


def overrides_from(kwargs: dict, cls) -> dict:
    """The config fields among a click command's keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}
