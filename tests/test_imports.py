"""The project's import graph is a DAG that runs one way (issue: models/ without import cycles).

Read from the source with ``ast`` (no import side effects): every ``import`` / ``from ... import`` of a
project module, at any depth (function-level imports included), is an edge. Checked: no cycle; every
module of every package (studio/ included) and every top-level module has a floor (`FLOORS`) and imports
only its own floor or lower ones; models/ imports no project module lazily (inside a function) to dodge
one; the library (models/, utils/, generation/, studio/) never imports the stage CLIs; and every module
imports in a fresh interpreter.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "generation", "utils", "shapes", "studio")
TOP_LEVEL = ("prompt", "prompt_batch", "generate", "app")
SCRIPTS = ("prompt_batch", "generate", "app")  # CLIs: nothing in the library may import them
# Floors, lowest first: a module may import modules of its own floor or of lower ones, never of a higher one.
# A module's floor is that of its longest listed prefix (utils.eval.x: "utils.eval", utils.layout: "utils").
FLOORS = (
    ("utils",),                       # layouts, caches, I/O, the LLM client, plotting
    ("models",),                      # model building and loading, attention processors, tokenizers
    ("generation", "utils.eval"),     # stage 2 (sampling, guidance, runs, settings) and stage 3 (evaluation)
    ("shapes",),                      # the shapes world: data, planner, detector, training (LVD-Shapes)
    ("prompt",),                      # stage-1 data: templates and prompt sets
    ("studio",),                      # the studio's backend and page
    SCRIPTS,                          # the CLIs
)


def project_modules() -> dict[str, Path]:
    modules = {name: ROOT / f"{name}.py" for name in TOP_LEVEL if (ROOT / f"{name}.py").is_file()}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else ():
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported project module, whether the import sits inside a function)."""
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(child) for fn in functions for child in ast.walk(fn)}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.append((name, target, id(node) in nested))
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}
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


def test_the_import_graph_has_no_cycle():
    edges = import_edges(project_modules())
    assert len(edges) > 30  # the scan sees the project's imports
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def floor_of(module: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(FLOORS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise KeyError(f"{module} has no floor in FLOORS")
    return max(matches)[1]


def test_every_module_has_a_floor_and_imports_point_down():
    modules = project_modules()
    assert {name.split(".")[0] for name in modules} >= {*PACKAGES, *SCRIPTS}
    unplaced = []
    for name in modules:
        try:
            floor_of(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == []
    upward = [f"{a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})"
              for a, b, _ in import_edges(modules) if floor_of(b) > floor_of(a)]
    assert upward == []


def test_models_imports_no_project_module_lazily():
    lazy = [(a, b) for a, b, nested in import_edges(project_modules()) if nested and a.startswith("models")]
    assert lazy == []


def test_the_library_never_imports_a_cli_or_the_stage_one_data():
    forbidden = set(SCRIPTS) | {"prompt"}
    bad = [(a, b) for a, b, _ in import_edges(project_modules())
           if a.split(".")[0] in ("models", "utils", "generation") and b.split(".")[0] in forbidden]
    assert bad == []
    studio_to_cli = [(a, b) for a, b, _ in import_edges(project_modules())
                     if a.startswith("studio") and b.split(".")[0] in SCRIPTS]
    assert studio_to_cli == []   # the studio builds its configs with generation.settings, not generate.py


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    import importlib.util

    has_gradio = importlib.util.find_spec("gradio") is not None  # studio.ui (and app's page) need the app extra
    names = [name for name in project_modules() if has_gradio or name != "studio.ui"]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_stage_two_cli_and_the_batch_runner_are_small_pieces():
    """Issue 17.3: ``generate.main`` was seven ``print(...); return 2`` blocks and ``prompt_batch.run_batch`` 147
    lines of closures; the CLIs now stop through one exception and no function of theirs is long."""
    long_functions, usage_returns = [], []
    for name in ("generate", "prompt_batch"):
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
            if (name == "generate" and isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)
                    and node.value.value == 2):
                usage_returns.append(f"generate.py:{node.lineno}")
    assert long_functions == []
    assert usage_returns == []  # usage errors end through generate._Stop, printed in one place


def test_unused_names_are_gone_and_the_wan_guided_blocks_are_checked_in_one_place():
    """Issue 17.3: ``Backbone.default_guided_layers`` and ``wan_attention.guided_block_indices`` were unused; the
    guided blocks were validated in three places. One function, `check_wan_guided_layers`, now says it."""
    sources = {name: path.read_text(encoding="utf-8") for name, path in project_modules().items()}
    for unused in ("default_guided_layers", "guided_block_indices"):
        assert [name for name, text in sources.items() if unused in text] == []
    says_it = [name for name, text in sources.items() if "is not a cross-attention module of this transformer" in text]
    assert says_it == ["models.wan_attention"]
    defines_a_check = [name for name, text in sources.items() if "def check_wan_guided_layers" in text]
    assert defines_a_check == ["models.wan_attention"]
