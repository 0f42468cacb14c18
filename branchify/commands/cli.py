"""The ``branchify`` command: list a model's exit points, sweep exit placements, report on and time a saved model.

``branchify points ARCH`` lists where exits can attach, with shapes, layouts and cumulative MACs;
``branchify sweep ARCH DATASET`` trains a head at every candidate on the frozen backbone and writes
the proposal (``result.json``, ``sweep.png``, a checkpoint and the spec); ``branchify report
CHECKPOINT DATASET --arch ARCH`` rebuilds a saved model and prints Distiller's statistics report with
the MACs; ``branchify benchmark CHECKPOINT DATASET`` times the saved exits against the original model
(``bx.benchmark``). User errors print one line on stderr and exit with status 2. Training with exits
is ``branchify-train`` (Distiller's command line).

>>> from branchify.commands.cli import build_parser
>>> build_parser().parse_args(["points", "resnet18", "--input-size", "64"]).input_size
(64, 64)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..checkpoint import load, read_checkpoint, save
from ..cost import exit_costs
from ..criteria import registered_criteria
from ..distiller.flags import SUMMARY, check_arch, default_input_size
from ..distiller.models import DISTILLER_EXITS, get_model
from ..distiller.train import evaluate
from ..errors import BranchifyError
from ..placement import sweep
from ..points import list_exit_points
from ..spec import ExitSpec
from ..surgery import attach_exits
from ..training import fit
from .common import (
    add_input_size,
    fraction,
    limit_batches,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    run_command,
    usable_cores,
)

__all__ = ["build_parser", "main"]

PROG = "branchify"
RESULT = "result.json"
PLOT = "sweep.png"


def _common_data(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("dataset", metavar="DATASET",
                        help="'digits' (offline, 32x32), a CIFAR-10 python folder, or an ImageFolder tree")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=batch_size,
                        help=f"mini-batch size (default: {batch_size})")
    parser.add_argument("-j", "--workers", type=non_negative_int, default=0,
                        help="data loading processes (default: 0, load in this process)")
    add_input_size(parser, "32 for digits and CIFAR-10, 224 for ImageFolder")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the data split and of any training (default: the training run's, else 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--limit-batches", type=positive_int, default=None,
                        help="at most N batches per pass (for smoke tests)")


def build_parser() -> argparse.ArgumentParser:
    """The ``branchify`` argument parser, one subcommand per task."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Automatic early exits for unmodified PyTorch classifiers.",
        epilog="Train with exits using branchify-train (Distiller's compress_classifier.py flags).")
    parser.add_argument("--version", action="version", version=f"branchify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    points = commands.add_parser(
        "points", help="list the exit points of a model with shapes, layouts and cumulative MACs",
        description=("List where exits can attach to ARCH (built with random weights, nothing is downloaded): "
                     "each point's name for --exit-layers / ExitPoint(layer=...), the activation's shape and layout "
                     "per sample, and the MACs spent up to it, in millions and as a share of the whole model."))
    points.add_argument("arch", metavar="ARCH", help="a torchvision classifier or a CIFAR ResNet (resnet20_cifar, ...)")
    add_input_size(points, "32 for CIFAR ResNets, 224 otherwise")
    points.add_argument("--all-nodes", action="store_true",
                        help="list every graph node, not just the block boundaries")
    points.add_argument("--num-classes", type=positive_int, default=None,
                        help="classes of the classifier (default: the arch's own)")

    sweep_cmd = commands.add_parser(
        "sweep", help="train a head at every candidate point and propose where exits pay off",
        description=("Train one exit head at every candidate point at once on ARCH's frozen backbone, then pick the "
                     "set of at most --max-exits exits with the fewest expected MACs whose accuracy drop stays within "
                     f"--max-accuracy-drop on the validation split. Writes {RESULT}, {PLOT}, the chosen exits' "
                     "checkpoint.safetensors and spec.json to --out. The backbone should be trained: pass "
                     "--checkpoint (from branchify-train) or --backbone-epochs."))
    sweep_cmd.add_argument("arch", metavar="ARCH", help="a torchvision classifier or a CIFAR ResNet")
    _common_data(sweep_cmd, batch_size=64)
    sweep_cmd.add_argument("--checkpoint", type=Path, default=None,
                           help="a branchify checkpoint (e.g. from branchify-train) whose backbone weights to use")
    sweep_cmd.add_argument("--backbone-epochs", type=non_negative_int, default=0,
                           help="first train the plain model this many epochs with SGD (default: 0)")
    sweep_cmd.add_argument("--backbone-lr", type=positive_float, default=0.05,
                           help="SGD learning rate for --backbone-epochs (default: 0.05)")
    sweep_cmd.add_argument("--epochs", type=positive_int, default=3, help="epochs of head training (default: 3)")
    sweep_cmd.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate of the heads "
                           "(default: 0.003)")
    sweep_cmd.add_argument("--max-exits", type=positive_int, default=2,
                           help="largest number of early exits in the proposal (default: 2)")
    sweep_cmd.add_argument("--max-accuracy-drop", type=fraction, default=0.01,
                           help="allowed top-1 drop against the final exit, as a fraction (default: 0.01 = one point)")
    sweep_cmd.add_argument("--candidates", nargs="+", metavar="LAYER", default=None,
                           help="the points to try (default: every point below 99%% of the MACs)")
    sweep_cmd.add_argument("--criterion", default="entropy", choices=[c for c in registered_criteria()
                                                                      if c != "distiller"],
                           help="exit criterion (default: entropy)")
    sweep_cmd.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output folder (default: runs/sweep)")

    report = commands.add_parser(
        "report", help="print the statistics of a saved model (Distiller's report and the MACs)",
        description=("Rebuild the model saved in CHECKPOINT (bx.save, branchify-train) and print Distiller's report "
                     "on a split of DATASET. With thresholds (saved, or --thresholds) each sample leaves at its first "
                     "exit that fires (routed mode): per exit the samples taken, their share and their accuracy, the "
                     "totals, then the MACs of each exit, of the original model, expected per sample, and the saving. "
                     "Without thresholds nothing is routed (forced mode): every exit classifies every sample, and "
                     "the report gives each exit's accuracy and loss over all of them, with no shares or saving."))
    report.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .safetensors file written by bx.save")
    _common_data(report, batch_size=128)
    report.add_argument("--arch", "-a", default=None,
                        help=f"the architecture the checkpoint was trained on (default: the one it records, else "
                             f"the {SUMMARY} that branchify-train wrote beside it)")
    report.add_argument("--split", choices=["val", "test"], default="val",
                        help="which split to report on (default: val, as branchify-train does)")
    report.add_argument("--thresholds", type=float, nargs="+", metavar="T", default=None,
                        help="route by these thresholds instead of the saved ones, one per early exit")
    report.add_argument("--criterion", choices=registered_criteria(), default=None,
                        help="route by this criterion instead of the saved one")

    export = commands.add_parser(
        "export", help="write a saved model as one ONNX file that routes each sample to its exit",
        description=("Rebuild the model saved in CHECKPOINT (bx.save, branchify-train) and write it with "
                     "ExitRunner.export_onnx: one ONNX model whose outputs are logits (batch, classes) and exit_index "
                     "(batch,), each stage running only on the samples that reach it. Thresholds are initializers "
                     "named exit_<i>_threshold, which a deployment can edit in the file. Needs branchify[onnx]."))
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .safetensors file written by bx.save")
    export.add_argument("--onnx", type=Path, required=True, metavar="PATH", help="the ONNX file to write")
    export.add_argument("--arch", "-a", default=None,
                        help=f"the architecture the checkpoint was trained on (default: the one it records, else "
                             f"the {SUMMARY} that branchify-train wrote beside it)")
    add_input_size(export, "the training run's, else the one the checkpoint records, else the arch's own")
    export.add_argument("--thresholds", type=float, nargs="+", metavar="T", default=None,
                        help="route by these thresholds instead of the saved ones, one per early exit")
    export.add_argument("--criterion", choices=[c for c in registered_criteria() if c != "distiller"], default=None,
                        help="route by this criterion instead of the saved one")
    export.add_argument("--opset", type=positive_int, default=None,
                        help="ONNX opset, at least 18 (default: torch.onnx's)")

    bench = commands.add_parser(
        "benchmark", help="time a saved model's early exits against the original model",
        description=("Rebuild the model saved in CHECKPOINT (bx.save, branchify-train), run bx.ExitRunner on the "
                     "first --samples samples of a split of DATASET and time it against the original model with "
                     "bx.benchmark: interleaved in one run, per batch size the median time per batch and its spread, "
                     "the throughput, the speedup, the MACs the exits saved and the speedup those MACs promise. The "
                     "exits need thresholds (saved, or --thresholds). Read the ratios: the times depend on the "
                     "machine and its load, and a spread above 10% is reported."))
    bench.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .safetensors file written by bx.save")
    bench.add_argument("dataset", metavar="DATASET",
                       help="'digits' (offline, 32x32), a CIFAR-10 python folder, or an ImageFolder tree")
    bench.add_argument("--arch", "-a", default=None,
                       help=f"the architecture the checkpoint was trained on (default: the one it records, else the "
                            f"{SUMMARY} that branchify-train wrote beside it)")
    bench.add_argument("--split", choices=["val", "test"], default="test",
                       help="which split to time on (default: test)")
    bench.add_argument("--samples", type=positive_int, default=256,
                       help="how many samples of the split to time (default: 256; batch 1 runs them one by one)")
    bench.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 64], metavar="B",
                       help="the batch sizes to time (default: 1 64)")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats of each (default: 5)")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="torch's CPU threads (default: torch's own choice)")
    bench.add_argument("--thresholds", type=float, nargs="+", metavar="T", default=None,
                       help="route by these thresholds instead of the saved ones, one per early exit")
    bench.add_argument("--criterion", choices=[c for c in registered_criteria() if c != "distiller"], default=None,
                       help="route by this criterion instead of the saved one")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON here")
    add_input_size(bench, "the training run's, else the one the checkpoint records")
    bench.add_argument("-j", "--workers", type=non_negative_int, default=0,
                       help="data loading processes (default: 0, load in this process)")
    bench.add_argument("--seed", type=int, default=None, help="seed of the data split (default: the training run's)")
    bench.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    bench.set_defaults(batch_size=256)  # the loader's; the timed batches are --batch-sizes
    return parser


# --- points ------------------------------------------------------------------------------------


def _points(args: argparse.Namespace) -> None:
    check_arch(args.arch)
    height, width = args.input_size or (default_input_size(args.arch),) * 2
    model = get_model(args.arch, args.num_classes).eval()
    found = list_exit_points(model, torch.zeros(1, 3, height, width), all_nodes=args.all_nodes)
    print(f"{args.arch} at 3x{height}x{width}: {len(found)} exit points")
    print(repr(found))
    base = args.arch.removesuffix("_earlyexit")
    if base in DISTILLER_EXITS:
        print(f"Distiller's exits for {base}: {', '.join(p.layer for p in DISTILLER_EXITS[base])}")


# --- sweep -------------------------------------------------------------------------------------


def _loaders(args: argparse.Namespace, val_fraction: float = 0.1):
    from ..distiller.data import make_loaders  # scikit-learn and torchvision's datasets only load when needed

    if args.workers > usable_cores():
        print(f"{PROG}: note: -j {args.workers} but {usable_cores()} usable CPU core(s); loading with "
              f"{usable_cores()} worker(s)", file=sys.stderr)
    return make_loaders(args.dataset, args.batch_size, min(args.workers, usable_cores()), args.seed,
                        size=args.input_size, val_fraction=val_fraction)


def _train_backbone(model: nn.Module, loader, example: torch.Tensor, *, epochs: int, lr: float,
                    device: torch.device) -> list[float]:
    """Train the plain ``model`` with cross-entropy on its own output and SGD (momentum 0.9), through ``bx.fit``
    (the package's one training loop); returns the mean loss per epoch."""
    # bx.fit trains modules with exits: one exit whose head the loss leaves out trains the backbone alone.
    first = list_exit_points(model, example)[0].name
    module = attach_exits(model, [first], example).to(device)
    history = fit(module, loader, epochs=epochs, progress=sys.stderr.isatty(),
                  optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4),
                  loss=lambda outputs, target: F.cross_entropy(outputs[-1], target),
                  on_epoch_end=lambda epoch: print(f"Backbone epoch [{epoch.epoch}]    Loss {epoch.loss:.6f}",
                                                   flush=True))
    return [epoch.loss for epoch in history.epochs]


def _sweep(args: argparse.Namespace) -> None:
    check_arch(args.arch)
    args.seed = 0 if args.seed is None else args.seed
    if args.checkpoint is not None and args.backbone_epochs:
        raise BranchifyError(
            f"--checkpoint {args.checkpoint} and --backbone-epochs {args.backbone_epochs} both set the backbone's "
            "weights; give one of them")
    device = resolve_device(args.device)
    loaders = _loaders(args)
    train_loader = limit_batches(loaders.train, args.limit_batches)
    val_loader = limit_batches(loaders.val, args.limit_batches)
    example = loaders.val.dataset[0][0].unsqueeze(0)
    torch.manual_seed(args.seed)
    model = get_model(args.arch, loaders.num_classes)
    if args.checkpoint is not None:
        # the module shares its backbone with ``model``, so loading it trains ``model`` too
        load(args.checkpoint, model, example)
    elif args.backbone_epochs:
        _train_backbone(model, train_loader, example, epochs=args.backbone_epochs, lr=args.backbone_lr, device=device)
    else:
        warnings.warn(
            f"the backbone of {args.arch} has random weights (nothing is downloaded), so the heads learn from "
            "untrained features; pass --checkpoint from branchify-train or --backbone-epochs N", stacklevel=1)
    model.to(device).eval()
    result = sweep(model, train_loader, val_loader, example_inputs=example.to(device), candidates=args.candidates,
                   epochs=args.epochs, lr=args.lr, max_exits=args.max_exits,
                   max_accuracy_drop=args.max_accuracy_drop, criterion=args.criterion, seed=args.seed,
                   progress=sys.stderr.isatty())
    print(repr(result))
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = [result.to_json(out / RESULT), result.plot(out / PLOT)]
    module = result.attach(model.cpu(), example)
    written.append(save(module, out / "checkpoint.safetensors", arch=args.arch))
    written.append(module.exit_spec.save(out / "spec.json"))
    print(f"Saved {', '.join(map(str, written))}")


# --- report ------------------------------------------------------------------------------------


def _with_overrides(spec: ExitSpec, thresholds: Sequence[float] | None, criterion: str | None) -> ExitSpec:
    if thresholds is not None:
        if len(thresholds) != len(spec.exits):
            raise BranchifyError(
                f"--thresholds has {len(thresholds)} value(s) {list(thresholds)} but the checkpoint has "
                f"{len(spec.exits)} early exit(s) {spec.layers}; give one threshold per early exit")
        spec = spec.with_exits(threshold=list(thresholds))
    if criterion is not None:
        spec = ExitSpec.model_validate({**spec.model_dump(), "criterion": criterion})
    return spec


def _training_run(checkpoint: Path) -> dict:
    """What branchify-train recorded beside ``checkpoint`` ({} when it was not written by branchify-train)."""
    try:
        record = json.loads((checkpoint.parent / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("args"), dict) else {}


def checkpoint_arch(checkpoint: Path, given: str | None) -> tuple[str, dict]:
    """The architecture of ``checkpoint``: ``given`` (``--arch``), else the name the checkpoint records, else the one
    branchify-train's summary beside it names; and that summary ({} without one). A ``given`` name that
    contradicts the record is refused."""
    run = _training_run(checkpoint)
    _, metadata, _ = read_checkpoint(checkpoint)
    recorded = metadata.get("arch") or run.get("arch")
    if given is None:
        if recorded is None:
            raise BranchifyError(
                f"which architecture is {checkpoint}? It records none (save with bx.save(module, path, arch=...)) "
                f"and no {SUMMARY} from branchify-train beside it names one; pass --arch ARCH (the one it was "
                "trained with)")
        given = str(recorded)
    elif recorded is not None and given.removesuffix("_earlyexit") != str(recorded).removesuffix("_earlyexit"):
        raise BranchifyError(f"--arch {given} but {checkpoint} was saved as {recorded}; pass --arch {recorded}")
    check_arch(given)
    return given, run


def _recorded_size(checkpoint: Path) -> tuple[int, int] | None:
    """The image size the checkpoint's module was built on, when it records one image input."""
    _, metadata, _ = read_checkpoint(checkpoint)
    try:
        args = json.loads(metadata["example_inputs"])["args"]
        shape = args[0]["shape"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return (int(shape[-2]), int(shape[-1])) if len(args) == 1 and len(shape) == 4 else None


def saved_run(args: argparse.Namespace) -> tuple[Path, dict]:
    """Fill in ``args`` for a command on a saved checkpoint: the architecture (``checkpoint_arch``), the training
    run's seed (another seed or share would put training samples into val and test) and its input size, else
    the one the checkpoint records. Returns the checkpoint's path and the training run's arguments."""
    checkpoint = args.checkpoint.expanduser()
    args.arch, run = checkpoint_arch(checkpoint, args.arch)
    trained = run.get("args", {})
    if getattr(args, "seed", 0) is None:
        args.seed = int(trained.get("seed", 0))
    if args.input_size is None:
        size = trained.get("input_size")
        args.input_size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list) \
            else _recorded_size(checkpoint)
    return checkpoint, trained


def _report(args: argparse.Namespace) -> None:
    checkpoint, trained = saved_run(args)
    device = resolve_device(args.device)
    loaders = _loaders(args, val_fraction=float(trained.get("validation_size", 0.1)))
    example = loaders.val.dataset[0][0].unsqueeze(0)
    module = load(args.checkpoint, get_model(args.arch, loaders.num_classes), example)
    spec = _with_overrides(module.exit_spec, args.thresholds, args.criterion)
    costs = exit_costs(module, example)
    module.to(device)
    loader = limit_batches(getattr(loaders, args.split), args.limit_batches)
    stats = evaluate(module, loader, spec=spec, costs=costs, device=device)
    summary = stats.summary()
    # An exit calibration switched off has threshold None while the others route.
    thresholds = "none" if spec.thresholds is None else ", ".join("off" if t is None else f"{t:g}"
                                                                  for t in spec.thresholds)
    print(f"{args.checkpoint}: {args.arch}, exits after {', '.join(spec.layers)}, criterion {spec.criterion!r}, "
          f"thresholds {thresholds}")
    print(f"--- {'validate' if args.split == 'val' else 'test'} ---------------------")
    print(f"{summary.samples} samples ({args.batch_size} per mini-batch)")
    if stats.mode == "forced":
        print("No thresholds, so no routing: each exit is judged on every sample; pass --thresholds for the routed "
              "report.")
    stats.report()


# --- export ------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> None:
    from ..runtime import ExitRunner

    checkpoint, _ = saved_run(args)
    height, width = args.input_size or (default_input_size(args.arch),) * 2
    _, header, _ = read_checkpoint(checkpoint)
    classes = int(header["num_classes"]) if header.get("num_classes", "").isdigit() else None
    example = torch.zeros(1, 3, height, width)
    module = load(checkpoint, get_model(args.arch, classes), example).eval()
    module.exit_spec = _with_overrides(module.exit_spec, args.thresholds, args.criterion)
    if module.exit_spec.thresholds is None:
        raise BranchifyError(
            f"the exits of {args.checkpoint} have no thresholds, so the exported model could not route any sample; "
            "pass --thresholds T [T ...], one per early exit (bx.calibrate chooses them)")
    path = ExitRunner(module).export_onnx(args.onnx.expanduser(), example_inputs=example, opset=args.opset)
    spec = module.exit_spec
    exits = ", ".join(f"exit_{i}_threshold={p.threshold:g} ({spec.criterion_of(i)})" if p.threshold is not None
                      else f"exit {i} off" for i, p in enumerate(spec.exits))
    print(f"Wrote {path}: {args.arch} at 3x{height}x{width}, exits after {', '.join(spec.layers)}; input x (batch, 3, "
          f"{height}, {width}) -> logits (batch, {module.num_classes}), exit_index (batch,); {exits}")


# --- benchmark ---------------------------------------------------------------------------------


def _benchmark(args: argparse.Namespace) -> None:
    from ..runtime import ExitRunner
    from ..runtime.benchmark import benchmark

    checkpoint, trained = saved_run(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaders = _loaders(args, val_fraction=float(trained.get("validation_size", 0.1)))
    example = loaders.val.dataset[0][0].unsqueeze(0)
    module = load(checkpoint, get_model(args.arch, loaders.num_classes), example).eval()
    module.exit_spec = _with_overrides(module.exit_spec, args.thresholds, args.criterion)
    if module.exit_spec.thresholds is None:
        raise BranchifyError(
            f"the exits of {args.checkpoint} have no thresholds, so no sample could leave early and there is nothing "
            "to time; pass --thresholds T [T ...], one per early exit (bx.calibrate chooses them)")
    runner = ExitRunner(module.to(device))
    chunks, held = [], 0
    for images, _ in getattr(loaders, args.split):
        chunks.append(images)
        held += len(images)
        if held >= args.samples:
            break
    inputs = torch.cat(chunks)[:args.samples]
    result = benchmark(runner, inputs, batch_sizes=args.batch_sizes, repeats=args.repeats)
    print(f"{args.checkpoint}: {args.arch}, {runner!r}; {len(inputs)} {args.split} samples")
    print(repr(result))
    if args.json is not None:
        args.json.expanduser().write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"Wrote {args.json}")


_COMMANDS = {"points": _points, "sweep": _sweep, "report": _report, "export": _export, "benchmark": _benchmark}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``branchify`` with ``argv`` (default: the command line); returns the exit status.

    User errors print one line on stderr and return 2, as argparse does for bad flags.
    """
    args = build_parser().parse_args(argv)
    return run_command(PROG, f"{PROG} {args.command}", lambda: _COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
