"""Distiller's early-exit trainer on an unmodified model: the ``branchify-train`` command.

Distiller trained hand-edited ``*_earlyexit`` copies of its models with ``compress_classifier.py``.
This trainer takes the same command line (``--arch``, ``--epochs``, ``-b``, ``--lr``, ``-j``,
``--out-dir``, ``-n``, ``--earlyexit_thresholds``, ``--earlyexit_lossweights`` and the dataset
directory), attaches the exits to the plain model where Distiller had them (or at ``--exit-layers``),
trains with Distiller's loss and SGD, prints Distiller's training columns per epoch and its
validation report (plus the MACs), and writes the checkpoint and the spec.

Two things differ on purpose. The exit criterion is the entropy of each exit's softmax by default,
which needs no label (Distiller compared the cross-entropy against the label; ``--criterion
distiller`` reproduces that, with a warning). And the counts of thresholds and weights are checked
against the exits before any data is read.

>>> from branchify.train import parse_args
>>> args = parse_args(["--arch=resnet32_cifar_earlyexit", "--earlyexit_lossweights", "0.4", "digits"])
>>> args.arch, args.earlyexit_lossweights, args.criterion
('resnet32_cifar_earlyexit', [0.4], 'entropy')
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pydantic
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import save
from .cost import ExitCosts, exit_costs
from .criteria import registered_criteria
from .errors import BranchifyError
from .loss import EarlyExitLoss
from .models import distiller_exits, get_model, model_names
from .outputs import final_logits
from .spec import ExitSpec
from .stats import ExitStats
from .surgery import attach_exits

__all__ = [
    "EpochLog",
    "build_parser",
    "error_line",
    "evaluate",
    "exit_spec_from_args",
    "limit_batches",
    "main",
    "parse_args",
    "resolve_device",
    "run_command",
    "train_epoch",
]

PROG = "branchify-train"
CHECKPOINT = "checkpoint.safetensors"
SPEC = "spec.json"
SUMMARY = "summary.json"
_DISTILLER_SUFFIX = "_earlyexit"


# --- small pieces shared with the `branchify` command ------------------------------------------


def error_line(err: Exception) -> str:
    """A user error as one line: a ``BranchifyError``'s message, or pydantic's errors joined.

    >>> import branchify as bx
    >>> from branchify.train import error_line
    >>> error_line(bx.BranchifyError("bad value 3;\\n use 2"))
    'bad value 3; use 2'
    """
    if isinstance(err, pydantic.ValidationError):
        parts = []
        for item in err.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            where = ".".join(str(part) for part in item["loc"])
            value = item.get("input")
            got = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
            parts.append(f"{err.title} {where}: {message}{got}" if where else f"{err.title}: {message}")
        text = "; ".join(parts)
    else:
        text = str(err)
    return " ".join(text.split())


class _Limited:
    """At most ``limit`` batches of ``loader`` per pass (each ``iter`` starts a fresh pass)."""

    def __init__(self, loader: Iterable, limit: int) -> None:
        self.loader = loader
        self.limit = limit

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.limit)

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)  # type: ignore[arg-type]


def limit_batches(loader: Iterable, limit: int | None) -> Iterable:
    """``loader`` cut to its first ``limit`` batches per pass (``None``: unchanged), for quick runs.

    >>> from branchify.train import limit_batches
    >>> len(limit_batches([1, 2, 3], 2)), list(limit_batches([1, 2, 3], 2)), list(limit_batches([1, 2], None))
    (2, [1, 2], [1, 2])
    """
    return loader if limit is None else _Limited(loader, limit)


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names; ``"auto"`` is CUDA when available, else the CPU.

    >>> from branchify.train import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BranchifyError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BranchifyError(f"--device {name!r} asks for CUDA, which this machine lacks; use --device cpu")
    return device


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_input_size(arch: str) -> int:
    """The side the architecture is built for: 32 for the CIFAR ResNets, 224 for torchvision's.

    >>> from branchify.train import default_input_size
    >>> default_input_size("resnet32_cifar_earlyexit"), default_input_size("resnet18")
    (32, 224)
    """
    return 32 if arch.removesuffix(_DISTILLER_SUFFIX).endswith("_cifar") else 224


def check_arch(arch: str) -> None:
    """Reject an unknown ``--arch`` (with close names) before any data is read."""
    if arch.removesuffix(_DISTILLER_SUFFIX) not in model_names():
        get_model(arch)  # raises the error with the close names


def _argument_type(name: str, convert: type, accepts: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require ``accepts(value)``, else say ``rule``."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{value} {rule}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse type: {kind}, which {rule}."
    return parse


positive_int = _argument_type("positive_int", int, lambda v: v >= 1, "must be at least 1")
non_negative_int = _argument_type("non_negative_int", int, lambda v: v >= 0, "must be 0 or more")
positive_float = _argument_type("positive_float", float, lambda v: math.isfinite(v) and v > 0,
                                "must be a positive number")
fraction = _argument_type("fraction", float, lambda v: 0 <= v < 1, "must be >= 0 and < 1")


def one_line_warnings(prog: str, stream: TextIO | None = None) -> None:
    """Show warnings as ``prog: warning: message`` (call inside ``warnings.catch_warnings()``)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=stream or sys.stderr)

    warnings.showwarning = show


# --- the command line --------------------------------------------------------------------------


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
    parser.add_argument("--input-size", type=positive_int, default=None,
                        help="image side in pixels (default: 32 for digits and CIFAR-10, 224 for ImageFolder)")
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

    >>> from branchify.train import parse_args
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

    >>> from branchify.train import exit_spec_from_args, parse_args
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
    spec = ExitSpec.from_distiller_args(layers, args.earlyexit_thresholds, args.earlyexit_lossweights,
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


# --- training and validation -------------------------------------------------------------------


@dataclass(frozen=True)
class EpochLog:
    """One training epoch, as Distiller logged it.

    ``loss``: the mean training loss per sample; ``accuracy[i]``: exit ``i``'s top-k accuracy (0-100)
    if every sample left there (the final exit last); ``lr``; ``batch_time``: mean seconds per step.

    >>> from branchify.train import EpochLog
    >>> log = EpochLog(0, 2, 2, 64, 1.5, [{"top1": 50.0, "top5": 90.0}, {"top1": 60.0, "top5": 95.0}], 0.1, 0.25)
    >>> print(log.line())
    Epoch: [0][    2/    2]    Overall Loss 1.500000    Objective Loss 1.500000    Top1_exit0 50.000000    \
Top5_exit0 90.000000    Top1_exit1 60.000000    Top5_exit1 95.000000    LR 0.100000    Time 0.250000
    """

    epoch: int
    step: int
    steps: int
    samples: int
    loss: float
    accuracy: list[dict[str, float]]
    lr: float
    batch_time: float

    def columns(self) -> dict[str, float]:
        """Distiller's columns in its order: losses, Top1/Top5 per exit, LR, Time.

        Without a regularizer (branchify adds none) Distiller's overall and objective losses are equal.
        """
        columns = {"Overall Loss": self.loss, "Objective Loss": self.loss}
        for i, accuracy in enumerate(self.accuracy):
            for key, value in accuracy.items():
                columns[f"{key.capitalize()}_exit{i}"] = value
        columns["LR"] = self.lr
        columns["Time"] = self.batch_time
        return columns

    def line(self) -> str:
        """The line Distiller's Python logger printed for these figures."""
        head = f"Epoch: [{self.epoch}][{self.step:5d}/{self.steps:5d}]    "
        return head + "    ".join(f"{name} {value:.6f}" for name, value in self.columns().items())


def _disable(progress: bool | None) -> bool | None:
    # tqdm's disable=None turns the bar off when the output is not a terminal
    return None if progress is None else not progress


def _detached(outputs: Sequence) -> tuple:
    *exits, final = outputs
    return (*(z.detach() for z in exits), final_logits(final).detach())


def train_epoch(module: nn.Module, loader: Iterable, loss_fn: EarlyExitLoss, optimizer: torch.optim.Optimizer, *,
                epoch: int, epochs: int, device: torch.device | str = "cpu", print_freq: int | None = None,
                progress: bool | None = None) -> EpochLog:
    """Train ``module`` (from ``bx.attach_exits``) for one pass over ``loader``; return Distiller's figures.

    Each step runs every exit, takes ``loss_fn`` (``bx.EarlyExitLoss``) and an optimizer step; every
    exit's top-1/top-5 is measured on every sample (``ExitStats`` in forced mode). With
    ``print_freq`` the line is also printed every ``print_freq`` steps. ``progress=None`` shows a
    tqdm bar on terminals only.
    """
    stats = ExitStats(module.exit_spec, mode="forced")
    module.train()
    steps = len(loader)  # type: ignore[arg-type]
    total, samples, start = 0.0, 0, time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])

    def log(step: int) -> EpochLog:
        rows = stats.summary().exits
        return EpochLog(epoch=epoch, step=step, steps=steps, samples=samples, loss=total / samples,
                        accuracy=[dict(row.accuracy or {}) for row in rows], lr=lr,
                        batch_time=(time.perf_counter() - start) / step)

    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=_disable(progress), leave=False)
    step = 0
    for step, (inputs, target) in enumerate(bar, start=1):
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        outputs = module(inputs)
        loss = loss_fn(outputs, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            stats.update(_detached(outputs), target)
        total += float(loss.detach()) * len(target)
        samples += len(target)
        if print_freq and step % print_freq == 0 and step < steps:
            tqdm.write(log(step).line())
    if not step:
        raise BranchifyError("the training loader yielded no batches; give a dataset with training samples")
    return log(step)


def evaluate(module: nn.Module, loader: Iterable, *, spec: ExitSpec | None = None, costs: ExitCosts | None = None,
             device: torch.device | str = "cpu", progress: bool | None = None) -> ExitStats:
    """Statistics of ``module`` over ``loader``: routed when the spec has thresholds, else forced.

    ``spec`` defaults to ``module.exit_spec`` (pass another one, e.g. with other thresholds, to
    route by it); ``costs`` (``bx.exit_costs``) adds the MAC lines to the report.
    """
    spec = module.exit_spec if spec is None else spec
    stats = ExitStats(spec, mode="routed" if spec.thresholds is not None else "forced", costs=costs)
    module.eval()
    with torch.no_grad():
        for inputs, target in tqdm(loader, desc="validate", disable=_disable(progress), leave=False):
            stats.update(module(inputs.to(device, non_blocking=True)), target.to(device, non_blocking=True))
    return stats


def describe_exits(module: nn.Module) -> list[str]:
    """One line per exit: where it reads, the activation's shape, and the inferred head size."""
    lines = []
    for i, (info, head) in enumerate(zip(module.exit_points, module.exit_heads)):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        size = f", Linear({linears[-1].in_features}, {linears[-1].out_features})" if linears else ""
        shape = "x".join(map(str, info.shape))
        kind = module.exit_spec.exits[i].head.kind
        lines.append(f"exit {i}: after {info.name} ({shape}, reached at {info.macs_fraction:.1%} of the model's MACs), "
                     f"{kind} head{size}")
    lines.append(f"exit {len(module.exit_points)}: the model's own classifier")
    return lines


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run(args: argparse.Namespace) -> Path:
    """Train and report as the parsed flags say; returns the run's folder."""
    spec = exit_spec_from_args(args)  # first: wrong counts must fail before any data is read
    dataset = _dataset(args)
    device = resolve_device(args.device)
    workers = _workers(args.workers)
    out = Path(args.out_dir).expanduser() / (args.name or args.arch)

    from .data import make_loaders  # scikit-learn and torchvision's datasets only load when a run starts

    torch.manual_seed(args.seed)
    loaders = make_loaders(dataset, args.batch_size, workers, args.seed, size=args.input_size,
                           val_fraction=args.validation_size)
    train_loader = limit_batches(loaders.train, args.limit_batches)
    val_loader = limit_batches(loaders.val, args.limit_batches)
    print(f"Dataset sizes: training={len(loaders.train.dataset)} validation={len(loaders.val.dataset)} "
          f"test={len(loaders.test.dataset)} ({loaders.num_classes} classes)")

    example = loaders.val.dataset[0][0].unsqueeze(0)
    model = get_model(args.arch, loaders.num_classes)
    module = attach_exits(model, spec, example)
    costs = exit_costs(module, example)
    print(f"{args.arch} at {'x'.join(map(str, example.shape[1:]))}, criterion {spec.criterion!r}:")
    for line in describe_exits(module):
        print(f"  {line}")

    module.to(device)
    loss_fn = EarlyExitLoss(module.exit_spec)
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    used = min(len(loaders.train.dataset), len(train_loader) * args.batch_size)  # type: ignore[arg-type]
    print(f"Training epoch: {used} samples ({args.batch_size} per mini-batch), loss weights "
          f"{loss_fn.weights} + final {loss_fn.final_weight:g}, SGD lr={args.lr:g} momentum={args.momentum:g} "
          f"weight_decay={args.weight_decay:g}")
    history = []
    for epoch in range(args.epochs):
        log = train_epoch(module, train_loader, loss_fn, optimizer, epoch=epoch, epochs=args.epochs, device=device,
                          print_freq=args.print_freq)
        print(log.line(), flush=True)
        history.append(log)

    stats = evaluate(module, val_loader, costs=costs, device=device)
    summary = stats.summary()
    print("--- validate ---------------------")
    print(f"{summary.samples} samples ({args.batch_size} per mini-batch)")
    if stats.mode == "forced":
        print("No --earlyexit_thresholds, so no routing: each exit is judged on every sample. Give thresholds (or "
              "calibrate them with bx.calibrate) for Distiller's routed report.")
    stats.report()

    checkpoint = save(module, out / CHECKPOINT)
    (out / SPEC).write_text(module.exit_spec.model_dump_json(indent=2) + "\n")
    record = {
        "arch": args.arch,
        "dataset": dataset,
        "num_classes": loaders.num_classes,
        "input_size": list(example.shape[1:]),
        "args": vars(args),
        "training": [dataclasses.asdict(log) for log in history],
        "validation": summary.to_dict(),
        "files": {"checkpoint": CHECKPOINT, "spec": SPEC},
    }
    (out / SUMMARY).write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    print(f"Saved {checkpoint}, {out / SPEC} and {out / SUMMARY}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``branchify-train`` with ``argv`` (default: the command line); returns the exit status.

    User errors print one line on stderr and return 2, as argparse does for bad flags.
    """
    args = parse_args(argv)
    return run_command(PROG, PROG, lambda: run(args))


def run_command(prog: str, where: str, command: Callable[[], object]) -> int:
    """Run ``command()`` for program ``prog`` with one-line warnings; return its exit status.

    A user error (``BranchifyError``, pydantic's ``ValidationError``) prints ``where: error: ...``
    on one line of stderr and gives 2, as argparse does for bad flags; success gives 0.
    """
    with warnings.catch_warnings():
        one_line_warnings(prog)
        try:
            command()
        except (BranchifyError, pydantic.ValidationError) as err:
            print(f"{where}: error: {error_line(err)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
