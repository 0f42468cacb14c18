"""The fast tier (``make test``) still reaches every public name of the package.

Moving a heavy test to the slow tier must keep a cheap representative of what it covered: this check fails
when the last fast test that uses a public name (``bx.generate``, ``bx.OnlineCalibrator``, ...) is marked slow.
It reads the test sources (a name counts where a fast test, or a helper of a module holding fast tests, uses it),
so it runs in milliseconds and needs no coverage tool.
"""

from __future__ import annotations

import ast
from pathlib import Path

import branchify as bx

TESTS = Path(__file__).resolve().parent
# Returned, never built by hand: a fast test reaches them through what returns them (calibrate, fit, generate...).
RESULTS = {"BenchmarkResult", "BenchmarkRow", "Calibration", "ExitPointInfo", "ExitResult", "ExitStatsSummary",
           "FitEpoch", "FitHistory", "FitStep", "GenerateResult", "SweepResult"}


def _is_slow(decorator: ast.expr) -> bool:
    """``@pytest.mark.slow`` or ``@pytest.mark.slow(...)`` (a mark on some parameters only does not count)."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) == "pytest.mark.slow"


def _module_is_slow(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
               and "pytest.mark.slow" in ast.unparse(node.value) for node in tree.body)


def _names(node: ast.AST) -> set[str]:
    """Every identifier and attribute name used under ``node``."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
        elif isinstance(sub, ast.alias):
            found.add(sub.asname or sub.name.rsplit(".", 1)[-1])
    return found


def fast_tier_names(directory: Path = TESTS) -> dict[str, set[str]]:
    """For each test file with at least one fast test: the names its fast tests and its helpers use."""
    reached: dict[str, set[str]] = {}
    for path in sorted(directory.glob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name.startswith("test_") and _module_is_slow(tree):
            continue
        names: set[str] = set()
        fast_tests = 0
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if node.name.startswith("Test") and any(map(_is_slow, node.decorator_list)):
                    continue
                tests = [m for m in methods if m.name.startswith("test") and not any(map(_is_slow, m.decorator_list))]
                fast_tests += len(tests)
                names |= set().union(*map(_names, tests)) if tests else set()
                if not node.name.startswith("Test"):  # a helper class
                    names |= _names(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("test"):
                    if any(map(_is_slow, node.decorator_list)):
                        continue
                    fast_tests += 1
                names |= _names(node)  # a fast test, a fixture or a helper the fast tests may call
            else:
                names |= _names(node)  # imports and module-level set-up
        if fast_tests or not path.name.startswith("test_"):  # helpers (zoo.py, by_hand.py) count for their users
            reached[path.name] = names
    return reached


def test_every_public_name_is_used_by_a_fast_test():
    reached = set().union(*fast_tier_names().values())
    assert RESULTS <= set(bx.__all__), f"RESULTS names what the package no longer exports: {RESULTS - set(bx.__all__)}"
    missing = sorted(set(bx.__all__) - RESULTS - reached)
    assert not missing, (f"no fast-tier test uses {missing}: keep a cheap representative of each public name "
                         "outside the slow tier (tests/conftest.py)")


def test_the_check_sees_a_name_used_only_by_slow_tests(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest\nimport branchify as bx\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    bx.generate(None)\n\n"
        "def test_fast():\n    bx.fit(None)\n\n"
        "class TestGroup:\n    @pytest.mark.slow\n    def test_slow(self):\n        bx.sweep(None)\n")
    (tmp_path / "test_b.py").write_text("import pytest\nimport branchify as bx\npytestmark = pytest.mark.slow\n\n"
                                        "def test_all_slow():\n    bx.calibrate(None)\n")
    reached = set().union(*fast_tier_names(tmp_path).values())
    assert "fit" in reached
    assert not {"generate", "sweep", "calibrate"} & reached
