"""The core's import graph: no cycle (so every module sits above all it imports), and the core never
imports the nodes, the support helpers or ComfyUI."""
import ast
from pathlib import Path

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
