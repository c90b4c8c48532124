"""The import layering of DESIGN.md, read off the source with `ast` (imports inside functions count too).

Floors, bottom up (`FLOORS`): `models/` and `data/`; the registries of knowledge `model_params` and
`model_paths`; the core of `utils/`; `utils/methods/` and `utils/detectors/`; the evaluation pipeline that
combines them (`utils.evaluation`, `utils.scoring`, `utils.preflight`); `utils/studies/` and `utils/plots/`;
the scripts (every other top-level module, scripts/, benchmarks/). A module imports only from its own floor or
below, and the project's modules form no import cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "data", "utils")
SCRIPT_DIRS = ("scripts", "benchmarks")
# (floor, module prefixes), bottom up; a module belongs to the first floor with a matching prefix, `utils` being
# the core's catch-all; anything outside the packages and registries is a script, the top floor.
FLOORS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("ground", ("models", "data")),
    ("registries", ("model_params", "model_paths")),
    ("methods and detectors", ("utils.methods", "utils.detectors")),
    # utils.evaluation, utils.scoring and utils.preflight build detectors and load runs with their method's
    # wrapper (utils.methods.load_run): they sit above the methods and detectors that they combine
    ("evaluation pipeline", ("utils.evaluation", "utils.scoring", "utils.preflight")),
    ("studies and plots", ("utils.studies", "utils.plots")),
    ("utils core", ("utils",)),
)
FLOOR_ORDER = ("ground", "registries", "utils core", "methods and detectors", "evaluation pipeline",
               "studies and plots", "scripts")

def module_files() -> Dict[str, Path]:
    """Every project module (dotted name -> file): the packages, the top-level scripts, scripts/, benchmarks/."""
    files: Dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted(ROOT.glob("*.py")):
        files[path.stem] = path
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            files[f"{folder}.{path.stem}"] = path
    return files


def _is_package(name: str, files: Dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(name: str, files: Dict[str, Path]) -> str | None:
    """The project module `name` denotes: itself, or its longest prefix that is a module (an attribute import)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in files:
            return candidate
    return None


def imports_of(module: str, files: Dict[str, Path]) -> Iterator[Tuple[str, int]]:
    """(imported project module, line) for every import statement of `module`, at any depth of the file."""
    tree = ast.parse(files[module].read_text(), filename=str(files[module]))
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, files)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level-1 packages from this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule itself
                target = _resolve(f"{base}.{alias.name}" if base else alias.name, files)
                if target is not None:
                    yield target, node.lineno


def import_graph(files: Dict[str, Path]) -> Dict[str, Dict[str, int]]:
    """module -> {imported module: first line}, self-imports left out."""
    graph: Dict[str, Dict[str, int]] = {}
    for module in files:
        edges: Dict[str, int] = {}
        for target, line in imports_of(module, files):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _under(module: str, prefixes: Tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def floor_of(module: str) -> str:
    for floor, prefixes in FLOORS:
        if _under(module, prefixes):
            return floor
    return "scripts"


def upward_imports(graph: Dict[str, Dict[str, int]]) -> List[str]:
    """Each import of a module from a higher floor than its own, as `module:line -> target`."""
    found = []
    for module, edges in graph.items():
        level = FLOOR_ORDER.index(floor_of(module))
        for target, line in edges.items():
            if FLOOR_ORDER.index(floor_of(target)) > level:
                found.append(f"{module}:{line} -> {target}")
    return sorted(found)


def cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def test_no_upward_imports():
    violations = upward_imports(import_graph(module_files()))
    assert violations == [], f"{len(violations)} upward imports:\n" + "\n".join(violations)


def test_no_import_cycles():
    found = cycles(import_graph(module_files()))
    assert found == [], f"{len(found)} import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_analysis_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The checker itself: a function-level import and a relative import both become edges, and a cycle and an
    upward import built from them are reported."""
    (tmp_path / "models").mkdir()
    (tmp_path / "utils").mkdir()
    files = {"models": tmp_path / "models" / "__init__.py", "models.a": tmp_path / "models" / "a.py",
             "utils": tmp_path / "utils" / "__init__.py", "utils.b": tmp_path / "utils" / "b.py"}
    files["models"].write_text("")
    files["utils"].write_text("")
    files["models.a"].write_text("def f():\n    from utils.b import g\n    return g\n")
    files["utils.b"].write_text("from ..models import a\n\ndef g():\n    return 1\n")
    graph = import_graph(files)
    assert graph["models.a"] == {"utils.b": 2}
    assert graph["utils.b"] == {"models.a": 1}
    assert upward_imports(graph) == ["models.a:2 -> utils.b"]
    assert cycles(graph) == [["models.a", "utils.b"]]


def test_the_floors_of_the_layering():
    """Each rule of DESIGN.md's layering, on a made-up graph: what may import what."""
    graph = {"data.x": {"models.y": 1}, "utils.runs": {"utils.methods": 2}, "utils.methods.m": {"utils.plots.p": 3},
             "utils.detectors.d": {"utils.methods": 4, "utils.cli": 5}, "utils.studies.s": {"utils.evaluation": 6},
             "utils.evaluation": {"utils.detectors": 7, "model_paths": 8}, "model_paths": {"utils.cli": 9},
             "train": {"utils.studies.s": 10}, "utils.plots.p": {"train": 11}}
    assert upward_imports(graph) == ["model_paths:9 -> utils.cli", "utils.methods.m:3 -> utils.plots.p",
                                     "utils.plots.p:11 -> train", "utils.runs:2 -> utils.methods"]
