"""Exits through forward hooks, for models that torch.fx cannot trace.

Data-dependent Python control flow (``if x.sum() > 0:``) defeats tracing. Such a model still gets
its exits: forward hooks on the named modules capture their outputs during the model's own
forward, and the heads run on them. Hooks are registered for the duration of each forward only, so
the model itself is left as it was. Shapes and MACs come from one real forward of the example
inputs (fake tensors cannot follow data-dependent branches).
"""

from __future__ import annotations

import difflib
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import BranchifyError
from .heads import build_head
from .layout import Layout, layout_from_shape, module_channel_dim
from .points import ExitPointInfo
from .propagate import describe_inputs
from .spec import ExitSpec, spec_attribute
from .trace import restore_modes

__all__ = ["HookExitModule", "attach_exits_with_hooks"]


def _call_ignoring_result(hook, index: int, _module: nn.Module, _args, output) -> None:
    # A forward hook that returns a value replaces the module's output; callbacks must never do that.
    hook(index, output)


class HookExitModule(nn.Module):
    """A model with exit heads fed by forward hooks; forward returns ``(exit_0, ..., final)``.

    Same attributes as ``ExitModule``; ``exit_path == "hooks"``. ``layer_paths`` are the hooked
    module paths in exit order; the first call of a module during a forward is the one that counts
    (as in the runtime, which must decide before the forward goes on).
    """

    exit_path = "hooks"

    def __init__(self, model: nn.Module, heads: list[nn.Module], *, exit_spec: ExitSpec,
                 exit_points: list[ExitPointInfo], num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.exit_heads = nn.ModuleList(heads)
        self.exit_spec = exit_spec
        self.exit_points = exit_points
        self.num_classes = num_classes
        self.layer_paths = [p.layer for p in exit_spec.exits]
        self.training = model.training
        self.exit_heads.train(model.training)

    exit_spec = spec_attribute("execution order")

    def run_with_hooks(self, hook, *args, **kwargs):
        """Run the model with ``hook(index, output)`` called after each exit layer."""
        handles = []
        for index, path in enumerate(self.layer_paths):
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_hook(partial(_call_ignoring_result, hook, index)))
        try:
            return self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, *args, **kwargs):
        captured: dict[int, torch.Tensor] = {}
        final = self.run_with_hooks(captured.setdefault, *args, **kwargs)
        missing = [self.layer_paths[i] for i in range(len(self.layer_paths)) if i not in captured]
        if missing:
            raise BranchifyError(f"exit layers {missing} did not run in this forward, so their exits have no input")
        return (*(head(captured[i]) for i, head in enumerate(self.exit_heads)), final)


def attach_exits_with_hooks(model: nn.Module, spec: ExitSpec, inputs: tuple, *, reason: str) -> HookExitModule:
    modules = dict(model.named_modules())
    for index, point in enumerate(spec.exits):
        if point.layer not in modules or not point.layer:
            close = difflib.get_close_matches(point.layer, [m for m in modules if m], n=5, cutoff=0.5)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            raise BranchifyError(
                f"exit {index} (layer {point.layer!r}): this model cannot be traced ({reason}), so exits must "
                f"name modules, and there is no module {point.layer!r}.{hint} See [name for name, _ in "
                "model.named_modules()]")

    order: list[int] = []
    seen: dict[int, tuple[torch.Tensor, float]] = {}
    snapshot = [(m, m.training) for m in model.modules()]
    model.eval()
    handles = []
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            for index, point in enumerate(spec.exits):
                def hook(_m, _a, out, index=index):
                    if index not in seen:  # the first call counts, as in the forward and the runtime
                        order.append(index)
                        seen[index] = (out, counter.get_total_flops() / 2)
                handles.append(modules[point.layer].register_forward_hook(hook))
            try:
                output = model(*inputs)
            except Exception as err:
                text = str(err).strip().splitlines()
                raise BranchifyError(
                    f"the model rejects example_inputs ({describe_inputs(inputs)}): "
                    f"{text[0] if text else type(err).__name__}") from None
            total = counter.get_total_flops() / 2
    finally:
        for handle in handles:
            handle.remove()
        restore_modes(snapshot)
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise BranchifyError("the model's eval output must be a (batch, num_classes) tensor")
    num_classes = int(output.shape[1])
    batch = int(output.shape[0])

    heads, points, ordered = [], [], []
    for index in [i for i in order] + [i for i in range(len(spec.exits)) if i not in seen]:
        point = spec.exits[index]
        what = f"exit {index} (layer {point.layer!r})"
        if index not in seen:
            raise BranchifyError(f"{what}: the module did not run in the eval forward of example_inputs")
        value, macs = seen[index]
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            raise BranchifyError(f"{what}: its output is not a per-sample tensor; pick a module that outputs one")
        layout = point.head.layout
        if layout is None:
            cdim = module_channel_dim(modules[point.layer], value.ndim)
            layout = (Layout.from_channel_dim(value.ndim, cdim) if cdim is not None
                      else layout_from_shape(value.shape, tuple(inputs[0].shape[-2:]) if inputs[0].ndim == 4 else None))
        if layout is None:
            raise BranchifyError(
                f"{what}: cannot tell the layout of shape {tuple(value.shape)}; declare HeadSpec(layout=...)")
        heads.append(build_head(point.head, value.shape[1:], layout, num_classes, where=what,
                                device=value.device, dtype=value.dtype))
        points.append(ExitPointInfo(point.layer, point.layer, tuple(value.shape[1:]), layout, macs / batch,
                                    macs / total if total else 0.0))
        ordered.append(point)
    exit_spec = spec.model_copy(update={"exits": ordered})
    return HookExitModule(model, heads, exit_spec=exit_spec, exit_points=points, num_classes=num_classes)
