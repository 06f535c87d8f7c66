"""The subpackages of ernie_core import each other without a cycle (layers point one way: e.g.
peft -> models, never models -> peft). Every `import` in the library counts, at module top level or
inside a function, so a cycle cannot hide behind a deferred import."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ernie_core"


def _unit(module: str) -> str:
    """ernie_core.models.io -> 'models'; a top-level module (ernie_core.eval) is its own unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the ernie_core modules `path` imports."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ernie_core")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("ernie_core"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}  # `from . import peft` names a module
    return out


def subpackage_graph() -> dict[str, set[str]]:
    units = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {u: set() for u in units}
    for path in PKG.rglob("*.py"):
        src = _unit(_module_name(path))
        if src not in units:
            continue
        for name in _imports(path):
            dst = _unit(name)
            if dst in units and dst != src:
                graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    assert "peft" in graph["train"] and "models" in graph["peft"], "the walker must see real edges"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between ernie_core subpackages: {' -> '.join(cycle)}"


def test_models_do_not_import_peft():
    assert "peft" not in subpackage_graph()["models"]


def test_the_walker_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
