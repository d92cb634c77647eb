"""No import cycle among the modules imported at load time (issue 17.2), read from the source with ``ast``.

An import counts when it runs as the module loads: at module level, not under ``if TYPE_CHECKING:``
and not inside a function (a deferred import is how a command keeps ``--help`` fast, and it cannot
make a cycle at load time). ``from . import x`` counts as an import of the submodule ``x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tamperprobe

ROOT = Path(tamperprobe.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["tamperprobe", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_imports(tree: ast.Module, types: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module loads (module level, also inside try/if; under TYPE_CHECKING only with ``types``)."""
    out: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if types or "TYPE_CHECKING" not in test:
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    walk(block)

    walk(tree.body)
    return out


def import_graph(types: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at load time (and for type checking too, with ``types``)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _load_time_imports(ast.parse(path.read_text(encoding="utf-8")), types):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
                continue
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            submodules = {f"{target}.{a.name}" for a in node.names} & files.keys()
            deps.update(submodules)
            if target in files and (node.module or len(submodules) < len(node.names)):  # `from . import sub` needs only sub
                deps.add(target)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_imports_no_cycle_at_load_time():
    assert cycles(import_graph()) == []


def test_the_history_the_ledger_and_the_pool_import_no_cycle():
    graph = import_graph()
    assert "tamperprobe.served.ledger" in graph["tamperprobe.served.pool"]
    assert graph["tamperprobe.served.ledger"] >= {"tamperprobe.served._db"}
    served = {"tamperprobe.served.history", "tamperprobe.served.ledger", "tamperprobe.served._db", "tamperprobe.served.pool"}
    assert not [c for c in cycles(graph) if served & set(c)]
    # the history and the ledger sit under everything that verifies: they import neither the pool nor verify
    for low_level in ("tamperprobe.served.history", "tamperprobe.served.ledger", "tamperprobe.served._db"):
        assert not graph[low_level] & {"tamperprobe.served.pool", "tamperprobe.served.verify", "tamperprobe.served.session"}
    # not even for type checking (history's Report): main had history -> verify -> pool -> history
    typed = import_graph(types=True)
    assert "tamperprobe.served.verify" in typed["tamperprobe.served.history"]
    assert not [c for c in cycles(typed) if served & set(c)]
