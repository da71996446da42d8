"""The import graph follows the layers of docs/architecture.md: no import reaches up a
layer, and no modules import each other, directly or through others.

Every ``import`` and ``from ... import`` in ``mailworker/`` counts: at the top of a
module, inside a function (a lazy import hides a cycle but does not remove it) and under
``TYPE_CHECKING``. The layers are read from the table in docs/architecture.md, so the
document and this test cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mailworker"
DOC = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _owner(name: str) -> str | None:
    """The module an imported name lives in (``mailworker.store.Store`` -> the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path) -> set[str]:
    """The mailworker modules *name* imports, anywhere in its source."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # "from mailworker import api" imports the module mailworker.api.
            found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                      for a in node.names}
    owners = {_owner(n) for n in found if n == "mailworker" or n.startswith("mailworker.")}
    return {o for o in owners if o is not None and o != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer_table() -> list[tuple[int, str, list[str]]]:
    """(number, name, module patterns) per row of the doc's layer table."""
    text = DOC.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| (\d+) (\w+) \| (.+?) \|", line)
        if m:
            rows.append((int(m[1]), m[2], re.findall(r"`([\w.*]+)`", m[3])))
    return rows


def layer_of(name: str, table: list[tuple[int, str, list[str]]]) -> int | None:
    for number, _, patterns in table:
        for pattern in patterns:
            if pattern.endswith(".*"):
                head = pattern[:-2]
                if name == head or name.startswith(head + "."):
                    return number
            elif name == pattern:
                return number
    return None


def test_the_doc_has_the_layer_table() -> None:
    table = layer_table()
    assert [n for n, _, _ in table] == list(range(len(table))) and len(table) >= 5, table


def test_every_module_has_a_layer() -> None:
    table = layer_table()
    missing = sorted(m for m in MODULES if layer_of(m, table) is None)
    assert not missing, (f"modules not placed in docs/architecture.md's layer table: "
                         f"{missing}; add each to the row of its layer")
    patterns = [p for _, _, ps in table for p in ps]
    unknown = [p for p in patterns if p.removesuffix(".*") not in MODULES]
    assert not unknown, f"the layer table names modules that do not exist: {unknown}"


def test_no_import_reaches_up_a_layer() -> None:
    table = layer_table()
    names = {n: name for n, name, _ in table}
    upward = []
    for mod, targets in sorted(GRAPH.items()):
        here = layer_of(mod, table)
        for target in sorted(targets):
            there = layer_of(target, table)
            if here is not None and there is not None and there > here:
                upward.append(f"{mod} ({here} {names[here]}) imports {target} "
                              f"({there} {names[there]})")
    assert not upward, "imports reaching up a layer:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    cycles = strongly_connected(GRAPH)
    assert not cycles, f"modules that import each other (through any path): {cycles}"


def test_the_checks_see_lazy_and_typing_imports() -> None:
    # The graph must see what it is meant to judge: an import inside a function and one
    # under TYPE_CHECKING are edges, and a planted cycle is found.
    assert "mailworker.delivery" in GRAPH["mailworker.celery_integration"]  # lazy
    assert "mailworker.record" in GRAPH["mailworker.hooks"]  # TYPE_CHECKING only
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]


def test_every_module_is_described() -> None:
    text = DOC.read_text().split("## Modules", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"`(mailworker[\w.]*)`", text))
    missing = sorted(set(MODULES) - described)
    assert not missing, f"modules without a line in docs/architecture.md's Modules: {missing}"


def test_pure_layers_load_no_redis_or_celery() -> None:
    # What the layering is for: the decision layer can be imported alone.
    import subprocess
    import sys

    code = ("import sys, mailworker.outcome, mailworker.record, mailworker.hooks; "
            "print(sorted(m for m in ('redis', 'celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
