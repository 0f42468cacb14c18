"""The runner's checks of a call's inputs, before anything runs: count, batch dims, ranks, dtypes and device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._propagate import describe_inputs
from ..errors import BranchifyError

__all__ = ["check_inputs"]


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point or dtype.is_complex else "bool" if dtype == torch.bool else "integer"


def check_inputs(inputs: tuple, *, count: int | None, names: Callable[[], list[str]] | None,
                 dtype: torch.dtype | None, device: torch.device | None, since: Callable[[], str],
                 specs: Sequence | None = None, positional: bool = False) -> None:
    """Refuse inputs the runner cannot take, naming what it takes (``count`` tensors, or the model's inputs
    ``names()``; None on the hook path) and, in ``since()``, what it has run on. The two describe the
    refusal only, so they are called only to word it: this runs on every call of the runner. ``specs``: an
    ``InputSpec`` per input (its dtype and number of dims in the example the module was built on), or None
    when not known; ``positional``: word the inputs by position rather than by name."""
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if (count is not None and len(inputs) != count) or not tensors or not all(
            a.ndim > 0 and a.shape[0] == tensors[0].shape[0] for a in tensors):
        wanted = (f"{count} input tensor(s)" if count is not None and names is None else "the model's inputs"
                  if names is None else f"the model's inputs ({', '.join(names())})")
        raise BranchifyError(
            f"ExitRunner takes {wanted}, each tensor with the same batch dim, like the model's forward; got "
            f"{describe_inputs(inputs) or 'nothing'}{since()}")
    if specs is not None and len(specs) == len(inputs):
        for value, spec in zip(inputs, specs):
            if not isinstance(value, torch.Tensor):
                continue
            which = spec.name if positional else (f"input {spec.name!r}" if len(inputs) > 1 else "the input")
            if spec.ndim is not None and value.ndim != spec.ndim:
                missing = (f": it lacks the batch dimension; for one sample pass x.unsqueeze(0) (shape "
                           f"{(1, *value.shape)})") if value.ndim == spec.ndim - 1 else ""
                raise BranchifyError(
                    f"{which} has shape {tuple(value.shape)} ({value.ndim} dims), but the module was built on "
                    f"{spec.ndim}-dim inputs (batch first){missing}")
            if spec.dtype is not None and _kind(value.dtype) != _kind(spec.dtype):
                fix = (f"convert it with x.to({spec.dtype}) (images: x.float() / 255, then the training "
                       "normalisation)" if _kind(spec.dtype) == "float" else
                       f"pass the {_kind(spec.dtype)} tensor the model was built on (x.to({spec.dtype}); token ids "
                       "come from the tokenizer as int64)")
                raise BranchifyError(
                    f"{which} is a {value.dtype} tensor, but the module was built on {spec.dtype} for it, and "
                    f"the model cannot take {_kind(value.dtype)} values there; {fix}")
    x = next((a for a in tensors if a.is_floating_point()), tensors[0])
    if (dtype is not None and x.is_floating_point() and x.dtype != dtype) or (
            device is not None and x.device != device):
        raise BranchifyError(
            f"the runner got a {x.dtype} input on {x.device}, but the module's parameters are {dtype} "
            f"on {device}; convert the input (x.to({str(device)!r}, {dtype})) or the module "
            "(module.to(...)) and build a new runner")
