"""The pieces of the ONNX export: each stage (with its head, criterion and the mask of the samples that
leave) captured by ``torch.export``, the batch dim and the dims the capture made dynamic kept dynamic,
and translated by ``torch.onnx``.

Thresholds (and temperatures) are inputs of each piece, so that the composed model can read them from
top-level initializers named ``exit_{i}_threshold`` and ``exit_{i}_temperature``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...criteria import Criterion
from ...errors import BranchifyError, BranchifyInternalError
from ...routing import ExitRule, agreeing_run
from ..core import carried_specs, dynamic_shapes

__all__ = ["MIN_OPSET", "Piece", "check_opset", "export_piece_models", "require_onnx", "temperature_name",
           "threshold_name"]

MIN_OPSET = 18  # torch.onnx's dynamo exporter and the ops used here (ScatterND, NonZero, If) need no more


def threshold_name(i: int) -> str:
    """The name of exit ``i``'s threshold initializer in the exported model."""
    return f"exit_{i}_threshold"


def temperature_name(i: int) -> str:
    """The name of exit ``i``'s temperature initializer (criteria that score one exit's logits only)."""
    return f"exit_{i}_temperature"


def require_onnx():
    """``onnx``, after checking that what the export needs (onnx, onnxscript) is installed."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise BranchifyError(
                f"exporting to ONNX needs the {name!r} package, which is not installed; "
                "pip install 'branchify[onnx]' (onnx, onnxscript and onnxruntime)") from None
    return importlib.import_module("onnx")


def check_opset(opset: int | None) -> None:
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


def _describe(spec, i: int) -> str:
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
        raise BranchifyInternalError(f"torch.onnx returned no program for {what}")
    return onnx_program.model_proto


def export_piece_models(core, values: tuple, opset: int | None) -> list[Piece]:
    """Every stage of the runner's ``core`` as an ONNX piece, from stage 0's example ``values``."""
    rules = core.rules()
    remembers = any(r is not None and r.criterion.across_exits for r in rules)
    batch = torch.export.Dim("batch", min=1)
    pieces: list[Piece] = []
    judged = False
    prediction = streak = None
    with torch.inference_mode(False), torch.no_grad():
        specs = core.inputs
        for i, stage in enumerate(core.stages):
            rule = rules[i] if i < len(rules) else None
            head = core.heads[i] if rule is not None else None
            module = _PieceModule(stage, values, head, core.head_inputs[i] if head is not None else 1, rule,
                                  remembers, judged)
            tensor_specs = None if specs is None else [s for s, v in zip(specs, values) if isinstance(v, torch.Tensor)]
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
            dynamic = dynamic_shapes(inputs, tensor_specs, batch)
            what = _describe(core.spec, i)
            if rule is not None:
                what += f", its head and criterion {rule.criterion.name!r}"
            model = _export(module, inputs, dynamic, names, opset, what)
            outputs = module(*inputs)
            carried_out = len(outputs) - (0 if rule is None else 2 + 2 * remembers)
            pieces.append(Piece(i, model, rule, len(tensors), carried_out, remembers, judged, inputs))
            if rule is not None and remembers:
                prediction, streak = outputs[-2], outputs[-1]
            judged = judged or rule is not None
            values = stage(*values)
            specs = carried_specs(core.stages[i + 1], values) if i + 1 < len(core.stages) else None
    return pieces


