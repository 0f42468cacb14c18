"""Distiller's ``compress_classifier.py`` flags: the ``branchify-train`` parser and the exit spec they describe.

>>> from branchify.distiller.flags import parse_args
>>> args = parse_args(["--arch=resnet32_cifar_earlyexit", "--earlyexit_lossweights", "0.4", "digits"])
>>> args.arch, args.earlyexit_lossweights, args.criterion
('resnet32_cifar_earlyexit', [0.4], 'entropy')
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ..commands.common import add_input_size, fraction, non_negative_int, positive_float, positive_int, usable_cores
from ..criteria import registered_criteria
from ..errors import BranchifyError
from ..spec import ExitPoint, ExitSpec, HeadSpec
from .models import _DISTILLER_SUFFIX, distiller_exits, get_model, model_names

__all__ = ["build_parser", "exit_spec_from_args", "parse_args", "spec_from_args"]

PROG = "branchify-train"
CHECKPOINT = "checkpoint.safetensors"
SPEC = "spec.json"
SUMMARY = "summary.json"


def default_input_size(arch: str) -> int:
    """The side the architecture is built for: 32 for the CIFAR ResNets, 224 for torchvision's.

    >>> from branchify.distiller.flags import default_input_size
    >>> default_input_size("resnet32_cifar_earlyexit"), default_input_size("resnet18")
    (32, 224)
    """
    return 32 if arch.removesuffix(_DISTILLER_SUFFIX).endswith("_cifar") else 224


def check_arch(arch: str) -> None:
    """Reject an unknown ``--arch`` (with close names) before any data is read."""
    if arch.removesuffix(_DISTILLER_SUFFIX) not in model_names():
        get_model(arch)  # raises the error with the close names


def spec_from_args(layers: Sequence[str], thresholds: Sequence[float] | None,
                        lossweights: Sequence[float] | None, *, head: HeadSpec | None = None,
                        criterion: str = "entropy") -> ExitSpec:
    """Build a spec from Distiller's ``--earlyexit_thresholds`` / ``--earlyexit_lossweights``.

    Counts are checked against the exit layers before anything runs (Distiller crashed
    mid-epoch when they disagreed, its issue #103).

    >>> from branchify.distiller import spec_from_args
    >>> spec_from_args(["layer1", "layer2"], [1.2, 0.9], [0.1, 0.3]).weights
    [0.1, 0.3]
    """
    layers = list(layers)
    for flag, values in (("--earlyexit_thresholds", thresholds), ("--earlyexit_lossweights", lossweights)):
        if values is not None and len(values) != len(layers):
            raise BranchifyError(
                f"{flag} has {len(values)} value(s) {list(values)} but there are {len(layers)} exit "
                f"layer(s) {layers}; give exactly one value per exit (the final exit takes none)")
    points = [
        ExitPoint(layer=layer, head=head or HeadSpec(),
                  threshold=None if thresholds is None else thresholds[i],
                  weight=None if lossweights is None else lossweights[i])
        for i, layer in enumerate(layers)
    ]
    return ExitSpec(exits=points, criterion=criterion)


def build_parser() -> argparse.ArgumentParser:
    """The ``branchify-train`` argument parser: Distiller's flags plus branchify's."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "Train a classifier with early exits, taking Distiller's compress_classifier.py flags. Exits are "
            "attached to the unmodified model: where Distiller had them for resnet50 and the CIFAR ResNets, or at "
            "--exit-layers. Prints Distiller's training columns per epoch and its validation report, then writes "
            f"{CHECKPOINT}, {SPEC} and {SUMMARY} to OUT_DIR/NAME/.", width=79),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("example:\n  branchify-train --arch=resnet32_cifar_earlyexit --epochs=20 -b 128 --lr=0.003 \\\n"
                "      --earlyexit_thresholds 0.4 --earlyexit_lossweights 0.4 -j 2 --out-dir runs -n earlyexit digits"))
    parser.add_argument("data", nargs="?", metavar="DATASET_DIR",
                        help="a CIFAR-10 python folder or an ImageFolder tree, or 'digits' (offline default)")
    parser.add_argument("--dataset", metavar="DIGITS_OR_DIR",
                        help="the dataset instead of the positional DATASET_DIR; 'digits' is scikit-learn's bundled "
                             "digits at 32x32 (offline)")
    parser.add_argument("--arch", "-a", required=True, metavar="ARCH",
                        help="a torchvision classifier (resnet18, ...), a CIFAR ResNet (resnet20_cifar ... "
                             "resnet56_cifar), or Distiller's name with _earlyexit (the same plain backbone)")
    parser.add_argument("--exit-layers", nargs="+", metavar="LAYER",
                        help="where the exits go (names from `branchify points ARCH`); default: Distiller's places "
                             "for resnet50 and the CIFAR ResNets")
    parser.add_argument("--earlyexit_thresholds", nargs="+", metavar="T",
                        help="one exit threshold per early exit, applied to --criterion; without them the "
                             "validation report is in forced mode (every exit judged on every sample)")
    parser.add_argument("--earlyexit_lossweights", nargs="+", metavar="W",
                        help="one loss weight per early exit; the final exit gets 1 - sum, so the sum must be < 1")
    parser.add_argument("--criterion", default="entropy", choices=registered_criteria(),
                        help="exit criterion for the thresholds (default: entropy of the softmax, in nats, no label "
                             "needed); 'distiller' compares the cross-entropy against the label, as Distiller did, "
                             "to reproduce its numbers only")
    parser.add_argument("--epochs", type=positive_int, default=90, help="training epochs (default: 90)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=256,
                        help="mini-batch size for training and validation (default: 256)")
    parser.add_argument("--lr", "--learning-rate", type=positive_float, default=0.1,
                        help="SGD learning rate (default: 0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", "--wd", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    parser.add_argument("-j", "--workers", type=non_negative_int, default=None,
                        help="data loading processes, at most the usable CPU cores (default: min(4, cores))")
    parser.add_argument("--validation-size", "--vs", type=fraction, default=0.1,
                        help="share of the training data held out for validation (default: 0.1; digits always "
                             "splits 60/20/20)")
    parser.add_argument("-o", "--out-dir", default="runs", help="folder for the run's outputs (default: runs)")
    parser.add_argument("-n", "--name", default=None, help="the run's name and subfolder (default: the arch)")
    add_input_size(parser, "32 for digits and CIFAR-10, 224 for ImageFolder")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data split and order (default: 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("-p", "--print-freq", type=positive_int, default=None,
                        help="also print the training line every N steps (default: once per epoch)")
    parser.add_argument("--limit-batches", type=positive_int, default=None,
                        help="at most N batches per epoch and for validation (for smoke tests)")
    return parser


def _is_dataset(value: str) -> bool:
    return value.strip().lower() == "digits" or Path(value).expanduser().is_dir()


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``branchify-train``'s flags; the dataset may also follow a list flag.

    A list flag takes every value after it, so ``--earlyexit_lossweights 0.4 digits`` would give
    the dataset to the flag: a last value that is not a number (or, after ``--exit-layers``, that
    is ``digits`` or an existing folder) is taken as the dataset when none was given.

    >>> from branchify.distiller.flags import parse_args
    >>> args = parse_args(["--arch=resnet20_cifar", "--earlyexit_lossweights", "0.4", "digits"])
    >>> args.earlyexit_lossweights, args.data
    ([0.4], 'digits')
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for flag in ("exit_layers", "earlyexit_thresholds", "earlyexit_lossweights"):
        values = getattr(args, flag)
        if not values or args.data is not None or args.dataset is not None or len(values) < 2:
            continue
        numeric = flag != "exit_layers"
        last = values[-1]
        if (numeric and not _is_float(last)) or (not numeric and _is_dataset(last)):
            args.data = last
            setattr(args, flag, values[:-1])
    for flag in ("earlyexit_thresholds", "earlyexit_lossweights"):
        values = getattr(args, flag)
        if values is None:
            continue
        bad = [v for v in values if not _is_float(v)]
        if bad:
            parser.error(f"argument --{flag}: {bad[0]!r} is not a number; give one number per early exit")
        setattr(args, flag, [float(v) for v in values])
    return args


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_values(flag: str, values: Sequence[float] | None) -> None:
    for value in values or ():
        if not (math.isfinite(value) and value >= 0):
            raise BranchifyError(f"{flag} has {value!r}; every value must be a finite number >= 0")


def exit_spec_from_args(args: argparse.Namespace) -> ExitSpec:
    """The exit spec that the flags describe, checked before any data is read.

    Exits go at ``--exit-layers`` (default heads), or where Distiller put them for the arch (with
    Distiller's heads); thresholds and loss weights must number one per exit.

    >>> from branchify.distiller.flags import exit_spec_from_args, parse_args
    >>> args = parse_args(["--arch=resnet50_earlyexit", "--earlyexit_thresholds", "1.2", "0.9",
    ...                                   "--earlyexit_lossweights", "0.1", "0.3", "digits"])
    >>> spec = exit_spec_from_args(args)
    >>> spec.layers, spec.thresholds, spec.criterion, spec.exits[1].head.channels
    (['layer1', 'layer2'], [1.2, 0.9], 'entropy', [12])
    """
    check_arch(args.arch)
    if args.exit_layers:
        layers, heads = list(args.exit_layers), None
    else:
        points = distiller_exits(args.arch)
        layers, heads = [p.layer for p in points], [p.head for p in points]
    _check_values("--earlyexit_thresholds", args.earlyexit_thresholds)
    _check_values("--earlyexit_lossweights", args.earlyexit_lossweights)
    spec = spec_from_args(layers, args.earlyexit_thresholds, args.earlyexit_lossweights,
                                        criterion=args.criterion)
    if args.earlyexit_lossweights is None:
        example = " ".join(f"{0.5 / len(layers):g}" for _ in layers)
        raise BranchifyError(
            f"--earlyexit_lossweights is missing: training weighs each of the {len(layers)} early exit(s) {layers} "
            f"(the final exit gets 1 - sum); give one weight per exit, e.g. --earlyexit_lossweights {example}")
    if heads is not None:
        spec = spec.with_exits(head=heads)
    return spec


def _dataset(args: argparse.Namespace) -> str:
    given = [d for d in (args.data, args.dataset) if d is not None]
    if not given:
        raise BranchifyError(
            "no dataset: end the command line with a dataset directory (a CIFAR-10 python folder or an ImageFolder "
            "tree), or pass --dataset digits for the offline default")
    if len(given) == 2 and given[0] != given[1]:
        raise BranchifyError(
            f"two datasets: the positional {args.data!r} and --dataset {args.dataset!r}; give only one of them")
    return given[0]


def _workers(requested: int | None) -> int:
    cores = usable_cores()
    if requested is None:
        return min(4, cores)
    if requested > cores:
        # more loader processes than cores only add start-up time and memory
        print(f"{PROG}: note: -j {requested} but {cores} usable CPU core(s); loading with {cores} worker(s)",
              file=sys.stderr)
        return cores
    return requested
