"""The runner's core: what it routes with, in one of three modes, behind one public surface.

A runner routes a module cut into graph stages (``StagedCore``), a hook-path module whose forward is
opaque (``HookedCore``), or the programs of a runner folder read back without the module (``LoadedCore``).
Each core holds the stages, heads, the rules of the spec in force, the MAC table, how a call's arguments
bind to the model's inputs (``InputSpec``) and the checks of those inputs; ``archive``, ``onnx_export``
and ``benchmark`` read these and nothing private of the runner.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._inputs import Inputs, bind
from .._propagate import describe_inputs
from ..errors import BranchifyError
from ..routing import ExitRule, Judge, exit_rules
from ..spec import ExitSpec
from .carried import check_carried
from .checks import check_inputs
from .hooked import HookRouter
from .macs import MacTable
from .staged import route_stages

__all__ = ["HookedCore", "InputSpec", "LoadedCore", "RunnerCore", "StagedCore", "carried_specs", "dynamic_shapes",
           "placeholder_specs"]


@dataclass(frozen=True)
class InputSpec:
    """One input of the model as the runner takes it: its name, and what the module was built on.

    ``dtype``: the tensor's dtype (None: not a tensor, or unknown); ``ndim``: its number of dims, batch
    included; ``dynamic``: the non-batch dims whose size may vary (the capture made them symbolic, e.g. a
    sequence length); ``value``: the constant a non-tensor input takes (a forward default such as None).

    >>> InputSpec("input_ids", torch.int64, 2, (1,)).dynamic
    (1,)
    """

    name: str
    dtype: torch.dtype | None = None
    ndim: int | None = None
    dynamic: tuple[int, ...] = ()
    value: object = None
    is_tensor: bool = True

    def to_json(self) -> dict:
        if not self.is_tensor:
            return {"name": self.name, "value": self.value}
        return {"name": self.name, "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                "ndim": self.ndim, "dynamic": list(self.dynamic)}

    @classmethod
    def from_json(cls, data: dict) -> InputSpec:
        if "value" in data:
            return cls(str(data["name"]), value=data["value"], is_tensor=False)
        dtype = data.get("dtype")
        return cls(str(data["name"]), None if dtype is None else getattr(torch, dtype),
                   None if data.get("ndim") is None else int(data["ndim"]), tuple(int(d) for d in data["dynamic"]))


def placeholder_specs(graph, record: dict | None = None) -> tuple[InputSpec, ...]:
    """The inputs of a stage graph: what the capture recorded of each placeholder (torch.export), else what
    ``record`` (``Inputs.record`` of the example the module was built on) says of it (torch.fx)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    recorded: dict[str, dict] = {}
    if record is not None:
        recorded.update(zip((str(n.target).lstrip("*") for n in placeholders), record["args"]))
        recorded.update(record["kwargs"])
    specs = []
    for node in placeholders:
        name = str(node.target).lstrip("*")
        val = node.meta.get("val")
        entry = recorded.get(name, {})
        if isinstance(val, torch.Tensor):
            dynamic = tuple(d for d in range(1, val.ndim) if not isinstance(val.shape[d], int))
            specs.append(InputSpec(name, val.dtype, val.ndim, dynamic))
        elif "shape" in entry:
            specs.append(InputSpec(name, getattr(torch, entry["dtype"]), len(entry["shape"])))
        elif node.args and not isinstance(node.args[0], torch.Tensor):
            specs.append(InputSpec(name, value=node.args[0], is_tensor=False))
        else:
            specs.append(InputSpec(name))
    return tuple(specs)


def dynamic_shapes(values: tuple, specs, batch) -> tuple:
    """Batch dim ``batch`` on every tensor, and the dims the capture made dynamic (``specs[j].dynamic``) left to
    torch.export to relate (a sequence length shared by the ids and the mask is one dim)."""
    auto = torch.export.Dim.AUTO
    shapes = []
    for j, v in enumerate(values):
        if not isinstance(v, torch.Tensor) or v.ndim == 0:
            shapes.append(None)
            continue
        dims = {0: batch}
        if specs is not None and j < len(specs):
            dims.update({d: auto for d in specs[j].dynamic if d < v.ndim})
        shapes.append(dims)
    return tuple(shapes)


def carried_specs(stage, values: tuple) -> tuple:
    """The ``InputSpec`` of each value ``stage`` takes (what its graph's placeholders say), for ``dynamic_shapes``."""
    specs = placeholder_specs(stage.graph)
    return specs if len(specs) == len(values) else None


def _signature(values: tuple, shapes: bool = False) -> tuple:
    """What ``RunnerCore.check`` reads of a call's inputs: per input, its type, or for a tensor its dtype, device,
    number of dims and whether its batch dim equals the first tensor's; with ``shapes``, also each tensor's shape
    without the batch dim (what ``RunnerCore.costs`` looks its MACs up by)."""
    if len(values) == 1 and isinstance(values[0], torch.Tensor):  # one tensor, the common case, without the loop
        a = values[0]
        shape = a.shape
        return ((a.dtype, a.device, len(shape), bool(shape), shape[1:] if shapes else None),)
    unset = batch = object()  # a plain loop: this runs on every call, and a generator costs twice its time
    signature = []
    for a in values:
        if isinstance(a, torch.Tensor):
            shape = a.shape
            if batch is unset:
                batch = shape[0] if shape else None
            signature.append((a.dtype, a.device, len(shape), bool(shape) and shape[0] == batch,
                              shape[1:] if shapes else None))
        else:
            signature.append(type(a))
    return tuple(signature)


class RunnerCore:
    """What a runner routes with (one subclass per mode); ``ExitRunner.core`` is one.

    Public surface: ``kind`` (``"staged"``, ``"hooked"`` or ``"loaded"``), ``module`` (None when loaded),
    ``spec``, ``rules()`` (the spec in force, followed), ``stages``, ``heads``, ``head_inputs`` (how many of
    stage ``i``'s first outputs head ``i`` takes: its input, then e.g. the attention mask), ``num_classes``,
    ``dtype``/``device`` (of the parameters), ``inputs`` (``InputSpec`` per model input, when known),
    ``macs`` (the MAC table), ``bind``, ``check``, ``costs`` (the two at once: ``prepare``), ``route`` and
    ``example`` (the default example).

    >>> import torch, branchify as bx
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]), torch.randn(1, 4))
    >>> core = bx.ExitRunner(module).core
    >>> core.kind, len(core.stages), [i.name for i in core.inputs]
    ('staged', 2, ['input'])
    """

    kind: str = ""
    module: nn.Module | None = None

    def __init__(self, *, spec: ExitSpec, stages: list[nn.Module], heads: list[nn.Module], head_inputs: list[int],
                 num_classes: int, dtype: torch.dtype | None, device: torch.device | None,
                 inputs: tuple[InputSpec, ...] | None) -> None:
        self.spec = spec
        # The rules of the spec in force, a ``Judge`` of them (which keeps the thresholds it has checked; each call
        # judges with its ``fresh()``), and the MACs of the input signatures ``prepare`` has let through under them:
        # swapped together, so that a thread never pairs one spec's rules with another's checks or costs.
        self._routing: tuple[list[ExitRule | None], Judge, dict[tuple, torch.Tensor]] = self._routing_of(spec)
        self.stages = stages
        self.heads = heads
        self.head_inputs = list(head_inputs)
        self.num_classes = num_classes
        self.dtype = dtype
        self.device = device
        self.inputs = inputs
        self.macs = MacTable()
        # (shape without the batch dim, dtype) of each tensor of the first input seen: the default example
        self.first_inputs: tuple | None = None
        self._lock = threading.Lock()
        self._accepted: set[tuple] = set()  # what ``check`` has let through, as ``_signature`` words it
        self._arity = None if inputs is None else len(inputs)

    # --- the spec in force -------------------------------------------------------------------------------

    @staticmethod
    def _routing_of(spec: ExitSpec) -> tuple[list[ExitRule | None], Judge, dict]:
        rules = exit_rules(spec, deployed=True)
        return rules, Judge(rules), {}

    def rules(self) -> list[ExitRule | None]:
        """The rule of each exit (None: off) of the spec in force; a module's new spec takes effect here."""
        return self._rules_in_force()[0]

    def _rules_in_force(self) -> tuple[list[ExitRule | None], Judge, dict[tuple, torch.Tensor]]:
        module = self.module
        if module is not None and module.exit_spec is not self.spec:
            with self._lock:
                if module.exit_spec is not self.spec:
                    self._routing = self._routing_of(module.exit_spec)
                    self.spec = module.exit_spec
                    self.macs.forget()  # the new spec may switch exits off, and an exit that is off is not charged
        return self._routing

    # --- inputs --------------------------------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, tuple[str, ...] | None]:
        """A call's arguments as the model's inputs, in order (positional, named, or one dict of named
        tensors; defaults filled in); and the names to call with as keywords (hook path), else None."""
        if not kwargs and len(args) == self._arity and isinstance(args[0], torch.Tensor):
            return args, None  # every input given in order: what each mode's binding returns, without building it
        if len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list)):
            args = tuple(args[0])  # example_inputs given as a tuple
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            return self._bind(Inputs((), dict(args[0])))
        return self._bind(Inputs(tuple(args), dict(kwargs)))

    def _bind(self, inputs: Inputs) -> tuple[tuple, tuple[str, ...] | None]:
        raise NotImplementedError

    def check(self, values: tuple) -> None:
        """Refuse inputs the runner cannot take, before anything runs.

        The checks read, of each input, only whether it is a tensor and its dtype, device, number of dims and
        whether its batch dim is the first tensor's: inputs alike in those (``_signature``) as inputs already
        let through pass without checking again (this runs on every call of the runner)."""
        signature = _signature(values)
        if signature in self._accepted:
            return
        self._check(values)
        self._accepted.add(signature)

    def prepare(self, values: tuple, names: tuple[str, ...] | None = None) -> tuple[torch.Tensor, tuple]:
        """``check`` then ``costs``, in one lookup for inputs alike in what both read (``_signature`` with the
        shapes) to inputs already prepared under the spec in force (this runs on every call of the runner); and
        that spec's routing (its rules, judge and costs), for ``route``: a call reads the spec in force once, so
        that a spec set meanwhile (another thread, bx.OnlineCalibrator) cannot pair one spec's decisions with
        another's costs."""
        routing = self._rules_in_force()
        ready = routing[2]
        key = _signature(values, shapes=True)
        costs = ready.get(key)
        if costs is None:
            self.check(values)
            costs = ready[key] = self.costs(values, names)
        return costs, routing

    def _check(self, values: tuple) -> None:
        names = None if self.inputs is None else (lambda: [i.name for i in self.inputs])
        check_inputs(values, count=None if self.inputs is None else len(self.inputs), names=names,
                     dtype=self.dtype, device=self.device, since=self.macs.since, specs=self.inputs)

    @staticmethod
    def batch_tensor(values: tuple) -> torch.Tensor:
        if values and isinstance(values[0], torch.Tensor):  # the common case, without a generator (every call)
            return values[0]
        return next(a for a in values if isinstance(a, torch.Tensor))

    def costs(self, values: tuple, names: tuple[str, ...] | None = None) -> torch.Tensor:
        """Each exit's per-sample MACs for inputs shaped like ``values`` (counted once per shape), on their device."""
        x = self.batch_tensor(values)
        shapes = tuple(a.shape[1:] for a in values if isinstance(a, torch.Tensor))
        costs = self.macs.get(x.device, shapes)
        if costs is None:
            # Batch 1, zeros: the hook path counts with a real forward, and a model with data-dependent
            # branches should not see uninitialised memory.
            example = tuple(a.new_zeros((1, *a.shape[1:])) if isinstance(a, torch.Tensor) else a for a in values)
            costs = self.macs.remember(shapes, self._count(values, example, names), x.device)
            if self.first_inputs is None:
                self.first_inputs = tuple((a.shape[1:], a.dtype) for a in values if isinstance(a, torch.Tensor))
        return costs

    def _count(self, values: tuple, example: tuple, names: tuple[str, ...] | None) -> list[float]:
        from ..cost import exit_costs

        try:
            per_exit = exit_costs(self.module, example if names is None else dict(zip(names, example))).per_exit
        except BranchifyError as err:
            raise BranchifyError(f"the runner cannot take inputs {describe_inputs(values)}: {err}") from err
        return per_exit

    def example(self, example_inputs=None, *, what: str = "export") -> tuple:
        """Stage 0's inputs at batch 2 (so that export does not specialise the batch dim to 1): from
        ``example_inputs`` if given, else zeros of the shape and dtype of the first input the runner has seen."""
        if example_inputs is None:
            if self.first_inputs is None:
                raise BranchifyError(
                    f"the runner has not seen an input yet, so it does not know the input shape to {what}; pass "
                    "example_inputs=torch.randn(1, 3, 224, 224) (your input's shape, or a tokenizer's output) or "
                    "call the runner once")
            tensors = iter(torch.zeros((2, *s), dtype=d, device=self.device) for s, d in self.first_inputs)
            example_inputs = tuple(next(tensors) if i is None or i.is_tensor else i.value
                                   for i in (self.inputs or [None] * len(self.first_inputs)))
        values, _ = self.bind((example_inputs,), {})
        self.check(values)
        if any(isinstance(v, torch.Tensor) and v.shape[0] == 0 for v in values):
            raise BranchifyError("example_inputs has no samples; pass at least one sample (its values do not matter)")
        return tuple(torch.cat([v[:1], v[:1]]) if isinstance(v, torch.Tensor) else v for v in values)

    # --- routing -----------------------------------------------------------------------------------------

    def route(self, stages: Sequence, heads: Sequence, values: tuple, names: tuple[str, ...] | None,
              x: torch.Tensor, rules: Sequence[ExitRule | None] | None = None, *,
              routing: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and exit index of the batch ``values``, run with ``stages`` and ``heads`` (compiled or not),
        under ``rules`` (default: the spec in force, or the one ``routing`` from ``prepare`` holds;
        ``bx.OnlineCalibrator`` routes with its own)."""
        if rules is None:
            rules, judge, _ = self._rules_in_force() if routing is None else routing
        else:
            judge = None  # rules of the caller's own (bx.OnlineCalibrator): their thresholds are checked each call
        return route_stages(stages, heads, self.head_inputs, rules, values, x, judge)

    def original(self, stages: Sequence, values: tuple, names: tuple[str, ...] | None):
        """The model's computation as the runner holds it, on the whole batch, without heads or routing."""
        for stage in stages:
            values = stage(*values)
        return values


class StagedCore(RunnerCore):
    """A module from a captured graph, cut into stages at its exits."""

    kind = "staged"

    def __init__(self, module: nn.Module, cut, *, dtype, device) -> None:
        super().__init__(spec=module.exit_spec, stages=list(cut.modules), heads=list(module.exit_heads),
                         head_inputs=cut.head_inputs, num_classes=int(module.num_classes), dtype=dtype, device=device,
                         inputs=placeholder_specs(cut.modules[0].graph, getattr(module, "example_record", None)))
        self.module = module
        self._carried_checked: set = set()

    def _bind(self, inputs: Inputs):
        return bind(self.stages[0].graph, inputs, "ExitRunner"), None

    def _count(self, values, example, names):
        per_exit = super()._count(values, example, names)
        check_carried(self.stages, example)
        return per_exit


class HookedCore(RunnerCore):
    """A hook-path module: the model's own forward runs, and stops once every sample has left."""

    kind = "hooked"

    def __init__(self, module: nn.Module, *, dtype, device) -> None:
        super().__init__(spec=module.exit_spec, stages=[], heads=list(module.exit_heads),
                         head_inputs=[1] * len(module.exit_heads), num_classes=int(module.num_classes), dtype=dtype,
                         device=device, inputs=None)
        self.module = module
        self.router = HookRouter(module)
        record = getattr(module, "example_record", None)
        if record is not None and not record["kwargs"]:
            self.ranks = tuple(len(a["shape"]) if "shape" in a else None for a in record["args"])
            self.record_dtypes = tuple(getattr(torch, a["dtype"]) if "dtype" in a else None for a in record["args"])
        else:
            self.ranks = self.record_dtypes = None

    def _bind(self, inputs: Inputs):
        if inputs.kwargs:
            return tuple(inputs.kwargs.values()), tuple(inputs.kwargs)
        return inputs.args, None

    def _check(self, values: tuple) -> None:
        specs = None
        if self.ranks is not None and len(self.ranks) == len(values):
            specs = tuple(InputSpec(f"input {i}" if len(values) > 1 else "the input", d, r)
                          for i, (d, r) in enumerate(zip(self.record_dtypes, self.ranks)))
        check_inputs(values, count=None, names=None, dtype=self.dtype, device=self.device, since=self.macs.since,
                     specs=specs, positional=True)

    def route(self, stages, heads, values, names, x, rules=None, *, routing=None):
        if rules is None:
            rules = self.rules() if routing is None else routing[0]
        return self.router.route(heads, rules, values, names, x)

    def original(self, stages, values, names):
        model = self.module.model
        return model(**dict(zip(names, values))) if names is not None else model(*values)


class LoadedCore(RunnerCore):
    """The programs of a runner folder (``ExitRunner.load``): no module, the shapes it was saved for."""

    kind = "loaded"

    def _bind(self, inputs: Inputs):
        specs = self.inputs
        if specs is None:  # a folder saved before the inputs were recorded
            if inputs.kwargs:
                raise BranchifyError("this loaded runner takes positional input tensors only (its folder records "
                                     "no input names); save the runner again to call it with named inputs")
            return inputs.args, None
        if inputs.kwargs:
            known = [i.name for i in specs]
            unknown = sorted(set(inputs.kwargs) - set(known[len(inputs.args):]))
            if unknown:
                raise BranchifyError(f"ExitRunner: unknown input(s) {unknown}; this runner was saved for inputs "
                                     f"{known}")
        values = list(inputs.args)
        for spec in specs[len(values):]:
            if spec.name in inputs.kwargs:
                values.append(inputs.kwargs[spec.name])
            elif not spec.is_tensor:
                values.append(spec.value)
            elif not inputs.kwargs:
                break  # too few positional inputs: the count check words it
            else:
                raise BranchifyError(f"ExitRunner: input {spec.name!r} is missing; this runner takes "
                                     f"{[i.name for i in specs]} (got {inputs.describe() or 'nothing'})")
        return tuple(values), None

    def _count(self, values, example, names):
        raise BranchifyError(
            f"this runner was saved for inputs {self.macs.seen()} and counts the MACs of those only, but got "
            f"{describe_inputs(values)}; pass inputs of that shape, or save the runner again with example_inputs "
            "of the shape you need")
