"""The architecture map (docs/architecture.md) checked against the code: imports that form no circle, a
pure core that does no I/O, and the line budget of the scan, worklist actions, digest and report queries.

Why a test: each of these was true once and drifted (the report's SQL grew to 1,351 lines with its
shortcuts); a reviewer notices a circle or a database import in the core only when something breaks."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refloop"
#: The pure core: no database, network, file or clock access; it takes ``now`` from its caller.
CORE = ("message", "referral", "stall", "report", "clock", "x360")
#: Libraries that do I/O, and the project's I/O shells: none of them may be imported by the core.
IO = ("sqlalchemy", "aiohttp", "asyncio", "socket", "apscheduler", "alembic", "smtplib", "urllib", "http",
      "subprocess", "refloop.store", "refloop.daemon", "refloop.routes", "refloop.notify", "refloop.cli")
#: Issue 11: the scan, worklist actions, digest and report queries together, split by what they own.
BUDGET = {"store/scan.py", "store/alerts.py", "store/digest.py", "store/report_queries.py"}
BUDGET_LINES = 900


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        name = ".".join(("refloop", *path.relative_to(PACKAGE).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, *, top_only: bool) -> set[str]:
    """Modules *path* imports: at module level only (what runs on import), or anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative enough for this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_module_imports_form_no_circle() -> None:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        edges[name] = {t for t in _imports(path, top_only=True) if t in modules and t != name}
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a two-module circle is found, a chain is not."""
    assert _cycles(defaultdict(set, {"a": {"b"}, "b": {"a"}, "c": {"a"}})) == [["a", "b"]]
    assert _cycles(defaultdict(set, {"a": {"b"}, "b": {"c"}})) == []


def test_the_core_does_no_io() -> None:
    for name in CORE:
        imported = _imports(PACKAGE / f"{name}.py", top_only=False)
        bad = sorted(i for i in imported if any(i == io or i.startswith(io + ".") for io in IO))
        assert bad == [], f"refloop.{name} imports {bad}"


def test_scan_worklist_actions_digest_and_report_queries_stay_under_budget() -> None:
    lines = {name: len((PACKAGE / name).read_text(encoding="utf-8").splitlines()) for name in sorted(BUDGET)}
    assert sum(lines.values()) < BUDGET_LINES, lines
