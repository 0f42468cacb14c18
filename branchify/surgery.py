"""The surgery: an unmodified model in, a multi-output GraphModule out.

The returned module computes the original graph unchanged and, right after each exit point, runs
that exit's head; its forward returns ``(exit_0, ..., exit_{k-1}, final)``. It keeps a train and an
eval graph and switches between them with ``.train()``/``.eval()``, so behaviour that tracing would
freeze (auxiliary outputs, mode-dependent branches) follows the mode as in the original.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.fx.graph_module import _assign_attr

from ._inputs import Inputs
from ._sharing import note_built_on
from ._trace import QUALNAME, ancestors, final_output_nodes
from .capture import NoGraph, unwrap_compiled
from .capture import capture as capture_graphs
from .errors import BranchifyError
from .exits import HEAD, HEAD_INPUT_COPY, HEADS, ExitPointInfo, Exits
from .heads import build_head, default_token, mask_reading
from .layout import choose_layout
from .lm import attach_lm_exits
from .points import Analysis
from .spec import ExitPoint, ExitSpec, spec_attribute

__all__ = ["ExitModule", "attach_exits"]

MASK = "attention_mask"


class ExitModule(fx.GraphModule, Exits):
    """A traced model with exit heads; ``forward`` returns ``(exit_0, ..., exit_{k-1}, final)``.

    Attributes: ``exit_spec`` (the spec, exits in graph order), ``exit_heads`` (``nn.ModuleList``),
    ``exit_points`` (``ExitPointInfo`` per exit), ``num_classes``, ``exit_path`` (``"fx"``).
    The backbone's parameters are shared with the model it was made from, as with
    ``torchvision.models.feature_extraction.create_feature_extractor``.
    """

    # plain Python state: TorchScript must not compile it (extends GraphModule's own list)
    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "exit_spec"]

    def __init__(self, root: Mapping[str, object], graphs: dict[bool, fx.Graph], *, exit_spec: ExitSpec,
                 exit_points: list[ExitPointInfo], num_classes: int, training: bool = False,
                 exit_path: str = "fx", keyword_inputs: bool = False, example_record: dict | None = None) -> None:
        super().__init__(dict(root), graphs[training], class_name="ExitModule")
        for graph in graphs.values():
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                    _assign_attr(root[node.target], self, node.target)
        heads = [root[f"{HEADS}.{i}"] for i in range(len(exit_points))]
        self.exit_heads = nn.ModuleList(heads)
        self._graphs = graphs
        self.exit_spec = exit_spec
        self.exit_points = exit_points
        self.num_classes = num_classes
        self.exit_path = exit_path
        self.keyword_inputs = keyword_inputs
        self.example_record = example_record  # what the example inputs looked like (bx.save records it)
        # Only the wrapper's flag: shared backbone modules keep the flags they had in the model.
        self.training = training
        self.exit_heads.train(training)

    exit_spec = spec_attribute("graph order")

    def _count_exit_costs(self, inputs):
        from .cost import graph_costs

        return graph_costs(self, inputs)

    def exit_stages(self):
        from ._stages import extract_stages

        return extract_stages(self, self._graphs[False])

    def __call__(self, *args, **kwargs):
        if self.keyword_inputs and len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])  # module(batch) with a tokenizer's output
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        names = [str(n.target) for n in placeholders]
        if kwargs:
            unknown = sorted(set(kwargs) - set(names))
            if unknown:
                raise BranchifyError(
                    f"unknown input(s) {unknown}; this module was captured with inputs {names}. Drop the "
                    "others (labels belong in the loader's target, not the model's inputs)")
        missing = [str(n.target) for n in placeholders[len(args):] if n.target not in kwargs and not n.args]
        if missing:
            given = Inputs(args, kwargs).describe() or "nothing"
            raise BranchifyError(
                f"input(s) {missing} missing: this module was captured with inputs {names} and got {given}; pass "
                "every input the example had, by name (module(**batch), e.g. a tokenizer's whole output with its "
                "attention_mask), or build the module on an example without it")
        return super().__call__(*args, **kwargs)

    def train(self, mode: bool = True) -> ExitModule:
        if self._graphs[mode] is not self.graph:
            self.graph = self._graphs[mode]
            self.recompile()
        return super().train(mode)

    def _parts(self) -> tuple[type, dict, dict, dict]:
        """What rebuilds this module: its class, the objects its graphs name, the graphs, the rest."""
        targets = {node.target for graph in self._graphs.values() for node in graph.nodes
                   if node.op in ("get_attr", "call_module")}
        targets |= {f"{HEADS}.{i}" for i in range(len(self.exit_heads))}
        root = {t: _get_attr(self, t) for t in sorted(targets)}
        # type(self) is torch.fx's per-instance GraphModuleImpl; constructing through it skips __init__.
        cls = next(c for c in type(self).__mro__ if not c.__qualname__.endswith("GraphModuleImpl"))
        rest = dict(exit_spec=self.exit_spec, exit_points=list(self.exit_points), num_classes=self.num_classes,
                    training=self.training, exit_path=self.exit_path, keyword_inputs=self.keyword_inputs,
                    example_record=self.example_record)
        return cls, root, self._graphs, rest

    def __deepcopy__(self, memo: dict) -> ExitModule:
        cls, root, graphs, rest = self._parts()
        clone = cls(copy.deepcopy(root, memo), copy.deepcopy(graphs), **rest)
        memo[id(self)] = clone
        return clone

    def __reduce__(self):
        # GraphModule pickles as a plain GraphModule of its current code: the exits' state and the other
        # mode's graph would be lost
        cls, root, graphs, rest = self._parts()
        detached = {mode: copy.deepcopy(graph) for mode, graph in graphs.items()}  # without their owning module
        return _rebuild, (cls, root, detached, rest)


def _rebuild(cls: type, root: dict, graphs: dict, rest: dict) -> ExitModule:
    return cls(root, graphs, **rest)


def _get_attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
        return True
    except AttributeError:
        return False


def as_spec(spec) -> ExitSpec:
    """An ``ExitSpec`` from what ``attach_exits`` takes: a spec, a dict of one, a spec file's path, or a list of
    layer names (exits with default heads)."""
    if isinstance(spec, ExitSpec):
        return spec
    if isinstance(spec, Mapping):
        return ExitSpec.model_validate(spec)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and (spec.endswith(".json") or os.path.isfile(spec))):
        return ExitSpec.load(spec)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(name, str) for name in spec):
        return ExitSpec(exits=[ExitPoint(layer=name) for name in spec])
    hint = f"; for one exit at {spec!r} pass [{spec!r}]" if isinstance(spec, str) else ""
    raise BranchifyError(
        f"spec must be a bx.ExitSpec, a dict of one, a spec file (.json) or a list of layer names, got "
        f"{type(spec).__name__}{hint}; e.g. bx.ExitSpec(exits=[bx.ExitPoint(layer='layer1')]) or ['layer1', 'layer2']")


def _num_classes(output) -> int:
    if isinstance(output, torch.Tensor) and output.ndim == 2:
        return int(output.shape[1])
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise BranchifyError(
        f"the model's eval output is {shape}, but branchify needs a classifier whose eval output is "
        "a (batch, num_classes) tensor")


def attach_exits(model: nn.Module, spec: ExitSpec, example_inputs=None, *,
                 leaf_modules: list[type] | None = None, capture: str = "auto",
                 output: str | int | None = None) -> nn.Module:
    """Attach the exits of ``spec`` to ``model`` and return a multi-output module.

    The model is captured as a graph: with torch.fx (torchvision's node names), else with
    torch.export (Hugging Face transformers and other models fx cannot trace), else, for models
    neither can capture, through forward hooks, with a warning. ``result.exit_path`` says which
    (``"fx"``, ``"export"`` or ``"hooks"``); ``capture=`` forces one. Each exit's layer resolves to a
    graph node (a module path to the last node inside that module); shapes and layouts come from a pass
    with fake tensors over ``example_inputs`` (a tensor, a tuple of tensors, or a dict of named tensors
    such as a tokenizer's output; any batch size: nothing is computed).

    ``spec`` is a ``bx.ExitSpec`` (or a dict of one, the path of a file ``spec.save`` wrote, or a list of
    layer names for exits with default heads). Exits are listed in the order the model reaches them (a
    spec in another order is refused with the order that works). The result's forward returns
    ``(exit_0, ..., exit_{k-1}, final)`` in that order, and ``final`` is the original model's logits,
    bit for bit: its output itself, or the ``"logits"`` entry of a dict or ``ModelOutput``; ``output=``
    names another entry (a key or a position). A module captured from named inputs is called as ``module(batch)`` or
    ``module(**batch)``. ``model`` is not modified; the result shares its parameters.
    ``leaf_modules`` are module types torch.fx does not trace through.

    Exits with ``HeadSpec(kind="lm")`` on a Hugging Face causal LM (GPT-2, Llama, Qwen2) build the LM exit module
    of ``branchify.lm.attach_lm_exits`` instead (per-token vocabulary logits for ``bx.generate``); they need no
    ``example_inputs``, and ``capture``, ``leaf_modules`` and ``output`` do not apply to them.

    >>> import torch, torchvision, branchify as bx
    >>> model = torchvision.models.resnet18().eval()
    >>> module = bx.attach_exits(model, ["layer1", "layer2"], torch.randn(1, 3, 64, 64)).eval()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> outputs = module(x)
    >>> [tuple(o.shape) for o in outputs]
    [(2, 1000), (2, 1000), (2, 1000)]
    >>> module.exit_spec.layers, torch.equal(outputs[-1], model(x)), module.exit_path
    (['layer1', 'layer2'], True, 'fx')
    """
    spec = as_spec(spec)
    model = unwrap_compiled(model)
    if any(point.head.kind == "lm" for point in spec.exits):
        if capture not in ("auto", "hooks") or leaf_modules is not None or output is not None:
            raise BranchifyError(
                f"LM exits (HeadSpec(kind='lm')) read the decoder layers with forward hooks and return the model's own "
                f"logits, so capture={capture!r}, leaf_modules={leaf_modules!r} and output={output!r} do not apply; "
                "leave them at their defaults")
        return attach_lm_exits(model, spec)
    if example_inputs is None:
        raise BranchifyError(
            "attach_exits needs example_inputs to size the heads: a tensor, a tuple of tensors or a dict of named "
            "tensors, e.g. torch.randn(1, 3, 224, 224) (only LM exits, HeadSpec(kind='lm'), need none)")
    inputs = Inputs.of(example_inputs)
    inputs.check_batch("attach_exits")
    try:
        traced = capture_graphs(model, inputs, path=capture, leaf_modules=leaf_modules, output=output)
    except NoGraph as no_graph:
        from .fallback import attach_exits_with_hooks

        if capture != "hooks":
            warnings.warn(
                f"{type(model).__name__} cannot be captured as a graph ({no_graph}); attaching exits with forward "
                "hooks instead. Exits must then name modules, and the runtime cannot drop samples inside the forward",
                stacklevel=2)
        return _recorded(attach_exits_with_hooks(model, spec, inputs, reason=str(no_graph), output=output), inputs,
                         model)
    analysis = Analysis(traced, inputs)
    num_classes = _num_classes(analysis.output)

    anchors = []  # (eval node, train node, spec index)
    for index, point in enumerate(spec.exits):
        what = f"exit {index} (layer {point.layer!r})"
        node = traced.resolve(point.layer, False, what=what)
        problem = analysis.problem(node)
        if problem is not None:
            raise BranchifyError(f"{what}: cannot attach at node {node.meta.get(QUALNAME, node.name)!r}: {problem}")
        train_node = traced.resolve(point.layer, True, what=what)
        train_outputs = final_output_nodes(traced.graphs[True])
        if train_node in train_outputs or not any(train_node in ancestors(o) for o in train_outputs):
            raise BranchifyError(f"{what}: in train mode the layer does not feed the output; pick an earlier layer")
        anchors.append((node, train_node, index))
    spec.check_order([analysis.order[node.name] for node, _, _ in anchors], "graph order")
    for (a, _, i), (b, _, j) in zip(anchors, anchors[1:]):
        if a is b:
            raise BranchifyError(
                f"exits {i} ({spec.exits[i].layer!r}) and {j} ({spec.exits[j].layer!r}) resolve to the same node "
                f"{a.meta.get(QUALNAME, a.name)!r}; keep one of them")

    ordered = [spec.exits[i] for _, _, i in anchors]
    exit_spec = spec.model_copy(update={"exits": ordered})
    mask = _attention_mask(analysis)
    token = default_token(model)
    root: dict[str, object] = {}
    points: list[ExitPointInfo] = []
    extra_inputs: list[bool] = []  # does head k read the attention mask
    copies: list[bool] = []  # does head k read a copy (a later op changes its input in place)
    for k, (node, _, i) in enumerate(anchors):
        point = spec.exits[i]
        what = f"exit {i} (layer {point.layer!r})"
        facts = analysis.facts_of(node)
        layout = choose_layout(point.head.layout, analysis.layout_of(node), facts.shape, what,
                               analysis.batch_dims.get(node.name))
        info = analysis.info(point.layer, node)
        points.append(ExitPointInfo(info.name, info.node, info.shape, layout, info.macs, info.macs_fraction))
        head = build_head(point.head, info.shape, layout, num_classes, where=what,
                          device=facts.device, dtype=facts.dtype, token=token)
        root[f"{HEADS}.{k}"] = mask_reading(head, layout, facts.shape,
                                            None if mask is None else analysis.facts[mask].shape, what)
        extra_inputs.append(root[f"{HEADS}.{k}"] is not head)
        copies.append(facts.mutated_later)

    graphs = {}
    for training in (True, False):
        graph = traced.graphs[training]
        mask_node = next((n for n in graph.nodes if n.op == "placeholder" and n.name == mask), None)
        heads = []
        for k, (eval_node, train_node, _) in enumerate(anchors):
            anchor = train_node if training else eval_node
            with graph.inserting_after(anchor):
                source = anchor
                if copies[k]:  # the head reads the value as it was here, and autograd keeps it intact
                    source = graph.call_method("clone", (anchor,))
                    source.meta[HEAD_INPUT_COPY] = True
                with graph.inserting_after(source):
                    args = (source, mask_node) if extra_inputs[k] else (source,)
                    heads.append(graph.create_node("call_module", f"{HEADS}.{k}", args, name=f"exit_head_{k}"))
                    heads[-1].meta[HEAD] = k
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        output.args = ((*heads, output.args[0]),)
        output.type = None
        graphs[training] = graph
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target not in root:
                root[node.target] = traced.attr(node.target, training)
    return _recorded(ExitModule(root, graphs, exit_spec=exit_spec, exit_points=points, num_classes=num_classes,
                                training=model.training, exit_path=traced.path,
                                keyword_inputs=bool(inputs.kwargs) and not inputs.args), inputs, model)


def _recorded(module: nn.Module, inputs: Inputs, model: nn.Module) -> nn.Module:
    """``module`` remembering what its example inputs looked like (one sample), so that ``bx.save`` can record
    it and ``bx.load`` rebuild the module without being given an example; built on ``model`` (whose modes it
    shares: ``branchify._sharing``)."""
    module.example_record = inputs.record()
    note_built_on(model, module)
    return module


def _attention_mask(analysis: Analysis) -> str | None:
    """The name of the input that marks padding (a tokenizer's ``attention_mask``), if the model takes one."""
    for node in analysis.graph.nodes:
        if node.op == "placeholder" and node.name == MASK and analysis.facts.get(node.name) is not None:
            shape = analysis.facts[node.name].shape
            if shape is not None and len(shape) == 2:
                return node.name
    return None
