"""The package's import graph has no cycle.

Every module under ``src/tamperprobe`` is parsed with ``ast``; its module-level imports (relative ones
resolved against the package, ``from . import x`` read as the submodule ``x`` when one exists) are the
edges of a graph over the package's modules. Imports inside functions and under ``if TYPE_CHECKING:``
do not count: they run late or never, which is how a type can name a module that imports it. A
cycle among the rest means a module cannot be imported first without the other half-initialised.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tamperprobe

ROOT = Path(tamperprobe.__file__).parent
PACKAGE = "tamperprobe"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module, type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: the module body, and the bodies of its top-level
    ``if``/``try``/``with`` blocks (``if TYPE_CHECKING:`` only when ``type_checking``), never inside a function or class."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if type_checking or not _is_type_checking(node.test):
                stack += node.body
            stack += node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            stack += node.body
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, known: set[str], *, type_checking: bool = False) -> set[str]:
    """The package modules ``name`` imports at module level (importing ``p.q.m`` imports ``p`` and ``p.q`` too).

    Its own ancestor packages are left out: Python imports them before the module, so a module
    that imports from its package (``from . import x``) never makes a cycle with it.
    """
    is_package = path.name == "__init__.py"
    own = set(_ancestors(name))
    out: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8")), type_checking):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin] + [f"{origin}.{a.name}" for a in node.names]
        for target in targets:
            # the deepest package module the name points at (a name imported from a module is not a module)
            while target and target not in known:
                target = target.rpartition(".")[0]
            for module in [*_ancestors(target), target]:
                if module.startswith(PACKAGE) and module != name and module not in own:
                    out.add(module)
    return out


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known, type_checking=type_checking) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """The package's import graph, parsed once per module (the tests below only read it)."""
    return import_graph()


@pytest.fixture(scope="module")
def typed() -> dict[str, set[str]]:
    """The import graph with the type-only imports, parsed once per module."""
    return import_graph(type_checking=True)


def test_the_graph_sees_the_package(graph):
    assert "tamperprobe.evaluation.campaign" in graph and "tamperprobe.cli.app" in graph
    assert "tamperprobe.evaluation.protocol" in graph["tamperprobe.evaluation.campaign"]
    assert "tamperprobe.evaluation.results" in graph["tamperprobe.evaluation.report"]


def test_cycle_finder_finds_cycles_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert cycles({"a": {"a"}}) == [{"a"}]


def test_imports_resolve_relative_and_skip_type_checking_and_functions(tmp_path):
    src = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from .b import x\n"
        "from .. import c\n"
        "from . import s\n"
        "import tamperprobe.d.e\n"
        "if TYPE_CHECKING:\n    from .f import F\n"
        "def g():\n    from .h import h\n"
        "try:\n    from .i import i\nexcept ImportError:\n    pass\n"
    )
    path = tmp_path / "a.py"
    path.write_text(src)
    known = {f"tamperprobe.p.{m}" for m in "abfhis"} | {"tamperprobe.c", "tamperprobe.d", "tamperprobe.d.e", "tamperprobe", "tamperprobe.p"}
    assert imports_of("tamperprobe.p.a", path, known) == {
        "tamperprobe.p.b",
        "tamperprobe.c",
        "tamperprobe.p.s",
        "tamperprobe.d",
        "tamperprobe.d.e",
        "tamperprobe.p.i",
    }
    with_types = imports_of("tamperprobe.p.a", path, known, type_checking=True)
    assert with_types == imports_of("tamperprobe.p.a", path, known) | {"tamperprobe.p.f"}


def test_no_import_cycle_in_the_package(graph):
    found = [sorted(c) for c in cycles(graph)]
    assert found == [], f"import cycles: {found}"


def test_evaluation_types_make_no_cycle_either(typed):
    """In ``evaluation`` not even the type-only imports make a cycle: the result types live in ``results``, apart from their runners."""
    evaluation = {
        m: {t for t in targets if t.startswith("tamperprobe.evaluation")} for m, targets in typed.items() if m.startswith("tamperprobe.evaluation")
    }
    found = [sorted(c) for c in cycles(evaluation)]
    assert found == [], f"import cycles (type-only imports counted): {found}"


def test_the_history_and_the_ledger_sit_below_what_verifies(graph, typed):
    """``served.history`` (runs), ``served.ledger`` (the pool ledger) and ``served._db`` (their file) import neither the pool nor
    verify nor the session, and not even type-only imports make a cycle among them (main had history -> verify -> pool -> history)."""
    low = {"tamperprobe.served.history", "tamperprobe.served.ledger", "tamperprobe.served._db"}
    assert "tamperprobe.served.ledger" in graph["tamperprobe.served.pool"] and "tamperprobe.served._db" in graph["tamperprobe.served.ledger"]
    for module in low:
        assert not graph[module] & {"tamperprobe.served.pool", "tamperprobe.served.verify", "tamperprobe.served.session"}, module
    assert "tamperprobe.served.verify" in typed["tamperprobe.served.history"]  # Report, for type checking only
    found = [sorted(c) for c in cycles(typed) if c & (low | {"tamperprobe.served.pool"})]
    assert found == [], f"import cycles (type-only imports counted): {found}"
