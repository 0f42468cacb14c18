"""Exit criteria: per-sample scores computed from one exit's logits, and the rule that fires an exit.

A criterion maps logits ``(B, C)`` to scores ``(B,)``; a sample leaves when its score is strictly
below the threshold (``exits_when="below"``) or at least the threshold (``"above"``). A NaN score
never fires. Each criterion declares the range its scores lie in (``low``, ``high``; entropy's upper
end is ``log C``, known once the number of classes ``C`` is), so that calibration can place
thresholds without sentinel values, whatever the sign of the scores, and a threshold outside the
range on the side where the exit can never fire is refused (past the other end every sample leaves,
which stays allowed).

``"patience"`` (PABEE, Zhou et al. 2020) looks across exits: its score at an exit is the number of
consecutive judged exits, ending there, that predict the same class; with threshold ``t`` it fires
when exit ``i`` and the ``t - 1`` judged exits before it agree. ``branchify.routing`` carries that
count from exit to exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import _registry
from ._rows import by_rows
from .errors import BranchifyError

__all__ = ["Criterion", "get_criterion", "register_criterion", "registered_criteria"]

ScoreFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A named exit rule. ``needs_labels`` marks rules that read the target (not deployable)."""

    name: str
    score_fn: ScoreFn | None
    exits_when: Literal["below", "above"]
    needs_labels: bool = False
    low: float = -math.inf
    high: float = math.inf
    across_exits: bool = False  # the score depends on the exits before (patience), not on one exit's logits
    high_of_classes: Callable[[int], float] | None = None  # the upper end when it depends on the class count
    # The score of a batch of one sample as a Python float, the value ``score_fn(logits).item()`` gives, and of a
    # float32 score (the built-in label-free criteria: the runner's batch-1 path, ``ExitRule.fires_one``).
    one: Callable[[torch.Tensor], float] | None = None

    def score_range(self, classes: int | None = None) -> tuple[float, float]:
        """The range of the scores, ``(low, high)``; with ``classes``, the range for that many classes.

        >>> get_criterion("entropy").score_range(4)
        (0.0, 1.3862943611198906)
        """
        if classes is None or self.high_of_classes is None:
            return self.low, self.high
        return self.low, min(self.high, float(self.high_of_classes(int(classes))))

    def score(self, logits: torch.Tensor, target: torch.Tensor | None = None,
              temperature: float = 1.0) -> torch.Tensor:
        """Per-sample scores of ``logits`` (after dividing by ``temperature``).

        Large CPU batches are scored a block of rows at a time (``branchify._rows``), so score
        functions must be per-sample: a row's score may depend on that row alone.
        """
        if self.across_exits:
            raise BranchifyError(
                f"criterion {self.name!r} scores a sample across exits (its score is a run of agreeing exits), so one "
                "exit's logits do not give it; route with branchify.routing, which carries the run from exit to exit")
        if self.needs_labels and target is None:
            raise BranchifyError(
                f"criterion {self.name!r} reads the labels, but no target was given; pass the "
                "target, or use a label-free criterion such as 'entropy' or 'confidence'")

        if temperature == 1.0 and not self.needs_labels:  # the runner's common case, without a closure per call
            return by_rows(self.score_fn, logits)

        def scores(z: torch.Tensor, *label: torch.Tensor) -> torch.Tensor:
            return self.score_fn(z if temperature == 1.0 else z / temperature, *label)

        return by_rows(scores, logits, target) if self.needs_labels else by_rows(scores, logits)

    def fires(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Boolean mask of samples that leave; NaN scores never leave (every comparison with NaN is false)."""
        return scores < threshold if self.exits_when == "below" else scores >= threshold

    def check_threshold(self, threshold: float, where: str = "", classes: int | None = None) -> None:
        """Refuse a threshold this criterion cannot use: patience counts exits (a positive integer); any other
        must lie in the score range (``score_range(classes)``; without ``classes``, the part of it that does
        not depend on them), where it decides between samples.

        Refused: a threshold at which the exit can never fire (below ``low`` for an exit that fires below
        ``t``, past ``high`` for one that fires at or above it), since no sample can reach it. Accepted: the
        edges (``threshold=0.0`` with entropy judges the exit and lets no sample out), and thresholds past the
        other end, where every sample leaves: a documented way to send the whole batch out at one exit, and
        what Distiller's command lines write for an exit that always fires (an entropy threshold above
        ``log C``).

        >>> try:
        ...     get_criterion("confidence").check_threshold(1.5)
        ... except BranchifyError as err:
        ...     print(str(err)[:79])
        criterion 'confidence' scores lie in [0, 1], so at threshold 1.5 the exit never
        >>> get_criterion("entropy").check_threshold(3.0, classes=10)  # above log 10: every sample leaves
        """
        if self.across_exits:
            if not (float(threshold).is_integer() and threshold >= 1):
                raise BranchifyError(
                    f"{where}criterion {self.name!r} takes a positive integer threshold (how many consecutive exits "
                    f"must agree), got {threshold!r}; use e.g. threshold=2")
            return
        low, high = self.score_range(classes)
        t = float(threshold)
        slack = 1e-6 * max(1.0, abs(high)) if math.isfinite(high) else 0.0
        if self.exits_when == "below":
            never, rule = t < low, "below"
        else:
            never, rule = t > high + slack, ">="
        if not never:
            return
        of = f" for {classes} classes" if classes is not None and self.high_of_classes is not None else ""
        span = f"[{low:g}, {high:g}]"
        raise BranchifyError(
            f"{where}criterion {self.name!r} scores lie in {span}{of}, so at threshold {threshold!r} the exit never "
            f"fires (it fires when the score is {rule} the threshold); give a threshold in {span}, or let bx.calibrate "
            "choose it")


def _float(logits: torch.Tensor) -> torch.Tensor:
    """``logits.float()``, without a dispatch when they already are float32 (the same tensor either way)."""
    return logits if logits.dtype is torch.float32 else logits.float()


def _negated_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(_float(logits), dim=-1)
    probs = logp.exp()
    # in place unless autograd needs exp's output: one temporary fewer keeps a block of rows in the cache
    terms = probs * logp if probs.requires_grad else probs.mul_(logp)
    return terms.sum(dim=-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return -_negated_entropy(logits)


def _entropy_one(logits: torch.Tensor) -> float:
    # Negated in Python after the read-back: negation is exact, so the value is ``_entropy``'s, one operation
    # fewer. (``linalg.vecdot`` for the multiply and sum, one Python call fewer, is slower at batch 1 in place.)
    return -_negated_entropy(logits).item()


def _confidence(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(_float(logits), dim=-1).amax(dim=-1)


def _margin(logits: torch.Tensor) -> torch.Tensor:
    probs = F.softmax(_float(logits), dim=-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _confidence_one(logits: torch.Tensor) -> float:
    return _confidence(logits).item()


def _margin_one(logits: torch.Tensor) -> float:
    return _margin(logits).item()


def _distiller(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="none")


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, score_fn: ScoreFn, exits_when: Literal["below", "above"] = "below", *,
                       low: float = -math.inf, high: float = math.inf,
                       high_of_classes: Callable[[int], float] | None = None, replace: bool = False) -> Criterion:
    """Register a label-free exit criterion under ``name``.

    ``score_fn(logits) -> scores`` maps ``(B, C)`` logits to ``(B,)`` scores, which lie in
    ``[low, high]`` (default: any real number; calibration refuses scores outside the range, specs a
    threshold outside it); ``high_of_classes(C)``, when given, narrows the upper end once the number of
    classes is known (entropy's is ``math.log``). A registered name can then be used in
    ``ExitSpec(criterion=...)`` or per exit; registering a taken name again needs ``replace=True``.

    >>> import torch, branchify as bx
    >>> crit = bx.register_criterion("top_logit_example", lambda z: z.amax(dim=-1), exits_when="above")
    >>> crit.fires(crit.score(torch.tensor([[3.0, 0.0], [0.1, 0.2]])), 1.0).tolist()
    [True, False]
    """
    if not isinstance(name, str) or not name:
        raise BranchifyError(f"criterion name must be a non-empty string, got {name!r}")
    if exits_when not in ("below", "above"):
        raise BranchifyError(f"exits_when must be 'below' or 'above', got {exits_when!r}")
    if not callable(score_fn):
        raise BranchifyError(f"score_fn for criterion {name!r} must be callable, got {score_fn!r}")
    if name in _BUILTIN:
        raise BranchifyError(f"criterion {name!r} is built in and cannot be replaced; choose another name")
    if isinstance(low, bool) or isinstance(high, bool) or not (isinstance(low, (int, float))
                                                               and isinstance(high, (int, float)) and low < high):
        raise BranchifyError(f"criterion {name!r}: the score range needs low < high, got low={low!r}, high={high!r}")
    if high_of_classes is not None and not callable(high_of_classes):
        raise BranchifyError(f"high_of_classes for criterion {name!r} must be callable (classes -> upper end), "
                             f"got {high_of_classes!r}")
    crit = Criterion(name, score_fn, exits_when, low=float(low), high=float(high), high_of_classes=high_of_classes)
    return _registry.add(_REGISTRY, name, crit, what="criterion", builtin=_BUILTIN, replace=replace)


def registered_criteria() -> list[str]:
    """Names usable as a criterion."""
    return sorted(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; unknown names list the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BranchifyError(
            f"unknown criterion {name!r}; registered: {registered_criteria()}. "
            "Register your own with bx.register_criterion(name, score_fn, exits_when=...)") from None


_BUILTIN = {
    "entropy": Criterion("entropy", _entropy, "below", low=0.0, high_of_classes=math.log, one=_entropy_one),
    "confidence": Criterion("confidence", _confidence, "above", low=0.0, high=1.0, one=_confidence_one),
    "margin": Criterion("margin", _margin, "above", low=0.0, high=1.0, one=_margin_one),
    "distiller": Criterion("distiller", _distiller, "below", needs_labels=True, low=0.0),
    "patience": Criterion("patience", None, "above", low=1.0, across_exits=True),
}
_REGISTRY.update(_BUILTIN)
