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
    "contracts": 0,
    "search_space": 0,
    "config": 0,
    "rundir": 0,
    "gradstats": 1,
    "metrics": 1,
    "models": 1,
    "data": 1,
    "losses": 2,
    "tasks": 2,  # classification / dense prediction behind gradtail.contracts.TaskContract
    # gradtail losses inside torchvision's detectors, and the detection run loop (an engine of its own:
    # it reuses the engine's checkpoint RNG capture and environment record)
    "detection": 4,
    "diagnostics": 2,
    "regularizers": 3,
    "optim": 3,
    "posthoc": 3,
    "engine": 4,
    "bench": 5,
    "tune": 5,
    "report": 5,
    "predict": 5,
    "cli": 6,
    "__main__": 6,
    "__init__": 6,
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
