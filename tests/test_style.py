"""Style rules a reviewer would otherwise check by hand: functions stay short."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def long_functions(root: Path, limit: int) -> list[str]:
    """'path:line name (N lines)' (path from root's parent) for each function or method over
    `limit` lines under root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_library_function_is_over_80_lines():
    too_long = [
        f for package in ("wm_jax", "data_pipelines") for f in long_functions(REPO / package, MAX_FUNCTION_LINES)
    ]
    assert not too_long, "split these into named steps:\n" + "\n".join(too_long)


def test_the_check_sees_a_long_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * 81)
    assert long_functions(tmp_path / "pkg", MAX_FUNCTION_LINES) == ["pkg/m.py:1 f (82 lines)"]
