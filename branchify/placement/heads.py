"""Training every candidate's head at once on a frozen backbone: one backbone forward per batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._distributed import data_parallel, summed
from .._inputs import split_batch
from .._trace import kept_modes
from ..calibration.cache import module_device

__all__ = ["train_heads"]


def train_heads(module: nn.Module, loader: Iterable, *, epochs: int, lr: float, progress: bool = True,
                desc: str = "sweep: training heads") -> list[float]:
    """Train every exit head of ``module`` on a frozen backbone; returns the mean loss per epoch.

    The backbone runs in eval mode with its parameters taken out of autograd, so one forward per
    batch feeds all heads and no backbone state (weights, BatchNorm statistics) changes. Under
    torch.distributed the heads train under ``DistributedDataParallel`` (each rank on its loader's
    shard, gradients averaged), and the losses reported are the means over every rank's batches.
    """
    heads = list(module.exit_heads.parameters())
    head_ids = {id(p) for p in heads}
    backbone = [p for p in module.parameters() if id(p) not in head_ids]
    flags = [p.requires_grad for p in backbone]
    k = len(module.exit_heads)
    device = module_device(module)
    optimizer = torch.optim.Adam(heads, lr=lr)
    losses = []
    with kept_modes(module):
        for p in backbone:
            p.requires_grad_(False)
        try:
            module.eval()
            module.exit_heads.train()  # heads with dropout or normalisation train as heads; the backbone stays put
            # Built after freezing: DDP synchronises the parameters that require gradients when it is built.
            model, joined = data_parallel(module)
            for epoch in range(epochs):
                total, batches = 0.0, 0
                bar = tqdm(loader, desc=f"{desc}, epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
                with joined():  # ranks whose shards hold fewer batches keep the others' all-reduces going
                    for batch in bar:
                        inputs, target = split_batch(batch)
                        target = target.to(device).long()
                        outputs = inputs.map(lambda x: x.to(device)).call(model)
                        loss = sum(F.cross_entropy(z, target) for z in outputs[:k])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach())
                        batches += 1
                        bar.set_postfix(loss=f"{total / batches / k:.3f}")
                total, batches = summed(total, batches, device)
                losses.append(total / max(batches, 1) / k)
        finally:
            for p, flag in zip(backbone, flags):
                p.requires_grad_(flag)
    return losses
