"""Import direction: the detector is usable on its own (nothing under detector/ nor tools/extract_rois.py
imports e2e_vl), and no two modules or sub-packages import each other, however indirectly. Function-level
imports count: they hide a cycle from Python, not from the design."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "e2e_vl")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` depends on that module; `from module import name` on the module.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    modules = set(files)
    return {name: imported(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def package_of(module: str) -> str:
    """`detector`, or the sub-package of e2e_vl (`e2e_vl.engine`, ...; `e2e_vl` for its top-level modules)."""
    parts = module.split(".")
    if parts[0] == "detector" or len(parts) == 1 or not (REPO / parts[0] / parts[1]).is_dir():
        return parts[0]
    return ".".join(parts[:2])


def test_detector_and_extraction_import_nothing_from_e2e_vl():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("e2e_vl")) for m, deps in graph.items()
                 if m.startswith("detector")}
    offenders["tools/extract_rois.py"] = sorted(
        d for d in imported(REPO / "tools" / "extract_rois.py", set(graph)) if d.startswith("e2e_vl"))
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert find_cycle(graph) is None
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    assert find_cycle({p: deps - {p} for p, deps in packages.items()}) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
