"""What every module with exits is, whichever way its model was captured: the exit-module protocol.

``bx.attach_exits`` returns one of two implementations: ``ExitModule`` (a graph from torch.fx or
torch.export) and ``HookExitModule`` (forward hooks on an uncaptured model). Both carry the same
attributes and answer the same questions by method, so no caller asks which one it holds:
``exit_costs`` (what each exit costs, per sample) and ``exit_stages`` (the graph cut at the exits,
or None when there is no graph to cut). Every name starts with ``exit_``: an exit module carries the
model's own attributes too (timm's ``stages``), and they must never collide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .errors import BranchifyError

if TYPE_CHECKING:
    from .cost import ExitCosts
    from .inputs import Inputs
    from .points import ExitPointInfo
    from .spec import ExitSpec
    from .stages import Stages

__all__ = ["HEAD", "HEADS", "HEAD_INPUT_COPY", "Exits", "exit_module"]

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
        """Per-sample MACs of each exit for inputs shaped like ``inputs``."""
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
