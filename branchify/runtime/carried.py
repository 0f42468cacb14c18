"""Values that cross a cut: the runner drops leaving samples from each, so each must be per-sample."""

from __future__ import annotations

import torch
from torch import nn

from .._propagate import fake_mode
from ..errors import BranchifyError

__all__ = ["check_carried"]


def _carried_values(stages: list[nn.Module], example: tuple, batch: int) -> list[list]:
    """What each cut carries for ``example`` repeated to ``batch`` samples, run on fake tensors."""
    with fake_mode() as mode:
        values = tuple(mode.from_tensor(torch.cat([a] * batch)) if isinstance(a, torch.Tensor) else a for a in example)
        carried = []
        for stage in stages[:-1]:
            values = stage(*values)
            carried.append(list(values))
    return carried


def check_carried(stages: list[nn.Module], example: tuple) -> None:
    """Every value carried across a cut must be a per-sample tensor, or a constant (a forward argument's
    default such as ``attn_mask=None``) that is the same whatever the batch; else compaction would be wrong."""
    twos, threes = _carried_values(stages, example, 2), _carried_values(stages, example, 3)
    for i, (stage, two, three) in enumerate(zip(stages, twos, threes)):
        names = [n for n in stage.graph.nodes if n.op == "output"][0].args[0]
        for node, value, other in zip(names, two, three):
            if isinstance(value, torch.Tensor):
                if value.ndim > 0 and value.shape[0] == 2 and other.shape[0] == 3:
                    continue
                shape = tuple(value.shape)
                batch_dims = [d for d in range(1, value.ndim) if value.shape[d] == 2 and other.shape[d] == 3]
                if value.ndim == other.ndim and len(batch_dims) == 1:
                    raise BranchifyError(
                        f"value {node.name!r} crosses the cut after exit {i} with the batch at dim {batch_dims[0]} "
                        f"(shape {shape} for 2 samples: a sequence-first activation, as "
                        "nn.TransformerEncoderLayer(batch_first=False) makes); the runner drops the samples that "
                        "leave along dim 0 only. Build the model batch-first (batch_first=True takes the same "
                        "weights), or attach with capture='hooks' (that runner compacts nothing: it stops the "
                        "forward once every sample has left)")
            elif isinstance(value, (type(None), bool, int, float, str)) and value == other:
                continue
            else:
                shape = type(value).__name__
            raise BranchifyError(
                f"value {node.name!r} crosses the cut after exit {i} but is {shape}, not a per-sample tensor, so the "
                "runner cannot drop the samples that leave; move the exit to another layer")
