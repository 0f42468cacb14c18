"""Distiller's early-exit trainer on an unmodified model: the ``branchify-train`` command.

Distiller trained hand-edited ``*_earlyexit`` copies of its models with ``compress_classifier.py``.
This trainer takes the same command line (``--arch``, ``--epochs``, ``-b``, ``--lr``, ``-j``,
``--out-dir``, ``-n``, ``--earlyexit_thresholds``, ``--earlyexit_lossweights`` and the dataset
directory), attaches the exits to the plain model where Distiller had them (or at ``--exit-layers``),
trains with Distiller's loss and SGD (through ``bx.fit``), prints Distiller's training columns per epoch and its
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import save
from ..commands.common import limit_batches, resolve_device, run_command
from ..cost import ExitCosts, exit_costs
from ..loss import EarlyExitLoss
from ..spec import ExitSpec
from ..stats import ExitStats
from ..surgery import attach_exits
from ..training import FitEpoch, FitStep, fit
from .flags import CHECKPOINT, PROG, SPEC, SUMMARY, _dataset, _workers, exit_spec_from_args, parse_args
from .models import get_model

__all__ = ["EpochLog", "evaluate", "main", "run"]


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


class _DistillerLog:
    """Distiller's training figures, gathered from ``bx.fit``'s steps: the ``on_step`` hook of ``run``.

    Per epoch: the mean loss per sample, every exit's top-1/top-5 on the training batches (``ExitStats``
    in forced mode, on the outputs each step computed), the learning rate of the first step and the
    mean seconds per step. With ``print_freq`` the line is also printed every ``print_freq`` steps.
    """

    def __init__(self, spec: ExitSpec, *, print_freq: int | None = None) -> None:
        self.spec = spec
        self.print_freq = print_freq
        self.history: list[EpochLog] = []

    def step(self, step: FitStep) -> None:
        if step.step == 1:
            self._stats = ExitStats(self.spec, mode="forced")
            self._total, self._samples, self._lr = 0.0, 0, step.lr
        self._stats.update(step.outputs, step.target)
        self._total += float(step.loss) * len(step.target)
        self._samples += len(step.target)
        self._last = step
        if self.print_freq and step.step % self.print_freq == 0 and (step.steps is None or step.step < step.steps):
            tqdm.write(self.log().line())

    def log(self) -> EpochLog:
        """The figures so far in the current epoch."""
        step = self._last
        rows = self._stats.summary().exits
        return EpochLog(epoch=step.epoch, step=step.step, steps=step.steps or step.step, samples=self._samples,
                        loss=self._total / self._samples, accuracy=[dict(row.accuracy or {}) for row in rows],
                        lr=self._lr, batch_time=step.seconds / step.step)

    def epoch_end(self, epoch: FitEpoch) -> None:
        log = self.log()
        print(log.line(), flush=True)
        self.history.append(log)


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
    log = _DistillerLog(module.exit_spec, print_freq=args.print_freq)
    fit(module, train_loader, epochs=args.epochs, loss=loss_fn, optimizer=optimizer, on_step=log.step,
        on_epoch_end=log.epoch_end, progress=sys.stderr.isatty())

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
        "training": [dataclasses.asdict(epoch) for epoch in log.history],
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
