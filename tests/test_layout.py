"""The repository's shape: the core's import graph has no cycle (so every module sits above all it
imports) and never reaches the nodes, the support helpers or ComfyUI; the tooling imports its
helpers from ``support`` (no sys.path edits outside tests/conftest.py, no test module importing
another, the tiny model configs written once)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfforcing_core.config import WanConfig
from support import tiny
from support.comfy_paths import REPO_ROOT

CORE = REPO_ROOT / "selfforcing_core"
FOREIGN = ("nodes", "support", "comfy", "comfy_api", "folder_paths", "server")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(core modules, other top-level names) that ``path`` imports anywhere (function-level too).

    The parity package loads its format modules by name (``FORMAT_MODULES``): those count too.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    core, other = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FORMAT_MODULES" for t in node.targets)):
            candidates = [f"{package}.{value.value}" for value in node.value.elts]
        else:
            continue
        for candidate in candidates:
            if candidate in modules:
                core.add(candidate)
            elif not candidate.startswith("selfforcing_core"):
                other.add(candidate.split(".")[0])
    core.discard(name)
    return core, other


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    paths = sorted(CORE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph, foreign = {}, {}
    for path in paths:
        graph[module_name(path)], foreign[module_name(path)] = imports_of(path, modules)
    return graph, foreign


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Height of every module: 0 imports no core module, else 1 + the highest it imports.
    Raises AssertionError naming the cycle if there is one."""
    height, visiting = {}, []

    def visit(module):
        if module in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
        if module not in height:
            visiting.append(module)
            height[module] = 1 + max((visit(d) for d in graph[module]), default=-1)
            visiting.pop()
        return height[module]

    for module in graph:
        visit(module)
    return height


def python_files():
    """Every .py file of the repository (hidden folders such as .venv and .host left out)."""
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__pycache__")
        yield from (Path(folder) / name for name in sorted(files) if name.endswith(".py"))


def test_the_cycle_check_names_a_cycle():
    with pytest.raises(AssertionError, match="import cycle: a -> b -> c -> a"):
        layers({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
    assert layers({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"b": 0, "a": 1, "c": 2}


def test_core_import_graph_has_no_cycle():
    """Without a cycle every module has a height above everything it imports (printed: the layers)."""
    graph, _ = import_graph()
    height = layers(graph)
    assert height["selfforcing_core.units"] == 0 and height["selfforcing_core.model"] > height["selfforcing_core.kv_cache"]
    for level in range(max(height.values()) + 1):
        print(level, sorted(m.removeprefix("selfforcing_core.") for m, h in height.items() if h == level))


def test_core_never_imports_nodes_support_or_comfyui():
    _, foreign = import_graph()
    leaks = {module: sorted(names & set(FOREIGN)) for module, names in foreign.items() if names & set(FOREIGN)}
    assert leaks == {}


def is_sys_path(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def sys_path_edits(source: str) -> list[int]:
    """Lines that change ``sys.path``: sys.path.insert / append / extend / remove / clear, or an
    assignment to sys.path or a slice of it."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines += [node.lineno] if node.func.attr in ("insert", "append", "extend", "remove", "clear") else []
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lines += [node.lineno for target in targets
                      if is_sys_path(target) or isinstance(target, ast.Subscript) and is_sys_path(target.value)]
    return sorted(lines)


def test_no_sys_path_edits_outside_the_conftest():
    """Tests reach the repository through pytest.ini's pythonpath; benchmarks and scripts run as modules or by path (the development install)."""
    assert sys_path_edits("import sys\nsys.path[:0] = [root]\nsys.path.insert(0, root)\nsys.path += [root]\n"
                          "print(sys.path[0])\n") == [2, 3, 4]
    edits = [f"{path.relative_to(REPO_ROOT)}:{line}" for path in python_files()
             if path != REPO_ROOT / "tests" / "conftest.py" for line in sys_path_edits(path.read_text())]
    assert edits == []


def test_no_test_module_imports_another():
    """Helpers shared by tests live in ``support``; a test module imports no ``test_*`` module."""
    tests = {path.stem for path in (REPO_ROOT / "tests").glob("test_*.py")}
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO_ROOT)} imports {name}" for name in names
                      if name.split(".")[-1] in tests or name.split(".")[0] in tests]
    assert found == []


def test_the_tiny_model_configs_are_written_once():
    """A literal ``WanConfig(...)`` equal to one of support/tiny.py's configs anywhere else is a copy."""
    shared = {"TINY": tiny.TINY, "HOST_TINY": tiny.HOST_TINY, "OTHER_TINY": tiny.OTHER_TINY}
    copies = []
    for path in python_files():
        if path == REPO_ROOT / "support" / "tiny.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "WanConfig" and not node.args
                    and all(isinstance(k.value, ast.Constant) for k in node.keywords)):
                config = WanConfig(**{k.arg: k.value.value for k in node.keywords})
                copies += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} is {name}"
                           for name, value in shared.items() if config == value]
    assert copies == []


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO_ROOT / "benchmarks").glob("bench_*.py")))
def test_benchmarks_run_by_path_from_anywhere(script, tmp_path):
    """``python benchmarks/bench_x.py`` works as well as ``python -m benchmarks.bench_x`` (the
    development install of scripts/setup.sh); ``--help`` imports everything the benchmark uses."""
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{script} --help failed (is `pip install -e .` done? scripts/setup.sh does it):\n{run.stderr}"
    assert "usage:" in run.stdout
