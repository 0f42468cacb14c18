"""Fuzzing the loaders: a saved checkpoint or runner folder with bytes flipped, cut short or its header
edited either loads exactly what was saved or is refused with a BranchifyError; nothing else escapes."""

from __future__ import annotations

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

EXAMPLES = 300
X = torch.randn(1, 8)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)


def model() -> nn.Module:
    torch.manual_seed(0)
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


def _check_checkpoint(data: bytes, tmp: Path) -> None:
    path = tmp / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = bx.load(path, model(), X)
    except bx.BranchifyError:
        return
    assert _same_module(loaded), "a damaged checkpoint loaded as something else"


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


def _check_runner(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = bx.ExitRunner.load(tmp)
        except bx.BranchifyError:
            return
        x = torch.randn(5, 8)
        want, got = bx.ExitRunner(MODULE)(x), loaded(x)
        assert torch.equal(want.exit_index, got.exit_index) and torch.equal(want.macs, got.macs)


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
