"""The package's layers, checked on its source: file reading at the bottom, the models above it,
then embedding, evaluation, search and training, and the command line on top.  No import cycle
between clipforge modules, and no module imports a layer above its own, at module level or
inside a function (an upward import hidden in a function is a cycle waiting to happen)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import clipforge

PACKAGE = Path(clipforge.__file__).parent

# Module name prefixes by layer, lowest first.  A module belongs to the layer of its longest
# matching prefix.  The package itself (``clipforge``) is the public facade: it imports the
# bottom layer eagerly and everything else on first use, so it sits outside the layers.
LAYERS = (
    ("clipforge.configs", "clipforge.fileio", "clipforge.allocator", "clipforge.text",
     "clipforge.image", "clipforge.reading", "clipforge.data", "clipforge.prompts",
     "clipforge.samples", "clipforge.encoder", "clipforge.ranks", "clipforge.video"),
    ("clipforge.model", "clipforge.weights", "clipforge.precision", "clipforge.factory",
     "clipforge.onnx", "clipforge.loss", "clipforge.classifier"),
    ("clipforge.inference", "clipforge.inference_shards", "clipforge.dense",
     "clipforge.evaluation", "clipforge.search", "clipforge.training"),
    ("clipforge.commands", "clipforge.cli", "clipforge.__main__"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool,
             modules: dict[str, Path]) -> set[str]:
    """The clipforge modules an import statement loads (``from . import x`` loads module x)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        names = submodules if submodules and len(submodules) == len(node.names) else [target]
    found = set()
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name.startswith("clipforge") and name in modules and name != module \
                and not module.startswith(name + "."):  # a module's own packages load first
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the clipforge modules it imports anywhere (module level or in a function),
    leaving out ``if TYPE_CHECKING:`` blocks, which never run."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
        while pending:
            for child in ast.iter_child_nodes(pending.pop()):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    edges |= _targets(module, child, path.name == "__init__.py", modules)
                pending.append(child)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    matches = [(len(prefix), n) for n, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_every_module_has_a_layer_and_imports_none_above_it() -> None:
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "clipforge" and layer(m) is None)
    assert unplaced == [], "add these modules to LAYERS"
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m != "clipforge"
                    for t in targets if t != "clipforge" and layer(t) > layer(m))
    assert upward == []


def test_parsing_classify_does_not_import_the_training_loop() -> None:
    """``python -m clipforge classify --help`` (as runpy runs ``-m``) leaves the loop alone."""
    code = ("import runpy, sys\n"
            "sys.argv = ['clipforge', 'classify', '--help']\n"
            "try:\n"
            "    runpy.run_module('clipforge', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('loop' if 'clipforge.training.loop' in sys.modules else 'no loop')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--labels" in result.stdout
    assert result.stdout.strip().endswith("no loop")
