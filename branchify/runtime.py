"""The early-exit runtime: every sample of a batch stops computing at the first exit that lets it out.

The traced model is cut into stages at the exit points (``branchify.stages``). After each stage the
runner judges the remaining samples with that exit's head and criterion, writes the logits of the
samples that leave into the result at their batch positions, and carries only the others on, so later
stages run on ever smaller sub-batches. Per exit it synchronises with the device at most once (to learn
how many samples leave, which fixes the next sub-batch's size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cost import exit_costs
from .errors import BranchifyError
from .exits import exit_module
from .inputs import Inputs, bind
from .propagate import describe_inputs, fake_mode
from .routing import exit_rules
from .spec import ExitSpec

__all__ = ["ExitResult", "ExitRunner"]

_FORMAT = "branchify-runner"
_VERSION = 1
_TABLE = "routing.json"


@dataclass(frozen=True)
class ExitResult:
    """What the runner computed for a batch: logits, the exit each sample took, and what it cost.

    ``logits`` is ``(B, num_classes)``; ``exit_index`` is ``(B,)`` int64, ``k`` for samples that no
    early exit took (``k`` early exits); ``macs`` is ``(B,)`` float64, each sample's multiply-accumulates
    as ``bx.exit_costs`` counts them for its exit.

    >>> import torch, branchify as bx
    >>> result = bx.ExitResult(torch.zeros(2, 10), torch.tensor([0, 1]), torch.tensor([1e6, 2e6]))
    >>> result.exit_index.bincount(minlength=2).tolist()
    [1, 1]
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    macs: torch.Tensor


class _BatchExited(Exception):
    """Raised from a forward hook to stop an opaque forward once every sample has left."""


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
        self._setup(module=module.eval(), spec=spec, stages=[] if cut is None else list(cut.modules),
                    heads=list(module.exit_heads), num_classes=int(module.num_classes), num_inputs=None,
                    dtype=None if param is None else param.dtype, device=None if param is None else param.device,
                    hooks=hooks, head_inputs=None if cut is None else cut.head_inputs)
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
        self._macs: dict[tuple, torch.Tensor] = {}
        self._shapes: list[tuple[torch.Size, ...]] = []

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
            logits, exit_index = self._route_hooks(inputs, names) if self._hooks else self._route(inputs)
            return ExitResult(logits, exit_index, costs[exit_index])

    def _follow_spec(self) -> None:
        module = self._module
        if module is not None and module.exit_spec is not self._spec:
            self._rules = exit_rules(module.exit_spec, deployed=True)
            self._spec = module.exit_spec

    def _route(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        stages, heads, rules = self._run_stages, self._run_heads, self._rules
        k = len(rules)
        first = self._batch_input(inputs)
        batch = first.shape[0]
        exit_index = torch.full((batch,), k, dtype=torch.int64, device=first.device)
        logits = None  # allocated when some samples leave and others go on
        where = None  # original positions of the samples still running; None while that is the whole batch
        values = inputs
        for i in range(k):
            values = stages[i](*values)
            z = heads[i](*values[:self._head_inputs[i]])
            fired = rules[i].fires(z)
            leaving = int(fired.sum())  # the one host sync of this exit
            if leaving == 0:
                continue
            if leaving == fired.shape[0]:
                if where is None:
                    return z, exit_index.fill_(i)
                logits.index_copy_(0, where, z)
                return logits, exit_index.index_fill_(0, where, i)
            # Leavers first, each group in batch order; argsort avoids a second sync (nonzero would sync).
            order = torch.argsort(fired, descending=True, stable=True)
            leave, keep = order[:leaving], order[leaving:]
            if where is None:
                logits = z.new_empty((batch, z.shape[1]))
                dest, where = leave, keep
            else:
                dest, where = where[leave], where[keep]
            logits.index_copy_(0, dest, z[leave])
            exit_index.index_fill_(0, dest, i)
            # Advanced indexing keeps channels-last tensors channels-last (index_select does not).
            values = tuple(v[keep] if isinstance(v, torch.Tensor) else v for v in values)
        final = stages[k](*values)[0]
        if where is None:
            return final, exit_index
        logits.index_copy_(0, where, final)
        return logits, exit_index

    def _route_hooks(self, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        heads, rules = self._run_heads, self._rules
        first = self._batch_input(inputs)
        batch = first.shape[0]
        exit_index = torch.full((batch,), len(rules), dtype=torch.int64, device=first.device)
        running = torch.ones(batch, dtype=torch.bool, device=first.device)
        state: dict[str, torch.Tensor] = {}
        judged: set[int] = set()

        def judge(i: int, out: torch.Tensor) -> None:
            if i in judged:
                return  # judged at the first call of the layer
            judged.add(i)
            z = heads[i](out)
            fired = rules[i].fires(z) & running
            state["logits"] = torch.where(fired[:, None], z, state["logits"]) if "logits" in state else z
            exit_index.masked_fill_(fired, i)
            running.logical_and_(~fired)
            if not bool(running.any()):  # the one host sync of this exit
                raise _BatchExited

        try:
            if names is not None:
                final = self._module.run_with_hooks(judge, **dict(zip(names, inputs)))
            else:
                final = self._module.run_with_hooks(judge, *inputs)
        except _BatchExited:
            return state["logits"], exit_index
        if "logits" not in state:
            return final, exit_index
        return torch.where(running[:, None], final, state["logits"]), exit_index

    def _input_names(self) -> list[str]:
        return [str(n.target) for n in self.stages[0].graph.nodes if n.op == "placeholder"]

    @staticmethod
    def _batch_input(inputs: tuple) -> torch.Tensor:
        return next(a for a in inputs if isinstance(a, torch.Tensor))

    def _check(self, inputs: tuple) -> None:
        expected = self._num_inputs
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        if (expected is not None and len(inputs) != expected) or not tensors or not all(
                a.ndim > 0 and a.shape[0] == tensors[0].shape[0] for a in tensors):
            count = (f"{expected} input tensor(s)" if expected is not None else "the model's inputs"
                     if self._hooks else f"the model's inputs ({', '.join(self._input_names())})")
            raise BranchifyError(
                f"ExitRunner takes {count}, each tensor with the same batch dim, like the model's forward; got "
                f"{describe_inputs(inputs) or 'nothing'}{self._expected()}")
        x = next((a for a in tensors if a.is_floating_point()), tensors[0])
        if (self._dtype is not None and x.is_floating_point() and x.dtype != self._dtype) or (
                self._device is not None and x.device != self._device):
            raise BranchifyError(
                f"the runner got a {x.dtype} input on {x.device}, but the module's parameters are {self._dtype} "
                f"on {self._device}; convert the input (x.to({str(self._device)!r}, {self._dtype})) or the module "
                "(module.to(...)) and build a new runner")

    def _seen_shapes(self) -> str:
        return "; ".join(", ".join(f"(B, {', '.join(map(str, s))})" for s in shapes) for shapes in self._shapes)

    def _expected(self) -> str:
        return f" (it has run on {self._seen_shapes()})" if self._shapes else ""

    def _costs(self, inputs: tuple, names: tuple[str, ...] | None = None) -> torch.Tensor:
        x = self._batch_input(inputs)
        shapes = tuple(a.shape[1:] for a in inputs if isinstance(a, torch.Tensor))
        key = (x.device, *shapes)
        costs = self._macs.get(key)
        if costs is None:
            # Batch 1, zeros: the hook fallback counts with a real forward, and a model with data-dependent
            # branches should not see uninitialised memory.
            example = tuple(a.new_zeros((1, *a.shape[1:])) if isinstance(a, torch.Tensor) else a for a in inputs)
            if self._module is None:
                raise BranchifyError(
                    f"this runner was saved for inputs {self._seen_shapes()} and its exported "
                    f"programs take only those, but got {describe_inputs(inputs)}; pass inputs of that shape, or "
                    "save the runner again with example_inputs of the shape you need")
            try:
                per_exit = exit_costs(self._module, example if names is None else dict(zip(names, example))).per_exit
            except BranchifyError as err:
                raise BranchifyError(f"the runner cannot take inputs {describe_inputs(inputs)}: {err}") from None
            if not self._hooks:
                _check_carried(self.stages, example)
            costs = self._remember(shapes, per_exit, x.device)
        return costs

    def _remember(self, shapes: tuple, per_exit: Sequence[float], device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        costs = torch.tensor(list(per_exit), dtype=dtype, device=device)
        self._macs[(device, *shapes)] = costs
        if shapes not in self._shapes:
            self._shapes.append(shapes)
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
        if self._hooks:
            raise BranchifyError(
                "this module comes from the hook fallback (its model cannot be traced), so its forward is Python "
                "code that cannot be saved without its source; save the model's weights instead")
        if example_inputs is None:
            if not self._shapes:
                raise BranchifyError(
                    "the runner has not seen an input yet, so it does not know the input shape to export; "
                    "pass example_inputs=torch.randn(1, 3, 224, 224) (your input's shape) or call the runner once")
            example_inputs = tuple(torch.zeros((2, *s), dtype=self._dtype, device=self._device)
                                   for s in self._shapes[0])
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        self._check(inputs)
        # Batch 2 so that export does not specialise the batch dim to 1.
        example = tuple(torch.cat([a[:1], a[:1]]) for a in inputs)
        self._follow_spec()
        values = example
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        batch = torch.export.Dim("batch", min=1)
        names = {"stages": [], "heads": []}
        with torch.inference_mode(False), torch.no_grad():
            for i, stage in enumerate(self.stages):
                program = torch.export.export(stage, values, dynamic_shapes=tuple({0: batch} for _ in values))
                names["stages"].append(f"stage_{i}.pt2")
                torch.export.save(program, directory / names["stages"][-1])
                values = stage(*values)
                if i < len(self.heads):
                    head = torch.export.export(self.heads[i], (values[0],), dynamic_shapes=({0: batch},))
                    names["heads"].append(f"head_{i}.pt2")
                    torch.export.save(head, directory / names["heads"][-1])
        table = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_classes": self.num_classes,
            "num_inputs": len(inputs),
            "dtype": str(self._dtype).removeprefix("torch."),
            "exits": [{"layer": p.layer, "criterion": self._spec.criterion_of(i), "threshold": r.threshold,
                       "temperature": r.temperature} for i, (p, r) in enumerate(zip(self._spec.exits, self._rules))],
            # Only the exported shape: the programs take no other.
            "macs": [{"input_shapes": [list(a.shape[1:]) for a in example],
                      "per_exit": self._costs(example).tolist()}],
            **names,
        }
        (directory / _TABLE).write_text(json.dumps(table, indent=2) + "\n")
        return directory

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
        directory = Path(directory)
        path = directory / _TABLE
        if not path.is_file():
            raise BranchifyError(f"no {_TABLE} in {str(directory)!r}; pass a directory written by runner.save(dir)")
        table = json.loads(path.read_text())
        if table.get("format") != _FORMAT or table.get("version") != _VERSION:
            raise BranchifyError(
                f"{str(path)!r} is not a branchify runner table of version {_VERSION} (format "
                f"{table.get('format')!r}, version {table.get('version')!r}); save it again with this branchify")
        spec = ExitSpec(exits=[{"layer": e["layer"], "threshold": e["threshold"], "criterion": e["criterion"],
                                "temperature": e["temperature"]} for e in table["exits"]])
        with _weights_only_loads():
            stages = [torch.export.load(directory / name).module() for name in table["stages"]]
            heads = [torch.export.load(directory / name).module() for name in table["heads"]]
        runner = cls.__new__(cls)
        runner._setup(module=None, spec=spec, stages=stages, heads=heads, num_classes=int(table["num_classes"]),
                      num_inputs=int(table["num_inputs"]), dtype=getattr(torch, table["dtype"]),
                      device=torch.device("cpu"))
        for entry in table["macs"]:
            runner._remember(tuple(torch.Size(s) for s in entry["input_shapes"]), entry["per_exit"], runner._device)
        return runner

    def __repr__(self) -> str:
        exits = ", ".join(f"{p.layer}: {self._spec.criterion_of(i)} {r.threshold:g}"
                          for i, (p, r) in enumerate(zip(self._spec.exits, self._rules)))
        path = "hooks" if self._hooks else f"{len(self.stages)} stages"
        return f"ExitRunner({path}; {exits})"


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch.export.load retries with weights_only=False when a weights-only read fails; forbid that."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def _carried_values(stages: list[nn.Module], example: tuple, batch: int) -> list[list]:
    """What each cut carries for ``example`` repeated to ``batch`` samples, run on fake tensors."""
    with fake_mode() as mode:
        values = tuple(mode.from_tensor(torch.cat([a] * batch)) if isinstance(a, torch.Tensor) else a for a in example)
        carried = []
        for stage in stages[:-1]:
            values = stage(*values)
            carried.append(list(values))
    return carried


def _check_carried(stages: list[nn.Module], example: tuple) -> None:
    """Every value carried across a cut must be a per-sample tensor, or a constant (a forward argument's
    default such as ``attn_mask=None``) that is the same whatever the batch; else compaction would be wrong."""
    twos, threes = _carried_values(stages, example, 2), _carried_values(stages, example, 3)
    for i, (stage, two, three) in enumerate(zip(stages, twos, threes)):
        names = [n for n in stage.graph.nodes if n.op == "output"][0].args[0]
        for node, value, other in zip(names, two, three):
            if isinstance(value, torch.Tensor):
                if value.ndim > 0 and value.shape[0] == 2 and other.shape[0] == 3:
                    continue
                shape = tuple(value.shape)
            elif isinstance(value, (type(None), bool, int, float, str)) and value == other:
                continue
            else:
                shape = type(value).__name__
            raise BranchifyError(
                f"value {node.name!r} crosses the cut after exit {i} but is {shape}, not a per-sample tensor, so the "
                "runner cannot drop the samples that leave; move the exit to another layer")
