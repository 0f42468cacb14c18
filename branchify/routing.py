"""The routing rule, in one place: a sample leaves at the first exit whose criterion fires.

Statistics, the runtime (both capture paths), calibration and the sweep all decide with it. Each exit
has an ``ExitRule``, or None when the exit is off (its threshold is unset while others are set): an
off exit is never judged, so its head need not run. ``Judge`` walks the exits in order for a batch,
carrying what a criterion across exits needs (``"patience"``: each sample's run of agreeing exits),
and ``first_exit`` turns per-exit decisions into the exit each sample takes (``k``, the final exit,
when none fires).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .criteria import Criterion, get_criterion
from .errors import BranchifyError

__all__ = ["ExitRule", "Judge", "agreeing_run", "exit_rules", "first_exit", "route"]


@dataclass(frozen=True)
class ExitRule:
    """One exit's decision: its criterion, threshold and temperature."""

    criterion: Criterion
    threshold: float
    temperature: float
    # The threshold per (dtype, device) of float32/float64 scores, as a 0-dim tensor and as the Python float of
    # that tensor's value: comparing with the tensor gives the same mask as with the float (which the comparison
    # rounds to the scores' dtype, as torch.tensor does), without wrapping a Python scalar into a tensor on every
    # call (a few microseconds per exit at small batches); comparing one score read back as a Python float with
    # the rounded float gives the same decision (both values are exact in the scores' dtype).
    _as_tensor: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    # The threshold rounded to float32, for criteria that read one sample's float32 score back (``Criterion.one``).
    _float32: float = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_float32", _rounded(float(self.threshold), torch.float32))

    def fires(self, logits: torch.Tensor, target: torch.Tensor | None = None,
              streak: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the samples this exit lets out, judged on its ``logits`` (``streak``: the run of
        agreeing exits ending here, for a criterion across exits)."""
        if self.criterion.across_exits:
            if streak is None:
                raise BranchifyError(f"criterion {self.criterion.name!r} needs the exits before; route with Judge")
            return streak >= self.threshold
        scores = self.criterion.score(logits, target, self.temperature)
        return self.criterion.fires(scores, self._threshold_like(scores)[0])

    def fires_one(self, logits: torch.Tensor) -> bool:
        """``fires`` for the logits of one sample, as a bool: its score is read back once and compared in
        Python (the decision ``fires`` gives, without the tensor comparison; a NaN score never fires)."""
        criterion = self.criterion
        if criterion.one is not None:  # a float32 score, read back by the criterion itself
            score = criterion.one(logits if self.temperature == 1.0 else logits / self.temperature)
            return score < self._float32 if criterion.exits_when == "below" else score >= self._float32
        scores = criterion.score(logits, None, self.temperature)
        tensor, value = self._threshold_like(scores)
        if value is None:  # scores of another dtype: compared as tensors, which round the threshold to it
            return bool(self.criterion.fires(scores, tensor).item())
        return bool(self.criterion.fires(scores.item(), value))

    def _threshold_like(self, scores: torch.Tensor) -> tuple[torch.Tensor | float, float | None]:
        """The threshold to compare ``scores`` with, and its value rounded to their dtype (None but for
        float32 and float64 scores, when the threshold is the float itself)."""
        dtype = scores.dtype
        if dtype is not torch.float32 and dtype is not torch.float64:
            return self.threshold, None
        key = (dtype, scores.device)
        threshold = self._as_tensor.get(key)
        if threshold is None:
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                tensor = torch.tensor(self.threshold, dtype=dtype, device=scores.device)
            threshold = self._as_tensor[key] = (tensor, _rounded(self.threshold, dtype))
        return threshold


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 or float64 as ``torch.tensor(value, dtype=dtype)`` rounds it (to nearest, ties
    to even; past float32's range, infinity), without a tensor: reading one back would be a host sync."""
    if dtype is torch.float64:
        return value
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def exit_rules(spec, *, deployed: bool = False, classes: int | None = None) -> list[ExitRule | None]:
    """The rule of every exit of ``spec`` (None where the exit is off); ``deployed=True`` refuses criteria that
    read labels; with ``classes``, thresholds outside the score range for that many classes are refused. A spec
    without any threshold cannot route and is refused."""
    thresholds = [p.threshold for p in spec.exits]
    if all(t is None for t in thresholds):
        raise BranchifyError(
            "no exit of the spec has a threshold, so no sample can be routed to an exit; give the exits thresholds "
            "(an exit left without one is off), or calibrate them with "
            "bx.calibrate(module, loader, max_accuracy_drop=0.02) (which switches every exit off, and warns, when "
            "it cannot certify any: calibrate on more samples or loosen the target)")
    rules: list[ExitRule | None] = []
    for i, point in enumerate(spec.exits):
        if point.threshold is None:
            rules.append(None)
            continue
        criterion = get_criterion(spec.criterion_of(i))
        if deployed and criterion.needs_labels:
            raise BranchifyError(
                f"exit {i} ({point.layer!r}) uses criterion {criterion.name!r}, which reads the labels (its score is "
                "the loss against the target), and there are no labels at inference; use a label-free criterion "
                "such as 'entropy' or 'confidence' (bx.calibrate can set its thresholds)")
        if classes is not None:
            criterion.check_threshold(point.threshold, f"exit {i} ({point.layer!r}): ", classes)
        rules.append(ExitRule(criterion, float(point.threshold), point.temperature))
    return rules


def agreeing_run(prediction: torch.Tensor, previous: torch.Tensor | None = None,
                 run: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's run of consecutive judged exits predicting the same class, ending at the exit that predicts
    ``prediction`` (``previous`` and ``run``: the last judged exit's; None at the first judged exit).

    >>> agreeing_run(torch.tensor([3, 1]), torch.tensor([3, 2]), torch.tensor([2, 4])).tolist()
    [3, 1]
    """
    if previous is None:
        return torch.ones_like(prediction)
    return torch.where(prediction == previous, run + 1, 1)


class Judge:
    """Judges a batch exit by exit, in order; the per-sample memory across exits travels with it.

    ``judge.fires(i, logits)`` says which samples exit ``i`` lets out (exit ``i`` must be on); after
    some samples leave, ``judge.keep(index)`` keeps the memory of those that go on. Each exit's threshold is
    checked against the number of classes the first time it is judged; ``checked`` (the ``(exit, classes)``
    pairs already checked) lets a caller that judges many batches under the same ``rules`` check them once,
    not once per batch: it must belong to those rules (``fresh`` keeps it).
    """

    def __init__(self, rules: Sequence[ExitRule | None], target: torch.Tensor | None = None, *,
                 checked: set[tuple[int, int]] | None = None) -> None:
        self.rules = list(rules)
        self.target = target
        self._remembers = any(r is not None and r.criterion.across_exits for r in self.rules)
        self._prediction: torch.Tensor | None = None
        self._streak: torch.Tensor | None = None
        self._checked: set[tuple[int, int]] = set() if checked is None else checked

    def fresh(self) -> Judge:
        """A judge for the next batch under the same rules, sharing the thresholds checked: this one when it
        carries nothing from batch to batch (no criterion across exits, no target), so that a caller judging many
        batches (the runner) need not build one per batch."""
        if not self._remembers and self.target is None:
            return self
        return type(self)(self.rules, checked=self._checked)

    def fires(self, i: int, logits: torch.Tensor) -> torch.Tensor:
        rule = self._rule(i, logits)
        streak = None
        if self._remembers:
            prediction = logits.argmax(dim=-1)
            streak = agreeing_run(prediction, self._prediction, self._streak)
            self._prediction, self._streak = prediction, streak
        return rule.fires(logits, self.target, streak)

    def fires_one(self, i: int, logits: torch.Tensor) -> bool:
        """``fires`` for a batch of one sample, as a bool (the runner's batch-1 path: one read of the score, no
        mask); ``keep`` is never needed after it, since the sample either leaves or goes on."""
        if self._remembers or self.target is not None:
            return bool(self.fires(i, logits).item())
        return self._rule(i, logits).fires_one(logits)

    def _rule(self, i: int, logits: torch.Tensor) -> ExitRule:
        """Exit ``i``'s rule, its threshold checked against the number of classes of ``logits``."""
        rule = self.rules[i]
        if rule is None:
            raise BranchifyError(f"exit {i} is off (no threshold); it is never judged")
        classes = int(logits.shape[-1])
        if (i, classes) not in self._checked:  # a range that depends on the classes is known only now
            rule.criterion.check_threshold(rule.threshold, f"exit {i}: ", classes)
            self._checked.add((i, classes))
        return rule

    def keep(self, index: torch.Tensor) -> None:
        """Keep the memory of the samples at ``index`` (those that go on)."""
        if self._prediction is not None:
            self._prediction, self._streak = self._prediction[index], self._streak[index]
        if self.target is not None:
            self.target = self.target[index]


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
    rules = exit_rules(spec, classes=int(exit_logits[0].shape[-1]) if len(exit_logits) else None)
    if len(exit_logits) != len(rules):
        raise BranchifyError(f"{len(exit_logits)} exit outputs for a spec with {len(rules)} exits")
    return route_by(rules, exit_logits, target)


def route_by(rules: Sequence[ExitRule | None], exit_logits: Sequence[torch.Tensor],
             target: torch.Tensor | None = None) -> torch.Tensor:
    """``route`` under rules already made (``exit_rules``; None where an exit is off, so that with every exit
    off each sample goes to the end): for callers that route many batches under a few fixed rule sets.

    >>> import torch
    >>> route_by([None], [torch.tensor([[9.0, 0.0]])]).tolist()
    [1]
    """
    judge = Judge(rules, target)
    none = torch.zeros(exit_logits[0].shape[0], dtype=torch.bool, device=exit_logits[0].device)
    return first_exit([none if rule is None else judge.fires(i, z)
                       for i, (rule, z) in enumerate(zip(rules, exit_logits))])
