"""What every module with exits is, whichever way its model was captured: the exit-module protocol.

``bx.attach_exits`` returns one of two implementations: ``ExitModule`` (a graph from torch.fx or
torch.export) and ``HookExitModule`` (forward hooks on an uncaptured model). Both carry the same
attributes and answer the same questions by method, so no caller asks which one it holds:
``exit_costs`` (what each exit costs, per sample) and ``exit_stages`` (the graph cut at the exits,
or None when there is no graph to cut). Every name starts with ``exit_``: an exit module carries the
model's own attributes too (timm's ``stages``), and they must never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import BranchifyError
from .layout import Layout

if TYPE_CHECKING:
    from ._inputs import Inputs
    from ._stages import Stages
    from .cost import ExitCosts
    from .spec import ExitSpec


@dataclass(frozen=True)
class ExitPointInfo:
    """One attachable point.

    ``name`` is what ``ExitPoint(layer=...)`` accepts; ``node`` the graph node it resolves to;
    ``shape`` the per-sample shape (no batch dim); ``layout`` None when the graph does not
    determine it; ``macs`` the per-sample MACs spent up to and including this point and
    ``macs_fraction`` their share of the whole model's. ``aliases`` are other names for the same
    point (the last block of a stage ends where the stage does: ``layer1.1`` is ``layer1``).
    """

    name: str
    node: str
    shape: tuple[int, ...]
    layout: Layout | None
    macs: float
    macs_fraction: float
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        layout = self.layout.value if self.layout else "?"
        shape = "x".join(map(str, self.shape))
        return f"{self.name:<32} {shape:<14} {layout:<5} {self.macs / 1e6:10.2f} MMACs {self.macs_fraction:7.1%}"


__all__ = ["HEAD", "HEADS", "HEAD_INPUT_COPY", "ExitPointInfo", "Exits", "exit_module"]

HEADS = "exit_heads"  # the attribute (and state-dict prefix) of the heads
HEAD = "branchify_exit_head"  # node.meta tag of head k's node: k
HEAD_INPUT_COPY = "branchify_head_input_copy"  # node.meta tag of the copy a head reads


class Exits:
    """The protocol: ``exit_spec``, ``exit_heads``, ``exit_points``, ``num_classes``, ``exit_path``, and:"""

    exit_spec: ExitSpec
    exit_heads: nn.ModuleList
    exit_points: list[ExitPointInfo]
    num_classes: int
    exit_path: str

    def exit_costs(self, inputs: Inputs) -> ExitCosts:
        """Per-sample MACs of each exit for inputs shaped like ``inputs``, the heads of exits that are off not
        charged: counted once per input signature (shapes without the batch dim, dtypes, devices), then read
        from the module."""
        key = inputs.signature()
        memo = self.__dict__.setdefault("_exit_cost_memo", {})
        costs = memo.get(key) if key is not None else None
        if costs is None:
            # Counted outside inference mode (the fake pass reads version counters, which inference tensors
            # lack), on copies of any inference tensors: a runner called under torch.inference_mode() can meet
            # a new input shape.
            with torch.inference_mode(False):
                costs = self._count_exit_costs(inputs.map(lambda t: t.clone() if t.is_inference() else t))
            if key is not None:
                memo[key] = costs
        return costs.judging(self.exit_spec.judged)

    def _count_exit_costs(self, inputs: Inputs) -> ExitCosts:
        raise NotImplementedError

    def exit_stages(self) -> Stages | None:
        """The eval graph cut into one stage per stretch between exits; None without a graph."""
        raise NotImplementedError


def exit_module(module, what: str) -> Exits:
    """``module`` if it is a module made by ``bx.attach_exits``, else a clear refusal naming ``what``."""
    if not isinstance(module, Exits):
        raise BranchifyError(
            f"{what} needs a module made by bx.attach_exits, got {type(module).__name__}; "
            "build one with bx.attach_exits(model, spec, example_inputs)")
    return module
