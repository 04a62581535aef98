"""The package's structure: no two areas of phreg import each other, counting imports made inside functions.

An area is a subpackage (`phreg/distill/`, `phreg/hub/`, ...) or a top-level module (`phreg/run.py`). Dependencies
run one way (e.g. distill -> hub: the loop exports; hub never imports distill), so each area can be read, tested and
changed from the areas below it.
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "phreg"


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
                if dotted[0] != "phreg" or len(module) < 2 or len(dotted) < 2:
                    continue
                a, b = module[1], dotted[1]
                if a != b:
                    edges[a][b].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def test_no_two_areas_import_each_other():
    edges = area_imports()
    loops = [f"{a} <-> {b}: {where[:2]} / {edges[b][a][:2]}" for a in edges for b, where in edges[a].items()
             if a < b and a in edges.get(b, {})]
    assert not loops, "areas that import each other: " + "; ".join(loops)


def test_the_scan_sees_imports_inside_functions():
    """The rule is only worth something if the scan finds what it is meant to find (imports hidden in functions)."""
    edges = area_imports()
    assert "phreg/hub/export.py" in str(edges["hub"]["run"])  # `from ..run import ...`
    assert "cli" in edges and "distill" in edges["cli"]  # cli imports distill inside _distill()
