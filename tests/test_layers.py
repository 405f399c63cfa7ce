"""The package's layers (ARCHITECTURE.md): no module imports from a layer above its own, and no import cycle.

Every `import` of every module under src/advantage counts for the layers, including those under
`if TYPE_CHECKING:` and those inside functions (a lazy import is still a dependency). Cycles are looked for
among the imports that run when a module is imported (module level, not under TYPE_CHECKING): a lazy import
inside a function, or a type-only one, is how a module refers back within its own layer without a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "wire types and configs",
        [
            "advantage.wire",
            "advantage.config",
            "advantage.trajectory",
            "advantage.files",
            "advantage.environment",
            "advantage.cluster",
        ],
    ),
    (
        "engine and training",
        [
            "advantage.engine",
            "advantage.training",
            "advantage.tracking",
            "advantage.scaling",
            "advantage.health",
            "advantage.threads",
            "advantage.online",  # the traffic store, feedback and groups (the online *trainer* is on top)
        ],
    ),
    ("service", ["advantage.service", "advantage.service_ops", "advantage.registry"]),
    ("server and backends", ["advantage.server", "advantage.backends"]),
    (
        "public API and CLI",
        [
            "advantage",  # the package's __init__: the public API's re-exports
            "advantage.__main__",
            "advantage.cli",
            "advantage.model",
            "advantage.lowlevel",
            "advantage.gather",
            "advantage.sft",
            "advantage.distill",
            "advantage.online.trainer",
            "advantage.online.judging",  # the online trainer's judge: it uses RULER and the TrainableModel
            "advantage.online.golden",  # the gate's golden set: it scores through the TrainableModel's backend
            "advantage.rewards",
            "advantage.report",
            "advantage.export",
            "advantage.tasks",
        ],
    ),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "advantage").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, layer = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    if layer < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to ARCHITECTURE.md).")
    return layer


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported advantage module, runs at import time) for every import statement in `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def target(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*up, *([node.module] if node.module else [])])
        # `from advantage import service_ops` imports a module; `from advantage.x import Name` imports x.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]

    def walk(nodes: list[ast.stmt], eager: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.extend((m, eager) for m in target(node) if m.split(".")[0] == "advantage")
            elif isinstance(node, ast.If) and _is_type_checking(node):
                walk(node.body, False)
                walk(node.orelse, eager)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(node.body, False)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, eager)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk([n for n in getattr(node, field, []) if isinstance(n, ast.AST)], eager)  # type: ignore[misc]

    walk(ast.parse(path.read_text()).body, True)
    return [(m, eager) for m, eager in found if m in MODULES and m != module]


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module: str) -> None:
    mine = layer_of(module)
    upward = [f"{m} ({LAYERS[layer_of(m)][0]})" for m, _ in imports(module) if layer_of(m) > mine]
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports from a layer above it: {upward}"


def test_no_import_cycle() -> None:
    graph = {m: sorted({d for d, eager in imports(m) if eager}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import() -> None:
    """The rule bites: a backend importing the public API's model would be caught."""
    assert layer_of("advantage.model") > layer_of("advantage.backends.base")
    assert layer_of("advantage.wire.ops") == 0 and layer_of("advantage.online.trainer") == len(LAYERS) - 1
