"""The package's import graph follows the layers of docs/design.md: no import runs back up."""
import ast
from pathlib import Path

import sparsebench

PACKAGE = Path(sparsebench.__file__).parent

# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    {"errors", "specs", "registry", "platform", "__init__"},
    {"models", "datasets", "measure", "store"},
    {"training"},
    {"methods"},
    {"runners"},
    {"report"},
    {"cli", "__main__"},
]


def layer_of(top: str) -> int:
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"sparsebench.{top} is in no layer of the design; add it to LAYERS and docs/design.md")


def top_level(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_tops(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sparsebench" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_no_import_runs_back_up():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = top_level(path)
        if own == "__init__":         # the package's convenience entry points import lazily, inside functions
            continue
        for line, top in imported_tops(path):
            if layer_of(top) > layer_of(own):
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports sparsebench.{top}")
    assert not violations, "imports that run back up:\n" + "\n".join(violations)


def test_every_module_is_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(top_level(path))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules) -> set:
    """The package's modules `path` imports anywhere in it, also inside functions: a deferred import
    still ties the two modules together. `from pkg import sub` counts as importing `pkg.sub`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name in modules}


def test_no_import_circles():
    """No module imports, directly or through others, a module that imports it back (a package's
    `__init__` re-exporting its own modules is the one allowed way back)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: module_imports(path, paths) - {name} for name, path in paths.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    circles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)
