"""The layering of docs/ARCHITECTURE.md, enforced: every import points down, and no module imports itself
back through others. Imports inside functions count (they are how cycles used to hide).

    model → core → calibration → targets → application → cli
    (core.errors imports nothing and may be imported from every layer, the model included)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "exporter", "calibration", "targets")

# (layer, module prefixes), bottom first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("core.errors",)),
    ("model", ("exporter.model",)),
    ("core", ("core",)),
    ("calibration", ("calibration",)),
    ("targets", ("targets",)),
    ("application", ("exporter",)),
    ("cli", ("cli",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    assert best is not None, module
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if "data" not in p.relative_to(ROOT).parts:  # calibration/data/make_data.py is a script
                mods[module_name(p)] = p
    return mods


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def test_every_import_points_down():
    upward = []
    for mod, deps in sorted(graph().items()):
        for dep in sorted(deps):
            if dep == "core.errors" or dep == "core":  # the errors and the package version: imported by every layer
                continue
            if RANK[layer_of(dep)] > RANK[layer_of(mod)]:
                upward.append(f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_core_errors_imports_nothing_of_ours():
    assert graph()["core.errors"] == set()


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + " | ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The check can fail: an import hidden in a function, and a relative one, are both found."""
    modules = {"core.runner": Path(), "targets.base": Path(), "core.errors": Path(), "targets": Path()}
    src = tmp_path / "runner.py"
    src.write_text("def f():\n    from targets.base import Session\n")
    assert imports_of(src, "core.runner", modules) == {"targets.base"}
    pkg = tmp_path / "__init__.py"
    pkg.write_text("from .base import x\n")
    assert imports_of(pkg, "targets", modules) == {"targets.base"}
    assert RANK[layer_of("targets.base")] > RANK[layer_of("core.runner")]
    assert layer_of("core.errors") == "errors" and layer_of("exporter.model.config") == "model"
