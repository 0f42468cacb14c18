"""``make demo`` end to end, shortened: every phase prints its time, and what it writes is usable as it is.

The demo itself runs in the slow tier; what a user runs on its checkpoint next (``branchify report``) is
checked in the fast tier on a checkpoint built directly, with each way calibration can leave its exits.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torchvision

import branchify as bx
from branchify.commands import cli
from branchify.distiller.models import get_model


@pytest.mark.slow
def test_the_demo_runs_its_phases_with_elapsed_times_and_writes_a_checkpoint_report_can_read(tmp_path, capsys):
    # As make demo runs it, in a process of its own (it sets torch's threads and determinism for itself). No
    # timeout: pytest's own run is the bound, and a loaded machine is no failure.
    command = [sys.executable, "-m", "branchify.commands.demo", "--epochs", "1", "--repeats", "2", "--timed-samples",
               "64", "--out", str(tmp_path), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    laps = re.findall(r"^   \[(.+?): ([\d.]+) s; ([\d.]+) s in all\]$", out, re.M)
    assert [what for what, _, _ in laps] == ["training", "report", "calibration", "runner and timing",
                                            "accuracy-against-compute curve"]
    totals = [float(total) for _, _, total in laps]
    assert totals == sorted(totals)
    assert "timed against the original model on 64 test images" in out
    checkpoint = tmp_path / "checkpoint.safetensors"
    assert bx.ExitSpec.load(tmp_path / "spec.json") == bx.load(checkpoint, torchvision.models.resnet18(
        num_classes=10)).exit_spec
    # The demo's checkpoint records its architecture and input size: report needs neither (issue 15).
    assert cli.main(["report", str(checkpoint), "digits", "--limit-batches", "1", "-b", "32"]) == 0
    assert f"{checkpoint}: resnet18, exits after layer1, layer2" in capsys.readouterr().out
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 0


# Calibration may switch any exit off (threshold None), some of them, or none; the demo's did so on some
# machines and report then crashed formatting the None (issue 23).
@pytest.mark.parametrize("thresholds, shown", [
    ([None, 0.5], "thresholds off, 0.5"),
    ([0.25, None], "thresholds 0.25, off"),
])
def test_report_shows_an_exit_that_calibration_switched_off(tmp_path, capsys, thresholds, shown):
    torch.manual_seed(0)
    spec = bx.ExitSpec(criterion="entropy", exits=[bx.ExitPoint(layer="layer1", threshold=thresholds[0]),
                                                   bx.ExitPoint(layer="layer2", threshold=thresholds[1])])
    module = bx.attach_exits(get_model("resnet20_cifar", 10), spec, torch.zeros(1, 3, 32, 32))
    checkpoint = bx.save(module, tmp_path / "checkpoint.safetensors", arch="resnet20_cifar")
    assert cli.main(["report", str(checkpoint), "digits", "--limit-batches", "1", "-b", "16"]) == 0
    out = capsys.readouterr().out
    assert f"{checkpoint}: resnet20_cifar, exits after layer1, layer2, criterion 'entropy', {shown}" in out
    assert "Totals for entire network with early exits" in out


def test_the_demos_model_keeps_the_original_output_and_its_routed_report_counts_every_sample(capsys):
    """The demo's own pieces in the fast tier (its full run is slow): the ResNet-18 it builds and the report."""
    from branchify.commands import demo

    model, module, example = demo.build(seed=0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.equal(module.eval()(images)[-1], model.eval()(images))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    summary = demo.routed_report(module, loader, bx.exit_costs(module, example))
    assert summary.samples == 16 and sum(row.taken for row in summary.exits) == 16
    assert "Totals for entire network with early exits" in capsys.readouterr().out
