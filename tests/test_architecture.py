"""The import rules of docs/architecture.md: layers only import downwards, and no two
modules import each other (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Layer of each package, lowest first; a module may import its own layer and lower ones.
LAYERS = ["vmm", "vtl.abi", "vtl.core", "vtl.services", "vtl.lifecycle", "vtl.run", "vtl.modes", "vtl.tools"]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("vmm", "vtl"):
        for f in (REPO / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):
                    graph[m].add(n)
    return graph


def _layer(module: str) -> int | None:
    best = None
    for i, pkg in enumerate(LAYERS):
        if module == pkg or module.startswith(pkg + "."):
            best = i
    return best


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in _modules() if _layer(m) is None and m not in ("vtl", "vtl.__main__")]
    assert not loose, f"modules outside the documented layers: {loose}"


def test_layers_only_import_downwards() -> None:
    bad = []
    for m, deps in _imports(_modules()).items():
        lm = _layer(m)
        for d in deps:
            ld = _layer(d)
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{m} ({LAYERS[lm]}) imports {d} ({LAYERS[ld]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _imports(_modules())
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in graph[v]:
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_vmm_knows_nothing_of_vtls() -> None:
    graph = _imports(_modules())
    bad = [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("vmm") for d in deps
           if d.startswith("vtl")]
    assert not bad, bad
