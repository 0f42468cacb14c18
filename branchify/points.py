"""Exit points: the places in a model where an exit can attach, with shape, layout and cost."""

from __future__ import annotations

import dataclasses
import html

from torch import fx, nn

from ._inputs import Inputs
from ._propagate import NodeFacts, propagate
from ._trace import CALLS, QUALNAME, Traced, ancestors, call_names, depends_on_input, final_output_nodes
from .exits import ExitPointInfo
from .fallback import hook_points
from .layout import Layout, channel_dims, graph_batch_dims, layout_of

__all__ = ["ExitPointInfo", "ExitPoints", "list_exit_points"]


class ExitPoints(list):
    """The list ``list_exit_points`` returns; it prints (and renders in notebooks) as a table, with a legend
    for what needs one."""

    def _header(self) -> tuple[str, ...]:
        return ("name", "shape", "layout", "MMACs", "of model", *(("also named",) if self._aliased() else ()))

    def _aliased(self) -> bool:
        return any(p.aliases for p in self)

    def _rows(self) -> list[tuple[str, ...]]:
        also = self._aliased()
        return [(p.name, "x".join(map(str, p.shape)), p.layout.value if p.layout else "?", f"{p.macs / 1e6:.2f}",
                 f"{p.macs_fraction:.1%}", *((", ".join(p.aliases),) if also else ())) for p in self]

    def legend(self) -> list[str]:
        """The notes the table needs: what its columns mean and its marks say."""
        notes = ["shape: per sample; MMACs: millions of multiply-accumulates from the input up to this point; "
                 "of model: their share of the whole model's"]
        if self._aliased():
            notes.append("also named: other names for the same point (a stage's last block ends where the stage "
                         "does); any of them works as ExitPoint(layer=...)")
        if any(p.layout is None for p in self):
            notes.append("?: the operations do not say which dim holds the channels; an exit there needs "
                         "HeadSpec(layout=...), e.g. 'NCHW' or 'NLC'")
        return notes

    def __repr__(self) -> str:
        rows = [self._header(), *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([*table, *self.legend()])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self._header())
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._rows())
        notes = "".join(f"<p><small>{html.escape(note)}</small></p>" for note in self.legend())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


class Analysis:
    """Everything the fake pass tells about a traced model's eval graph."""

    def __init__(self, traced: Traced, example_inputs) -> None:
        self.traced = traced
        self.inputs = Inputs.of(example_inputs)
        self.graph = traced.graphs[False]
        targets = {n.target for n in self.graph.nodes if n.op in ("get_attr", "call_module")}
        self.gm = fx.GraphModule({t: traced.attr(t, False) for t in targets}, self.graph)
        self.facts, self.output = propagate(self.gm, self.inputs)
        self.batch = self.inputs.batch
        shapes = {k: f.shape for k, f in self.facts.items() if f.shape is not None}
        self.cdims = channel_dims(self.graph, shapes, modules=dict(self.gm.named_modules()))
        self.batch_dims = graph_batch_dims(self.gm, self.inputs, shapes)
        self.order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        self.outputs = final_output_nodes(self.graph)
        self.feeds_output: set[fx.Node] = set().union(*(ancestors(n) for n in self.outputs))
        cumulative, total = {}, 0.0
        for node in self.graph.nodes:
            total += self.facts[node.name].macs if node.name in self.facts else 0.0
            cumulative[node.name] = total
        self.cumulative_macs = cumulative
        self.total_macs = total

    def facts_of(self, node: fx.Node) -> NodeFacts:
        return self.facts[node.name]

    def problem(self, node: fx.Node) -> str | None:
        """Why ``node`` cannot carry an exit, or None when it can."""
        facts = self.facts.get(node.name)
        if facts is None or facts.shape is None:
            return "its value is not a tensor; pick a layer whose output is a tensor"
        if facts.dtype is not None and not (facts.dtype.is_floating_point or facts.dtype.is_complex):
            return (f"its value is a {facts.dtype} tensor (indices or a mask), which a head cannot read; pick a "
                    "layer after the embedding or the first layer that computes features")
        if node in self.outputs:
            return ("it is the model's final output, which is already the last exit; pick an earlier layer")
        if node not in self.feeds_output:
            return ("it is not on the path to the final output (it comes after it, or the output does not use "
                    "it); pick a layer that the final output depends on")
        if len(facts.shape) < 2 or not depends_on_input(node):
            return (f"its value (shape {facts.shape}) is not a per-sample activation computed from the input; "
                    "pick a layer that transforms the input")
        return None

    def layout_of(self, node: fx.Node) -> Layout | None:
        shape = self.facts[node.name].shape
        assert shape is not None
        return layout_of(shape, self.cdims.get(node.name), self.batch_dims.get(node.name))

    def sample_shape(self, node: fx.Node) -> tuple[int, ...]:
        """The node's shape without its batch dim (wherever the analysis found it; first when it did not)."""
        shape = self.facts[node.name].shape
        assert shape is not None
        batch = self.batch_dims.get(node.name) or 0
        return tuple(shape[:batch]) + tuple(shape[batch + 1:])

    def info(self, name: str, node: fx.Node) -> ExitPointInfo:
        macs = self.cumulative_macs[node.name] / self.batch
        return ExitPointInfo(name=name, node=node.meta.get(QUALNAME, node.name), shape=self.sample_shape(node),
                             layout=self.layout_of(node), macs=macs,
                             macs_fraction=macs * self.batch / self.total_macs if self.total_macs else 0.0)


def block_paths(model: nn.Module) -> list[str]:
    """The model's children and grandchildren, the members of containers among them, and the members of
    containers that a module merely wraps (a transformer's ``bert.encoder.layer.3``)."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    paths: list[str] = []

    def wraps_containers(module: nn.Module) -> bool:  # bert.encoder holds just the ModuleList of its layers
        children = list(module.children())
        return bool(children) and all(isinstance(c, containers) for c in children)

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            paths.append(path)
            if depth < 2 or isinstance(child, containers) or wraps_containers(child):
                visit(child, path + ".", depth + 1)

    visit(model, "", 1)
    return paths


def list_exit_points(model: nn.Module, example_inputs, *, all_nodes: bool = False, capture: str = "auto",
                     leaf_modules: list[type] | None = None, output: str | int | None = None) -> ExitPoints:
    """The points of ``model`` where an exit can attach, in graph order.

    By default the block boundaries (the model's children and grandchildren, and the members of
    containers among them); ``all_nodes=True`` lists every tensor-valued node by the name
    ``get_graph_node_names`` gives it. A module the forward calls more than once is listed once per
    call, as ``path:0``, ``path:1``, ... (the name ``bx.ExitPoint(layer=...)`` takes for that call);
    the block boundaries include every module holding layers that runs more than once (ALBERT's one
    shared layer), however deep it sits. Shapes and MACs come from one pass with fake tensors. The
    model is captured as ``bx.attach_exits`` captures it (``capture``, ``leaf_modules`` and ``output``
    mean the same); on the hook path the block boundaries are listed in the order they ran, from one
    real forward.

    >>> import torch, torchvision, branchify as bx
    >>> points = bx.list_exit_points(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> [(p.name, p.shape) for p in points if p.name in ("layer1", "layer2")]
    [('layer1', (64, 16, 16)), ('layer2', (128, 8, 8))]
    >>> round(points[-1].macs_fraction, 3) < 1.0
    True
    """
    from .capture import NoGraph, unwrap_compiled
    from .capture import capture as capture_graphs

    model = unwrap_compiled(model)
    inputs = Inputs.of(example_inputs)
    inputs.check_batch("list_exit_points")
    try:
        traced = capture_graphs(model, inputs, path=capture, leaf_modules=leaf_modules, output=output)
    except NoGraph:
        return _hook_exit_points(model, inputs, output)
    analysis = Analysis(traced, inputs)
    names: list[tuple[str, fx.Node]] = []
    if all_nodes:
        for node in analysis.graph.nodes:
            name = node.meta.get(QUALNAME, node.name)
            if node.op == "call_module" and len(traced.calls(str(node.target), False)) > 1:
                # a module called more than once: each call is listed by its index, its node name as an alias
                # (but not the bare module path, which names no one call)
                names.append((f"{node.target}:{node.meta[CALLS][node.target]}", node))
                if name == node.target:
                    continue
            names.append((name, node))
    else:
        blocks = block_paths(model)
        shared = [p for p in _holders(model) if p not in set(blocks) and len(traced.calls(p, False)) > 1]
        for path in [*blocks, *shared]:
            calls = traced.calls(path, False)  # none: a module that the eval forward never calls
            names.extend((name, call[-1]) for name, call in zip(call_names(path, len(calls)), calls))
    first: dict[str, str] = {}  # node -> the first name listed for it
    aliases: dict[str, list[str]] = {}
    found = []
    for name, node in names:
        if node.name in first:
            if name != first[node.name]:
                aliases[node.name].append(name)
            continue
        if analysis.problem(node) is not None:
            continue
        first[node.name] = name
        aliases[node.name] = []
        found.append((analysis.order[node.name], node.name, analysis.info(name, node)))
    return ExitPoints(dataclasses.replace(info, aliases=tuple(aliases[node])) if aliases[node] else info
                      for _, node, info in sorted(found, key=lambda item: item[0]))


def _holders(model: nn.Module) -> list[str]:
    """The modules that hold layers: one the forward calls more than once (ALBERT's one shared layer, a block
    applied twice) is a block boundary at each call, however deep it sits."""
    return [path for path, module in model.named_modules() if path and next(module.children(), None) is not None]


def _hook_exit_points(model: nn.Module, inputs: Inputs, output) -> ExitPoints:
    blocks = block_paths(model)
    points, final, total = hook_points(model, inputs, [*blocks, *_holders(model)], output)
    listed = set(blocks)
    points = {path: calls for path, calls in points.items() if path in listed or len(calls) > 1}
    batch = inputs.batch
    rows = []
    for facts in sorted((f for calls in points.values() for f in calls), key=lambda f: f.order):
        if len(facts.shape) < 2 or not facts.dtype.is_floating_point or facts.macs >= total:
            continue  # not per-sample features, or computed only at the very end
        rows.append(ExitPointInfo(facts.name, facts.name, facts.sample_shape, facts.layout, facts.macs / batch,
                                  facts.macs / total if total else 0.0))
    return ExitPoints(rows)
