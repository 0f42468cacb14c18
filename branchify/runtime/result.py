"""What the runner returns for a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExitResult"]


@dataclass(frozen=True)
class ExitResult:
    """What the runner computed for a batch: logits, the exit each sample took, and what it cost.

    ``logits`` is ``(B, num_classes)``; ``exit_index`` is ``(B,)`` int64, ``k`` for samples that no
    early exit took (``k`` early exits); ``macs`` is ``(B,)`` float64, each sample's multiply-accumulates
    as ``bx.exit_costs`` counts them for its exit.

    >>> import torch, branchify as bx
    >>> result = bx.ExitResult(torch.zeros(2, 10), torch.tensor([0, 1]), torch.tensor([1e6, 2e6]))
    >>> result.exit_index.bincount(minlength=2).tolist()
    [1, 1]
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    macs: torch.Tensor
