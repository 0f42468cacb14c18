"""Compute cost of early exits, in multiply-accumulates (MACs) per sample.

Counted by ``torch.utils.flop_counter`` (FLOPs / 2) while the module runs on fake tensors, so no
real compute happens. A sample that leaves at exit ``i`` has paid for the backbone up to exit ``i``
and for every head it was judged by on the way (the judged heads among ``0..i``); a sample that
goes all the way pays for the whole backbone and every judged head. An exit that is off (no
threshold while others have one) is never judged, so its head is not charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._inputs import Inputs
from ._propagate import fake_mode, propagate
from ._trace import eval_mode
from .errors import BranchifyError
from .exits import HEAD, exit_module

__all__ = ["ExitCosts", "exit_costs"]


@dataclass(frozen=True)
class ExitCosts:
    """Per-sample MACs of leaving at each exit.

    ``exits[i]``: backbone up to exit ``i`` plus the judged heads among ``0..i``; ``full``: the
    whole backbone plus every judged head (a sample that no exit takes); ``original``: the
    unmodified model; ``backbone[i]`` and ``heads[i]``: the parts; ``judged[i]``: is head ``i``
    charged (False for an exit that is off).
    """

    exits: list[float]
    full: float
    original: float
    backbone: list[float]
    heads: list[float]
    judged: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.judged:  # made by hand from its parts: every head runs
            object.__setattr__(self, "judged", [True] * len(self.heads))

    @classmethod
    def of(cls, backbone: Sequence[float], heads: Sequence[float], original: float,
           judged: Sequence[bool] | None = None) -> ExitCosts:
        """The costs of exits with these backbone and head MACs (``judged``: which heads run; default all)."""
        judged = [True] * len(heads) if judged is None else [bool(j) for j in judged]
        if len(judged) != len(heads) or len(backbone) != len(heads):
            raise BranchifyError(f"{len(backbone)} backbone costs, {len(heads)} heads and {len(judged)} judged flags; "
                                 "give one of each per exit")
        charged = [h if j else 0.0 for h, j in zip(heads, judged)]
        exits = [b + sum(charged[: i + 1]) for i, b in enumerate(backbone)]
        return cls(exits=exits, full=original + sum(charged), original=original, backbone=list(backbone),
                   heads=list(heads), judged=judged)

    def judging(self, judged: Sequence[bool]) -> ExitCosts:
        """These costs when only the heads marked in ``judged`` run (these very costs if that changes nothing)."""
        if [bool(j) for j in judged] == self.judged:
            return self
        return ExitCosts.of(self.backbone, self.heads, self.original, judged)

    @property
    def per_exit(self) -> list[float]:
        """``exits`` followed by ``full``: the cost of leaving at each of the k + 1 exits."""
        return [*self.exits, self.full]

    def expected(self, shares: Sequence[float]) -> float:
        """Expected MACs per sample given the share leaving at each of the k + 1 exits."""
        costs = self.per_exit
        if len(shares) != len(costs):
            raise BranchifyError(f"{len(shares)} shares for {len(costs)} exits (k early exits + the final one)")
        return float(sum(s * c for s, c in zip(shares, costs)))

    def saving(self, shares: Sequence[float]) -> float:
        """Fraction of the original model's MACs saved: ``1 - expected / original``."""
        return 1.0 - self.expected(shares) / self.original


def _head_macs(head: nn.Module, shapes: list[tuple[int, ...]], batch: int) -> float:
    """Per-sample MACs of ``head`` on fake inputs of the batched ``shapes`` (its input, then any mask)."""
    with fake_mode() as mode:
        inputs = [mode.from_tensor(torch.empty(shape)) for shape in shapes]
        with FlopCounterMode(display=False) as counter:
            head(*inputs)
    return counter.get_total_flops() / 2 / batch


def exit_costs(module: nn.Module, example_inputs) -> ExitCosts:
    """Per-sample MACs of each exit of a module made by ``bx.attach_exits``.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])
    >>> x = torch.randn(1, 3, 224, 224)
    >>> costs = bx.exit_costs(bx.attach_exits(torchvision.models.resnet50(), spec, x), x)
    >>> round(costs.original / 1e9, 3), costs.exits[0] < costs.exits[1] < costs.full
    (4.089, True)
    """
    return exit_module(module, "exit_costs").exit_costs(Inputs.of(example_inputs))


def graph_costs(module: nn.Module, inputs: Inputs) -> ExitCosts:
    """``exit_costs`` of a module with a graph: one pass with fake tensors over it."""
    batch = inputs.check_batch("exit_costs")
    facts, _ = propagate(module, inputs)
    backbone, heads, running = [], [], 0.0
    for node in module.graph.nodes:
        macs = facts[node.name].macs if node.name in facts else 0.0
        if HEAD in node.meta:
            backbone.append(running / batch)
            heads.append(macs / batch)
        else:
            running += macs
    return ExitCosts.of(backbone, heads, running / batch)


def hook_costs(module: nn.Module, inputs: Inputs) -> ExitCosts:
    """``exit_costs`` of a hook-path module: one real forward, counted."""
    batch = inputs.check_batch("exit_costs")
    seen: dict[int, tuple[float, list[tuple[int, ...]]]] = {}
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.run_with_hooks(  # the first call of an exit layer counts, as in the forward
            lambda i, out, *extras: seen.setdefault(i, (counter.get_total_flops() / 2,
                                                        [tuple(t.shape) for t in (out, *extras)])),
            *inputs.args, **inputs.kwargs)
        total = counter.get_total_flops() / 2
    backbone = [seen[i][0] / batch for i in range(len(module.exit_heads))]
    heads = [_head_macs(h, seen[i][1], batch) for i, h in enumerate(module.exit_heads)]
    return ExitCosts.of(backbone, heads, total / batch)
