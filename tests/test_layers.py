"""The layers of DESIGN.md, enforced on the import graph of ``src/rsvl``.

    entry points   cli/  serve/  scale/  api.py
    workflows      tasks/ < eval/ < train/
    models         models/ < index/
    foundation     errors < console, io, metrics < geo/, data/

An import may point down, or sideways within a layer in the order above (eval may call tasks,
train may use eval's protocols, never the other way). There are no cycles between modules,
no private name (``_x``) is imported from another module, and imports sit at module level
unless a ``# lazy:`` comment on the line (or in the comment block above it) gives the
measured reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: package prefix -> rank; a module may import modules of equal or lower rank only, and
#: modules of equal rank only inside its own prefix (one package) unless the rank says so
RANKS: dict[str, float] = {
    "rsvl.errors": 0.0,
    "rsvl": 0.0,  # the root package: __version__ and RsvlError only
    "rsvl.console": 0.1,
    "rsvl.io": 0.1,
    "rsvl.metrics": 0.1,
    "rsvl.geo": 0.2,
    "rsvl.data": 0.2,
    "rsvl.models": 1.0,
    "rsvl.index": 1.1,
    "rsvl.tasks": 2.0,
    "rsvl.eval": 2.1,
    "rsvl.train": 2.2,
    "rsvl.api": 3.0,
    "rsvl.cli": 3.1,
    "rsvl.serve": 3.1,
    "rsvl.scale": 3.1,
}
#: the foundation's packages that must not import torch (rasters of any size, no model)
TORCH_FREE = ("rsvl.geo", "rsvl.io", "rsvl.errors", "rsvl.console")


@dataclass(frozen=True)
class Import:
    module: str  # importing module
    target: str  # imported module (or module.attribute for `from x import y`)
    names: tuple[str, ...]
    line: int
    in_function: bool
    lazy: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "rsvl").rglob("*.py"))}


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str, path: Path) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = [(_resolve(mod, path, node), tuple(a.name for a in node.names))]
        elif isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        else:
            continue
        # the comment block above the statement counts too, and one comment covers the
        # group of imports below it (isort separates them by blank lines)
        above = node.lineno - 2
        while above >= 0 and (
            not lines[above].strip() or lines[above].strip().startswith(("#", "import ", "from "))
        ):
            above -= 1
        near = " ".join(lines[above + 1 : node.end_lineno or node.lineno])
        for target, names in targets:
            out.append(Import(mod, target, names, node.lineno, id(node) in inside, "# lazy:" in near))
    return out


def internal_target(target: str, names: tuple[str, ...], known: dict[str, Path]) -> list[str]:
    """The rsvl modules an import statement loads (``from rsvl.models import sam`` -> the
    package and its sub-module)."""
    if not target.startswith("rsvl"):
        return []
    found = [target] if target in known else []
    found += [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return found or [target]


def rank(mod: str) -> tuple[float, str]:
    best = max((p for p in RANKS if mod == p or mod.startswith(p + ".")), key=len)
    return RANKS[best], best


def test_rank_table_covers_every_module():
    for mod in modules():
        assert rank(mod)[1] != "rsvl" or mod in ("rsvl", "rsvl.py"), f"{mod} has no layer in RANKS"


def test_imports_point_down():
    known = modules()
    bad = []
    for mod, path in known.items():
        r, _ = rank(mod)
        for imp in imports_of(mod, path):
            for target in internal_target(imp.target, imp.names, known):
                t, _ = rank(target)
                if t > r and not (mod == "rsvl" and imp.lazy):
                    bad.append(f"{mod}:{imp.line} imports {target} (layer {t} above {r})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for imp in imports_of(mod, path):
            if mod == "rsvl" and imp.lazy:
                continue  # the root's lazy `load` is the entry point, not a dependency
            for target in internal_target(imp.target, imp.names, known):
                if target in known and target != mod:
                    graph[mod].add(target)
    # a package's __init__ importing its own sub-modules is how packages work, and a
    # sub-module importing a sibling loads the parent first: only edges that are not
    # parent<->child count towards cycles
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    edges = {m: {t for t in ts if not related(m, t)} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    known = modules()
    bad = []
    for mod, path in known.items():
        for imp in imports_of(mod, path):
            if not imp.target.startswith("rsvl") or imp.target == mod:
                continue
            for name in imp.names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{mod}:{imp.line} imports {imp.target}.{name}")
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("rsvl"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path, node)
                for a in node.names:
                    if f"{base}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != mod
            ):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_imports_at_module_level_unless_measured():
    bad = []
    for mod, path in modules().items():
        for imp in imports_of(mod, path):
            if imp.in_function and not imp.lazy:
                bad.append(f"{mod}:{imp.line} import {imp.target}")
    assert not bad, (
        "imports inside functions without a '# lazy: <measured reason>' comment:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("package", TORCH_FREE)
def test_foundation_does_not_import_torch(package):
    known = modules()
    heavy = ("torch", "torchvision", "open_clip", "transformers", "timm", "lightning")
    bad = []
    for mod, path in known.items():
        if mod == package or mod.startswith(package + "."):
            for imp in imports_of(mod, path):
                if imp.target.split(".")[0] in heavy:
                    bad.append(f"{mod}:{imp.line} imports {imp.target}")
    assert not bad, bad


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules above fail on a planted upward import, cycle and private import."""
    pkg = tmp_path / "rsvl"
    (pkg / "geo").mkdir(parents=True)
    (pkg / "tasks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "geo" / "__init__.py").write_text("")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "geo" / "a.py").write_text("from rsvl.tasks.b import _helper\n")
    (pkg / "tasks" / "b.py").write_text("from rsvl.geo import a\n\ndef _helper():\n    import numpy\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    for check in (
        test_imports_point_down,
        test_no_import_cycles,
        test_no_private_names_across_modules,
        test_imports_at_module_level_unless_measured,
    ):
        with pytest.raises(AssertionError):
            check()
