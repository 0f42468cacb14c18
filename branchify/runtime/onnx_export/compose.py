"""Composing the pieces into one ONNX graph that routes each sample itself, as ``route_stages`` does.

After each exit, NonZero splits the sub-batch into the samples that leave and those that go on, the
leavers' logits and exit index are scattered (ScatterND) into the outputs at their batch positions, every
tensor that crosses the cut is compacted (Gather along the batch), and the rest of the network sits in
the then-branch of an ``If`` on "does any sample go on", whose else-branch returns the outputs as they
are. A stage nobody reaches does no work, and an exit that is off is passed by (no head, no If).

Each piece's weights stay in the branch that holds its nodes: onnxruntime's NCHWc layout transformer only
rewrites convolutions whose weights are initializers of their own graph, and weights read from the outer
scope made resnet50 1.5x to 1.7x slower (``benchmarks/onnx.py`` measures both).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...errors import BranchifyInternalError
from ...routing import ExitRule
from .pieces import Piece, temperature_name, threshold_name

__all__ = ["LOGITS", "EXIT_INDEX", "Composer"]

LOGITS, EXIT_INDEX = "logits", "exit_index"


class _Names:
    """Fresh value names for the composed graph."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, hint: str) -> str:
        self.count += 1
        return f"route/{hint}_{self.count}"


def _rename_uses(graph, mapping: dict[str, str]) -> None:
    """Make ``graph``'s nodes (and those of its subgraphs) read ``mapping[name]`` wherever they read ``name``."""
    onnx = importlib.import_module("onnx")
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in mapping:
                node.input[j] = mapping[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, mapping)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_uses(g, mapping)


def _prefix_dims(graph, prefix: str) -> None:
    """Symbolic dims are named per exported piece (each calls its sub-batch ``s0``); keep them apart."""
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    dim.dim_param = prefix + dim.dim_param


@dataclass
class _Branch:
    """One graph being built (an If's branch): its nodes, their weights, and what they say of their values."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    value_info: list = field(default_factory=list)


class Composer:
    """Builds the routed graph from the pieces: one level per exit that is on, each in the then-branch of an If."""

    def __init__(self, pieces: list[Piece], num_classes: int) -> None:
        self.onnx = importlib.import_module("onnx")
        self.helper = self.onnx.helper
        self.pieces = pieces
        self.k = len(pieces) - 1
        self.num_classes = num_classes
        self.name = _Names()
        self.initializers: list = []
        self.constants: set[str] = set()
        self.functions: dict[tuple[str, str, str], object] = {}
        self.opsets: dict[str, int] = {}
        self.ir_version = 0
        self.graphs = [self._take(p) for p in pieces]
        self.logits_type = self.graphs[-1].output[0].type.tensor_type.elem_type

    def _take(self, piece: Piece):
        """The piece's graph with every name prefixed; its functions move to the model."""
        onnx = self.onnx
        model = onnx.compose.add_prefix(piece.model, f"p{piece.index}/")
        graph = model.graph
        _prefix_dims(graph, f"p{piece.index}_")
        for function in model.functions:
            self.functions[(function.domain, function.name, getattr(function, "overload", ""))] = function
        for entry in model.opset_import:
            known = self.opsets.setdefault(entry.domain, entry.version)
            if known != entry.version:
                if entry.domain in ("", "ai.onnx"):
                    raise BranchifyInternalError(f"the pieces were exported with opsets {known} and {entry.version}")
                self.opsets[entry.domain] = max(known, entry.version)
        self.ir_version = max(self.ir_version, model.ir_version)
        return graph

    def _add(self, branch: _Branch, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        branch.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _constant(self, value, dtype: str, hint: str) -> str:
        name = f"route/{hint}"
        if name not in self.constants:
            self.constants.add(name)
            self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def _run_piece(self, branch: _Branch, i: int, values: list[str], memory: tuple[str, str] | None) -> list[str]:
        """Add piece ``i``'s nodes, reading ``values`` (and the threshold, temperature, ``memory``); its outputs."""
        piece, graph = self.pieces[i], self.graphs[i]
        ins = [v.name for v in graph.input]
        mapping = dict(zip(ins[:piece.carried_in], values))
        feeds: list[str] = []
        if piece.rule is not None:
            feeds.append(threshold_name(i))
            if not piece.rule.criterion.across_exits:
                feeds.append(temperature_name(i))
            if piece.remembers and piece.judged_before:
                feeds.extend(memory)
        if len(ins) != piece.carried_in + len(feeds):
            raise BranchifyInternalError(f"piece {i} has {len(ins)} inputs, {piece.carried_in + len(feeds)} expected")
        mapping.update(zip(ins[piece.carried_in:], feeds))
        _rename_uses(graph, mapping)
        branch.nodes.extend(graph.node)
        branch.initializers.extend(graph.initializer)
        branch.value_info.extend(graph.value_info)
        return [mapping.get(v.name, v.name) for v in graph.output]  # an output may be one of the inputs

    def _level(self, i: int, values: list[str], where: str, logits: str, exits: str,
               memory: tuple[str, str] | None) -> tuple[_Branch, list[str]]:
        """The nodes that run stage ``i`` onward on the samples still going (their tensors ``values``, their
        batch positions ``where``), and the names of the finished ``(logits, exit_index)``."""
        branch = _Branch()
        axis0, axis1 = self._constant([0], "int64", "axis_0"), self._constant([1], "int64", "axis_1")
        while True:
            piece = self.pieces[i]
            outs = self._run_piece(branch, i, values, memory)
            if i == self.k:  # the final classifier: every sample still going ends here
                rows = self._add(branch, "Unsqueeze", [where, axis1], "rows")
                done = self._add(branch, "ScatterND", [logits, rows, outs[0]], "logits")
                # a branch's outputs must be made in the branch, even when unchanged
                return branch, [done, self._add(branch, "Identity", [exits], "exit_index")]
            carried = outs[:piece.carried_out]
            if piece.rule is None:  # an exit that is off is passed by: no head, no If
                values, i = carried, i + 1
                continue
            z, fired, *memory_out = outs[piece.carried_out:]
            leave = self._add(branch, "Squeeze", [self._add(branch, "NonZero", [fired], "leaving"), axis0], "leave")
            stay = self._add(branch, "Not", [fired], "staying")
            keep = self._add(branch, "Squeeze", [self._add(branch, "NonZero", [stay], "staying"), axis0], "keep")
            rows = self._add(branch, "Unsqueeze", [self._add(branch, "Gather", [where, leave], "positions", axis=0),
                                                   axis1], "rows")
            left = self._add(branch, "Gather", [z, leave], "left", axis=0)
            logits = self._add(branch, "ScatterND", [logits, rows, left], "logits")
            taken = self._add(branch, "Expand", [self._constant(i, "int64", f"exit_{i}"),
                                                 self._add(branch, "Shape", [leave], "count")], "taken")
            exits = self._add(branch, "ScatterND", [exits, rows, taken], "exit_index")
            values = [self._add(branch, "Gather", [v, keep], "carried", axis=0) for v in carried]
            where = self._add(branch, "Gather", [where, keep], "where", axis=0)
            memory = tuple(self._add(branch, "Gather", [v, keep], "memory", axis=0) for v in memory_out) or None
            going = self._add(branch, "Greater", [self._add(branch, "Size", [keep], "going"),
                                                  self._constant(0, "int64", "zero")], "any_going")
            rest, finished = self._level(i + 1, values, where, logits, exits, memory)
            return branch, self._if(branch, going, rest, finished, [logits, exits], f"after_exit_{i}")

    def _if(self, branch: _Branch, cond: str, then: _Branch, then_outs: list[str], else_outs: list[str],
            hint: str) -> list[str]:
        """``If(cond)``: the then-branch runs ``then``; the else-branch returns ``else_outs`` unchanged."""
        helper = self.helper
        otherwise = _Branch()
        else_names = [self._add(otherwise, "Identity", [name], "unchanged") for name in else_outs]
        graphs = [helper.make_graph(b.nodes, f"{hint}_{label}", [], self._outputs(outs), initializer=b.initializers,
                                    value_info=b.value_info)
                  for label, b, outs in (("then", then, then_outs), ("else", otherwise, else_names))]
        results = [self.name("logits"), self.name("exit_index")]
        branch.nodes.append(helper.make_node("If", [cond], results, name=self.name(hint), then_branch=graphs[0],
                                             else_branch=graphs[1]))
        return results

    def _outputs(self, names: list[str]) -> list:
        helper = self.helper
        return [helper.make_tensor_value_info(names[0], self.logits_type, ["batch", self.num_classes]),
                helper.make_tensor_value_info(names[1], self.onnx.TensorProto.INT64, ["batch"])]

    def compose(self, input_names: list[str], rules: Sequence[ExitRule | None]):
        """The routed model, taking ``input_names`` (stage 0's tensors) and routing by ``rules``."""
        onnx, helper = self.onnx, self.helper
        inputs = []
        infos = self.graphs[0].input[:self.pieces[0].carried_in]
        # the dims the capture left dynamic (a sequence length) keep a name; one shared by several inputs, one name
        params = list(dict.fromkeys(d.dim_param for info in infos for d in info.type.tensor_type.shape.dim[1:]
                                    if d.HasField("dim_param")))
        named = {p: "length" if len(params) == 1 else f"length_{j}" for j, p in enumerate(params)}
        for name, info in zip(input_names, infos):
            shape = ["batch", *[named[d.dim_param] if d.HasField("dim_param") else d.dim_value
                                for d in info.type.tensor_type.shape.dim[1:]]]
            inputs.append(helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, shape))
        for i, rule in enumerate(rules):
            if rule is not None:
                self.initializers.append(onnx.numpy_helper.from_array(
                    np.asarray(rule.threshold, dtype=np.float32), threshold_name(i)))
                if not rule.criterion.across_exits:
                    self.initializers.append(onnx.numpy_helper.from_array(
                        np.asarray(rule.temperature, dtype=np.float32), temperature_name(i)))
        top = _Branch()
        size = self._add(top, "Shape", [input_names[0]], "batch", start=0, end=1)
        batch = self._add(top, "Squeeze", [size, self._constant([0], "int64", "axis_0")], "batch")
        shape = self._add(top, "Concat", [size, self._constant([self.num_classes], "int64", "classes")], "shape",
                          axis=0)
        zero = onnx.numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.logits_type)))
        logits = self._add(top, "ConstantOfShape", [shape], "logits", value=zero)
        exits = self._add(top, "ConstantOfShape", [size], "exit_index",
                          value=onnx.numpy_helper.from_array(np.asarray([self.k], dtype=np.int64)))
        where = self._add(top, "Range", [self._constant(0, "int64", "zero"), batch,
                                         self._constant(1, "int64", "one")], "where")
        going = self._add(top, "Greater", [batch, self._constant(0, "int64", "zero")], "any_going")
        rest, finished = self._level(0, input_names, where, logits, exits, None)
        results = self._if(top, going, rest, finished, [logits, exits], "batch")  # an empty batch runs nothing
        top.nodes.append(helper.make_node("Identity", [results[0]], [LOGITS]))
        top.nodes.append(helper.make_node("Identity", [results[1]], [EXIT_INDEX]))
        graph = helper.make_graph(top.nodes, "branchify_routed", inputs, self._outputs([LOGITS, EXIT_INDEX]),
                                  initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                                 functions=list(self.functions.values()), producer_name="branchify",
                                 ir_version=self.ir_version)


