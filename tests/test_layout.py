"""The code reads in one direction: no import circle in kt_edge/, and evaluation never reaches into transfer/.

Every import counts, at module level or inside a function: a deferred import is still a dependency.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest
from sample_kit import REPO

PACKAGE = REPO / "kt_edge"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The kt_edge modules a file imports (``from a.b import c`` counts a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def import_graph() -> nx.DiGraph:
    files = {_module(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for module, path in files.items():
        graph.add_node(module)
        for target in _imports(path, set(files)):
            if target != module and not module.startswith(target + "."):  # a package's own __init__
                graph.add_edge(module, target)
    return graph


def test_no_module_of_kt_edge_imports_itself_back():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


@pytest.mark.parametrize(
    "low, high",
    [
        ("kt_edge.evaluate", "kt_edge.transfer"),
        ("kt_edge.engine", "kt_edge.stages"),
        ("kt_edge.models", "kt_edge.stages"),
        ("kt_edge.kmeans", "kt_edge.evaluate"),
        ("kt_edge.data", "kt_edge.evaluate"),
        ("kt_edge.export", "kt_edge.stages"),
    ],
)
def test_lower_layers_never_import_higher_ones(low, high):
    graph = import_graph()
    wrong = [(a, b) for a, b in graph.edges if a.startswith(low) and b.startswith(high)]
    assert not wrong, wrong


STAGES = {f"kt_edge.stages.{name}" for name in ("teacher", "features", "cluster", "distill", "evaluate", "export")}


def test_only_run_orders_the_stages():
    """A stage is given the artifacts it needs; it never calls (or imports) another stage to make them."""
    graph = import_graph()
    assert STAGES <= set(graph), STAGES - set(graph)
    wrong = [(a, b) for a, b in graph.edges if b in STAGES and a != "kt_edge.stages.run"]
    assert not wrong, wrong


def test_validating_a_recipe_imports_neither_faiss_nor_scikit_learn():
    import subprocess
    import sys

    code = (
        "import sys; from kt_edge.recipe import load_recipe; load_recipe('recipes/quickstart.yaml'); "
        "print(sorted(m for m in ('faiss', 'sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
