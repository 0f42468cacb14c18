"""Exits through forward hooks, for models that neither torch.fx nor torch.export can capture.

Data-dependent Python control flow (``if x.sum() > 0:``) defeats both. Such a model still gets its
exits: forward hooks on the named modules see their outputs during the model's own forward, and each
head runs inside the hook, on the value as the layer returned it (a later in-place operation such as
``ReLU(inplace=True)`` or ``out += identity`` cannot change what the head reads; with gradients on,
the head reads a copy, so autograd never finds its input overwritten). Hooks are registered for the
duration of each forward only, so the model itself is left as it was.

Shapes, layouts and MACs come from one real forward of the example inputs, recorded as a graph
(``branchify._record``) and read by the same layout analysis as the captured graphs.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._inputs import Inputs
from ._outputs import select_output
from ._record import Recording
from ._trace import eval_mode
from .errors import BranchifyError
from .exits import ExitPointInfo, Exits
from .heads import build_head, default_token, mask_reading
from .layout import Layout, batch_dim, channel_dims, choose_layout, layout_of, other_batch, widened
from .spec import ExitSpec, spec_attribute

__all__ = ["HookExitModule", "attach_exits_with_hooks", "hook_points"]


@dataclass(frozen=True)
class HookPoint:
    """What the recorded forward showed of one module's first output."""

    path: str
    shape: tuple[int, ...]  # batched
    dtype: torch.dtype
    device: torch.device
    layout: Layout | None
    macs: float  # cumulative, whole batch
    order: int
    batch_dim: int | None = 0  # the dim that holds the batch (None: no single dim)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        batch = self.batch_dim or 0
        return self.shape[:batch] + self.shape[batch + 1:]


MASK = "attention_mask"


def _features(output):
    """What an exit reads of a module's output: the output, or the first entry of a tuple (a transformer block's
    ``(hidden_states, attentions)``)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def attention_mask(model: nn.Module, args: tuple, kwargs: Mapping):
    """The padding mask a call of ``model`` passes (its ``attention_mask`` argument, by name or position), or
    None."""
    if MASK in kwargs:
        return kwargs[MASK]
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    return bound.get(MASK)


def _call_ignoring_result(hook, index: int, extras, _module: nn.Module, _args, output) -> None:
    # A forward hook that returns a value replaces the module's output; callbacks must never do that.
    hook(index, _features(output), *extras)


def hook_points(model: nn.Module, inputs: Inputs, paths: list[str], output=None
                ) -> tuple[dict[str, HookPoint], torch.Tensor, float]:
    """Run ``model`` once on ``inputs`` (eval mode, no grad), recording; facts for each of ``paths`` that
    returned a tensor, at its first call; the selected final output; the total MACs."""
    modules = dict(model.named_modules())
    inputs = Inputs.of(inputs)
    recording = Recording()
    for i, tensor in enumerate(inputs.tensors):
        recording.input(f"input_{i}", tensor)
    seen: dict[str, tuple] = {}
    handles = []
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            for path in paths:
                def hook(_m, _a, out, path=path):
                    out = _features(out)
                    if path not in seen and isinstance(out, torch.Tensor):  # the first call counts
                        seen[path] = (out, recording.node_of(out), counter.get_total_flops() / 2, len(seen))
                handles.append(modules[path].register_forward_hook(hook))
            try:
                with recording:
                    result = inputs.call(model)
            except BranchifyError:
                raise
            except Exception as err:
                text = str(err).strip().splitlines()
                raise BranchifyError(
                    f"the model rejects example_inputs ({inputs.describe()}): "
                    f"{text[0] if text else type(err).__name__}") from None
            total = counter.get_total_flops() / 2
    finally:
        for handle in handles:
            handle.remove()
    batch_dims = _batch_dims(model, inputs, {path: tuple(facts[0].shape) for path, facts in seen.items()})
    cdims = channel_dims(recording.graph, recording.shapes)
    points = {}
    for path, (out, node, macs, order) in seen.items():
        batch = batch_dims.get(path)
        layout = layout_of(out.shape, None if node is None else cdims.get(node.name), batch)
        points[path] = HookPoint(path, tuple(out.shape), out.dtype, out.device, layout, macs, order, batch)
    final, _ = select_output(result, output)
    return points, final, total


def _batch_dims(model: nn.Module, inputs: Inputs, shapes: dict[str, tuple[int, ...]]) -> dict[str, int | None]:
    """The batch dim of each module's output (``shapes``: at ``inputs``' batch), from a second forward at another
    batch size; unknown for all when the model does not run at another batch size."""
    other = other_batch(inputs)
    seen: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    handles = []
    try:
        for path in shapes:
            def hook(_m, _a, out, path=path):
                out = _features(out)
                if path not in seen and isinstance(out, torch.Tensor):
                    seen[path] = tuple(out.shape)
            handles.append(modules[path].register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            widened(inputs, other).call(model)
    except Exception:  # a model fixed to one batch size: no batch dim can be told
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return {path: batch_dim((shape, seen[path]), (inputs.batch, other)) for path, shape in shapes.items()
            if path in seen}


class HookExitModule(nn.Module, Exits):
    """A model with exit heads fed by forward hooks; forward returns ``(exit_0, ..., final)``.

    Same attributes as ``ExitModule``; ``exit_path == "hooks"``. ``layer_paths`` are the hooked
    module paths in exit order; the first call of a module during a forward is the one that counts
    (as in the runtime, which must decide before the forward goes on).
    """

    exit_path = "hooks"

    def __init__(self, model: nn.Module, heads: list[nn.Module], *, exit_spec: ExitSpec,
                 exit_points: list[ExitPointInfo], num_classes: int, output=None,
                 reads_mask: list[bool] | None = None) -> None:
        super().__init__()
        self.model = model
        self.exit_heads = nn.ModuleList(heads)
        self.exit_spec = exit_spec
        self.exit_points = exit_points
        self.num_classes = num_classes
        self.output = output
        self.layer_paths = [p.layer for p in exit_spec.exits]
        self.reads_mask = reads_mask or [False] * len(heads)  # does head k take the call's attention mask
        self.training = model.training
        self.exit_heads.train(model.training)

    exit_spec = spec_attribute("execution order")

    def _count_exit_costs(self, inputs):
        from .cost import hook_costs

        return hook_costs(self, inputs)

    def exit_stages(self):
        return None  # an opaque forward: nothing to cut

    def run_with_hooks(self, hook, *args, **kwargs):
        """Run the model with ``hook(index, output, *extras)`` called after each exit layer; returns the logits.

        ``extras`` are what head ``index`` takes beyond the layer's output: the call's attention mask for a
        head that skips padding, else nothing; a call without the mask such a head needs is refused."""
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])
        extras = [()] * len(self.layer_paths)
        if any(self.reads_mask):
            mask = attention_mask(self.model, args, kwargs)
            if not isinstance(mask, torch.Tensor):
                needs = [self.layer_paths[i] for i, reads in enumerate(self.reads_mask) if reads]
                raise BranchifyError(
                    f"the heads of the exits at {needs} pool the real tokens under the attention mask, but this "
                    f"call passes no {MASK!r} tensor; pass the tokenizer's {MASK!r} with the input ids")
            extras = [(mask,) if reads else () for reads in self.reads_mask]
        handles = []
        for index, path in enumerate(self.layer_paths):
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_hook(partial(_call_ignoring_result, hook, index, extras[index])))
        try:
            result = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return select_output(result, self.output)[0]

    def forward(self, *args, **kwargs):
        logits: dict[int, torch.Tensor] = {}

        def run_head(index: int, out: torch.Tensor, *extras: torch.Tensor) -> None:
            if index not in logits:  # the layer's first call counts
                # the head reads the value now; a copy when autograd will need it after later in-place ops
                value = out.clone() if torch.is_grad_enabled() else out
                logits[index] = self.exit_heads[index](value, *extras)

        final = self.run_with_hooks(run_head, *args, **kwargs)
        missing = [self.layer_paths[i] for i in range(len(self.layer_paths)) if i not in logits]
        if missing:
            raise BranchifyError(f"exit layers {missing} did not run in this forward, so their exits have no input")
        return (*(logits[i] for i in range(len(self.exit_heads))), final)


def attach_exits_with_hooks(model: nn.Module, spec: ExitSpec, inputs: Inputs, *, reason: str,
                            output=None) -> HookExitModule:
    modules = dict(model.named_modules())
    for index, point in enumerate(spec.exits):
        if point.layer not in modules or not point.layer:
            close = difflib.get_close_matches(point.layer, [m for m in modules if m], n=5, cutoff=0.5)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            raise BranchifyError(
                f"exit {index} (layer {point.layer!r}): this model is not captured as a graph ({reason}), so exits "
                f"must name modules, and there is no module {point.layer!r}.{hint} See [name for name, _ in "
                "model.named_modules()]")
    points_by_path, final, total = hook_points(model, Inputs.of(inputs), spec.layers, output)
    if not isinstance(final, torch.Tensor) or final.ndim != 2:
        shape = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise BranchifyError(f"the model's eval output is {shape}, but branchify needs (batch, num_classes) logits; "
                             "pick them with output=...")
    num_classes, batch = int(final.shape[1]), int(final.shape[0])

    for index, point in enumerate(spec.exits):
        if point.layer not in points_by_path:
            raise BranchifyError(f"exit {index} (layer {point.layer!r}): the module did not run in the eval forward "
                                 "of example_inputs, or did not return a tensor")
    spec.check_order([points_by_path[p.layer].order for p in spec.exits], "the order the forward calls them")
    heads, points, ordered, reads_mask = [], [], [], []
    mask = attention_mask(model, inputs.args, inputs.kwargs)
    mask_shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
    token = default_token(model)
    for index in range(len(spec.exits)):
        point = spec.exits[index]
        what = f"exit {index} (layer {point.layer!r})"
        facts = points_by_path[point.layer]
        if len(facts.shape) < 2 or not (facts.dtype.is_floating_point or facts.dtype.is_complex):
            raise BranchifyError(f"{what}: its output ({facts.shape}, {facts.dtype}) is not a per-sample float "
                                 "tensor; pick a module that outputs features")
        layout = choose_layout(point.head.layout, facts.layout, facts.shape, what, facts.batch_dim)
        head = build_head(point.head, facts.sample_shape, layout, num_classes, where=what,
                          device=facts.device, dtype=facts.dtype, token=token)
        heads.append(mask_reading(head, layout, facts.shape, mask_shape, what))
        reads_mask.append(heads[-1] is not head)
        points.append(ExitPointInfo(point.layer, point.layer, facts.sample_shape, layout, facts.macs / batch,
                                    facts.macs / total if total else 0.0))
        ordered.append(point)
    exit_spec = spec.model_copy(update={"exits": ordered})
    return HookExitModule(model, heads, exit_spec=exit_spec, exit_points=points, num_classes=num_classes,
                          output=output, reads_mask=reads_mask)
