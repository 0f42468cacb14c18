"""The training loss of an early-exit model: a weighted sum over the exits, with optional self-distillation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._outputs import split_outputs
from .errors import BranchifyError
from .exits import Exits
from .spec import ExitSpec

__all__ = ["EarlyExitLoss"]

BaseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EarlyExitLoss(nn.Module):
    """Distiller's early-exit loss ``sum_i w_i * CE(exit_i, y) + (1 - sum_i w_i) * CE(final, y)``.

    ``weights`` are the early exits' weights (in the order of ``module.exit_spec``); without them
    the spec's ``ExitPoint.weight`` values are used. ``base_loss(logits, target)`` replaces the
    per-exit cross-entropy; ``label_smoothing`` is passed to the default cross-entropy.

    With ``distill_alpha > 0`` every early exit also learns from the final exit (self-distillation,
    as in Zero Time Waste and FastBERT): exit ``i``'s term becomes
    ``(1 - alpha) * CE(exit_i, y) + alpha * T**2 * KL(softmax(final / T) || softmax(exit_i / T))``
    with ``T = distill_temperature``. The final exit's softmax is detached, so distillation never
    pulls the final classifier towards its own students.

    Calling it returns the total; with ``return_terms=True`` it returns ``(total, terms)`` where
    ``terms`` maps ``"exit_0"``, ..., ``"final"`` (and ``"distill_0"``, ... when distilling) to
    the unweighted, detached per-term losses.

    >>> import torch, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", weight=0.3)])
    >>> loss_fn = bx.EarlyExitLoss(spec)
    >>> outputs = (torch.zeros(4, 10), torch.zeros(4, 10))
    >>> total, terms = loss_fn(outputs, torch.tensor([0, 1, 2, 3]), return_terms=True)
    >>> round(total.item(), 4), sorted(terms), round(terms["final"].item(), 4)
    (2.3026, ['exit_0', 'final'], 2.3026)
    """

    def __init__(self, spec: ExitSpec, *, weights: Sequence[float] | None = None, base_loss: BaseLoss | None = None,
                 label_smoothing: float = 0.0, distill_alpha: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        if not isinstance(spec, ExitSpec):
            made = isinstance(spec, Exits)
            hint = " (for a module made by bx.attach_exits, pass module.exit_spec)" if made else ""
            raise BranchifyError(f"EarlyExitLoss needs a bx.ExitSpec, got {type(spec).__name__}{hint}")
        self.num_exits = len(spec.exits)
        self.weights = _weights(spec, weights)
        self.final_weight = 1.0 - math.fsum(self.weights)
        if not 0.0 <= label_smoothing <= 1.0:
            raise BranchifyError(f"label_smoothing={label_smoothing!r} must be in [0, 1], e.g. 0.1")
        if base_loss is not None and label_smoothing:
            raise BranchifyError(
                f"label_smoothing={label_smoothing!r} only applies to the default cross-entropy, but a base_loss "
                "was given; build the smoothing into base_loss, e.g. nn.CrossEntropyLoss(label_smoothing=0.1)")
        if base_loss is not None and not callable(base_loss):
            raise BranchifyError(f"base_loss must be callable as base_loss(logits, target), got {base_loss!r}")
        if not 0.0 <= distill_alpha <= 1.0:
            raise BranchifyError(
                f"distill_alpha={distill_alpha!r} must be in [0, 1]: the share of each early exit's loss that "
                "comes from distillation (0 turns it off)")
        if not (math.isfinite(distill_temperature) and distill_temperature > 0):
            raise BranchifyError(f"distill_temperature={distill_temperature!r} must be a positive number, e.g. 2.0")
        self.base_loss = base_loss if base_loss is not None else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._default_base = base_loss is None
        self.distill_alpha = float(distill_alpha)
        self.distill_temperature = float(distill_temperature)

    def forward(self, outputs: Sequence, target: torch.Tensor,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        exits, final = split_outputs(outputs, self.num_exits)
        target = _checked_target(target, final, self._default_base)
        terms = {f"exit_{i}": self.base_loss(logits, target) for i, logits in enumerate(exits)}
        terms["final"] = self.base_loss(final, target)
        alpha, temp = self.distill_alpha, self.distill_temperature
        total = self.final_weight * terms["final"]
        if alpha:
            teacher = F.log_softmax(final.detach() / temp, dim=-1)
            for i, logits in enumerate(exits):
                student = F.log_softmax(logits / temp, dim=-1)
                # T**2 keeps the gradient scale independent of T (Hinton et al.)
                terms[f"distill_{i}"] = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temp**2
        for i, weight in enumerate(self.weights):
            term = terms[f"exit_{i}"]
            if alpha:
                term = (1.0 - alpha) * term + alpha * terms[f"distill_{i}"]
            total = total + weight * term
        if return_terms:
            return total, {name: value.detach() for name, value in terms.items()}
        return total

    def extra_repr(self) -> str:
        text = f"weights={self.weights}, final_weight={self.final_weight:g}"
        if self.distill_alpha:
            text += f", distill_alpha={self.distill_alpha:g}, distill_temperature={self.distill_temperature:g}"
        return text


def _weights(spec: ExitSpec, weights: Sequence[float] | None) -> list[float]:
    k = len(spec.exits)
    if weights is None:
        if spec.weights is None:
            raise BranchifyError(
                f"no loss weights: the spec's {k} exit(s) have no weight and none were passed; give every "
                "ExitPoint a weight (spec.with_exits(weight=[...])) or pass EarlyExitLoss(spec, weights=[...]) "
                f"with {k} value(s) summing to less than 1")
        return list(spec.weights)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise BranchifyError(f"weights must be a sequence of {k} number(s), one per early exit, got {weights!r}")
    values = list(weights)
    if len(values) != k:
        raise BranchifyError(
            f"{len(values)} loss weight(s) {values} for {k} early exit(s) {spec.layers}; give exactly one weight "
            "per early exit (the final exit takes 1 - sum)")
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise BranchifyError(f"loss weight {w!r} of exit {i} ({spec.layers[i]!r}) must be a finite number >= 0")
    if not math.fsum(values) < 1:
        raise BranchifyError(
            f"loss weights {values} sum to {math.fsum(values):g}; the sum must be < 1 because the final exit "
            "gets 1 - sum. Lower the weights")
    return [float(w) for w in values]


def _checked_target(target, final: torch.Tensor, strict: bool) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise BranchifyError(f"target must be a tensor of class indices, got {type(target).__name__}")
    batch = final.shape[0]
    if target.ndim == 0 or target.shape[0] != batch:
        raise BranchifyError(
            f"target has shape {tuple(target.shape)} but the outputs have a batch of {batch}; pass one label "
            "per sample")
    if not strict:
        return target
    if target.is_floating_point():
        if tuple(target.shape) != tuple(final.shape):
            raise BranchifyError(
                f"a floating-point target is read as class probabilities and must be shaped like the logits "
                f"{tuple(final.shape)}, got {tuple(target.shape)}; for class indices pass an int64 tensor of "
                f"shape ({batch},)")
        return target
    if target.dtype == torch.bool or target.is_complex() or target.ndim != 1:
        raise BranchifyError(
            f"target has dtype {target.dtype} and shape {tuple(target.shape)}; pass class indices (int64, "
            f"shape ({batch},)) or class probabilities (float, shape {tuple(final.shape)})")
    return target.long()  # cross_entropy takes int64 indices only
