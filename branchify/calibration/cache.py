"""The logit cache: one pass of the network over a loader, every exit's logits kept on the CPU.

Calibration and the sweep run the network once and do everything after that on this cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .._distributed import combine
from .._inputs import split_batch
from .._outputs import split_outputs
from .._trace import eval_mode
from ..errors import BranchifyError
from ..exits import exit_module


@dataclass
class Cached:
    """Exit logits, final logits and targets of one pass over a loader (CPU, float32)."""

    exit_logits: list[torch.Tensor]
    final: torch.Tensor
    targets: torch.Tensor
    example_inputs: tuple

    @property
    def samples(self) -> int:
        return int(self.targets.shape[0])

    def correct(self) -> torch.Tensor:
        """``(k + 1, N)`` booleans: is exit ``i`` (the final one last) right on each sample."""
        logits = [*self.exit_logits, self.final]
        return torch.stack([z.argmax(dim=-1) == self.targets for z in logits])


def module_device(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def collect_logits(module: nn.Module, loader: Iterable, *, progress: bool = True,
                   desc: str = "caching exit logits") -> Cached:
    """Run ``module`` once over ``loader`` in eval mode and keep every exit's logits on the CPU."""
    k = len(exit_module(module, "caching exit logits").exit_spec.exits)
    device = module_device(module)
    exits: list[list[torch.Tensor]] = [[] for _ in range(k)]
    finals, targets, example = [], [], None
    with eval_mode(module):
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
                inputs, target = split_batch(batch)
                if example is None:
                    example = inputs.map(lambda x: x[:1])
                exit_logits, final = split_outputs(inputs.map(lambda x: x.to(device)).call(module), k)
                for store, logits in zip(exits, exit_logits):
                    store.append(logits.detach().float().cpu())
                finals.append(final.detach().float().cpu())
                targets.append(target.detach().cpu().reshape(-1))
    local = None if example is None else [*(torch.cat(e) for e in exits), torch.cat(finals), torch.cat(targets)]
    if local is not None and local[-1].shape[0] != local[-2].shape[0]:
        raise BranchifyError(f"{local[-1].shape[0]} targets for {local[-2].shape[0]} samples; give one per sample")
    # Under torch.distributed every rank takes part, so even a rank whose shard is empty gets the whole data.
    whole, example = combine(local, example, loader, desc.split(":")[0])
    if whole is None:
        raise BranchifyError("the loader yielded no batches; pass a loader over at least one labelled batch")
    cached = Cached(whole[:k], whole[k], whole[k + 1], example)
    _check_targets(cached)
    return cached


def _check_targets(cached: Cached) -> None:
    targets, classes = cached.targets, cached.final.shape[-1]
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise BranchifyError(
            f"targets must be integer class indices, got dtype {targets.dtype}; convert them with .long()")
    if targets.shape[0] != cached.final.shape[0]:
        raise BranchifyError(f"{targets.shape[0]} targets for {cached.final.shape[0]} samples; give one per sample")
    bad = (targets < 0) | (targets >= classes)
    if bool(bad.any()):
        raise BranchifyError(
            f"target {int(targets[bad][0])} is not a class index of a {classes}-class model; "
            f"targets must lie in [0, {classes - 1}]")
    cached.targets = targets.long()
