"""Cutting a traced exit module's eval graph into stages, one per stretch between exits.

Stage ``i`` runs the backbone from the previous cut up to exit ``i``'s anchor; the last stage runs the
rest and returns the final logits. The values live across a cut (defined before it, used after it)
are the stage's outputs and the next stage's inputs; a cut inside a residual block carries the branch
and the block input. Every stage returns a tuple whose first item is its exit's head input.

Parameters and buffers stay inside the stage that uses them (``torch.fx.passes.split_module`` hoists
``get_attr`` nodes into stage inputs instead). Values that are not per-sample activations are never
carried: anything that depends on the inputs at most through their shapes (a parameter, a relative
position bias computed from buffers, shape arithmetic such as ``x.shape[0]``, position ids and a RoPE
model's rotary cos/sin computed from the sequence length) is recomputed in the stage that reads it,
from the sub-batch that stage runs on, so a carried batch size can never go stale when the batch
shrinks, and a value with no batch dim never needs compacting.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._library.utils import is_impure

from ._trace import QUALNAME
from .errors import BranchifyError
from .exits import HEAD, HEAD_INPUT_COPY

__all__ = ["Stages", "extract_stages"]

_SYM_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "__len__"}
_RANDOM_METHODS = {"uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_"}


@dataclass(frozen=True)
class Stages:
    """The stages of an exit module: ``modules[i]`` feeds head ``i``; ``modules[-1]`` gives the final logits.

    ``carried[i]`` names the graph values stage ``i`` returns (its head input first), which stage
    ``i + 1`` takes as inputs.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer2")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 32, 32))
    >>> stages = extract_stages(module, module._graphs[False])
    >>> len(stages.modules), stages.carried
    (2, [['layer2_1_relu_1']])
    """

    modules: list[fx.GraphModule]
    carried: list[list[str]]
    head_inputs: list[int]  # how many of stage i's first outputs head i takes (its input, then the mask)


def _defined_in_stage(nodes: list[fx.Node], anchors: list[fx.Node]) -> dict[fx.Node, int]:
    """Stage of every node: how many anchors come strictly before it in graph order."""
    stage, cut = {}, 0
    for node in nodes:
        stage[node] = cut
        if cut < len(anchors) and node is anchors[cut]:
            cut += 1
    return stage


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``x[i] = v``, ``x.fill_(0)``, ``aten.index_put_``)."""
    if node.op == "call_function":
        if node.target is operator.setitem:
            return True
        schema = getattr(node.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__")


_VIEWS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "narrow", "t",
          "flatten", "unflatten", "diagonal", "as_strided", "unfold", "__getitem__", "view_as", "expand_as"}


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s value shares memory with its first argument (so writing into it writes there)."""
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.is_mutable
        return node.target is operator.getitem or getattr(node.target, "__name__", "") in _VIEWS
    return node.op == "call_method" and node.target in _VIEWS


def _written(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The value a write lands in, through any views of it, and those views."""
    target, views = node.args[0], []
    while target.op in ("call_function", "call_method") and _is_view(target) and target.args \
            and isinstance(target.args[0], fx.Node):
        views.append(target)
        target = target.args[0]
    return target, views


def _reads_shape(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape, dims, dtype or device (not its values)."""
    return ((node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2
             and node.args[1] in _SHAPE_ATTRS)
            or (node.op == "call_method" and node.target in _SHAPE_METHODS)
            or (node.op == "call_function" and node.target in _SYM_SIZE_OPS))  # torch.export's x.shape[i]


def _effectful(node: fx.Node) -> bool:
    """Whether running ``node`` again would differ from reading its value: a guard, a print, a random draw.

    Writes into the first argument are not counted here: ``_recomputable`` copies them with their target."""
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    if _mutates(node):
        return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
    return is_impure(node.target, args=node.args, kwargs=node.kwargs)


def _recomputable(nodes: list[fx.Node]) -> tuple[set[fx.Node], dict[fx.Node, list[fx.Node]]]:
    """Nodes a later stage recomputes rather than receives: those that depend on the inputs at most through
    their shapes (parameters, shape arithmetic, and what is computed from them alone: position ids, rotary
    cos/sin, a causal mask from the sequence length). Recomputed from the sub-batch a stage runs on, such a
    value is exactly the one the model computes for those samples, whatever its batch dim; carried, a
    value with no batch dim could not be compacted.

    A value that is filled in place (``bias = torch.zeros(...); bias[:, :4] = 5``) is recomputed together
    with those writes, when they are recomputable too and all come before its first read; otherwise it is
    not recomputed (a stage that needs it must receive it). Effectful nodes (guards, random draws) run once,
    where the model runs them. Returns the nodes and, per recomputed node, the writes to copy right after it.
    """
    position = {n: i for i, n in enumerate(nodes)}
    blocked: set[fx.Node] = set()
    while True:
        derived: set[fx.Node] = set()
        for node in nodes:
            if node in blocked or node.op not in ("get_attr", "call_module", "call_function", "call_method"):
                continue
            if _reads_shape(node) or (not _effectful(node) and all(a in derived for a in node.all_input_nodes)):
                derived.add(node)
        writes: dict[fx.Node, list[fx.Node]] = {}
        on_the_way: dict[fx.Node, set[fx.Node]] = {}
        for node in nodes:
            if _mutates(node) and node.args and isinstance(node.args[0], fx.Node):
                target, views = _written(node)
                if target in derived:
                    writes.setdefault(target, []).append(node)
                    on_the_way.setdefault(target, set()).update(views)
        newly = set()
        for target, mutators in writes.items():
            reads = [u for u in target.users if u not in mutators and u not in on_the_way[target]]
            if any(m not in derived for m in mutators) or (
                    reads and max(position[m] for m in mutators) > min(position[u] for u in reads)):
                newly.add(target)
        if not newly:
            return derived, writes
        blocked |= newly


def extract_stages(root: nn.Module, graph: fx.Graph) -> Stages:
    """Cut ``graph`` (an exit module's eval graph) into stages that share ``root``'s parameters.

    The graph must be one ``bx.attach_exits`` made: head ``k``'s node is tagged ``node.meta[HEAD] == k``
    and the output is ``(exit_0, ..., exit_{k-1}, final)``.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1.0.conv2")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 32, 32))
    >>> stages = extract_stages(module, module._graphs[False])
    >>> stages.carried[0]  # the cut falls inside a residual block: the block input crosses too
    ['layer1_0_conv2', 'maxpool']
    """
    nodes = list(graph.nodes)
    heads = sorted((n for n in nodes if HEAD in n.meta), key=lambda n: n.meta[HEAD])
    output = nodes[-1]
    if not heads or output.op != "output" or len(output.args[0]) != len(heads) + 1:
        raise BranchifyError("extract_stages needs the eval graph of a module made by bx.attach_exits")
    # a head that reads a copy of its input (a later op changes it in place) reads the input itself
    # here: each stage's head runs before the next stage does
    copies = [h.args[0] for h in heads if h.args[0].meta.get(HEAD_INPUT_COPY)]
    anchors = [h.args[0].args[0] if h.args[0].meta.get(HEAD_INPUT_COPY) else h.args[0] for h in heads]
    extras = [list(h.args[1:]) for h in heads]
    final = output.args[0][-1]
    if not isinstance(final, fx.Node):
        raise BranchifyError(f"the model's final output is {type(final).__name__}, not a tensor; "
                             "the runtime needs a classifier whose eval output is a (batch, classes) tensor")
    body = [n for n in nodes if n not in heads and n not in copies and n is not output]
    stage_of = _defined_in_stage(body, anchors)
    recompute, writes = _recomputable(body)
    num_stages = len(anchors) + 1

    # What each stage reads from earlier stages, after recomputing what can be recomputed.
    reads: list[set[fx.Node]] = [set() for _ in range(num_stages)]

    def needs(node: fx.Node, stage: int, seen: set[fx.Node]) -> None:
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg in recompute:  # copied into every stage that reads it, so its own inputs are read here
                needs(arg, stage, seen)
            elif stage_of[arg] != stage:
                reads[stage].add(arg)

    for node in body:
        if node not in recompute:
            needs(node, stage_of[node], set())
    for cut, extra in enumerate(extras):
        for arg in extra:
            if stage_of[arg] != cut:
                reads[cut].add(arg)

    position = {n: i for i, n in enumerate(body)}
    carried: list[list[fx.Node]] = []
    for cut, anchor in enumerate(anchors):
        live = {v for later in reads[cut + 1:] for v in later if stage_of[v] <= cut}
        live.discard(anchor)
        live.difference_update(extras[cut])
        carried.append([anchor, *extras[cut], *sorted(live, key=position.__getitem__)])

    modules = []
    for stage in range(num_stages):
        sources = [n for n in body if n.op == "placeholder"] if stage == 0 else carried[stage - 1]
        result = carried[stage] if stage < len(anchors) else [final]
        members = [n for n in body if stage_of[n] == stage and n.op != "placeholder"]
        modules.append(_build(root, sources, members, result, recompute, writes, f"ExitStage{stage}",
                              defaults=stage == 0))
    return Stages(modules, [[n.name for n in c] for c in carried], [1 + len(e) for e in extras])


def _build(root: nn.Module, sources: list[fx.Node], members: list[fx.Node], result: list[fx.Node],
           recompute: set[fx.Node], writes: dict[fx.Node, list[fx.Node]], class_name: str, *,
           defaults: bool) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for source in sources:
        # The first stage takes the model's inputs with their defaults; later stages take every carried
        # value as a plain input (a defaulted input carried before a non-defaulted one is no valid forward).
        env[source] = graph.node_copy(source) if defaults else graph.placeholder(source.name)
        env[source].meta = dict(source.meta)

    def value(node: fx.Node) -> fx.Node:
        if node not in env:
            if node not in recompute:
                raise BranchifyError(
                    f"internal: node {node.meta.get(QUALNAME, node.name)!r} is read across a cut but not carried")
            env[node] = graph.node_copy(node, value)
            for write in writes.get(node, ()):  # the in-place fills of a recomputed value come with it
                env[write] = graph.node_copy(write, value)
        return env[node]

    for node in members:
        # Recomputable nodes are copied where they are first read, so unused ones never appear.
        if node not in recompute:
            env[node] = graph.node_copy(node, value)
    graph.output(tuple(value(n) for n in result))
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name)
