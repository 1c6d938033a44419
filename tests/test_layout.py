"""The package's shape, read from its imports (wherever they stand in a file): no import circle, each wing
imports only the wings below it, report/ reads records without training code, and an own-module import
inside a function is there for start-up cost only, saying so in a comment."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdexp"
ENTRY_POINTS = {"cli", "train", "api", "demo", "bench", "__main__"}
# Wings bottom-up: each may import its own and those on lower floors only.
FLOORS = [{"core"}, {"objectives", "models", "data", "report", "schedules"}, {"teachers"}, {"run"}, {"grid"},
          ENTRY_POINTS]
MAX_WING_LEVELS = 8
# Command dispatchers load each command's code only when it is asked for (`kdexp report` never imports torch).
DISPATCHERS = {"cli.py", "report/cli.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imported_modules(node: ast.AST) -> set[str]:
    """The kdexp modules an import statement loads (``from kdexp.x import y`` is ``kdexp.x.y`` when that is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdexp" and not node.level:
        subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
        return subs or ({node.module} & MODULES.keys())
    return set()


@cache
def arrows() -> dict[str, set[str]]:
    """module → the kdexp modules it imports (package ``__init__`` files that only re-export are not nodes)."""
    graph = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            deps |= imported_modules(node)
        graph[name] = deps - {name}
    return graph


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdexp"


def floor(wing_name: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if wing_name in names)


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected sets of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def wing_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, deps in arrows().items():
        if module == "kdexp":
            continue
        out.setdefault(wing(module), set()).update(wing(d) for d in deps if d != "kdexp")
    return {k: v - {k} for k, v in out.items()}


def test_no_import_circle_between_files_or_wings():
    assert circles({m: d for m, d in arrows().items() if m != "kdexp"}) == []
    assert circles(wing_graph()) == []


def test_the_wing_graph_stands_on_at_most_eight_levels():
    graph = wing_graph()

    @cache
    def level(node: str) -> int:
        return 1 + max((level(d) for d in graph[node]), default=0)

    assert max(level(n) for n in graph) <= MAX_WING_LEVELS


def test_each_wing_imports_only_the_wings_below_it():
    upward = [(module, dep) for module, deps in arrows().items() if module != "kdexp" for dep in deps
              if dep != "kdexp" and floor(wing(dep)) > floor(wing(module))]
    assert upward == []


def test_report_imports_core_only():
    outside = {(m, d) for m, deps in arrows().items() if wing(m) == "report" for d in deps
               if wing(d) not in ("report", "core")}
    assert outside == set()


def test_own_module_imports_inside_functions_say_why():
    """Allowed for start-up cost (torch, Lightning, W&B) with a comment in the three lines above or on the
    line itself; a command dispatcher's per-command imports need none."""
    silent = []
    for name, path in MODULES.items():
        relative = str(path.relative_to(PACKAGE))
        if relative in DISPATCHERS:
            continue
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            group_start = None  # a run of import statements shares one comment
            for node in fn.body:
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    group_start = None
                    continue
                group_start = group_start or node.lineno
                if imported_modules(node):
                    context = lines[max(group_start - 4, 0):node.end_lineno]
                    if not any("#" in line for line in context):
                        silent.append(f"{relative}:{node.lineno}")
    assert silent == []


@pytest.mark.parametrize("wing_name", ["core", "teachers", "run", "grid"])
def test_every_wing_says_what_it_is(wing_name):
    init = PACKAGE / wing_name / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring naming the wing's job"
