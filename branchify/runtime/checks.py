"""The runner's checks of a call's inputs, before anything runs: count, batch dims, dtype and device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._propagate import describe_inputs
from ..errors import BranchifyError

__all__ = ["check_inputs"]


def check_inputs(inputs: tuple, *, count: int | None, names: Callable[[], list[str]] | None,
                 dtype: torch.dtype | None, device: torch.device | None, since: Callable[[], str],
                 ranks: tuple[int | None, ...] | None = None) -> None:
    """Refuse inputs the runner cannot take, naming what it takes (``count`` tensors, or the graph's inputs
    ``names()``; None on the hook path) and, in ``since()``, what it has run on. The two describe the
    refusal only, so they are called only to word it: this runs on every call of the runner. ``ranks``: the
    number of dims of each positional input in the example the module was built on (None: not known)."""
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if (count is not None and len(inputs) != count) or not tensors or not all(
            a.ndim > 0 and a.shape[0] == tensors[0].shape[0] for a in tensors):
        wanted = (f"{count} input tensor(s)" if count is not None else "the model's inputs" if names is None
                  else f"the model's inputs ({', '.join(names())})")
        raise BranchifyError(
            f"ExitRunner takes {wanted}, each tensor with the same batch dim, like the model's forward; got "
            f"{describe_inputs(inputs) or 'nothing'}{since()}")
    if ranks is not None and len(ranks) == len(inputs):
        for i, (value, rank) in enumerate(zip(inputs, ranks)):
            if rank is None or not isinstance(value, torch.Tensor) or value.ndim == rank:
                continue
            which = f"input {i}" if len(inputs) > 1 else "the input"
            missing = (f": it lacks the batch dimension; for one sample pass x.unsqueeze(0) (shape "
                       f"{(1, *value.shape)})") if value.ndim == rank - 1 else ""
            raise BranchifyError(
                f"{which} has shape {tuple(value.shape)} ({value.ndim} dims), but the module was built on "
                f"{rank}-dim inputs (batch first){missing}")
    x = next((a for a in tensors if a.is_floating_point()), tensors[0])
    if (dtype is not None and x.is_floating_point() and x.dtype != dtype) or (
            device is not None and x.device != device):
        raise BranchifyError(
            f"the runner got a {x.dtype} input on {x.device}, but the module's parameters are {dtype} "
            f"on {device}; convert the input (x.to({str(device)!r}, {dtype})) or the module "
            "(module.to(...)) and build a new runner")
