"""One ONNX model that routes each sample itself: the runner's stages, heads and criteria, nested in Ifs.

Each piece (stage ``i``, then head ``i``, its criterion's score and the mask of the samples that leave)
is captured by ``torch.export`` (batch dim dynamic) and translated by ``torch.onnx``; the pieces are
then composed with ``onnx``'s helpers into one graph that does what ``route_stages`` does:
after each exit, NonZero splits the sub-batch into the samples that leave and those that go on, the
leavers' logits and exit index are scattered (ScatterND) into the outputs at their batch positions, every
tensor that crosses the cut is compacted (Gather along the batch), and the rest of the network sits in
the then-branch of an ``If`` on "does any sample go on", whose else-branch returns the outputs as they
are. A stage nobody reaches does no work, and an exit that is off is passed by (no head, no If).

Thresholds (and temperatures) are top-level initializers named ``exit_{i}_threshold`` and
``exit_{i}_temperature``, float32 scalars, so a deployment can re-tune them in the file; the branches read
them from the outer scope. Each piece's weights stay in the branch that holds its nodes: onnxruntime's
NCHWc layout transformer only rewrites convolutions whose weights are initializers of their own graph, and
weights read from the outer scope made resnet50 1.5x to 1.7x slower (``benchmarks/onnx.py`` measures
both).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..criteria import Criterion
from ..errors import BranchifyError
from ..routing import ExitRule, agreeing_run

__all__ = ["MIN_OPSET", "Piece", "export_onnx", "export_pieces", "threshold_name", "temperature_name"]

MIN_OPSET = 18  # torch.onnx's dynamo exporter and the ops used here (ScatterND, NonZero, If) need no more
_TWO_GB = 2**31
_LOGITS, _EXIT_INDEX = "logits", "exit_index"


def threshold_name(i: int) -> str:
    """The name of exit ``i``'s threshold initializer in the exported model."""
    return f"exit_{i}_threshold"


def temperature_name(i: int) -> str:
    """The name of exit ``i``'s temperature initializer (criteria that score one exit's logits only)."""
    return f"exit_{i}_temperature"


def _require_onnx():
    """``onnx``, after checking that what the export needs (onnx, onnxscript) is installed."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise BranchifyError(
                f"exporting to ONNX needs the {name!r} package, which is not installed; "
                "pip install 'branchify[onnx]' (onnx, onnxscript and onnxruntime)") from None
    return importlib.import_module("onnx")


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise BranchifyError(f"opset must be an int (e.g. {MIN_OPSET}) or None for torch.onnx's default, "
                             f"got {opset!r}")
    if opset < MIN_OPSET:
        raise BranchifyError(
            f"opset {opset} is too old: torch.onnx's exporter and the routing (If, NonZero, ScatterND) need opset "
            f">= {MIN_OPSET}; pass opset={MIN_OPSET} or more, or leave it out for torch.onnx's default")


class _PieceModule(nn.Module):
    """Stage ``i``, then, when exit ``i`` is on, head ``i``, its criterion's score and the mask of the samples
    that leave (and, when a criterion looks across exits, each sample's prediction and run of agreeing exits).

    Takes the tensors the stage takes (its constant inputs are baked in), then the threshold and the
    temperature (0-d tensors; a criterion across exits takes no temperature), then the last judged exit's
    predictions and runs (when the routing remembers and an exit was judged before); returns the tensors
    the stage returns, then the head's logits and the mask, then the predictions and runs."""

    def __init__(self, stage: nn.Module, inputs: Sequence, head: nn.Module | None = None, head_inputs: int = 1,
                 rule: ExitRule | None = None, remembers: bool = False, judged_before: bool = False) -> None:
        super().__init__()
        self.stage, self.head = stage, head
        self.head_inputs = head_inputs
        self.criterion: Criterion | None = None if rule is None else rule.criterion
        self.tensor_at = [isinstance(v, torch.Tensor) for v in inputs]
        self.constants = [None if t else v for t, v in zip(self.tensor_at, inputs)]
        self.remembers, self.judged_before = remembers, judged_before
        self.training = False  # not self.eval(): a loaded runner's programs refuse train(), and they are in eval

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(args)
        values = [next(it) if t else c for t, c in zip(self.tensor_at, self.constants)]
        out = self.stage(*values)
        tensors = tuple(v for v in out if isinstance(v, torch.Tensor))
        if self.head is None or self.criterion is None:
            return tensors
        z = self.head(*out[:self.head_inputs])
        threshold = next(it)
        temperature = None if self.criterion.across_exits else next(it)
        memory: tuple[torch.Tensor, ...] = ()
        if self.remembers:
            prediction = z.argmax(dim=-1)  # as routing.Judge does
            streak = agreeing_run(prediction, next(it), next(it)) if self.judged_before else agreeing_run(prediction)
            memory = (prediction, streak)
        if temperature is None:
            fired = memory[1] >= threshold  # ExitRule.fires for a criterion across exits
        else:
            fired = self.criterion.fires(self.criterion.score_fn(z / temperature), threshold)
        return (*tensors, z, fired, *memory)


@dataclass
class Piece:
    """One exported piece: stage ``index`` (with head, criterion and mask when its exit is on).

    ``model`` takes ``carried_in`` tensors (stage 0: the model's tensor inputs), then, when the exit is on,
    its threshold, its temperature (unless its criterion looks across exits) and, when the routing
    ``remembers`` and an exit was ``judged_before``, the predictions and runs; it returns ``carried_out``
    tensors, then, when the exit is on, logits, mask, and predictions and runs when it remembers.
    ``inputs`` are the example inputs it was exported with (all of them: also the scalars)."""

    index: int
    model: object  # onnx.ModelProto
    rule: ExitRule | None
    carried_in: int
    carried_out: int
    remembers: bool
    judged_before: bool
    inputs: tuple[torch.Tensor, ...]


def _describe(runner, i: int) -> str:
    spec = runner._spec
    if i < len(spec.exits):
        return f"stage {i} (up to exit {i}, {spec.exits[i].layer!r})"
    return f"stage {i} (the last, up to the final classifier)"


def _exporter_summary(err: Exception) -> str:
    """An exporter's error in one line: what failed (its first sentence) and the exception under it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(" This is step")[0].rstrip(". ") if lines else type(err).__name__
    if "## Exception summary" in lines:
        cause = lines[lines.index("## Exception summary") + 1]
        cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", cause)
        first = f"{first}: {cause[:300]}"
    return f"{type(err).__name__}: {first}"


def _export(module: nn.Module, inputs: tuple, dynamic: tuple, names: list[str], opset: int | None, what: str):
    """``module`` as an ONNX model: captured by ``torch.export`` (so that nothing falls back to a trace that would
    bake data-dependent values in as constants), then translated by ``torch.onnx``."""
    way_out = ("the runner still runs it in torch. A criterion's score function must be torch operations that "
               "torch.export can trace; for a stage, move the exit to another layer, or report the model to "
               "torch.export / torch.onnx with the traceback of the cause")
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=(dynamic,))
    except Exception as err:
        raise BranchifyError(f"torch.export could not capture {what} for ONNX ({_exporter_summary(err)}); "
                             f"{way_out}") from err
    try:
        # torch.onnx prints its progress; the model is what matters here, the exporter's own log is not
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # one Dim for every batch dim: torch.onnx says it names them after one of them, which is the point
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=names, opset_version=opset,
                                             verbose=False, report=False)
    except Exception as err:
        raise BranchifyError(f"torch.onnx could not translate {what} to ONNX ({_exporter_summary(err)}); "
                             f"{way_out}") from err
    if onnx_program is None:
        raise BranchifyError(f"internal: torch.onnx returned no program for {what}")
    return onnx_program.model_proto


def _stage_inputs(runner, example_inputs) -> tuple:
    """Stage 0's inputs for the example (batch 2, so that export does not specialise the batch dim to 1)."""
    if example_inputs is None:
        if not runner._macs.shapes:
            raise BranchifyError(
                "the runner has not seen an input yet, so it does not know the input shape to export; pass "
                "example_inputs=torch.randn(1, 3, 224, 224) (your input's shape) or call the runner once")
        example_inputs = tuple(torch.zeros((2, *s), dtype=runner._dtype, device=runner._device)
                               for s in runner._macs.shapes[0])
    values, _ = runner._bind((example_inputs,), {})
    runner._check(values)
    if any(isinstance(v, torch.Tensor) and v.shape[0] == 0 for v in values):
        raise BranchifyError("example_inputs has no samples; pass at least one sample (its values do not matter)")
    return tuple(torch.cat([v[:1], v[:1]]) if isinstance(v, torch.Tensor) else v for v in values)


def export_pieces(runner, example_inputs=None, *, opset: int | None = None) -> list[Piece]:
    """Every stage of ``runner`` as an ONNX piece, exported with ``torch.onnx`` (see the module's docstring).

    ``benchmarks/onnx.py`` times the pieces on their own: that is the ideal the routed model is held to."""
    return _pieces(runner, _prepare(runner, example_inputs, opset), opset)


def _prepare(runner, example_inputs, opset: int | None) -> tuple:
    """Refuse what cannot be exported, before anything is exported; stage 0's example inputs."""
    _check_opset(opset)
    if runner._hooks:
        raise BranchifyError(
            "this runner's module comes from the hook fallback (module.exit_path == 'hooks': its model cannot be "
            "traced), so it has no stages and there is no graph to export to ONNX; export the plain model with "
            "torch.onnx.export, or make the model traceable (bx.attach_exits(..., capture='export'))")
    runner._follow_spec()  # refuses criteria that read labels, as the runner does
    _require_onnx()
    return _stage_inputs(runner, example_inputs)


def _pieces(runner, values: tuple, opset: int | None) -> list[Piece]:
    rules = runner._rules
    remembers = any(r is not None and r.criterion.across_exits for r in rules)
    batch = torch.export.Dim("batch", min=1)
    pieces: list[Piece] = []
    judged = False
    prediction = streak = None
    with torch.inference_mode(False), torch.no_grad():
        for i, stage in enumerate(runner.stages):
            rule = rules[i] if i < len(rules) else None
            head = runner.heads[i] if rule is not None else None
            module = _PieceModule(stage, values, head, runner._head_inputs[i] if head is not None else 1, rule,
                                  remembers, judged)
            tensors = tuple(v for v in values if isinstance(v, torch.Tensor))
            inputs: tuple = tensors
            names = [f"in_{j}" for j in range(len(tensors))]
            if rule is not None:
                inputs += (torch.tensor(rule.threshold, dtype=torch.float32),)
                names.append("threshold")
                if not rule.criterion.across_exits:
                    inputs += (torch.tensor(rule.temperature, dtype=torch.float32),)
                    names.append("temperature")
                if remembers and judged:
                    inputs += (prediction, streak)
                    names += ["prediction", "streak"]
            dynamic = tuple(None if v.ndim == 0 else {0: batch} for v in inputs)
            what = _describe(runner, i) + ("" if rule is None else f", its head and criterion {rule.criterion.name!r}")
            model = _export(module, inputs, dynamic, names, opset, what)
            outputs = module(*inputs)
            carried_out = len(outputs) - (0 if rule is None else 2 + 2 * remembers)
            pieces.append(Piece(i, model, rule, len(tensors), carried_out, remembers, judged, inputs))
            if rule is not None and remembers:
                prediction, streak = outputs[-2], outputs[-1]
            judged = judged or rule is not None
            values = stage(*values)
    return pieces


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


class _Composer:
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
                    raise BranchifyError(f"internal: the pieces were exported with opsets {known} and {entry.version}")
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
            raise BranchifyError(f"internal: piece {i} has {len(ins)} inputs, {piece.carried_in + len(feeds)} expected")
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
        for name, info in zip(input_names, self.graphs[0].input[:self.pieces[0].carried_in]):
            shape = ["batch", *[d.dim_value for d in info.type.tensor_type.shape.dim[1:]]]
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
        top.nodes.append(helper.make_node("Identity", [results[0]], [_LOGITS]))
        top.nodes.append(helper.make_node("Identity", [results[1]], [_EXIT_INDEX]))
        graph = helper.make_graph(top.nodes, "branchify_routed", inputs, self._outputs([_LOGITS, _EXIT_INDEX]),
                                  initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                                 functions=list(self.functions.values()), producer_name="branchify",
                                 ir_version=self.ir_version)


def _input_names(runner, values: tuple) -> list[str]:
    """The names of stage 0's tensor inputs: the model's forward arguments (``input_{j}`` when unknown)."""
    names = [str(n.target) for n in runner.stages[0].graph.nodes if n.op == "placeholder"]
    if len(names) != len(values):
        names = [f"input_{j}" for j in range(len(values))]
    names = [name for name, v in zip(names, values) if isinstance(v, torch.Tensor)]
    clash = sorted({_LOGITS, _EXIT_INDEX} & set(names))
    if clash:
        raise BranchifyError(f"the model's input {clash[0]!r} has the name of an output of the exported model "
                             f"({_LOGITS!r}, {_EXIT_INDEX!r}); rename that argument of the model's forward")
    return names


def _weight_bytes(graph) -> int:
    """The bytes of ``graph``'s initializers and of those of its subgraphs."""
    total = sum(len(t.raw_data) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            total += sum(_weight_bytes(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    return total


def export_onnx(runner, path: str | os.PathLike, example_inputs=None, *, opset: int | None = None) -> Path:
    """Write ``runner`` as one ONNX model that routes each sample itself (see ``ExitRunner.export_onnx``)."""
    values = _prepare(runner, example_inputs, opset)
    pieces = _pieces(runner, values, opset)
    onnx = importlib.import_module("onnx")
    model = _Composer(pieces, runner.num_classes).compose(_input_names(runner, values), runner._rules)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = _weight_bytes(model.graph) >= _TWO_GB - (64 << 20)
    try:
        if large:  # a protobuf message cannot exceed 2 GB: the weights go beside the file
            onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
            onnx.save(model, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise BranchifyError(f"internal: the composed ONNX model does not pass onnx.checker ({err})") from err
    return path
