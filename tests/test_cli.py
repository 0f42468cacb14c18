"""The `branchify` command: points, sweep and report, their help, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import branchify as bx
from branchify.commands import cli
from branchify.distiller import train
from branchify.distiller.models import get_model


def rows_of(out: str) -> dict[str, list[str]]:
    """The points table's rows by name (the lines under it, which explain it, left out)."""
    rows = [line.split() for line in out.splitlines()[2:]]
    return {row[0]: row for row in rows if len(row) >= 5 and row[4].endswith("%") and not row[0].endswith(":")}


def test_points_lists_block_boundaries_with_shapes_and_macs(capsys):
    assert cli.main(["points", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "resnet18 at 3x224x224: 13 exit points"
    assert out.splitlines()[1].split() == ["name", "shape", "layout", "MMACs", "of", "model", "also", "named"]
    rows = rows_of(out)
    assert rows["layer1"][1:3] == ["64x56x56", "NCHW"] and rows["layer4"][1] == "512x7x7"
    assert rows["layer1"][-1] == "layer1.1"  # the stage's last block is the same point
    assert "MMACs: millions of multiply-accumulates" in out
    fractions = [float(row[4].rstrip("%")) for row in rows.values()]
    assert fractions == sorted(fractions) and fractions[-1] == 100.0


def test_points_input_size_and_distillers_exits(capsys):
    assert cli.main(["points", "resnet50_earlyexit", "--input-size", "64", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert rows_of(out)["layer1"][1] == "256x16x16"
    assert out.splitlines()[-1] == "Distiller's exits for resnet50: layer1, layer2"
    assert cli.main(["points", "resnet20_cifar", "--input-size", "32", "16", "--all-nodes"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert rows["layer1.2.relu2"][1] == "16x32x16"


@pytest.mark.parametrize("command", ["points", "sweep", "report", "benchmark"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: branchify {command} ") and "--input-size" in out


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("points", "sweep", "report", "benchmark"))


def test_sweep_on_digits_writes_result_plot_and_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    argv = ["sweep", "resnet20_cifar", "digits", "--epochs", "1", "--max-exits", "1", "--candidates", "layer1",
            "layer2", "-b", "32", "--limit-batches", "2", "--out", str(out_dir)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "branchify: warning: the backbone of resnet20_cifar has random weights" in captured.err
    assert captured.out.startswith("SweepResult(2 candidates")
    result = json.loads((out_dir / "result.json").read_text())
    assert [row["layer"] for row in result["candidates"]] == ["layer1", "layer2"]
    assert result["samples"] == 64 and len(result["best"]["layers"]) == 1
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = bx.ExitSpec.model_validate_json((out_dir / "spec.json").read_text())
    assert spec.layers == result["best"]["layers"] and (out_dir / "checkpoint.safetensors").is_file()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A branchify-train run without thresholds: one small batch of digits on the CIFAR ResNet-20."""
    out_dir = tmp_path_factory.mktemp("runs")
    argv = ["--arch=resnet20_cifar_earlyexit", "--earlyexit_lossweights", "0.4", "-j", "0", "--epochs=1",
            "--limit-batches", "1", "-b", "16", "--out-dir", str(out_dir), "-n", "ee", "--seed", "3", "digits"]
    assert train.main(argv) == 0
    return out_dir / "ee"


def test_trainer_without_thresholds_reports_forced_statistics(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["validation"]["mode"] == "forced" and summary["args"]["seed"] == 3


def test_report_prints_distillers_lines_for_a_trainer_checkpoint(trained_run, capsys):
    checkpoint = str(trained_run / "checkpoint.safetensors")
    # an entropy threshold above ln 10 lets every sample out at the first exit
    assert cli.main(["report", checkpoint, "digits", "--thresholds", "3", "-b", "16", "--limit-batches", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{checkpoint}: resnet20_cifar_earlyexit, exits after layer1.2, criterion 'entropy'")
    report = lines[lines.index("--- validate ---------------------") + 1:]
    assert report[:3] == ["16 samples (16 per mini-batch)", "Exit 0: 16", "Percent Early Exit 0: 100.000"]
    assert report[3].startswith("Accuracy Stats for exit 0: top1 = ")
    assert report[4] == "Accuracy Stats for exit 1: top1 = 0.000, top5 = 0.000"
    assert report[5].startswith("Totals for entire network with early exits: top1 = ")
    assert report[6].startswith("MACs at exit 0: ") and report[-2].startswith("Saving vs the original model: ")
    # Distiller's lines, then one explaining the zero of the exit nobody reached
    assert report[-1].startswith("Note: no sample left at exit 1, so its accuracy above reads 0")


def test_report_without_thresholds_is_forced(trained_run, capsys):
    checkpoint = str(trained_run / "checkpoint.safetensors")
    argv = ["report", checkpoint, "digits", "--arch", "resnet20_cifar", "--split", "test", "-b", "16",
            "--limit-batches", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "--- test ----" in out and "No thresholds, so no routing" in out
    assert "Mean loss for exit 0: " in out and "Exit 0:" not in out


@pytest.mark.parametrize("argv, message", [
    (["points", "resnet18x"], "branchify points: error: unknown arch 'resnet18x' (close names: resnet18"),
    (["report", "/no/such.safetensors", "digits", "--arch", "resnet20_cifar"],
     "branchify report: error: no checkpoint at '/no/such.safetensors'"),
    (["report", "/no/such.safetensors", "digits"], "branchify report: error: no checkpoint at '/no/such.safetensors'"),
    (["sweep", "resnet20_cifar", "/no/such/folder"], "dataset path /no/such/folder does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_rejects_the_wrong_arch_and_threshold_count(trained_run, capsys):
    checkpoint = str(trained_run / "checkpoint.safetensors")
    assert cli.main(["report", checkpoint, "digits", "--arch", "resnet32_cifar"]) == 2
    assert "was saved as resnet20_cifar_earlyexit" in capsys.readouterr().err
    assert cli.main(["report", checkpoint, "digits", "--thresholds", "1", "2", "--limit-batches", "1"]) == 2
    assert "--thresholds has 2 value(s) [1.0, 2.0] but the checkpoint has 1 early exit(s)" in capsys.readouterr().err


@pytest.mark.slow  # trains then sweeps; test_sweep_on_digits_writes_result_plot_and_checkpoint stays fast
def test_sweep_takes_the_backbone_from_a_trainer_checkpoint(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoint.safetensors"
    argv = ["sweep", "resnet20_cifar", "digits", "--checkpoint", str(checkpoint), "--epochs", "1", "--max-exits",
            "1", "--candidates", "layer1", "--limit-batches", "1", "-b", "16", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "random weights" not in capsys.readouterr().err
    assert json.loads((tmp_path / "result.json").read_text())["candidates"][0]["layer"] == "layer1"
    assert cli.main([*argv, "--backbone-epochs", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("prog, argv", [
    ("points", ["points", "resnet18"]), ("sweep", ["sweep", "resnet18", "digits"]),
    ("report", ["report", "x.safetensors", "digits"]), ("branchify-train", ["--arch", "resnet20_cifar", "digits"])])
def test_every_command_takes_input_size_in_one_form(prog, argv):
    """``--input-size H [W]`` everywhere: one side for square inputs, or a height and a width."""
    from branchify.distiller import flags

    parse = flags.build_parser().parse_args if prog == "branchify-train" else cli.build_parser().parse_args
    assert parse([*argv, "--input-size", "48"]).input_size == (48, 48)
    assert parse([*argv, "--input-size", "48", "64"]).input_size == (48, 64)
    with pytest.raises(SystemExit):
        parse([*argv, "--input-size", "1", "2", "3"])


def test_too_many_input_sides_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["points", "resnet18", "--input-size", "1", "2", "3"])
    assert exited.value.code == 2
    assert "--input-size takes a side, or a height and a width, got 3 values 1 2 3" in capsys.readouterr().err


def test_a_non_square_input_size_reaches_the_data(tmp_path, capsys):
    """digits at 24x40 through the sweep: the data, the example and the checkpoint all have that shape."""
    argv = ["sweep", "resnet20_cifar", "digits", "--epochs", "1", "--max-exits", "1", "--candidates", "layer1",
            "-b", "16", "--limit-batches", "1", "--input-size", "24", "40", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    from branchify.distiller.models import get_model

    module = bx.load(tmp_path / "checkpoint.safetensors", get_model("resnet20_cifar", 10))
    assert module.example_record["args"][0]["shape"] == [1, 3, 24, 40]


def test_report_needs_no_arch_for_a_checkpoint_that_records_it(tmp_path, capsys):
    from branchify.distiller.models import get_model

    model = get_model("resnet20_cifar", 10)
    module = bx.attach_exits(model, ["layer1"], torch.zeros(1, 3, 32, 32))
    plain = bx.save(module, tmp_path / "plain" / "exits.safetensors")
    named = bx.save(module, tmp_path / "named" / "exits.safetensors", arch="resnet20_cifar")
    assert cli.main(["report", str(plain), "digits", "--limit-batches", "1"]) == 2
    assert "pass --arch ARCH" in capsys.readouterr().err
    assert cli.main(["report", str(named), "digits", "--limit-batches", "1", "-b", "16"]) == 0
    assert "resnet20_cifar, exits after layer1" in capsys.readouterr().out
    assert cli.main(["report", str(named), "digits", "--arch", "resnet32_cifar"]) == 2
    assert "was saved as resnet20_cifar; pass --arch resnet20_cifar" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess pipeline (branchify points | head)
def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``branchify points resnet18 | head -3``: no BrokenPipeError traceback."""
    import subprocess
    import sys

    script = "from branchify.commands.cli import main; raise SystemExit(main(['points', 'resnet18']))"
    points = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    points.stdout.close()  # the reader is gone before the table is written, as head's is once it has its lines
    err = points.stderr.read()
    points.wait(timeout=300)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()[-2000:]
    assert points.returncode == 1


def test_benchmark_times_a_trainer_checkpoint(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoint.safetensors"
    figures = tmp_path / "benchmark.json"
    # an entropy threshold above ln 10 lets every sample out at the first exit
    argv = ["benchmark", str(checkpoint), "digits", "--thresholds", "3", "--samples", "16", "--batch-sizes", "8", "1",
            "--repeats", "2", "--json", str(figures)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{checkpoint}: resnet20_cifar_earlyexit, ExitRunner(2 stages; layer1.2: entropy 3)")
    assert out[0].endswith("16 test samples")
    assert out[1].startswith("BenchmarkResult: ExitRunner against the original model")
    rows = [line.split() for line in out if line.startswith(("  1 ", "  8 "))]
    assert [row[0] for row in rows] == ["1", "8"]
    data = json.loads(figures.read_text())
    costs = bx.exit_costs(bx.load(checkpoint, get_model("resnet20_cifar", 10), torch.zeros(1, 3, 32, 32)),
                          torch.zeros(1, 3, 32, 32))
    assert [(row["batch_size"], row["batches"], row["shares"]) for row in data["rows"]] == [(1, 16, [1.0, 0.0]),
                                                                                          (8, 2, [1.0, 0.0])]
    assert data["rows"][0]["mac_saving"] == pytest.approx(1 - costs.exits[0] / costs.original, rel=1e-9)


def test_benchmark_needs_thresholds(trained_run, capsys):
    assert cli.main(["benchmark", str(trained_run / "checkpoint.safetensors"), "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("branchify benchmark: error: ") and "have no thresholds" in err and "--thresholds" in err


def test_backbone_epochs_train_the_plain_model_as_a_plain_loop_would(capsys):
    """--backbone-epochs goes through bx.fit (the package's one loop) and trains exactly as plain SGD does."""
    import copy

    import torch.nn.functional as F

    from branchify.distiller.models import get_model

    torch.manual_seed(0)
    ours = get_model("resnet20_cifar", 10)
    plain = copy.deepcopy(ours)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    losses = cli._train_backbone(ours, loader, torch.zeros(1, 3, 32, 32), epochs=2, lr=0.05,
                                 device=torch.device("cpu"))
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    plain.train()
    for _ in range(2):
        for x, y in loader:
            loss = F.cross_entropy(plain(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(losses) == 2 and "Backbone epoch [1]" in capsys.readouterr().out


def test_report_help_describes_both_modes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "With thresholds (saved, or --thresholds) each sample leaves at its first exit that fires (routed mode)" \
        in text
    assert "Without thresholds nothing is routed (forced mode): every exit classifies every sample" in text
    assert "per exit the samples taken" not in text.split("(forced mode)")[1]  # no shares in forced mode
