"""One pass over a graph with fake tensors: every node's shape and the MACs it spends.

No real compute happens: parameters are turned into fake tensors on the fly, so this costs the same
at batch 1 and batch 256. MACs come from ``torch.utils.flop_counter`` (FLOPs / 2), read after each
node, so a node's MACs are exactly what the counter attributes to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import BranchifyError
from .trace import as_tuple, restore_modes

__all__ = ["NodeFacts", "fake_mode", "propagate"]

_FAKE_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """A ``FakeTensorMode`` that accepts real parameters and keeps torch's own error log quiet.

    branchify turns a failing fake run into a BranchifyError that names the layer and the fix;
    torch would otherwise log a traceback first.
    """
    level = _FAKE_LOGGER.level
    _FAKE_LOGGER.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        _FAKE_LOGGER.setLevel(level)


@dataclass(frozen=True)
class NodeFacts:
    """What the fake pass learnt about one node. ``shape`` is None for non-tensor values."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    device: torch.device | None
    macs: float


class _Counting(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.facts: dict[str, NodeFacts] = {}

    def run_node(self, node: fx.Node):
        before = self.counter.get_total_flops()
        value = super().run_node(node)
        macs = (self.counter.get_total_flops() - before) / 2
        if isinstance(value, torch.Tensor):
            facts = NodeFacts(tuple(value.shape), value.dtype, value.device, macs)
        else:
            facts = NodeFacts(None, None, None, macs)
        self.facts[node.name] = facts
        return value


def describe_inputs(inputs: tuple) -> str:
    return ", ".join(f"{type(x).__name__}{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in inputs)


def propagate(gm: fx.GraphModule, example_inputs) -> tuple[dict[str, NodeFacts], object]:
    """Run ``gm`` in eval mode on fake copies of ``example_inputs``.

    Returns the facts per node name and the (fake) output. The module's training flags are
    restored afterwards.
    """
    inputs = as_tuple(example_inputs)
    snapshot = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with fake_mode() as mode:
            fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            with FlopCounterMode(display=False) as counter:
                interp = _Counting(gm, counter)
                try:
                    out = interp.run(*fake_inputs)
                except BranchifyError:
                    raise
                except Exception as err:
                    node = next((n for n in gm.graph.nodes if n.name not in interp.facts), None)
                    where = f" at node {node.name!r}" if node is not None else ""
                    text = str(err).strip().splitlines()
                    raise BranchifyError(
                        f"the model rejects example_inputs ({describe_inputs(inputs)}){where}: "
                        f"{text[0] if text else type(err).__name__}. Pass inputs the model accepts, e.g. "
                        "torch.randn(1, 3, 224, 224) for an ImageNet classifier") from None
    finally:
        restore_modes(snapshot)
    return interp.facts, out
