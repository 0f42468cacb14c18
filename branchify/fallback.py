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

import contextlib
import difflib
import inspect
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._inputs import Inputs
from ._outputs import select_output
from ._record import Recording
from ._trace import (
    COMPILED_PREFIX,
    call_names,
    compiled_name,
    container_not_called,
    eval_mode,
    several_calls,
    split_call,
)
from .errors import BranchifyError
from .exits import ExitPointInfo, Exits
from .heads import build_head, default_token, mask_reading
from .layout import Layout, batch_dim, channel_dims, choose_layout, layout_of, other_batch, widened
from .spec import ExitSpec, spec_attribute

__all__ = ["HookExitModule", "attach_exits_with_hooks", "hook_points"]


@dataclass(frozen=True)
class HookPoint:
    """What the recorded forward showed of one call of a module (``call`` of ``calls``)."""

    path: str
    call: int
    calls: int  # how many times the forward called the module
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

    @property
    def name(self) -> str:
        """The name of this call: the module path when it runs once, else ``path:call``."""
        return call_names(self.path, self.calls)[self.call]

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




def hook_points(model: nn.Module, inputs: Inputs, paths: list[str], output=None
                ) -> tuple[dict[str, list[HookPoint]], torch.Tensor, float]:
    """Run ``model`` once on ``inputs`` (eval mode, no grad), recording; facts for each call of each of ``paths``
    that returned a tensor, call by call; the selected final output; the total MACs."""
    modules = dict(model.named_modules())
    inputs = Inputs.of(inputs)
    recording = Recording()
    for i, tensor in enumerate(inputs.tensors):
        recording.input(f"input_{i}", tensor)
    seen: dict[str, list[tuple]] = {}
    order = iter(range(1 << 62))
    handles = []
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            for path in dict.fromkeys(paths):
                def hook(_m, _a, out, path=path):
                    out = _features(out)
                    # every call is kept (a non-tensor output too, so that call k stays the k-th call)
                    tensor = out if isinstance(out, torch.Tensor) else None
                    node = None if tensor is None else recording.node_of(tensor)
                    seen.setdefault(path, []).append((tensor, node, counter.get_total_flops() / 2, next(order)))
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
                    f"{text[0] if text else type(err).__name__}") from err
            total = counter.get_total_flops() / 2
    finally:
        for handle in handles:
            handle.remove()
    batch_dims = _batch_dims(model, inputs, {(path, call): tuple(c[0].shape) for path, calls in seen.items()
                                             for call, c in enumerate(calls) if c[0] is not None})
    cdims = channel_dims(recording.graph, recording.shapes)
    points: dict[str, list[HookPoint]] = {}
    for path, calls in seen.items():
        points[path] = []
        for call, (out, node, macs, position) in enumerate(calls):
            if out is not None:
                batch = batch_dims.get((path, call))
                layout = layout_of(out.shape, None if node is None else cdims.get(node.name), batch)
                points[path].append(HookPoint(path, call, len(calls), tuple(out.shape), out.dtype, out.device,
                                              layout, macs, position, batch))
    final, _ = select_output(result, output)
    return points, final, total


def _batch_dims(model: nn.Module, inputs: Inputs, shapes: dict[tuple[str, int], tuple[int, ...]]
                ) -> dict[tuple[str, int], int | None]:
    """The batch dim of each call's output (``shapes``, keyed by module path and call: at ``inputs``' batch), from
    a second forward at another batch size; unknown for all when the model does not run at another batch size."""
    other = other_batch(inputs)
    seen: dict[str, list] = {}
    modules = dict(model.named_modules())
    handles = []
    try:
        for path in dict.fromkeys(path for path, _ in shapes):
            def hook(_m, _a, out, path=path):
                out = _features(out)
                seen.setdefault(path, []).append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)
            handles.append(modules[path].register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            widened(inputs, other).call(model)
    except Exception:  # a model fixed to one batch size: no batch dim can be told
        return {}
    finally:
        for handle in handles:
            handle.remove()
    dims = {}
    for (path, call), shape in shapes.items():
        calls = seen.get(path, [])
        if call < len(calls) and calls[call] is not None:
            dims[(path, call)] = batch_dim((shape, calls[call]), (inputs.batch, other))
    return dims


class _LayerHooks:
    """The forward hooks of one hook-path module, shared by every thread that runs it.

    The exit layers are submodules of the user's model, which every thread calling the module shares, so a
    hook registered per call would see the other threads' forwards. One hook per layer is registered while
    any forward runs (the first in registers, the last out removes them, so the model carries no hook between
    forwards), and each hook hands the layer's output to the callback of the forward running in its own thread.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._active = 0
        self._handles: list = []

    def _fire(self, index: int, _module: nn.Module, _args, output) -> None:
        callback = getattr(self._local, "callback", None)
        if callback is not None:  # another thread's forward, or a forward outside run_with_hooks: not ours
            callback(index, output)  # returns None: a hook that returns a value would replace the output

    @contextlib.contextmanager
    def running(self, model: nn.Module, paths: list[str], callback) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                self._handles = [model.get_submodule(path).register_forward_hook(partial(self._fire, index))
                                 for index, path in enumerate(paths)]
            self._active += 1
        outer = getattr(self._local, "callback", None)
        self._local.callback = callback
        try:
            yield
        finally:
            self._local.callback = outer
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    for handle in self._handles:
                        handle.remove()
                    self._handles = []


# Kept beside the module rather than on it: a lock neither deep-copies nor pickles, and modules are both.
_LAYER_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYER_HOOKS_LOCK = threading.Lock()


def _hooks_of(module: nn.Module) -> _LayerHooks:
    with _LAYER_HOOKS_LOCK:
        hooks = _LAYER_HOOKS.get(module)
        if hooks is None:
            hooks = _LAYER_HOOKS[module] = _LayerHooks()
        return hooks


class HookExitModule(nn.Module, Exits):
    """A model with exit heads fed by forward hooks; forward returns ``(exit_0, ..., final)``.

    Same attributes as ``ExitModule``; ``exit_path == "hooks"``. ``layer_paths`` are the hooked
    module paths in exit order and ``layer_calls`` which call of each module carries the exit
    (``"path:k"`` names call k; a plain path, a module the forward calls once).
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
        self.layer_paths = [split_call(p.layer)[0] for p in exit_spec.exits]
        self.layer_calls = [split_call(p.layer)[1] or 0 for p in exit_spec.exits]
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
        """Run the model with ``hook(index, output, *extras)`` called after each exit's call of its layer (the
        ``layer_calls[index]``-th); returns the logits.

        ``extras`` are what head ``index`` takes beyond the layer's output: the call's attention mask for a
        head that skips padding, else nothing; a call without the mask such a head needs is refused. Safe to
        run from several threads at once: each thread's hook sees only its own forward (``_LayerHooks``)."""
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
        counts = [0] * len(self.layer_paths)  # this forward's own: concurrent forwards count their own calls

        def on_output(index: int, output) -> None:
            counts[index] += 1
            if counts[index] - 1 == self.layer_calls[index]:
                hook(index, _features(output), *extras[index])

        with _hooks_of(self).running(self.model, self.layer_paths, on_output):
            result = self.model(*args, **kwargs)
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
    inputs = Inputs.of(inputs)
    modules = dict(model.named_modules())
    for index, point in enumerate(spec.exits):
        path = split_call(point.layer)[0]
        if path.startswith(COMPILED_PREFIX) and path not in modules:
            raise BranchifyError(compiled_name(f"exit {index} (layer {point.layer!r})", point.layer))
        if path not in modules or not path:
            close = difflib.get_close_matches(point.layer, [m for m in modules if m], n=5, cutoff=0.5)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            raise BranchifyError(
                f"exit {index} (layer {point.layer!r}): this model is not captured as a graph ({reason}), so exits "
                f"must name modules, and there is no module {point.layer!r}.{hint} See [name for name, _ in "
                "model.named_modules()]")
    points_by_path, final, total = hook_points(model, inputs, [split_call(p)[0] for p in spec.layers],
                                               output)
    if not isinstance(final, torch.Tensor) or final.ndim != 2:
        shape = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise BranchifyError(f"the model's eval output is {shape}, but branchify needs (batch, num_classes) logits; "
                             "pick them with output=...")
    num_classes, batch = int(final.shape[1]), int(final.shape[0])

    chosen = []
    for index, point in enumerate(spec.exits):
        what = f"exit {index} (layer {point.layer!r})"
        path, call = split_call(point.layer)
        calls = points_by_path.get(path, [])
        count = calls[0].calls if calls else 0
        if call is None and count > 1:
            raise several_calls(what, path, count, "the eval forward of example_inputs")
        facts = next((f for f in calls if f.call == (call or 0)), None)
        inner = [m for m in modules if m.startswith(path + ".")] if not count and call is None else []
        if inner:
            inner_points = hook_points(model, inputs, inner, output)[0]
            ran = [p for calls_of in inner_points.values() for p in calls_of]
            if ran:
                raise container_not_called(what, path, max(ran, key=lambda p: p.order).name)
        if facts is None:
            ran = f"called {count} time(s)" if count else "not called"
            raise BranchifyError(f"{what}: the module is {ran} in the eval forward of example_inputs, and that call "
                                 "did not run or did not return a tensor; pick a call that returns features"
                                 + (f" ({', '.join(repr(f.name) for f in calls)})" if calls else ""))
        chosen.append(facts)
    spec.check_order([f.order for f in chosen], "the order the forward calls them")
    heads, points, ordered, reads_mask = [], [], [], []
    mask = attention_mask(model, inputs.args, inputs.kwargs)
    mask_shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
    token = default_token(model)
    for index in range(len(spec.exits)):
        point = spec.exits[index]
        what = f"exit {index} (layer {point.layer!r})"
        facts = chosen[index]
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
