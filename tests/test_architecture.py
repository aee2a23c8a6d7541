"""The package's layers: no module imports from a higher layer, the method families never import the
engine, and the engine knows methods only through declared contracts (no getattr / hasattr probing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gradtail

ROOT = Path(gradtail.__file__).parent

# Bottom to top. A module may import from its own layer and the layers below it, never above.
LAYERS: dict[str, int] = {
    "errors": 0,
    "registry": 0,
    "plugins": 0,
    "distributed": 0,
    "contracts": 0,  # the contracts and the task registry (TASKS), what every layer above implements
    "search_space": 0,
    "config": 0,
    "rundir": 0,
    "environment": 0,
    "tracking": 0,  # TensorBoard / MLflow (log:), called by the engine and tune
    "gradstats": 1,
    "metrics": 1,
    "data": 1,
    "losses": 2,
    "models": 2,  # detection heads hold a registered loss
    "diagnostics": 2,
    "regularizers": 3,
    "optim": 3,
    "posthoc": 3,
    "report": 3,  # one report module per task, used by the tasks
    "predict": 3,  # one predictor module per task, used by the tasks
    "export": 3,  # one exporter module per task (gradtail export), used by the tasks
    "tasks": 4,  # classification / segmentation / detection behind gradtail.contracts.TaskContract
    "engine": 5,  # one loop for every task, which it reaches through the contracts only
    "bench": 6,
    "tune": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 7,
}
METHOD_FAMILIES = ("losses", "regularizers", "optim", "posthoc")


def _top(module: str) -> str:
    """``gradtail.optim.gbg`` -> ``optim``."""
    return module.split(".")[1] if "." in module else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported gradtail module) for every import in the file, including function-level ones."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gradtail")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradtail"):
            found.append((node.lineno, node.module))
    return found


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = {_top(_module_name(p)) for p in _sources()} - set(LAYERS)
    assert not missing, f"add these top-level modules to LAYERS: {sorted(missing)}"


def test_no_import_runs_up_a_layer():
    violations = []
    for path in _sources():
        here = _module_name(path)
        if here == "gradtail":  # the package's own __init__ re-exports from anywhere
            continue
        layer = LAYERS[_top(here)]
        for line, target in _imports(path):
            if target == "gradtail":
                continue
            if LAYERS[_top(target)] > layer:
                violations.append(f"{path.relative_to(ROOT.parent)}:{line} {here} -> {target}")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_method_families_never_import_the_engine(family):
    for path in sorted((ROOT / family).rglob("*.py")):
        for line, target in _imports(path):
            assert _top(target) not in ("engine", "bench", "report", "cli"), f"{path}:{line} imports {target}"


def test_the_engine_does_not_probe_methods():
    probes = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Name) and called.id in ("getattr", "hasattr"):
                probes.append(f"{path.name}:{node.lineno}")
    assert not probes, f"declare these in gradtail.contracts instead: {probes}"


def test_the_checker_sees_a_violation(tmp_path):
    """The import scan finds imports inside functions too (the check cannot pass vacuously)."""
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    from gradtail.engine.trainer import T\n    import gradtail.cli.main\n")
    assert _imports(bad) == [(2, "gradtail.engine.trainer"), (3, "gradtail.cli.main")]
    assert any(t == "gradtail.contracts" for _, t in _imports(ROOT / "optim" / "gbg.py"))


def _module_graph() -> dict[str, set[str]]:
    """module -> the gradtail modules it imports (function-level imports included; ``from a import b``
    counts as importing ``a`` and, when ``a.b`` is a module, ``a.b``)."""
    modules = {_module_name(p): p for p in _sources()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_file_circle():
    """No two modules import each other, directly or through others (function-level imports count)."""
    assert _cycles(_module_graph()) == []


def test_no_package_cycle():
    packages: dict[str, set[str]] = {}
    for module, targets in _module_graph().items():
        packages.setdefault(_top(module), set()).update(_top(t) for t in targets if _top(t) != _top(module))
    assert _cycles(packages) == []


def test_the_cycle_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _task_name_branches(path: Path, names: set[str]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``) against a task's name, and ``match`` cases on one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        for op in operands:
            elements = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
            if any(isinstance(e, ast.Constant) and e.value in names for e in elements):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_branch_on_a_task_name_outside_the_tasks():
    """Only ``gradtail.tasks`` may compare anything with a task's name; everything else asks the task."""
    from gradtail.contracts import TASKS

    names = set(TASKS.names())
    assert {"classification", "segmentation", "detection"} <= names
    outside = [p for p in _sources() if p.relative_to(ROOT).parts[0] != "tasks"]
    hits = [h for p in outside for h in _task_name_branches(p, names)]
    assert hits == [], f"branches on a task name: {hits}"


def test_the_task_branch_checker_sees_one(tmp_path):
    bad = tmp_path / "mod.py"
    bad.write_text(
        "def f(cfg, x):\n    if cfg.task == 'detection':\n        return 1\n    return 'segmentation' in x\n"
    )
    hits = _task_name_branches(bad, {"detection", "segmentation"})
    assert len(hits) == 2
