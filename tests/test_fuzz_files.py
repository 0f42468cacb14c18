"""Fuzzing the loaders: a saved checkpoint or runner folder with bytes flipped, cut short or its header
edited either loads exactly what was saved or is refused with a BranchifyError; nothing else escapes.

The positive controls at the end keep this from passing by refusing everything: the files unchanged load
exactly, and the comparison used tells another module apart. The number of examples comes from the
Hypothesis profile of the tier (tests/conftest.py).
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import branchify as bx

X = torch.randn(1, 8)
FUZZ = settings(deadline=None, derandomize=True, database=None)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


SPEC = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=0.9), bx.ExitPoint(layer="3", threshold=0.9)])
MODULE = bx.attach_exits(model(), SPEC, X).eval()
FOLDER = Path(tempfile.mkdtemp())
CHECKPOINT = bx.save(MODULE, FOLDER / "m.safetensors").read_bytes()
RUNNER = FOLDER / "runner"
bx.ExitRunner(MODULE).save(RUNNER, example_inputs=X)
FILES = {p.name: p.read_bytes() for p in RUNNER.iterdir()}


def _same_module(loaded: nn.Module) -> bool:
    x = torch.randn(4, 8)
    with torch.no_grad():
        return (loaded.exit_spec == MODULE.exit_spec
                and all(torch.equal(a, b) for a, b in zip(loaded.eval()(x), MODULE(x))))


def _check_checkpoint(data: bytes, tmp: Path) -> str:
    path = tmp / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = bx.load(path, model(), X)
    except bx.BranchifyError:
        return "refused"
    assert _same_module(loaded), "a damaged checkpoint loaded as something else"
    return "loaded"


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(CHECKPOINT) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_checkpoint_with_flipped_bytes(flips):
    data = bytearray(CHECKPOINT)
    for at, mask in flips:
        data[at] ^= mask
    with tempfile.TemporaryDirectory() as tmp:
        _check_checkpoint(bytes(data), Path(tmp))


@FUZZ
@given(st.integers(0, len(CHECKPOINT) - 1))
def test_checkpoint_cut_short(length):
    with tempfile.TemporaryDirectory() as tmp:
        _check_checkpoint(CHECKPOINT[:length], Path(tmp))


HEADER_LENGTH = int.from_bytes(CHECKPOINT[:8], "little")
METADATA = json.loads(CHECKPOINT[8:8 + HEADER_LENGTH])["__metadata__"]


@FUZZ
@given(st.sampled_from(sorted(METADATA)), st.one_of(st.text(max_size=40), st.sampled_from(
    ["1", "2", "99", "true", "false", "fx", "hooks", "{}", json.dumps({"exits": []})])))
def test_checkpoint_with_an_edited_header_entry(key, value):
    header = json.loads(CHECKPOINT[8:8 + HEADER_LENGTH])
    header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with tempfile.TemporaryDirectory() as tmp:
        _check_checkpoint(len(raw).to_bytes(8, "little") + raw + CHECKPOINT[8 + HEADER_LENGTH:], Path(tmp))


def _same_results(want: bx.ExitRunner, got: bx.ExitRunner) -> bool:
    x = torch.randn(5, 8)
    a, b = want(x), got(x)
    return torch.equal(a.exit_index, b.exit_index) and torch.equal(a.macs, b.macs) and torch.equal(a.logits, b.logits)


def _check_runner(files: dict[str, bytes]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = bx.ExitRunner.load(tmp)
        except bx.BranchifyError:
            return "refused"
        assert _same_results(bx.ExitRunner(MODULE), loaded), "a damaged runner folder loaded as something else"
        return "loaded"


@FUZZ
@given(st.sampled_from(sorted(FILES)), st.data())
def test_runner_folder_with_flipped_bytes(name, data):
    content = bytearray(FILES[name])
    at = data.draw(st.integers(0, len(content) - 1))
    content[at] ^= data.draw(st.integers(1, 255))
    _check_runner({**FILES, name: bytes(content)})


@FUZZ
@given(st.sampled_from(sorted(FILES)), st.data())
def test_runner_folder_with_a_file_cut_short(name, data):
    _check_runner({**FILES, name: FILES[name][:data.draw(st.integers(0, len(FILES[name]) - 1))]})


@pytest.mark.parametrize("name", sorted(FILES))
def test_runner_folder_with_a_file_missing(name):
    _check_runner({k: v for k, v in FILES.items() if k != name})


# ---- positive controls --------------------------------------------------------------------------

def test_the_files_unchanged_load_exactly(tmp_path):
    """The checks above accept a file that is not damaged: without this, a loader refusing everything passes."""
    assert _check_checkpoint(CHECKPOINT, tmp_path) == "loaded"
    assert _check_runner(FILES) == "loaded"
    loaded = bx.ExitRunner.load(RUNNER)
    assert _same_results(bx.ExitRunner(MODULE), loaded)


def test_the_comparison_tells_another_module_apart():
    """The checks above would see a damaged file that loads as another module: other weights, other thresholds."""
    other = bx.attach_exits(model(seed=1), SPEC, X).eval()
    assert not _same_module(other)
    assert not _same_results(bx.ExitRunner(MODULE), bx.ExitRunner(other))
    retuned = copy.deepcopy(MODULE)
    retuned.exit_spec = SPEC.with_exits(threshold=[0.5, 0.5])
    assert not _same_module(retuned)
