"""Recording a forward as it runs: the torch operations applied to tensors, as a graph.

torch.fx and torch.export see a model's code; a recorded forward sees what the code did on one
input. It is the graph of the models no tracer captures (data-dependent control flow), and of a
leaf module's inside, so that the one layout analysis (``branchify.layout``) reads the same kind of
graph whatever captured the model. Every torch function and tensor method called on a recorded
tensor becomes a ``call_function`` node whose target is that function; tensors the graph did not
produce (parameters, constants) and other objects appear as the ``UNRECORDED`` argument.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["UNRECORDED", "Recording", "record"]


class _Unrecorded:
    """An argument the recording does not follow (a parameter, a constant tensor, an arbitrary object)."""

    def __repr__(self) -> str:
        return "UNRECORDED"


UNRECORDED = _Unrecorded()


class Recording(TorchFunctionMode):
    """A graph of the operations on recorded tensors, and every node's output shape.

    ``node_of(t)`` is the node that last produced tensor ``t`` (an in-place op produces a new node for
    the same tensor), or None. Tensors stay referenced while recording, so ids are never reused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._nodes: dict[int, fx.Node] = {}
        self._alive: list[torch.Tensor] = []

    def node_of(self, tensor: torch.Tensor) -> fx.Node | None:
        return self._nodes.get(id(tensor))

    def input(self, name: str, tensor: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(name)
        self._bind(tensor, node)
        return node

    def _bind(self, tensor: torch.Tensor, node: fx.Node) -> None:
        self._nodes[id(tensor)] = node
        self._alive.append(tensor)
        self.shapes[node.name] = tuple(tensor.shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        if not any(isinstance(a, torch.Tensor) and id(a) in self._nodes for a in leaves):
            return out  # nothing recorded went in: a constant computation
        results = out if isinstance(out, (tuple, list)) else (out,)
        if not any(isinstance(r, torch.Tensor) for r in results):
            return out  # shape reads and other non-tensor results
        node_args, node_kwargs = tree_map(self._as_arg, (tuple(args), dict(kwargs)))
        node = self.graph.create_node("call_function", func, node_args, node_kwargs)
        if isinstance(out, torch.Tensor):
            self._bind(out, node)
        else:
            for i, item in enumerate(results):
                if isinstance(item, torch.Tensor):
                    self._bind(item, self.graph.create_node("call_function", operator.getitem, (node, i)))
        return out

    def _as_arg(self, value):
        if isinstance(value, torch.Tensor):
            return self._nodes.get(id(value), UNRECORDED)
        if isinstance(value, (int, float, bool, str, slice, type(None), type(Ellipsis), torch.dtype, torch.device)):
            return value
        return UNRECORDED


def record(fn: Callable, inputs: dict[str, torch.Tensor], *args, **kwargs) -> tuple[Recording, object]:
    """Run ``fn(*inputs.values(), *args, **kwargs)`` while recording; returns the recording and the output."""
    recording = Recording()
    for name, tensor in inputs.items():
        recording.input(name, tensor)
    with recording:
        out = fn(*inputs.values(), *args, **kwargs)
    return recording, out
