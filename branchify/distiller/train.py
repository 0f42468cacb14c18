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

>>> from branchify.distiller.flags import parse_args
>>> args = parse_args(["--arch=resnet32_cifar_earlyexit", "--earlyexit_lossweights", "0.4", "digits"])
>>> args.arch, args.earlyexit_lossweights, args.criterion
('resnet32_cifar_earlyexit', [0.4], 'entropy')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .._outputs import final_logits
from ..checkpoint import save
from ..commands.common import limit_batches, resolve_device, run_command
from ..cost import ExitCosts, exit_costs
from ..errors import BranchifyError
from ..loss import EarlyExitLoss
from ..spec import ExitSpec
from ..stats import ExitStats
from ..surgery import attach_exits
from .flags import CHECKPOINT, PROG, SPEC, SUMMARY, _dataset, _workers, exit_spec_from_args, parse_args
from .models import get_model

__all__ = ["EpochLog", "evaluate", "main", "run", "train_epoch"]


# --- training and validation -------------------------------------------------------------------


@dataclass(frozen=True)
class EpochLog:
    """One training epoch, as Distiller logged it.

    ``loss``: the mean training loss per sample; ``accuracy[i]``: exit ``i``'s top-k accuracy (0-100)
    if every sample left there (the final exit last); ``lr``; ``batch_time``: mean seconds per step.

    >>> from branchify.distiller.train import EpochLog
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


if __name__ == "__main__":
    sys.exit(main())
