"""One pass over a graph with fake tensors: every node's shape and the MACs it spends.

No real compute happens: parameters are turned into fake tensors on the fly, so this costs the same
at batch 1 and batch 256. MACs come from ``torch.utils.flop_counter`` (FLOPs / 2), read after each
node, so a node's MACs are exactly what the counter attributes to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ._inputs import Inputs, bind
from ._quantized import float_twins
from ._trace import eval_mode
from .capture import held_output
from .errors import BranchifyError

__all__ = ["NodeFacts", "fake_mode", "propagate"]

@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """A ``FakeTensorMode`` that accepts real parameters and keeps torch's own error log quiet.

    branchify turns a failing fake run into a BranchifyError that names the layer and the fix;
    torch would otherwise log a traceback first. Only this thread's output is held back (``held_output``).
    """
    with held_output(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@dataclass(frozen=True)
class NodeFacts:
    """What the fake pass learnt about one node. ``shape`` is None for non-tensor values."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    device: torch.device | None
    macs: float
    mutated_later: bool = False  # a later operation changes this value in place (``relu_``, ``+=``)


class _Counting(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, twins: dict[str, torch.nn.Module]) -> None:
        super().__init__(gm)
        self.counter = counter
        self.twins = twins  # float stand-ins for layers fake tensors cannot run (branchify._quantized)
        self.facts: dict[str, NodeFacts] = {}
        self.versions: dict[str, tuple[torch.Tensor, int]] = {}

    def run_node(self, node: fx.Node):
        before = self.counter.get_total_flops()
        value = super().run_node(node)
        macs = (self.counter.get_total_flops() - before) / 2
        if isinstance(value, torch.Tensor):
            facts = NodeFacts(tuple(value.shape), value.dtype, value.device, macs)
            self.versions[node.name] = (value, value._version)  # fake tensors count in-place writes too
        else:
            facts = NodeFacts(None, None, None, macs)
        self.facts[node.name] = facts
        return value

    def call_module(self, target, args, kwargs):
        twin = self.twins.get(str(target))
        return super().call_module(target, args, kwargs) if twin is None else twin(*args, **kwargs)

    def mark_mutated(self) -> None:
        for name, (value, version) in self.versions.items():
            if value._version != version:
                self.facts[name] = dataclasses.replace(self.facts[name], mutated_later=True)


def describe_inputs(inputs) -> str:
    return Inputs.of(inputs).describe()


def propagate(gm: fx.GraphModule, example_inputs) -> tuple[dict[str, NodeFacts], object]:
    """Run ``gm`` in eval mode on fake copies of ``example_inputs`` (bound to its placeholders).

    Returns the facts per node name and the (fake) output. The module's training flags are
    restored afterwards.
    """
    inputs = Inputs.of(example_inputs)
    values = bind(gm.graph, inputs, "example_inputs")
    twins = float_twins(gm)
    with eval_mode(gm), fake_mode() as mode:
        fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in values)
        with FlopCounterMode(display=False) as counter:
            interp = _Counting(gm, counter, twins)
            try:
                out = interp.run(*fake_inputs)
                interp.mark_mutated()
            except BranchifyError:
                raise
            except Exception as err:
                node = next((n for n in gm.graph.nodes if n.name not in interp.facts), None)
                where = f" at node {node.name!r}" if node is not None else ""
                text = str(err).strip().splitlines()
                raise BranchifyError(
                    f"the model rejects example_inputs ({inputs.describe()}){where}: "
                    f"{text[0] if text else type(err).__name__}. Pass inputs the model accepts, e.g. "
                    "torch.randn(1, 3, 224, 224) for an ImageNet classifier") from err
    return interp.facts, out
