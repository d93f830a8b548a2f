"""The package's modules import each other without a circle.

Function-level imports count too: they hide a circle from Python, not from
a reader, who still goes round client, cluster, client, ...
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "helpers"


def _imports_of(path: Path, modules: set) -> set:
    """The helpers modules that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .client import X
                found.add(node.module.split(".")[0])
            else:            # from . import mpc, TFECluster
                for alias in node.names:
                    found.add(alias.name if alias.name in modules else "__init__")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def import_graph() -> dict:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    return {path.stem: _imports_of(path, modules) - {path.stem} for path in PACKAGE.glob("*.py")}


def find_cycle(graph: dict):
    """One import circle as a list of module names, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"client": {"cluster"}, "cluster": {"client"}}) == [
        "client", "cluster", "client"]
    assert find_cycle({"client": {"mpc"}, "cluster": {"client"}, "mpc": set()}) is None


def test_helpers_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_client_does_not_import_the_cluster():
    # The user-facing TFEWorker (in cluster.py) uses the client, not the other way round.
    assert "cluster" not in import_graph()["client"]
