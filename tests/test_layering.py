"""The tree shows the design: stage folders on floors, imports only downward, no circles.

Floors (a module may import its own folder and any lower floor, never a higher one or a sibling stage):

    5  __main__
    4  cli
    3  bench/                       (the paired run trains and exports)
    2  train/  export/  serve/      (stages; none imports another)
    1  engine/                      (one token loop, its backends)
    0  the foundation: errors, fileio, settings, config, cards, weights, models, runs, data, modelcard, perplexity

Imports inside functions count too: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_med"
FLOORS = {"__main__": 5, "cli": 4, "bench": 3, "train": 2, "export": 2, "serve": 2, "engine": 1}


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(root: Path) -> dict[str, set[str]]:
    files = {_module(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    edges = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level
                    else (node.module or "")
                )
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        edges[mod] = {d for d in deps if d in known and d != mod}
    return edges


def floor(module: str) -> tuple[int, str]:
    """(floor, stage folder or '' for the foundation) of a dotted module name below the package."""
    parts = module.split(".")[1:]
    if not parts:
        return 0, ""
    return FLOORS.get(parts[0], 0), parts[0] if parts[0] in FLOORS else ""


def problems(root: Path) -> list[str]:
    edges = graph(root)
    out = []
    for mod, deps in sorted(edges.items()):
        f, stage = floor(mod)
        for d in sorted(deps):
            g, other = floor(d)
            if other == stage and stage:
                continue
            if g > f or (g == f and other != stage):
                out.append(
                    f"{mod} imports {d}: floor {g} ({other or 'foundation'}) is not below {f} ({stage or 'foundation'})"
                )
    # circles, by depth-first search over the module graph
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                out.append(
                    "circle: " + " -> ".join(stack[stack.index(d) :] + [m, d]) if d in stack else f"circle: {m} -> {d}"
                )
            elif d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return out


def test_imports_go_down_the_floors_and_never_round_in_a_circle():
    assert problems(PACKAGE) == []


def test_load_engine_is_the_one_dispatcher_and_no_backend_imports_it():
    edges = graph(PACKAGE)
    backends = {"lora_med.engine.ort_backend", "lora_med.engine.torch_backend"}
    assert edges["lora_med.engine"] >= backends
    assert all("lora_med.engine" not in edges[b] for b in backends)
    # the decode graph's engine is built in one place: everything else asks load_engine for it
    builders = {
        _module(p, PACKAGE)
        for p in PACKAGE.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.ImportFrom) and any(a.name == "ort_engine" for a in n.names)
    }
    assert builders == {"lora_med.engine"}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lora_med"
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_check_catches_an_upward_import_and_a_circle(tmp_path):
    base = {
        "__init__.py": "",
        "errors.py": "",
        "engine/__init__.py": "from .loop import x\n",
        "engine/loop.py": "from ..errors import E\n",
        "export/__init__.py": "",
        "export/main.py": "from ..engine import load_engine\n",
    }
    assert problems(_tree(tmp_path / "clean", base)) == []
    upward = {**base, "engine/loop.py": "def f():\n    from ..export.main import merge_export\n"}
    found = problems(_tree(tmp_path / "up", upward))
    assert any("lora_med.engine.loop imports lora_med.export.main" in p for p in found), found
    sideways = {**base, "serve/__init__.py": "", "serve/app.py": "from ..export import main\n"}
    assert any("serve.app imports lora_med.export.main" in p for p in problems(_tree(tmp_path / "side", sideways)))
    circle = {**base, "errors.py": "from .fileio import x\n", "fileio.py": "from .errors import y\n"}
    assert any(p.startswith("circle:") for p in problems(_tree(tmp_path / "circle", circle)))
