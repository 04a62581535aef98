"""The package's structure: no cycle between areas of phreg, of any length, counting imports made inside functions;
a top level that holds only the public API, `__main__`, the command line and the errors.

An area is a subpackage (`phreg/distill/`, `phreg/hub/`, ...) or a top-level module (`phreg/cli.py`). Dependencies
run one way, from the command line down (commands -> distill -> hub -> eval -> targets -> models -> backbones -> data,
run, config, files -> errors), so each area can be read, tested and changed from the areas below it.
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "phreg"
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "errors.py"}


def is_area(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def area_imports() -> dict[str, dict[str, list[str]]]:
    """area -> imported area -> ['file:line', ...], for every `import` / `from ... import` anywhere in a file."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = parts[:-1] if parts[-1] == "__init__" else parts
        package = module if parts[-1] == "__init__" else module[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(package[:len(package) - node.level + 1]) if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                dotted = name.split(".")
                if dotted[0] != "phreg" or len(module) < 2 or len(dotted) < 2 or not is_area(dotted[1]):
                    continue
                a, b = module[1], dotted[1]
                if a != b:
                    edges[a][b].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected components of more than one area (Tarjan): each holds at least one cycle."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_cycle_between_areas_of_any_length():
    edges = area_imports()
    loops = cycles(edges)
    where = [f"{c}: " + "; ".join(f"{a} -> {b} {edges[a][b][:1]}" for a in c for b in c if b in edges.get(a, {}))
             for c in loops]
    assert not loops, "areas in an import cycle: " + " | ".join(where)


def test_the_cycle_finder_finds_long_cycles_and_only_cycles():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "d": {"a": 1, "c": 1}}) == []


def test_the_scan_sees_imports_inside_functions():
    """The rule is only worth something if the scan finds what it is meant to find (imports hidden in functions)."""
    edges = area_imports()
    assert "phreg/hub/export.py" in str(edges["hub"]["run"])  # `from ..run.folder import ...`
    assert "commands" in edges and "distill" in edges["commands"]  # imported inside `commands.distill.run`


def test_the_top_level_holds_the_api_the_command_line_and_the_errors():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == TOP_LEVEL, modules - TOP_LEVEL
