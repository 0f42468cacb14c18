"""What a model is called with: positional tensors, or named tensors (a tokenizer's output).

``example_inputs`` may be a tensor, a tuple of tensors, or a dict of named tensors. A module built
from a model that takes named inputs is called with that dict as its one positional argument
(``module(batch)``) or as keywords (``module(**batch)``); loaders may yield ``(inputs, labels)``
pairs or dicts with a ``labels`` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import BranchifyError

__all__ = ["Inputs", "bind", "split_batch"]

LABELS = "labels"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


@dataclass(frozen=True)
class Inputs:
    """A model call's arguments: ``args`` positional, ``kwargs`` named.

    >>> import torch
    >>> Inputs.of({"input_ids": torch.zeros(2, 5, dtype=torch.long)}).batch
    2
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example) -> Inputs:
        if isinstance(example, Inputs):
            return example
        if isinstance(example, torch.Tensor):
            return cls((example,))
        if isinstance(example, Mapping):
            return cls((), dict(example))
        if isinstance(example, (list, tuple)):
            if len(example) == 1 and isinstance(example[0], Mapping):
                return cls((), dict(example[0]))
            return cls(tuple(example))
        raise BranchifyError(
            f"example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, got "
            f"{type(example).__name__}; e.g. torch.randn(1, 3, 224, 224) or tokenizer(texts, return_tensors='pt')")

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    @property
    def batch(self) -> int:
        """The batch size: dim 0 of the first tensor."""
        first = next((t for t in self.tensors if t.ndim > 0), None)
        if first is None:
            raise BranchifyError(
                f"the inputs ({self.describe() or 'nothing'}) hold no tensor with a batch dim; pass batched tensors, "
                "e.g. torch.randn(1, 3, 224, 224) rather than torch.randn(3, 224, 224)")
        return int(first.shape[0])

    def signature(self) -> tuple | None:
        """What per-sample figures depend on: each tensor's shape without the batch dim, dtype and device,
        and the other values; None when a value cannot be compared (then nothing may be reused)."""
        def one(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape[1:]), v.dtype, v.device)
            if v is None or isinstance(v, (bool, int, float, str)):
                return ("value", type(v).__name__, v)
            raise TypeError
        try:
            return (tuple(one(a) for a in self.args), tuple((k, one(v)) for k, v in self.kwargs.items()))
        except TypeError:
            return None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """Apply ``fn`` to every tensor (to move, slice or fake them)."""
        def one(v):
            return fn(v) if isinstance(v, torch.Tensor) else v
        return Inputs(tuple(one(a) for a in self.args), {k: one(v) for k, v in self.kwargs.items()})

    def call(self, fn: Callable):
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def record(self) -> dict | None:
        """The shapes (batch 1) and dtypes of the tensors, and the other plain values, as JSON data; None when a
        value is neither (it could not be rebuilt). ``Inputs.from_record`` rebuilds zeros of that kind."""
        def one(v):
            if isinstance(v, torch.Tensor):
                return {"shape": [1, *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
            if v is None or isinstance(v, (bool, int, float, str)):
                return {"value": v}
            raise TypeError
        try:
            return {"args": [one(a) for a in self.args], "kwargs": {k: one(v) for k, v in self.kwargs.items()}}
        except TypeError:
            return None

    @classmethod
    def from_record(cls, record: dict) -> Inputs:
        """Zeros shaped as ``record`` (from ``Inputs.record``) says: an example to rebuild a module on."""
        def one(v):
            if "shape" in v:
                return torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"]))
            return v["value"]
        try:
            return cls(tuple(one(a) for a in record["args"]), {k: one(v) for k, v in record["kwargs"].items()})
        except (KeyError, TypeError, AttributeError, RuntimeError) as err:
            raise BranchifyError(f"the recorded example inputs {record!r} cannot be rebuilt ({err}); pass "
                                 "example_inputs") from None

    def check_batch(self, what: str) -> int:
        """The batch size, refusing an empty batch (nothing to measure shapes or costs on)."""
        batch = self.batch
        if batch == 0:
            raise BranchifyError(
                f"{what}: example_inputs have batch size 0 ({self.describe()}); pass at least one sample, "
                "e.g. x[:1] of a real batch")
        return batch


def split_batch(batch) -> tuple[Inputs, torch.Tensor]:
    """A loader's batch as ``(inputs, target)``: a pair, or a dict with a ``labels`` entry."""
    if isinstance(batch, Mapping) and LABELS in batch and isinstance(batch[LABELS], torch.Tensor):
        rest = {k: v for k, v in batch.items() if k != LABELS}
        return Inputs((), rest), batch[LABELS]
    if isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor) and len(batch) >= 2:
        inputs, target = batch[0], batch[1]
        if isinstance(target, torch.Tensor):
            return Inputs.of(inputs), target
    raise BranchifyError(
        f"the loader must yield (inputs, target) pairs with a target tensor of class indices, or dicts with a "
        f"{LABELS!r} entry, got a {type(batch).__name__}; wrap the data, e.g. "
        "torch.utils.data.TensorDataset(images, labels)")


def bind(graph: fx.Graph, inputs: Inputs, what: str) -> tuple:
    """The values of ``graph``'s placeholders for a call with ``inputs``: positional first, then by name,
    then the defaults the forward declares."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [str(p.target).lstrip("*") for p in placeholders]
    if len(inputs.args) > len(names):
        raise BranchifyError(
            f"{what}: got {len(inputs.args)} positional inputs ({inputs.describe()}) but the model takes "
            f"{len(names)} ({', '.join(names)})")
    unknown = sorted(set(inputs.kwargs) - set(names[len(inputs.args):]))
    if unknown:
        raise BranchifyError(
            f"{what}: unknown input(s) {unknown}; the module was captured with inputs {names}. Drop the others "
            "(labels go in the loader's target, not the inputs)")
    values = list(inputs.args)
    for placeholder, name in zip(placeholders[len(values):], names[len(values):]):
        if name in inputs.kwargs:
            values.append(inputs.kwargs[name])
        elif placeholder.args:
            values.append(placeholder.args[0])
        else:
            raise BranchifyError(f"{what}: input {name!r} is missing; the module takes {names} "
                                 f"(got {inputs.describe() or 'nothing'})")
    return tuple(values)
