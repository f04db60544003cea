"""The house rules of the package's layout, checked on the source itself.

Imports run one way (a walk of every import, module level and lazy alike, finds no cycle); `dictionaries/`
reaches `training/` only from the composition root (cli_models.py, cli_hub.py, demo.py), inside functions; one module
each talks to huggingface_hub (hub.py) and to nnsight (attachment.py); no file grows past ~400 lines; the
commands that only read cards load neither torch nor `training/`; no function is longer than 60 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HEAVY_IMPORTS_PROBE

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dictionaries", "training", "benchmarks")
MAX_LINES = 420  # "~400": a file past this is split by meaning


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement in the file, lazy ones included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
            found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports) as a path back to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


COMPOSITION_ROOT = ("dictionaries.cli_hub", "dictionaries.cli_models", "dictionaries.demo")


def test_dictionaries_reaches_training_only_from_the_composition_root_lazily():
    for name, path in _modules().items():
        if not name.startswith("dictionaries"):
            continue
        for module, top_level in _imports(path):
            if module.split(".")[0] != "training":
                continue
            assert name in COMPOSITION_ROOT, f"{name} imports {module}"
            assert not top_level, f"{name} imports {module} at module level"


@pytest.mark.parametrize("library, owner", [("huggingface_hub", "dictionaries.hub"),
                                            ("nnsight", "dictionaries.attachment")])
def test_one_module_talks_to_each_library(library, owner):
    users = {name for name, path in _modules().items() if name.startswith(("dictionaries", "training"))
             for module, _ in _imports(path) if module.split(".")[0] == library}
    assert users == {owner}


@pytest.mark.parametrize("path", sorted(p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_file_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"


@pytest.mark.parametrize("path", sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_function_over_sixty_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []




@pytest.mark.parametrize("args", [["list"], ["show", "pythia70m/mlp3/8192"], ["schema"],
                                  ["compare", "pythia70m/mlp3/8192", "pythia70m/mlp3/32768"]],
                         ids=lambda a: a[0])
def test_card_only_commands_need_neither_torch_nor_training(args):
    done = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS_PROBE, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:"
