"""docs/errors.md, the catalogue of bad input, is run: each case must raise its listed message.

The page is parsed, not copied: a case is a level-3 heading ``### `id`: title``, the first python
block under it (the code), a ``**Message:** `fragment` `` line and a ``**Fix:**`` line. Every case
runs in a fresh namespace after the page's setup block, in a scratch directory, and must raise
``bx.BranchifyError`` whose message contains the fragment. A heading that does not parse fails the
test rather than being skipped, and a floor on the number of cases notices removed ones.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import branchify as bx

PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
MIN_CASES = 64  # the number of cases when this test was written; lower it only when merging cases
SECTIONS = {"Spec": "spec-", "Surgery": "surgery-", "Loss": "loss-", "Training": "fit-", "Statistics": "stats-",
            "Runtime": "runtime-",
            "Calibration": "calibrate-", "Persistence": "checkpoint-"}

HEADING = re.compile(r"^### `(?P<id>[a-z0-9-]+)`: (?P<title>\S.*)$")
CODE = re.compile(r"^```python\n(?P<code>.*?)^```$", re.S | re.M)
MESSAGE = re.compile(r"^\*\*Message:\*\* `(?P<fragment>[^`]+)`$", re.M)
FIX = re.compile(r"^\*\*Fix:\*\* \S", re.M)


@dataclass(frozen=True)
class Case:
    id: str
    section: str
    code: str
    fragment: str


def parse(text: str) -> tuple[str, list[Case]]:
    """The setup code and the cases of the page; raises ValueError on any malformed part."""
    setup_part = re.search(r"^## Setup\n(?P<body>.*?)(?=^## )", text, re.S | re.M)
    if setup_part is None or not CODE.search(setup_part["body"]):
        raise ValueError("no '## Setup' section with a python block")
    setup = CODE.search(setup_part["body"])["code"]
    cases, section = [], None
    for block in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        first, _, body = block.partition("\n")
        if first.startswith("## "):
            section = first[3:].strip()
            continue
        if not first.startswith("### "):
            continue
        heading, code, message = HEADING.match(first), CODE.search(body), MESSAGE.search(body)
        if heading is None or code is None or message is None or FIX.search(body) is None:
            raise ValueError(f"malformed case {first!r}: it needs ### `id`: title, a python block, "
                             "a **Message:** `fragment` line and a **Fix:** line")
        cases.append(Case(heading["id"], section, code["code"], message["fragment"]))
    return setup, cases


SETUP, CASES = parse(PAGE.read_text())


def test_the_catalogue_is_complete_and_well_formed():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= max(20, MIN_CASES), f"{len(CASES)} cases; were some removed?"
    for case in CASES:
        assert case.section in SECTIONS, f"{case.id} sits under an unknown section {case.section!r}"
        assert case.id.startswith(SECTIONS[case.section]), f"{case.id} is filed under {case.section}"
        assert len(case.fragment) >= 15, f"{case.id}: a fragment this short would match almost any message"
    assert {case.section for case in CASES} == set(SECTIONS)
    runtime = {case.id for case in CASES if case.section == "Runtime"}
    assert {"runtime-wrong-dtype", "runtime-wrong-channels", "runtime-missing-batch-dim"} <= runtime


def test_the_parser_rejects_a_malformed_case():
    text = PAGE.read_text().replace("**Fix:**", "Fix:", 1)
    with pytest.raises(ValueError, match="malformed case"):
        parse(text)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Each case builds a ResNet-18 and traces it: tiny work, for which a thread pool on a few shared
    # cores costs more than it saves.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup_namespace(_one_thread) -> dict:
    namespace: dict = {}
    exec(compile(SETUP, f"{PAGE.name}:setup", "exec"), namespace)
    return namespace


def fresh(namespace: dict) -> dict:
    """A copy in which cases can change models and tensors freely; the module keeps sharing the model's weights.

    Running the setup again for every case gives the same and costs ten times more (a ResNet-18 is
    built and traced each time).
    """
    memo: dict = {}
    return {name: copy.deepcopy(value, memo) if isinstance(value, (torch.nn.Module, torch.Tensor)) else value
            for name, value in namespace.items()}


def test_a_fresh_namespace_is_a_faithful_copy(setup_namespace):
    namespace = fresh(setup_namespace)
    model, module, x = namespace["model"], namespace["module"], namespace["x"]
    assert model is not setup_namespace["model"] and module is not setup_namespace["module"]
    assert module.conv1.weight is model.conv1.weight  # still the model's own backbone
    assert all(torch.equal(a, b) for a, b in zip(module(x), setup_namespace["module"](x)))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_case_raises_its_listed_message(case, setup_namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the persistence cases write relative paths
    namespace = fresh(setup_namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some mistakes also warn (e.g. the 'distiller' criterion)
        with pytest.raises(bx.BranchifyError) as info:
            exec(compile(case.code, f"{PAGE.name}:{case.id}", "exec"), namespace)
    assert case.fragment in str(info.value), f"{case.id}: the message is now {str(info.value)!r}"


def test_a_caught_mistake_logs_no_torch_traceback(setup_namespace, caplog):
    """branchify turns the failure into a clear error, so torch's own error log is noise on top of it."""
    namespace = fresh(setup_namespace)
    case = next(case for case in CASES if case.id == "surgery-head-too-large")
    with caplog.at_level(logging.ERROR), pytest.raises(bx.BranchifyError):
        exec(compile(case.code, f"{PAGE.name}:{case.id}", "exec"), namespace)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
