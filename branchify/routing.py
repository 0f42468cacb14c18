"""The routing rule, in one place: a sample leaves at the first exit whose criterion fires.

Statistics, the runtime (both capture paths), calibration and the sweep all decide with it: an
``ExitRule`` per exit says which samples that exit lets out, and ``first_exit`` turns the per-exit
decisions into the exit each sample takes (``k``, the final exit, when none fires).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .criteria import Criterion, get_criterion
from .errors import BranchifyError

__all__ = ["ExitRule", "exit_rules", "first_exit", "route"]


@dataclass(frozen=True)
class ExitRule:
    """One exit's decision: its criterion, threshold and temperature."""

    criterion: Criterion
    threshold: float
    temperature: float

    def fires(self, logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the samples this exit lets out, judged on its ``logits``."""
        return self.criterion.fires(self.criterion.score(logits, target, self.temperature), self.threshold)


def exit_rules(spec, *, deployed: bool = False) -> list[ExitRule]:
    """The rules of every exit of ``spec``; ``deployed=True`` refuses criteria that read labels."""
    thresholds = spec.thresholds
    if thresholds is None:
        raise BranchifyError(
            "the spec has no thresholds, so no sample can be routed to an exit; give every ExitPoint a threshold, "
            "or calibrate them with bx.calibrate(module, loader, max_accuracy_drop=0.01)")
    rules = []
    for i, point in enumerate(spec.exits):
        criterion = get_criterion(spec.criterion_of(i))
        if deployed and criterion.needs_labels:
            raise BranchifyError(
                f"exit {i} ({point.layer!r}) uses criterion {criterion.name!r}, which reads the labels (its score is "
                "the loss against the target), and there are no labels at inference; use a label-free criterion "
                "such as 'entropy' or 'confidence' (bx.calibrate can set its thresholds)")
        rules.append(ExitRule(criterion, thresholds[i], point.temperature))
    return rules


def first_exit(fired: Sequence[torch.Tensor]) -> torch.Tensor:
    """The exit each sample takes given each exit's boolean decisions: the first that fires, else ``k``.

    >>> first_exit([torch.tensor([True, False, False]), torch.tensor([True, True, False])]).tolist()
    [0, 1, 2]
    """
    k = len(fired)
    taken = torch.full(fired[0].shape, k, dtype=torch.int64, device=fired[0].device)
    for i in reversed(range(k)):  # the earliest firing exit wins, so it is written last
        taken = torch.where(fired[i], i, taken)
    return taken


def route(spec, exit_logits: Sequence[torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
    """The exit each sample takes, from every exit's logits (vectorised over the batch; int64, ``(B,)``).

    >>> import torch, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.1)])
    >>> route(spec, [torch.tensor([[9.0, 0.0], [0.0, 0.0]])]).tolist()
    [0, 1]
    """
    rules = exit_rules(spec)
    if len(exit_logits) != len(rules):
        raise BranchifyError(f"{len(exit_logits)} exit outputs for a spec with {len(rules)} exits")
    return first_exit([rule.fires(z, target) for rule, z in zip(rules, exit_logits)])
