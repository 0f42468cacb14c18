"""Files written by earlier branchify versions keep loading, and give the outputs they gave then.

``tests/data/format1`` was written by the release before checkpoint format 2 (commit 214500d), and
``tests/data/format2`` by this one, each with ``expected.pt``: the inputs and the module's and the
runner's outputs at save time. A change that breaks reading old files fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import branchify as bx

DATA = Path(__file__).parent / "data"


def model() -> nn.Module:
    """The architecture the golden files were saved from (any weights: the checkpoint holds them)."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("version", ["format1", "format2"])
def test_a_saved_checkpoint_gives_the_outputs_it_gave_when_saved(version):
    expected = torch.load(DATA / version / "expected.pt", weights_only=True)
    with pytest.warns(UserWarning, match="format-1 checkpoint") if version == "format1" else _no_warning():
        module = bx.load(DATA / version / "checkpoint.safetensors", model(), torch.zeros(1, 8))
    with torch.no_grad():
        outputs = module.eval()(expected["inputs"])
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected["outputs"]))


@pytest.mark.parametrize("version", ["format1", "format2"])
def test_a_saved_runner_folder_gives_the_results_it_gave_when_saved(version):
    expected = torch.load(DATA / version / "expected.pt", weights_only=True)
    with pytest.warns(UserWarning, match="version-1 runner folder") if version == "format1" else _no_warning():
        runner = bx.ExitRunner.load(DATA / version / "runner")
    result = runner(expected["inputs"])
    assert torch.equal(result.exit_index, expected["exit_index"])
    assert torch.equal(result.macs, expected["macs"])
    torch.testing.assert_close(result.logits, expected["logits"], rtol=1e-5, atol=1e-6)


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
