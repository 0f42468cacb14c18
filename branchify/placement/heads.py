"""Training every candidate's head at once on a frozen backbone: one backbone forward per batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..training import fit

__all__ = ["train_heads"]


def train_heads(module: nn.Module, loader: Iterable, *, epochs: int, lr: float, progress: bool = True) -> list[float]:
    """Train every exit head of ``module`` on a frozen backbone with Adam at ``lr``; returns the mean loss per
    sample of each epoch (the heads' cross-entropies summed).

    This is ``bx.fit(mode="heads")``: the backbone runs in eval mode with its parameters taken out of autograd,
    so one forward per batch feeds all heads and no backbone state (weights, BatchNorm statistics) changes.
    Under torch.distributed the heads train under ``DistributedDataParallel`` (each rank on its loader's
    shard, gradients averaged), and the losses are over every rank's batches.
    """
    history = fit(module, loader, epochs=epochs, mode="heads", progress=progress,
                  optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    return [epoch.loss for epoch in history.epochs]
