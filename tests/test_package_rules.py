"""Rules the package keeps, checked on its source: importing hiera_det changes no other library
(no assignment to another module's attributes, no `mock`), and every function is short enough to
read at once."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hiera_det"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_names(tree: ast.Module) -> set[str]:
    """Names bound by import statements (modules, and objects imported from modules)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_assignment_to_another_library_and_no_mock(path):
    tree = _tree(path)
    imported = _imported_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("mock" in m for m in modules), f"{path}:{node.lineno} imports mock"
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            targets = node.args[:1]
        for target in targets:
            if isinstance(target, ast.Attribute):
                assert _root_name(target) not in imported, (
                    f"{path}:{node.lineno} assigns to an attribute of the imported "
                    f"{_root_name(target)!r}"
                )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_at_most_60_lines(path):
    long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path}: {long}"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks above fail on code that does what they forbid."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import detectron2.engine.defaults\nfrom unittest import mock\n"
        "detectron2.engine.defaults.DetectionCheckpointer = object\n"
    )
    with pytest.raises(AssertionError, match="imports mock"):
        test_no_assignment_to_another_library_and_no_mock(bad)
    bad.write_text("import detectron2\ndetectron2.engine.defaults.X = object\n")
    with pytest.raises(AssertionError, match="assigns to an attribute of the imported"):
        test_no_assignment_to_another_library_and_no_mock(bad)
    bad.write_text("def f():\n" + "    x = 1\n" * 60)
    with pytest.raises(AssertionError, match="61 lines"):
        test_functions_are_at_most_60_lines(bad)
