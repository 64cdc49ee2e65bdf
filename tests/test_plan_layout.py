"""The planner's package layout (STYLE.md 17): what measures this machine, plan.calibration and
plan.validation, lives apart from the core it measures. No core module reaches either of them,
directly or through another module, not even by an import inside a function; and the planner's
modules form no cycle when those function-level imports count too (tests/test_code_shape.py
checks module-level cycles across the whole package)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_code_shape import find_cycles

PLAN = Path(__file__).resolve().parents[1] / "tokenmill" / "plan"
MEASURING = ("tokenmill.plan.calibration", "tokenmill.plan.validation")


def _module_name(path: Path) -> str:
    parts = ("tokenmill", "plan", *path.relative_to(PLAN).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> set[str]:
    """tokenmill modules imported anywhere in `tree` (functions included), less the imports
    under `if TYPE_CHECKING:`, which never run. `from a import b` counts both a and a.b."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenmill"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tokenmill"))
        found |= _imports(node)
    return found


def plan_graph() -> dict[str, list[str]]:
    """tokenmill.plan's modules and the planner modules each imports."""
    paths = {_module_name(p): p for p in sorted(PLAN.rglob("*.py"))}
    return {
        name: sorted(m for m in _imports(ast.parse(path.read_text())) if m in paths and m != name)
        for name, path in paths.items()
    }


def _is_measuring(name: str) -> bool:
    return any(name == pkg or name.startswith(pkg + ".") for pkg in MEASURING)


def reachable(graph: dict[str, list[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_measuring_packages_exist():
    graph = plan_graph()
    for name in (
        "tokenmill.plan.calibration.fit",
        "tokenmill.plan.calibration.run",
        "tokenmill.plan.validation.probe",
        "tokenmill.plan.validation.run",
    ):
        assert name in graph


def test_the_core_reaches_neither_calibration_nor_validation():
    graph = plan_graph()
    core = [name for name in graph if not _is_measuring(name)]
    assert "tokenmill.plan.simulate" in core and "tokenmill.plan.planner" in core
    leaks = {name: sorted(filter(_is_measuring, reachable(graph, name))) for name in core}
    assert not {name: found for name, found in leaks.items() if found}


def test_the_check_sees_a_core_module_that_reaches_calibration():
    graph = {"core.a": ["core.b"], "core.b": ["tokenmill.plan.calibration.fit"]}
    graph["tokenmill.plan.calibration.fit"] = []
    assert "tokenmill.plan.calibration.fit" in reachable(graph, "core.a")
    tree = ast.parse("def f():\n    from tokenmill.plan.validation.run import x\n")
    assert "tokenmill.plan.validation.run" in _imports(tree)
    guarded = ast.parse("if TYPE_CHECKING:\n    from tokenmill.plan.validation.run import x\n")
    assert not _imports(guarded)


def test_no_import_cycle_in_the_planner_counting_function_level_imports():
    cycles = find_cycles(plan_graph())
    assert not cycles, f"import cycles: {cycles[:5]}"
