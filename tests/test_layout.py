"""The house drawn from its imports: packages by concept, nothing imports upward, no import
cycle, mlflow and optuna each in their own places, modules a reader can hold."""

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Each top-level module or package of bench/ and its floor: a part imports only parts on lower
# floors (or itself). The command line is on top; what every part uses is at the bottom.
FLOORS = {
    "errors": 0, "stats": 0, "registry": 0,
    "paths": 1, "experiments": 1, "process": 1, "servers": 2,
    "data": 2, "engine": 2, "workers": 2,
    "models": 3,
    "config": 4,
    "ablation": 5, "reference": 5,
    "tracking": 6,
    "job": 7, "results": 7,
    "suite": 8, "report": 8,
    "tuning": 9, "perf": 9,
    "cli": 10, "__main__": 11,
}  # fmt: skip
MLFLOW_PLACES = ("tracking",)
OPTUNA_PLACES = ("tuning", "report", "results")
MAX_LINES = 450
MAX_FUNCTION = 65  # lines of one function or method, its signature and docstring included
MAX_TOP_LEVEL = 13  # modules directly in bench/, besides __init__ and __main__


def _sources() -> set[str]:
    root = BENCH.parent
    return {str(p.relative_to(root).with_suffix("")).removesuffix("/__init__") for p in BENCH.rglob("*.py")}


SOURCES = _sources()


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(BENCH.rglob("*.py")):
        parts = path.relative_to(BENCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:  # names for annotations: nothing is imported when the code runs
            continue
        level = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" for a in node.names]
            # `from package import module` needs the package's face only where a name is not a module
            if not all(n.replace(".", "/") in SOURCES for n in names):
                out.append((base, level))
            out += [(n, level) for n in names]
    return out


def part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if bits[0] == "bench" and len(bits) > 1 else None


def test_every_part_has_a_floor():
    parts = {part(m) for m in modules()} - {None}
    assert parts <= set(FLOORS), f"parts without a floor: {sorted(parts - set(FLOORS))}"


def test_nothing_imports_upward():
    known = modules()
    upward = []
    for name, path in known.items():
        here = part(name)
        for target, _ in imports(path, name):
            there = part(target)
            if here and there and there != here and (target in known or f"bench.{there}" in known):
                if FLOORS[there] >= FLOORS[here]:
                    upward.append(f"{name} -> {target}")
    assert not upward, "\n".join(sorted(set(upward)))


def test_no_import_cycle_among_modules():
    known = modules()
    graph = {
        name: {t for t, top in imports(path, name) if top and t in known and t != name} for name, path in known.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize(("library", "places"), [("mlflow", MLFLOW_PLACES), ("optuna", OPTUNA_PLACES)])
def test_a_library_is_imported_only_in_its_places(library, places):
    outside = [
        name
        for name, path in modules().items()
        if part(name) not in places and any(t.split(".")[0] == library for t, _ in imports(path, name))
    ]
    assert not outside, f"{library} imported in {outside}"


def test_modules_are_small_and_few_at_the_top():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
    top = [p.name for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= MAX_TOP_LEVEL, sorted(top)


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)
