"""The early-exit runner: every sample of a batch stops computing at the first exit that lets it out.

It routes with ``staged`` (a traced model cut into stages) or ``hooked`` (the hook path's opaque
forward), counts each input shape's MACs once, checks inputs before anything runs, and saves itself
with ``archive``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BranchifyError
from ..exits import exit_module
from .archive import load_runner, save_runner
from .core import HookedCore, RunnerCore, StagedCore
from .onnx_export import export_onnx
from .result import ExitResult

__all__ = ["ExitRunner"]

# The guard ``torch.inference_mode()`` enters, entered directly: the context manager around it costs three Python
# calls per runner call (10-20 us at batch 1 after a stage's kernels have gone through the caches).
_Guard = getattr(torch._C, "_InferenceMode", None)


def _inference_mode():
    return torch.inference_mode() if _Guard is None else _Guard(True)


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

    ``core`` is what the runner routes with, one per mode (``StagedCore``, ``HookedCore``, ``LoadedCore``
    in ``branchify.runtime.core``): its stages, heads, rules, MAC table, inputs and their checks. Each input
    must have the kind (float or integer) it had in the example the module was built on. One runner may
    be called from several threads at once, on every path.

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
        exit_module(module, "ExitRunner")
        cut = module.exit_stages()
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if module.training:
            warnings.warn(
                "ExitRunner switched the module to eval mode (it was in training mode): the runner is for "
                "inference, with BatchNorm's running statistics and no dropout. Call module.eval() before building "
                "the runner to silence this; call module.train() to train again (the runner then refuses to run)",
                UserWarning, stacklevel=2)
        module.eval()
        dtype, device = (None, None) if param is None else (param.dtype, param.device)
        self._use(HookedCore(module, dtype=dtype, device=device) if cut is None
                  else StagedCore(module, cut, dtype=dtype, device=device))
        if example_inputs is not None:
            values, names = self.core.bind((example_inputs,), {})
            self.core.check(values)
            self.core.costs(values, names)

    @classmethod
    def _of(cls, core: RunnerCore) -> ExitRunner:
        """A runner around ``core`` (how ``load`` makes one without a module)."""
        runner = cls.__new__(cls)
        runner._use(core)
        return runner

    def _use(self, core: RunnerCore) -> None:
        self.core = core
        self._run_stages: list = list(core.stages)  # what runs: the stages, or their compiled versions
        self._run_heads: list = list(core.heads)

    @property
    def stages(self) -> list[nn.Module]:
        return self.core.stages

    @property
    def heads(self) -> list[nn.Module]:
        return self.core.heads

    @property
    def num_classes(self) -> int:
        return self.core.num_classes

    def __call__(self, *args, **kwargs) -> ExitResult:
        core = self.core
        if core.module is not None and core.module.training:
            raise BranchifyError(
                "the module is in training mode (module.train() was called after the runner was built); "
                "call module.eval() before running the runner")
        inputs, names = core.bind(args, kwargs)
        costs, routing = core.prepare(inputs, names)  # follows a new spec before the costs are read
        if torch.is_inference_mode_enabled():  # a caller's serving loop often is: entering again changes nothing
            return self._route(inputs, names, costs, routing)
        with _inference_mode():
            return self._route(inputs, names, costs, routing)

    def _route(self, inputs: tuple, names: tuple[str, ...] | None, costs: torch.Tensor,
               routing: tuple) -> ExitResult:
        core = self.core
        x = core.batch_tensor(inputs)
        if x.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.int64, device=x.device)
            return ExitResult(x.new_empty((0, core.num_classes), dtype=core.dtype or x.dtype), empty, costs[empty])
        # Shapes and dtypes were checked on fake tensors (costs) before anything ran: what fails now
        # (out of memory, the model's own checks of values) is not a shape mistake, and passes unchanged.
        logits, exit_index = core.route(self._run_stages, self._run_heads, inputs, names, x, routing=routing)
        return ExitResult(logits, exit_index, costs.index_select(0, exit_index))

    def original(self, *args, **kwargs):
        """The model's computation as the runner holds it, on the whole batch: every stage in turn, without
        heads or routing (on the hook path, the model itself). ``bx.benchmark`` times it against the runner.

        >>> import torch, branchify as bx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]),
        ...                          torch.randn(1, 4)).eval()
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(bx.ExitRunner(module).original(x)[0], model(x))
        True
        """
        inputs, names = self.core.bind(args, kwargs)
        return self.core.original(self._run_stages, inputs, names)

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
        if self.core.kind == "hooked":
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
        (a tensor, a tuple, or a dict of named tensors such as a tokenizer's output; default: zeros of the
        shape and dtype of the first input the runner has seen) fix the non-batch dims of the exported
        programs, but for those the capture left dynamic (a sequence length). The table records the inputs'
        names, so the loaded runner takes the same dict or keywords. Returns the directory.

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
        return cls._of(load_runner(directory))

    def export_onnx(self, path: str | os.PathLike,
                    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None, *,
                    opset: int | None = None) -> Path:
        """Write one ONNX model that routes each sample itself, as the runner does; returns the path.

        Its inputs are the model's, batch dim dynamic; its outputs ``logits`` ``(B, C)`` and ``exit_index``
        ``(B,)`` int64, in batch order. Each stage runs only on the samples that reach it (nested ``If`` nodes),
        and the thresholds are initializers named ``exit_{i}_threshold`` (temperatures ``exit_{i}_temperature``),
        which can be edited in the file. ``example_inputs`` (a tensor, a tuple, or a dict of named tensors) fix
        the non-batch dims but for those the capture left dynamic, such as a sequence length (default: zeros of
        the shape and dtype of the first input seen); ``opset`` defaults to torch.onnx's (at least 18). Needs
        ``branchify[onnx]``.

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
        rules, spec = self.core.rules(), self.core.spec
        exits = ", ".join(f"{p.layer}: off" if r is None else f"{p.layer}: {spec.criterion_of(i)} {r.threshold:g}"
                          for i, (p, r) in enumerate(zip(spec.exits, rules)))
        path = "hooks" if self.core.kind == "hooked" else f"{len(self.stages)} stages"
        return f"ExitRunner({path}; {exits})"


