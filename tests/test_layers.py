"""The import graph keeps the house plan of DESIGN.md: stages side by side over the contracts
layer, the command line above the workflow layer, and no circle anywhere.

Read with ``ast`` (nothing is imported), function-local and TYPE_CHECKING imports included: a
circle hidden behind a local import is still a circle to the reader.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmvq", "pipeline", "workflows")
STAGES = ("pipeline.synth", "pipeline.ingest", "pipeline.preprocess", "pipeline.train",
          "pipeline.tokenize", "pipeline.evaluate", "pipeline.register")
MAX_CHAIN = 14  # files in the longest import chain (../shared/tools/imports.py's goal)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def _edges(module: str) -> frozenset[str]:
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            # A package's own modules importing the package (its __init__) is not an edge.
            if target and target != module and not (module.startswith(target + ".")
                                                    and MODULES[target].name == "__init__.py"):
                out.add(target)
    return frozenset(out)


def _stage_of(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def test_pipeline_never_imports_workflows():
    bad = [f"{m} -> {t}" for m in MODULES if m.startswith("pipeline")
           for t in _edges(m) if t.startswith("workflows")]
    assert bad == []


def test_mmvq_imports_only_itself():
    bad = [f"{m} -> {t}" for m in MODULES if m.startswith("mmvq")
           for t in _edges(m) if not t.startswith("mmvq")]
    assert bad == []


def test_no_stage_imports_another_and_nothing_below_imports_a_stage():
    """Only the workflow layer (the registry) and the benchmarks that time a stage know the
    stages; a stage, the contracts and the Ray glue never import a stage other than themselves."""
    bad = []
    for module in MODULES:
        if not module.startswith("pipeline") or module.startswith("pipeline.bench"):
            continue
        for target in _edges(module):
            stage = _stage_of(target)
            if stage is not None and stage != _stage_of(module):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_contracts_import_no_stage_and_no_ray():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("pipeline.formats"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{module} -> {n}" for n in names if n.split(".")[0] == "ray"]
        bad += [f"{module} -> {t}" for t in _edges(module) if _stage_of(t)]
    assert bad == []


def test_no_import_cycle_and_a_shallow_graph():
    state: dict[str, int] = {}
    cycles = []

    @functools.cache
    def depth(module: str) -> int:
        return 1 + max((depth(t) for t in _edges(module)), default=0)

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(_edges(module)):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []
    deepest = max(MODULES, key=depth)
    assert depth(deepest) <= MAX_CHAIN, deepest


def test_the_checker_sees_a_stage_to_stage_import(monkeypatch):
    """The rule can fail: a tokenize -> train edge (what TOKENIZER_DIR once was) is caught."""
    monkeypatch.setattr(f"{__name__}._edges",
                        lambda m: frozenset({"pipeline.train"}) if m == "pipeline.tokenize"
                        else frozenset())
    try:
        test_no_stage_imports_another_and_nothing_below_imports_a_stage()
    except AssertionError as err:
        assert "pipeline.tokenize -> pipeline.train" in str(err)
    else:
        raise AssertionError("a stage-to-stage import went unnoticed")
