"""The suite's two tiers, and fixtures shared by every test file.

``make test`` runs the fast tier (``pytest -m "not slow"``), ``make check`` everything (slow marks, doctests,
then the docs build). What makes a test slow is decided here, for every file, new ones included:

- doctests are slow (``--doctest-modules`` collects them; several build resnet50 at 224 and compile it);
- Hypothesis draws as many examples as the tier's profile says: ``fast`` (20) when slow tests are
  deselected, ``full`` (300) otherwise; ``BRANCHIFY_TIER=fast|full`` or ``--hypothesis-profile`` choose
  one explicitly. Tests set ``deadline``/``derandomize`` themselves but leave ``max_examples`` to the profile;
- the torchvision zoo runs a few representatives in the fast tier and every builder in the full one
  (``zoo.zoo_params()``; ``BRANCHIFY_ZOO=all`` or a comma-separated list of names widens the fast tier);
- in the fast tier, tests over ``FAST_BUDGET`` seconds are listed at the end, to be marked slow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # the shared zoo helpers in tests/zoo.py

FAST_BUDGET = 3.0  # seconds: a fast-tier test above this belongs in the slow tier (STYLE: the tier stays < 5 min)
PROFILES = {"fast": 20, "full": 300}  # Hypothesis examples per property (300: what the suite ran before the tiers)

for _name, _examples in PROFILES.items():
    settings.register_profile(_name, max_examples=_examples)


def tier(config: pytest.Config) -> str:
    """``fast`` when the run deselects the slow tests (``-m "not slow"``), else ``full``; BRANCHIFY_TIER wins."""
    chosen = os.environ.get("BRANCHIFY_TIER")
    if chosen:
        if chosen not in PROFILES:
            raise pytest.UsageError(f"BRANCHIFY_TIER={chosen!r}: use one of {sorted(PROFILES)}")
        return chosen
    return "fast" if "not slow" in (config.option.markexpr or "") else "full"


def pytest_configure(config: pytest.Config) -> None:
    config.branchify_tier = tier(config)
    if not config.getoption("hypothesis_profile", None):  # an explicit --hypothesis-profile is kept
        settings.load_profile(config.branchify_tier)


def pytest_report_header(config: pytest.Config) -> str:
    return (f"branchify tier: {config.branchify_tier} (Hypothesis max_examples={settings().max_examples}; "
            f"make test = fast, make check = full)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.branchify_tier != "fast":
        return
    over = sorted(((report.duration, report.nodeid) for reports in terminalreporter.stats.values()
                   for report in reports if getattr(report, "when", None) == "call"
                   and getattr(report, "duration", 0.0) > FAST_BUDGET), reverse=True)
    if over:
        terminalreporter.section(f"fast-tier tests over {FAST_BUDGET:g} s (mark them @pytest.mark.slow, keeping a "
                                 "cheap representative fast)")
        for duration, nodeid in over:
            terminalreporter.write_line(f"{duration:7.2f}s {nodeid}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small tensors: on a few shared cores a thread pool's synchronisation
    costs more than the work (measured: efficientnet_b0's timm check 2.2 s with 1 thread, 9-12 s with 2 while
    another job runs; the property tests 3.6x slower with 2 threads). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
