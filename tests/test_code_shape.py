"""The code keeps the shape STYLE.md asks for: no file in tokenmill/ over 400 lines, no function
over 60 lines (Python and the native C++ alike), and no import cycles between modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tokenmill"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources(*suffixes: str) -> list[Path]:
    return sorted(p for p in ROOT.rglob("*") if p.suffix in suffixes)


def test_no_file_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources(".py", ".cpp", ".h")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_python_function_over_60_lines():
    long = {}
    for path in _sources(".py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                num_lines = node.end_lineno - node.lineno + 1
                if num_lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = num_lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def cpp_function_lengths(text: str) -> dict[int, int]:
    """{first line: length} of every function body in C++ source written in our layout: a
    definition's signature starts in column 0 (or is indented inside a struct) and its body
    is a brace block closed by `}` at the signature's indentation."""
    lines = text.splitlines()
    lengths: dict[int, int] = {}
    signature = re.compile(
        r"^(\s*)(?!if\b|for\b|while\b|switch\b|else\b|do\b|return\b)[\w:<>,\s\*&~\[\]=]+\("
    )
    i = 0
    while i < len(lines):
        match = signature.match(lines[i])
        if not match or lines[i].rstrip().endswith(";"):
            i += 1
            continue
        indent = match.group(1)
        j = i
        while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
            j += 1
        if j == len(lines) or lines[j].rstrip().endswith(";"):
            i = j + 1
            continue
        depth, k = 0, j
        while k < len(lines):
            code = re.sub(r"//.*", "", lines[k])
            depth += code.count("{") - code.count("}")
            if depth <= 0:
                break
            k += 1
        if lines[k].startswith(indent + "}") or k == j:
            lengths[i + 1] = k - i + 1
            i = k + 1
        else:
            i += 1
    return lengths


def test_no_cpp_function_over_60_lines():
    long = {}
    for path in _sources(".cpp", ".h"):
        for line, num_lines in cpp_function_lengths(path.read_text()).items():
            if num_lines > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(ROOT)}:{line}"] = num_lines
    assert not long, f"C++ functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_cpp_length_check_sees_a_long_function():
    body = "\n".join(f"  x += {i};" for i in range(70))
    text = f"namespace a {{\n\nint f(int x) {{\n{body}\n  return x;\n}}\n\n}}  // namespace a\n"
    assert cpp_function_lengths(text) == {3: 73}


def _module_imports(path: Path) -> set[str]:
    """tokenmill modules imported at module level (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node] if not isinstance(node, ast.Try | ast.If) else ast.walk(node):
            if (
                isinstance(sub, ast.ImportFrom)
                and sub.module
                and sub.module.startswith("tokenmill")
            ):
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("tokenmill"))
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    return cycles


def test_cycle_check_sees_a_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycles():
    paths = {_module_name(p): p for p in _sources(".py")}
    graph = {
        name: sorted(m for m in _module_imports(path) if m in paths and m != name)
        for name, path in paths.items()
    }
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles: {cycles[:5]}"
