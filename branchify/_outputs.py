"""The multi-output convention: ``(exit_0, ..., exit_{k-1}, final)``.

Early exits give ``(B, C)`` logits. The final output is the original model's: a tensor, or in train
mode for googlenet / inception_v3 a namedtuple whose first field is the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import BranchifyError

__all__ = ["final_logits", "split_outputs"]


def final_logits(final) -> torch.Tensor:
    """The logits of a final output (the first field of a namedtuple such as ``GoogLeNetOutputs``)."""
    if isinstance(final, torch.Tensor):
        return final
    if isinstance(final, tuple) and final and isinstance(final[0], torch.Tensor):
        return final[0]
    raise BranchifyError(f"the final output is {type(final).__name__}, not logits (a tensor or a namedtuple of them)")


def split_outputs(outputs: Sequence, num_exits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Split ``(exit_0, ..., exit_{k-1}, final)`` into the exit logits and the final logits.

    >>> import torch
    >>> exits, final = split_outputs((torch.zeros(2, 3), torch.ones(2, 3)), 1)
    >>> len(exits), final.shape
    (1, torch.Size([2, 3]))
    """
    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, Sequence):
        raise BranchifyError(
            f"expected the tuple (exit_0, ..., final) that an attach_exits module returns, got "
            f"{type(outputs).__name__}")
    if len(outputs) != num_exits + 1:
        raise BranchifyError(
            f"got {len(outputs)} outputs but the spec has {num_exits} exits, so {num_exits + 1} outputs "
            "(exits + final) are expected; pass the module's whole output tuple with the spec it was built from")
    exits = list(outputs[:-1])
    final = final_logits(outputs[-1])
    for i, logits in enumerate(exits):
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape != final.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise BranchifyError(f"exit {i} output is {shape}; every exit must give logits shaped like the final "
                                 f"output {tuple(final.shape)}")
    return exits, final


def _entry(path) -> str | int:
    key = path[0]
    return getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))


def select_output(output, selector: str | int | None, *, strict: bool = True):
    """The part of a model's output that holds the logits: ``(leaf, description)``.

    ``output`` may be a tensor, a tuple, a dict or a Hugging Face ``ModelOutput`` (anything
    ``torch.utils._pytree`` flattens; leaves may be tensors or graph nodes). ``selector`` names an
    entry (a key or attribute, or a position); by default a tensor is taken as it is and a mapping's
    ``"logits"`` entry is taken. With ``strict=False`` an output that has no default is returned whole
    (googlenet's training outputs) instead of refused.

    >>> import torch
    >>> select_output({"logits": torch.zeros(2, 3), "hidden": torch.ones(2, 4)}, None)[1]
    "entry 'logits'"
    """
    from torch.utils._pytree import tree_flatten_with_path

    if selector is None and not isinstance(output, (tuple, list, dict)) and not hasattr(output, "keys"):
        return output, "the output"
    leaves = tree_flatten_with_path(output)[0]
    entries = {_entry(path): leaf for path, leaf in leaves if len(path) == 1}
    wanted = selector if selector is not None else "logits"
    if wanted in entries:
        return entries[wanted], f"entry {wanted!r}"
    if selector is None and not strict:
        return output, "the output"
    listed = ", ".join(repr(e) for e in entries) or "none"
    kind = type(output).__name__.removeprefix("immutable_")  # torch.fx stores a traced dict as immutable_dict
    if selector is None:
        raise BranchifyError(
            f"the model returns a {kind} (entries: {listed}) with no 'logits' entry; say which entry holds the "
            f"logits with output=..., e.g. attach_exits(model, spec, example_inputs, "
            f"output={next(iter(entries), 0)!r})")
    raise BranchifyError(f"output={selector!r}: the model returns a {kind} without that entry (entries: {listed}); "
                         "pass one of them")
