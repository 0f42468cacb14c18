"""The early-exit runner: every sample of a batch stops computing at the first exit that lets it out.

It routes with ``staged`` (a traced model cut into stages) or ``hooked`` (the hook path's opaque
forward), counts each input shape's MACs once, checks inputs before anything runs, and saves itself
with ``archive``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .._inputs import Inputs, bind
from .._propagate import describe_inputs
from ..cost import exit_costs
from ..errors import BranchifyError
from ..exits import exit_module
from ..routing import exit_rules
from ..spec import ExitSpec
from .archive import load_runner, save_runner
from .carried import check_carried
from .checks import check_inputs
from .hooked import route_hooks
from .macs import MacTable
from .onnx_export import export_onnx
from .result import ExitResult
from .staged import route_stages

__all__ = ["ExitRunner"]

_FORMAT = "branchify-runner"
_VERSION = 1
_TABLE = "routing.json"


class ExitRunner:
    """Run a module from ``bx.attach_exits`` so that each sample stops at its exit.

    ``runner(x)`` returns an ``ExitResult``. Decisions are those ``bx.ExitStats`` counts in routed mode
    on the module's outputs (``branchify.routing.route``); logits equal the module's outputs for the
    same samples up to CPU kernels' batch-size-dependent rounding (about 1e-5 relative), since later
    stages run on sub-batches. ``stages`` are plain ``fx.GraphModule`` s (they script, export and
    export to ONNX) and ``heads`` the module's exit heads.

    The runner is for inference: it puts ``module`` in eval mode, runs under ``torch.inference_mode``
    and refuses to run if the module is switched back to training. It follows ``module.exit_spec``
    (a new spec, e.g. from calibration, takes effect at the next call); criteria that read labels
    (``"distiller"``) are refused. Inputs must have the dtype and device of the module's parameters
    (``module.to(...)`` before building the runner); channels-last inputs keep their layout.

    MACs are counted once per input shape (ignoring the batch): from ``example_inputs`` when given,
    otherwise at the first call with that shape, with fake tensors (no real compute).

    Modules from the hook fallback (untraceable models, ``module.exit_path == "hooks"``) have an
    opaque forward that cannot be cut into stages: the whole batch runs through the model, and the
    runner stops the forward as soon as every sample has left (it raises from the exit layer's hook);
    if any sample goes on, the forward finishes for the whole batch. Each exit is judged at the first
    call of its layer. ``stages`` is then empty and ``compile``/``save`` are not available.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=6.0, criterion="entropy"),
    ...                           bx.ExitPoint(layer="layer3", threshold=0.5, criterion="confidence")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, torch.randn(1, 3, 32, 32))
    >>> runner = bx.ExitRunner(module)
    >>> result = runner(torch.randn(4, 3, 32, 32))
    >>> result.logits.shape, result.exit_index.tolist(), len(runner.stages)
    (torch.Size([4, 10]), [0, 0, 0, 0], 3)
    """

    def __init__(self, module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> None:
        spec = exit_module(module, "ExitRunner").exit_spec
        cut = module.exit_stages()
        hooks = cut is None
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if module.training:
            warnings.warn(
                "ExitRunner switched the module to eval mode (it was in training mode): the runner is for "
                "inference, with BatchNorm's running statistics and no dropout. Call module.eval() before building "
                "the runner to silence this; call module.train() to train again (the runner then refuses to run)",
                UserWarning, stacklevel=2)
        self._setup(module=module.eval(), spec=spec, stages=[] if cut is None else list(cut.modules),
                    heads=list(module.exit_heads), num_classes=int(module.num_classes), num_inputs=None,
                    dtype=None if param is None else param.dtype, device=None if param is None else param.device,
                    hooks=hooks, head_inputs=None if cut is None else cut.head_inputs)
        record = getattr(module, "example_record", None)
        if record is not None and not record["kwargs"]:
            self._ranks = tuple(len(a["shape"]) if "shape" in a else None for a in record["args"])
        if example_inputs is not None:
            values, names = self._bind((example_inputs,), {})
            self._check(values)
            self._costs(values, names)

    def _setup(self, *, module: nn.Module | None, spec: ExitSpec, stages: list[nn.Module], heads: list[nn.Module],
               num_classes: int, num_inputs: int | None, dtype: torch.dtype | None,
               device: torch.device | None, hooks: bool = False, head_inputs: list[int] | None = None) -> None:
        self._module = module
        self._head_inputs = head_inputs or [1] * len(heads)
        self._hooks = hooks
        self._rules = exit_rules(spec, deployed=True)
        self._spec = spec
        self.stages = stages
        self.heads = heads
        self.num_classes = num_classes
        self._num_inputs = num_inputs
        self._dtype = dtype
        self._device = device
        self._run_stages: list = list(stages)
        self._run_heads: list = list(heads)
        self._macs = MacTable()
        self._ranks: tuple[int | None, ...] | None = None  # each input's dims in the example the module was built on

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, tuple[str, ...] | None]:
        """The stage-0 inputs of a call: as the model takes them (positional, named, or one dict of named
        tensors), with the forward's defaults filled in; and, on the hook path, the names of named inputs
        (the model is then called with them as keywords)."""
        if len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list)) and not self._hooks:
            args = tuple(args[0])  # example_inputs given as a tuple
        inputs = Inputs.of(args[0]) if len(args) == 1 and not kwargs and isinstance(args[0], Mapping) \
            else Inputs(tuple(args), dict(kwargs))
        if self._hooks or self._module is None:
            if inputs.kwargs:
                if self._module is None:
                    raise BranchifyError("a loaded runner takes positional input tensors only")
                return tuple(inputs.kwargs.values()), tuple(inputs.kwargs)
            return inputs.args, None
        return bind(self.stages[0].graph, inputs, "ExitRunner"), None

    def __call__(self, *args, **kwargs) -> ExitResult:
        if self._module is not None and self._module.training:
            raise BranchifyError(
                "the module is in training mode (module.train() was called after the runner was built); "
                "call module.eval() before running the runner")
        self._follow_spec()
        inputs, names = self._bind(args, kwargs)
        self._check(inputs)
        costs = self._costs(inputs, names)
        with torch.inference_mode():
            x = self._batch_input(inputs)
            if x.shape[0] == 0:
                empty = torch.empty(0, dtype=torch.int64, device=x.device)
                return ExitResult(x.new_empty((0, self.num_classes), dtype=self._dtype or x.dtype), empty,
                                  costs[empty])
            # Shapes and dtypes were checked on fake tensors (_costs) before anything ran: what fails now
            # (out of memory, the model's own checks of values) is not a shape mistake, and passes unchanged.
            if self._hooks:
                logits, exit_index = route_hooks(self._module, self._run_heads, self._rules, inputs, names, x)
            else:
                logits, exit_index = route_stages(self._run_stages, self._run_heads, self._head_inputs, self._rules,
                                                  inputs, x)
            return ExitResult(logits, exit_index, costs[exit_index])

    def _follow_spec(self) -> None:
        module = self._module
        if module is not None and module.exit_spec is not self._spec:
            self._rules = exit_rules(module.exit_spec, deployed=True)
            self._spec = module.exit_spec
            self._macs.forget()  # the new spec may switch exits off, and an exit that is off is not charged

    def _input_names(self) -> list[str]:
        return [str(n.target) for n in self.stages[0].graph.nodes if n.op == "placeholder"]

    @staticmethod
    def _batch_input(inputs: tuple) -> torch.Tensor:
        return next(a for a in inputs if isinstance(a, torch.Tensor))

    def _check(self, inputs: tuple) -> None:
        names = None if self._hooks or not self.stages else self._input_names
        check_inputs(inputs, count=self._num_inputs, names=names, dtype=self._dtype, device=self._device,
                     since=self._macs.since, ranks=self._ranks)

    def _costs(self, inputs: tuple, names: tuple[str, ...] | None = None) -> torch.Tensor:
        x = self._batch_input(inputs)
        shapes = tuple(a.shape[1:] for a in inputs if isinstance(a, torch.Tensor))
        costs = self._macs.get(x.device, shapes)
        if costs is None:
            # Batch 1, zeros: the hook fallback counts with a real forward, and a model with data-dependent
            # branches should not see uninitialised memory.
            example = tuple(a.new_zeros((1, *a.shape[1:])) if isinstance(a, torch.Tensor) else a for a in inputs)
            if self._module is None:
                raise BranchifyError(
                    f"this runner was saved for inputs {self._macs.seen()} and its exported "
                    f"programs take only those, but got {describe_inputs(inputs)}; pass inputs of that shape, or "
                    "save the runner again with example_inputs of the shape you need")
            try:
                per_exit = exit_costs(self._module, example if names is None else dict(zip(names, example))).per_exit
            except BranchifyError as err:
                raise BranchifyError(f"the runner cannot take inputs {describe_inputs(inputs)}: {err}") from None
            if not self._hooks:
                check_carried(self.stages, example)
            costs = self._macs.remember(shapes, per_exit, x.device)
        return costs

    def compile(self, **kwargs) -> ExitRunner:
        """Compile each stage and head with ``torch.compile(**kwargs)``; routing stays in Python.

        The batch dim is dynamic (``dynamic=True`` unless given), so a new sub-batch size does not
        recompile (sizes 0 and 1 are specialised once each, as torch.compile does). Returns the runner.

        >>> import torch, torchvision, branchify as bx
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer2", threshold=5.0)])
        >>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 32, 32))
        >>> runner = bx.ExitRunner(module).compile(backend="eager")
        >>> runner(torch.randn(3, 3, 32, 32)).logits.shape
        torch.Size([3, 1000])
        """
        if self._hooks:
            raise BranchifyError(
                "this module comes from the hook fallback (its model cannot be traced), so it has no stages to "
                "compile; torch.compile cannot follow its data-dependent forward either. Run the runner uncompiled")
        kwargs.setdefault("dynamic", True)
        self._run_stages = [torch.compile(s, **kwargs) for s in self.stages]
        self._run_heads = [torch.compile(h, **kwargs) for h in self.heads]
        return self

    def save(self, directory: str | os.PathLike, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
             ) -> Path:
        """Write each stage and head as a ``torch.export`` program, and a JSON routing table.

        The programs take any batch size. The table holds the criteria (by name: a criterion
        registered with ``bx.register_criterion`` must be registered again before loading),
        thresholds, temperatures, the number of classes and the per-exit MACs. ``example_inputs``
        (default: zeros shaped like the first input the runner has seen) fix the non-batch dims of the
        exported programs. Returns the directory.

        >>> import tempfile, torch, branchify as bx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=2.0)])
        >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 3, 16, 16)))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     sorted(p.name for p in runner.save(tmp, example_inputs=torch.randn(1, 3, 16, 16)).iterdir())
        ['head_0.pt2', 'routing.json', 'stage_0.pt2', 'stage_1.pt2']
        """
        return save_runner(self, directory, example_inputs)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExitRunner:
        """Load a runner written by ``save``; the original model's source is not needed.

        The exported programs are read with ``torch.export.load`` with weights-only unpickling forced,
        so a tampered archive cannot run code. The loaded runner takes inputs of the shape it was
        saved for, on the CPU.

        >>> import tempfile, torch, branchify as bx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=2.0)])
        >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 3, 16, 16)))
        >>> x = torch.randn(5, 3, 16, 16)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = bx.ExitRunner.load(runner.save(tmp, example_inputs=x))
        >>> torch.equal(loaded(x).exit_index, runner(x).exit_index)
        True
        """
        return load_runner(cls, directory)

    def export_onnx(self, path: str | os.PathLike,
                    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None, *,
                    opset: int | None = None) -> Path:
        """Write one ONNX model that routes each sample itself, as the runner does; returns the path.

        Its inputs are the model's, batch dim dynamic; its outputs ``logits`` ``(B, C)`` and ``exit_index``
        ``(B,)`` int64, in batch order. Each stage runs only on the samples that reach it (nested ``If`` nodes),
        and the thresholds are initializers named ``exit_{i}_threshold`` (temperatures ``exit_{i}_temperature``),
        which can be edited in the file. ``example_inputs`` fix the non-batch dims (default: zeros shaped like
        the first input seen); ``opset`` defaults to torch.onnx's (at least 18). Needs ``branchify[onnx]``.

        >>> import tempfile, onnxruntime, torch, branchify as bx
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(1),
        ...                             torch.nn.Linear(8 * 14 * 14, 10))
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=2.2716)])
        >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 3, 16, 16)).eval())
        >>> x = torch.randn(6, 3, 16, 16)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     session = onnxruntime.InferenceSession(str(runner.export_onnx(f"{tmp}/model.onnx", x[:1])))
        >>> logits, exit_index = session.run(None, {"input": x.numpy()})
        >>> exit_index.tolist(), runner(x).exit_index.tolist(), logits.shape
        ([1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 0, 1], (6, 10))
        """
        return export_onnx(self, path, example_inputs, opset=opset)

    def __repr__(self) -> str:
        exits = ", ".join(f"{p.layer}: off" if r is None else f"{p.layer}: {self._spec.criterion_of(i)} {r.threshold:g}"
                          for i, (p, r) in enumerate(zip(self._spec.exits, self._rules)))
        path = "hooks" if self._hooks else f"{len(self.stages)} stages"
        return f"ExitRunner({path}; {exits})"


