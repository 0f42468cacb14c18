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

``pieces`` captures each stage's piece, ``compose`` builds the routed graph; this module is the export.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from ...errors import BranchifyError, BranchifyInternalError
from .compose import EXIT_INDEX, LOGITS, Composer
from .pieces import MIN_OPSET, Piece, check_opset, export_piece_models, require_onnx, temperature_name, threshold_name

__all__ = ["MIN_OPSET", "Piece", "export_onnx", "export_pieces", "threshold_name", "temperature_name"]

_TWO_GB = 2**31


def export_pieces(runner, example_inputs=None, *, opset: int | None = None) -> list[Piece]:
    """Every stage of ``runner`` as an ONNX piece, exported with ``torch.onnx`` (see ``pieces``).

    ``benchmarks/onnx.py`` times the pieces on their own: that is the ideal the routed model is held to."""
    return export_piece_models(runner.core, _prepare(runner, example_inputs, opset), opset)


def _prepare(runner, example_inputs, opset: int | None) -> tuple:
    """Refuse what cannot be exported, before anything is exported; stage 0's example inputs."""
    check_opset(opset)
    core = runner.core
    if core.kind == "hooked":
        raise BranchifyError(
            "this runner's module comes from the hook fallback (module.exit_path == 'hooks': its model cannot be "
            "traced), so it has no stages and there is no graph to export to ONNX; export the plain model with "
            "torch.onnx.export, or make the model traceable (bx.attach_exits(..., capture='export'))")
    core.rules()  # refuses criteria that read labels, as the runner does
    require_onnx()
    return core.example(example_inputs)


def _input_names(core, values: tuple) -> list[str]:
    """The names of stage 0's tensor inputs: the model's forward arguments (``input_{j}`` when unknown)."""
    names = [i.name for i in core.inputs] if core.inputs is not None else []
    if len(names) != len(values):
        names = [f"input_{j}" for j in range(len(values))]
    names = [name for name, v in zip(names, values) if isinstance(v, torch.Tensor)]
    clash = sorted({LOGITS, EXIT_INDEX} & set(names))
    if clash:
        raise BranchifyError(f"the model's input {clash[0]!r} has the name of an output of the exported model "
                             f"({LOGITS!r}, {EXIT_INDEX!r}); rename that argument of the model's forward")
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
    pieces = export_piece_models(runner.core, values, opset)
    onnx = importlib.import_module("onnx")
    model = Composer(pieces, runner.num_classes).compose(_input_names(runner.core, values), runner.core.rules())
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
        raise BranchifyInternalError(f"the composed ONNX model does not pass onnx.checker ({err})") from err
    return path
