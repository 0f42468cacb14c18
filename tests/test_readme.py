"""The README's Python blocks run, in order, in one namespace: the quick start cannot drift."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
MAX_LINES = 12  # the whole digits job: load data, attach, fit, calibrate, run, benchmark


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def quick_start() -> str:
    """The first Python block under the ``## Quick start`` heading."""
    section = README.read_text().split("\n## Quick start\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_quick_start_is_the_whole_job_in_at_most_12_lines():
    code = quick_start()
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= MAX_LINES, f"the quick start has {len(lines)} lines of code; keep it within {MAX_LINES}"
    for step in ("make_loaders(", "bx.attach_exits(", "bx.fit(", "bx.calibrate(", "bx.ExitRunner(", "runner(",
                 "bx.benchmark("):
        assert step in code, f"the quick start lacks {step}"
    assert code == blocks()[0]  # it runs first, below


@pytest.mark.slow
def test_readme_python_blocks_run():
    found = blocks()
    assert len(found) >= 4
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(found[0], str(README), "exec"), namespace)
    # the quick start: trained, calibrated (some exit on), run, timed
    assert namespace["module"].exit_spec.thresholds is not None
    assert namespace["result"].logits.shape == (64, 10)
    text = printed.getvalue()
    assert "FitHistory(joint, 3 epochs" in text and "BenchmarkResult: ExitRunner against the original model" in text
    for block in found[1:]:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["result"].logits.shape == (8, 10)
    assert namespace["calibration"].spec.thresholds is not None
