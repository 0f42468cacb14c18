"""``make demo`` end to end, shortened: every phase prints its time, and what it writes is usable as it is."""

from __future__ import annotations

import re
import subprocess
import sys

import torchvision

import branchify as bx
from branchify.commands import cli


def test_the_demo_runs_its_phases_with_elapsed_times_and_writes_a_checkpoint_report_can_read(tmp_path, capsys):
    # As make demo runs it, in a process of its own (it sets torch's threads and determinism for itself).
    command = [sys.executable, "-m", "branchify.commands.demo", "--epochs", "1", "--repeats", "2", "--timed-samples",
               "64", "--out", str(tmp_path), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
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
