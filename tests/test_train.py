"""The Distiller-compatible trainer: Distiller's command lines on digits, checks before training, outputs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import branchify as bx
import branchify.distiller.data
import branchify.distiller.flags as flags
import branchify.distiller.train as train
from branchify.distiller.models import get_model

ROOT = Path(__file__).resolve().parents[1]

# Distiller's two example command lines, as its documentation gives them.
CIFAR_LINE = ("--arch=resnet32_cifar_earlyexit --epochs=20 -b 128 --lr=0.003 --earlyexit_thresholds 0.4 "
              "--earlyexit_lossweights 0.4 -j 30 --out-dir /home/ -n earlyexit /home/pcifar10")
IMAGENET_LINE = ("--arch=resnet50_earlyexit --epochs=120 -b 128 --lr=0.003 --earlyexit_thresholds 1.2 0.9 "
                 "--earlyexit_lossweights 0.1 0.3 -j 30 --out-dir /home/ -n earlyexit /home/I1K/i1k-extracted/")
# Appended overrides (argparse keeps the last value): one epoch of one small batch, validation on one batch.
QUICK = ["--epochs=1", "--limit-batches", "1", "-b", "16"]


def distiller_argv(line: str, out_dir: Path) -> list[str]:
    """The command line with only the dataset pointed at digits and the output folder at a temporary one."""
    argv = shlex.split(line)
    assert argv[-1].startswith("/home/") and argv[argv.index("--out-dir") + 1] == "/home/"
    argv[-1] = "digits"
    argv[argv.index("--out-dir") + 1] = str(out_dir)
    return argv + QUICK


def check_distiller_output(stdout: str, exits: int) -> None:
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("Epoch: [0][")]
    assert len(epoch_lines) == 1
    columns = ["Overall Loss", "Objective Loss"]
    columns += [f"Top{k}_exit{i}" for i in range(exits + 1) for k in (1, 5)] + ["LR", "Time"]
    positions = [epoch_lines[0].index(f"    {name} ") for name in columns]
    assert positions == sorted(positions)  # Distiller's column order
    assert "LR 0.003000" in epoch_lines[0]
    report = stdout[stdout.index("--- validate"):].splitlines()
    assert report[1] == "16 samples (16 per mini-batch)"
    taken = [line for line in report if line.startswith("Exit ")]
    assert sum(int(line.split(": ")[1]) for line in taken) == 16
    assert len([line for line in report if line.startswith("Percent Early Exit ")]) == len(taken)
    accuracy = [line for line in report if line.startswith("Accuracy Stats for exit ")]
    assert [line.split(":")[0] for line in accuracy] == [f"Accuracy Stats for exit {i}" for i in range(exits + 1)]
    assert all(", top5 = " in line for line in accuracy)
    assert any(line.startswith("Totals for entire network with early exits: top1 = ") for line in report)
    assert any(line.startswith("MACs of the original model: ") for line in report)
    assert any(line.startswith("Saving vs the original model: ") for line in report)


@pytest.mark.slow  # a subprocess training run; test_exit_layers_train_any_arch_and_write_checkpoint_and_spec stays fast
def test_distiller_cifar_command_line_runs_through_the_example_script(tmp_path):
    argv = distiller_argv(CIFAR_LINE, tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "compress_classifier.py"), *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    check_distiller_output(done.stdout, exits=1)
    assert "exit 0: after layer1.2 (16x32x32" in done.stdout and "Linear(1600, 10)" in done.stdout
    assert "-j 30 but" in done.stderr  # more workers than cores: capped, with a note
    run = tmp_path / "earlyexit"
    spec = bx.ExitSpec.model_validate_json((run / "spec.json").read_text())
    assert spec.layers == ["layer1.2"] and spec.thresholds == [0.4] and spec.weights == [0.4]
    assert spec.criterion == "entropy" and spec.exits[0].head.kind == "pool"


@pytest.mark.slow  # trains at 224; the cifar command line's fast tests cover the trainer
def test_distiller_imagenet_command_line(tmp_path, capsys):
    assert train.main(distiller_argv(IMAGENET_LINE, tmp_path)) == 0
    out = capsys.readouterr().out
    check_distiller_output(out, exits=2)
    # Distiller's heads, sized for 32x32 digits instead of its hand-typed 224x224 sizes
    assert "conv head, Linear(40, 10)" in out and "conv head, Linear(12, 10)" in out
    run = tmp_path / "earlyexit"
    spec = bx.ExitSpec.model_validate_json((run / "spec.json").read_text())
    assert spec.layers == ["layer1", "layer2"] and spec.thresholds == [1.2, 0.9] and spec.weights == [0.1, 0.3]
    assert [p.head.channels for p in spec.exits] == [[10], [12]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["arch"] == "resnet50_earlyexit" and summary["num_classes"] == 10
    assert summary["validation"]["mode"] == "routed" and summary["validation"]["samples"] == 16
    assert len(summary["training"]) == 1 and len(summary["training"][0]["accuracy"]) == 3


@pytest.fixture
def no_training(monkeypatch):
    """Make reading data, attaching exits or training fail loudly: a check must come before them."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the trainer went past its up-front checks")

    monkeypatch.setattr(branchify.distiller.data, "make_loaders", forbidden)
    monkeypatch.setattr(train, "attach_exits", forbidden)
    monkeypatch.setattr(train, "fit", forbidden)


@pytest.mark.parametrize("argv, message", [
    ("--arch=resnet32_cifar_earlyexit --earlyexit_thresholds 0.4 0.5 --earlyexit_lossweights 0.4 digits",
     "--earlyexit_thresholds has 2 value(s) [0.4, 0.5] but there are 1 exit layer(s) ['layer1.2']"),
    ("--arch=resnet50_earlyexit --earlyexit_thresholds 1.2 0.9 --earlyexit_lossweights 0.1 digits",
     "--earlyexit_lossweights has 1 value(s) [0.1] but there are 2 exit layer(s) ['layer1', 'layer2']"),
    ("--arch=resnet20_cifar --exit-layers layer1 layer2 --earlyexit_lossweights 0.3 digits",
     "--earlyexit_lossweights has 1 value(s) [0.3] but there are 2 exit layer(s)"),
    ("--arch=resnet20_cifar --earlyexit_lossweights 0.6 0.5 --exit-layers layer1 layer2 --dataset digits",
     "exit loss weights sum to 1.1"),
    ("--arch=resnet20_cifar --earlyexit_thresholds -1 --earlyexit_lossweights 0.3 digits",
     "--earlyexit_thresholds has -1.0; every value must be a finite number >= 0"),
    ("--arch=resnet20_cifar --earlyexit_thresholds 0.4 digits", "--earlyexit_lossweights is missing"),
    ("--arch=resnet20_cifar --earlyexit_lossweights 0.3", "no dataset"),
    ("--arch=resnet20_cifar --earlyexit_lossweights 0.3 --dataset digits /data/cifar", "two datasets"),
    ("--arch=resnet18x --earlyexit_lossweights 0.3 digits", "unknown arch 'resnet18x' (close names: resnet18"),
])
def test_bad_flags_are_rejected_before_training(argv, message, no_training, tmp_path, capsys):
    assert train.main([*shlex.split(argv), "--out-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("branchify-train: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not captured.out and not any(tmp_path.iterdir())


def test_exit_layers_are_required_without_distillers_exits(no_training, capsys):
    assert train.main(["--arch=resnet18", "--earlyexit_thresholds", "0.4", "--earlyexit_lossweights", "0.4",
                       "digits"]) == 2
    err = capsys.readouterr().err
    assert "Distiller had no early-exit model for 'resnet18'" in err and "--exit-layers" in err


def test_exit_layers_train_any_arch_and_write_checkpoint_and_spec(tmp_path, capsys):
    # in the order the model reaches them (another order is refused); each threshold stays with its layer
    argv = ["--arch", "resnet18", "--exit-layers", "layer1", "layer2", "--earlyexit_thresholds", "0.6", "0.5",
            "--earlyexit_lossweights", "0.3", "0.2", "--criterion", "distiller", "-j", "0", "--out-dir",
            str(tmp_path), "-n", "r18", "--dataset", "digits", *QUICK]
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    # the label-reading criterion works, with a one-line warning
    assert "branchify-train: warning: criterion 'distiller'" in captured.err
    # each exit with its own threshold and weight
    assert "exit 0: after layer1 (64x8x8" in captured.out and "exit 1: after layer2 (128x4x4" in captured.out
    run = tmp_path / "r18"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "spec.json", "summary.json"]
    spec = bx.ExitSpec.model_validate_json((run / "spec.json").read_text())
    assert spec.layers == ["layer1", "layer2"] and spec.thresholds == [0.6, 0.5] and spec.weights == [0.3, 0.2]
    assert spec.criterion == "distiller" and {p.head.kind for p in spec.exits} == {"linear"}
    x = torch.zeros(1, 3, 32, 32)
    module = bx.load(run / "checkpoint.safetensors", get_model("resnet18", 10), x)
    assert module.exit_spec == spec and len(module.eval()(x)) == 3


def test_dataset_may_follow_a_list_flag():
    args = flags.parse_args(["--arch=resnet20_cifar", "--earlyexit_lossweights", "0.4", "digits"])
    assert args.earlyexit_lossweights == [0.4] and args.data == "digits"
    args = flags.parse_args(["--arch=resnet20_cifar", "--exit-layers", "layer1", "digits"])
    assert args.exit_layers == ["layer1"] and args.data == "digits"
    args = flags.parse_args(["--arch=resnet20_cifar", "--exit-layers", "layer1", "layer2", "--dataset", "digits"])
    assert args.exit_layers == ["layer1", "layer2"] and args.data is None


def test_non_numeric_threshold_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        flags.parse_args(["--arch=resnet20_cifar", "--earlyexit_thresholds", "x", "--dataset", "digits"])
    assert exited.value.code == 2
    assert "argument --earlyexit_thresholds: 'x' is not a number" in capsys.readouterr().err


def test_print_freq_prints_distillers_line_within_the_epoch(tmp_path, capsys):
    argv = ["--arch", "resnet20_cifar", "--exit-layers", "layer1", "--earlyexit_lossweights", "0.3", "-p", "1",
            "--out-dir", str(tmp_path), "-n", "p", "--dataset", "digits", "--epochs=2", "--limit-batches", "2",
            "-b", "8"]
    assert train.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch: [")]
    assert [line[:17] for line in lines] == ["Epoch: [0][    1/", "Epoch: [0][    2/", "Epoch: [1][    1/",
                                             "Epoch: [1][    2/"]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert [(epoch["epoch"], epoch["step"], epoch["samples"]) for epoch in summary["training"]] == [(0, 2, 16),
                                                                                                    (1, 2, 16)]
