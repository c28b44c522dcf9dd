"""The package's structure: no import cycle, no private name used across modules, one step that
reads like the paper, short functions, imports at module top unless a comment says why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scalebio_core"
WINGS = ("core", "sources", "parallel", "train", "plan", "lab")
"""The subpackages, bottom to top (`parallel` and `sources` side by side): a module imports its
own wing, a lower one, or the top-level helpers (`errors`, `files`, `messages`), never a higher
wing."""
BASE, TOP = ("errors", "files", "messages"), ("cli", "__main__", "__init__")
FILES = {
    p.stem: p
    for p in PACKAGE.rglob("*.py")
    if "__pycache__" not in p.parts and not (p.stem == "__init__" and p.parent != PACKAGE)
}
MODULES = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in FILES.items()}


RANK = {"core": 1, "sources": 2, "parallel": 2, "train": 3, "plan": 4, "lab": 5}


def _rank(module: str) -> int:
    """0 for the top-level helpers, then the wings (sources beside parallel), then the command
    line and the package's __init__."""
    if module in BASE:
        return 0
    if module in TOP:
        return max(RANK.values()) + 1
    return RANK[FILES[module].parent.name]


def _targets(node: ast.ImportFrom) -> list[tuple[str, list[str]]]:
    """The package modules an `from … import …` reaches, with the names taken from each."""
    names = [a.name for a in node.names]
    if node.level == 0:
        if not (node.module or "").startswith("scalebio_core"):
            return []
        parts = node.module.split(".")[1:]
    else:
        parts = [p for p in (node.module or "").split(".") if p]
    if parts and parts[-1] in MODULES:
        return [(parts[-1], names)]
    modules = [(n, []) for n in names if n in MODULES]  # from <package> import a, b
    if modules:
        return modules
    return [] if parts else [("__init__", names)]


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, str, list[str]]]:
    """(statement, imported package module, names taken from it) for every import of a module
    of scalebio_core, at module top or inside a function."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.extend((node, m, names) for m, names in _targets(node))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scalebio_core."):
                    out.append((node, alias.name.split(".")[-1], []))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {dep for _, dep, _ in _imports(t) if dep in MODULES} for m, t in MODULES.items()}


def test_the_checks_see_the_package():
    """The checks below read real modules and real imports (else they would pass vacuously)."""
    assert {"bilevel", "trainer", "distributed", "engines", "config", "loop"} <= set(MODULES)
    assert "distributed" in _graph()["bilevel"] and "bilevel" in _graph()["trainer"]


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_no_private_name_crosses_modules():
    bad = []
    for m, tree in MODULES.items():
        imported_modules = set()
        for _, dep, names in _imports(tree):
            bad += [f"{m}: from {dep} import {n}" for n in names if n.startswith("_")]
            if not names:
                imported_modules.add(dep)
        for node in ast.walk(tree):  # module.attribute of an imported package module
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and node.attr.startswith("_")
            ):
                bad.append(f"{m}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_every_module_says_what_it_is_for():
    missing = [m for m, tree in MODULES.items() if not ast.get_docstring(tree)]
    assert not missing, missing


def test_imports_inside_functions_say_why():
    """Imports belong at module top; one inside a function (an optional dependency, a module
    with side effects) carries a comment on its line or the line before."""
    bad = []
    for m, tree in MODULES.items():
        lines = FILES[m].read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    here = lines[node.lineno - 1] + lines[node.lineno - 2]
                    if "#" not in here:
                        bad.append(f"{m}.py:{node.lineno} in {fn.name}")
    assert not bad, bad


def test_functions_are_short_and_the_trainer_is_small():
    long = [
        f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines"
        for m, tree in MODULES.items()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno >= 80
    ]
    assert not long, long
    assert len(FILES["trainer"].read_text().splitlines()) < 400


def test_the_step_has_no_engine_in_its_signature_or_body():
    """scalebio_step takes the state, the batches, the problem's functions, one distribution
    (and the estimator's divisor); it branches on nothing (docs/algorithm.md in order)."""
    step = next(
        n
        for n in ast.walk(MODULES["bilevel"])
        if isinstance(n, ast.FunctionDef) and n.name == "scalebio_step"
    )
    args = [a.arg for a in step.args.args]
    assert args == ["state", "batch", "val_batch", "fns", "dist", "divisor"]
    assert not [n for n in ast.walk(step) if isinstance(n, ast.If | ast.For | ast.While)]
    body = step.body[1:]  # after the docstring
    assert body[-1].end_lineno - body[0].lineno + 1 <= 60
    names = {n.id for n in ast.walk(step) if isinstance(n, ast.Name)}
    assert not names & {"engine", "sync", "reduce", "zero", "fsdp", "deepspeed"}


ENGINE_MODULES = {"distributed", "engines", "sharding", "zero"}
"""Where torch.distributed may be called: the distribution and its engines."""


def test_only_the_engines_call_torch_distributed():
    """The loop, the set-up and the recipes reach the processes through `RunDistribution`."""
    calls = {
        m: sorted({ast.unparse(n) for n in ast.walk(t) if _torch_distributed_call(n)})
        for m, t in MODULES.items()
    }
    assert calls["engines"], "the check sees the engines' calls"
    assert {m: c for m, c in calls.items() if c and m not in ENGINE_MODULES} == {}


def _torch_distributed_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and ast.unparse(node.func.value).startswith("torch.distributed")
    )


def test_every_engine_implements_the_run_interface():
    """`RunDistribution` (what the loop and the recipes use) is what `Local` and each engine
    provide, and what `choose` returns and `Method.dist` holds."""
    import inspect
    import typing

    from scalebio_core.core import distributed
    from scalebio_core.parallel import engines
    from scalebio_core.train import loop

    members = {
        n
        for proto in (distributed.Distribution, distributed.RunDistribution)
        for n in (*vars(proto), *getattr(proto, "__annotations__", {}))
        if not n.startswith("_")
    }
    assert {"world", "reduce", "agree", "barrier", "build_models", "load_models"} <= members
    local = distributed.Local()
    for cls in (distributed.Local, engines.MultiProcess, engines.Ddp, engines.Fsdp, engines.Zero):
        missing = {n for n in members if not hasattr(cls, n) and not hasattr(local, n)}
        assert not missing, (cls.__name__, missing)
    hints = typing.get_type_hints(engines.choose)
    assert hints["return"] is distributed.RunDistribution
    assert "RunDistribution" in inspect.getsource(loop.Method)


def test_no_cycle_through_the_benchmark_scripts():
    """`experiments.benchmark` loads benchmarks/<name>.py by importlib (notebooks 01 and 06): a
    script loaded so must not import `experiments` back, directly or through another module."""
    import re

    root = PACKAGE.parent
    loaded = {
        name
        for f in [*root.glob("notebooks/*.ipynb"), *FILES.values()]
        for name in re.findall(r'benchmark\(\\?"(\w+)\\?"\)', f.read_text())
    }
    assert {"memory", "toy_scaling"} <= loaded
    graph = _graph()

    def reach(start: set[str]) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            m = todo.pop()
            if m in graph and m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    for name in sorted(loaded):
        tree = ast.parse((root / "benchmarks" / f"{name}.py").read_text())
        direct = {dep for _, dep, _ in _imports(tree) if dep in MODULES}
        assert "experiments" not in reach(direct), name


def test_no_wing_imports_a_higher_one():
    """The tree is the plan: core, then sources and parallel, then train, plan and lab, then
    the command line; the scripts that lab loads by importlib (`experiments.benchmark`) count
    as lab's imports."""
    import re

    assert {m: FILES[m].parent.name for m in ("bilevel", "data", "engines", "loop")} == {
        "bilevel": "core",
        "data": "sources",
        "engines": "parallel",
        "loop": "train",
    }
    up = [
        f"{m} ({FILES[m].parent.name}) imports {dep} ({FILES[dep].parent.name})"
        for m, tree in MODULES.items()
        for _, dep, _ in _imports(tree)
        if _rank(dep) > _rank(m)
    ]
    root = PACKAGE.parent
    loaded = {
        name
        for f in [*root.glob("notebooks/*.ipynb"), *FILES.values()]
        for name in re.findall(r'benchmark\(\\?"(\w+)\\?"\)', f.read_text())
    }
    for name in sorted(loaded):  # loaded from lab: what they import sits at most at lab's level
        tree = ast.parse((root / "benchmarks" / f"{name}.py").read_text())
        up += [
            f"benchmarks/{name}.py (loaded by lab) imports {dep}"
            for _, dep, _ in _imports(tree)
            if dep in MODULES and _rank(dep) > _rank("experiments")
        ]
    assert up == []
