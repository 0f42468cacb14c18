"""Data spread over torch.distributed ranks: one process group's shards, combined into the whole data.

Calibration and the sweep cache every exit's logits over a loader. Under ``torchrun`` each rank's
loader usually holds a ``DistributedSampler`` shard; ``combine`` gathers every rank's cache, places
each sample by its dataset index (the order one process iterating the dataset sees), and drops the
samples the sampler repeated to give every rank the same count. Every rank gets the same whole
cache, so the search that follows gives every rank the same result, equal to one process over all
the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import BranchifyError

__all__ = ["combine", "data_parallel", "distributed_world", "summed"]


def distributed_world(group=None) -> int | None:
    """The number of ranks when torch.distributed is initialised with more than one, else None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size(group)
    return size if size > 1 else None


def data_parallel(module: torch.nn.Module, group=None, *, find_unused_parameters: bool = False):
    """``module`` wrapped in ``DistributedDataParallel`` under torch.distributed (else itself), and a context for
    each epoch that lets ranks with fewer batches join the others' last all-reduces (``DDP.join``)."""
    if distributed_world(group) is None:
        return module, contextlib.nullcontext
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                  process_group=group, find_unused_parameters=find_unused_parameters)
    return ddp, ddp.join


def summed(total: float, count: int, device: torch.device, group=None) -> tuple[float, int]:
    """``total`` and ``count`` summed over the ranks (unchanged outside torch.distributed)."""
    if distributed_world(group) is None:
        return total, count
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(both, group=group)
    return float(both[0]), int(both[1])


def _distributed_sampler(loader: Iterable):
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


@dataclass(frozen=True)
class _Shard:
    """What one rank says of its part before anything large is sent."""

    indexed: bool
    samples: int
    fingerprint: str
    dataset: int | None
    drops_last: bool
    example: object


def _fingerprint(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def combine(tensors: list[torch.Tensor] | None, example, loader: Iterable, what: str, group=None
            ) -> tuple[list[torch.Tensor] | None, object]:
    """Every rank's per-sample ``tensors`` (first dim: the samples its ``loader`` yielded, in order; None when it
    yielded none) as the whole data, the same on every rank, and ``example`` (one sample's inputs, None on a rank
    that saw nothing) from the first rank that has one. Outside torch.distributed: both unchanged.

    With a ``DistributedSampler`` the samples are placed by dataset index and the sampler's repeats dropped.
    Without one, every rank must hold the same samples (each then already has the whole data); ranks holding
    different samples without a sampler are refused, since nothing says which sample is which."""
    if distributed_world(group) is None:
        return tensors, example
    import torch.distributed as dist

    sampler = _distributed_sampler(loader)
    indices = None if sampler is None else torch.tensor(list(iter(sampler)), dtype=torch.int64)
    samples = 0 if tensors is None else int(tensors[0].shape[0])
    if indices is not None and indices.numel() != samples:
        # Raising here alone would leave the other ranks waiting; every rank learns of it below.
        samples = -1
    mine = _Shard(indexed=indices is not None, samples=samples,
                  fingerprint="" if indices is not None or tensors is None else _fingerprint(tensors),
                  dataset=None if sampler is None else len(sampler.dataset),
                  drops_last=bool(sampler is not None and sampler.drop_last), example=example)
    shards: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(shards, mine, group=group)
    for rank, shard in enumerate(shards):
        if shard.samples < 0:
            raise BranchifyError(
                f"rank {rank}'s loader yielded a different number of samples than its DistributedSampler lists, so "
                f"the {what} cannot place them by dataset index; iterate the sampler's indices in order "
                "(no IterableDataset, no sampler of your own around it)")
    example = next((s.example for s in shards if s.example is not None), None)
    if len({s.indexed for s in shards}) > 1:
        raise BranchifyError(
            f"some ranks' loaders draw from a DistributedSampler and others do not (ranks "
            f"{[r for r, s in enumerate(shards) if s.indexed]} do), so the {what} cannot combine their samples; give "
            "every rank's loader a DistributedSampler over the same dataset")
    if not shards[0].indexed:
        if len({(s.samples, s.fingerprint) for s in shards}) > 1:
            raise BranchifyError(
                f"torch.distributed is initialised and the ranks' loaders hold different samples "
                f"({[s.samples for s in shards]} samples), but not through a DistributedSampler, so the {what} cannot "
                "tell which sample is which; give each rank's loader a torch.utils.data.DistributedSampler, or give "
                "every rank the whole data")
        return tensors, example
    if len({s.dataset for s in shards}) > 1:
        raise BranchifyError(
            f"the ranks' DistributedSamplers cover datasets of different sizes ({[s.dataset for s in shards]}); "
            "give every rank a sampler over the same dataset")
    parts: list = [None] * len(shards)
    dist.all_gather_object(parts, (indices, tensors), group=group)
    held = [(i, t) for i, t in parts if t is not None]
    if not held:
        return None, example
    index = torch.cat([i for i, _ in held])
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]  # the sampler's padding repeats indices; keep one copy
    keep = order[first]
    missing = shards[0].dataset - int(first.sum())
    if missing > 0:
        warnings.warn(
            f"the {what} covers {int(first.sum())} of the dataset's {shards[0].dataset} samples: the ranks' "
            f"DistributedSamplers left {missing} out{' (drop_last=True)' if shards[0].drops_last else ''}; use "
            "DistributedSampler(..., drop_last=False) to cover every sample", UserWarning, stacklevel=3)
    return [torch.cat([t[j] for _, t in held])[keep] for j in range(len(held[0][1]))], example
