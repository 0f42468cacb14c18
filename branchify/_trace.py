"""Tracing a model into graphs whose nodes carry the names users can ask for.

Two graphs are kept, one traced in train mode and one in eval mode, because tracing freezes
``self.training`` into the graph (googlenet and inception_v3 return auxiliary outputs only in
training). ``torchvision.ops`` modules stay leaves, as in torchvision's feature extractor, so
stochastic depth keeps following ``.train()``/``.eval()`` at run time. Node names are the ones
``torchvision.models.feature_extraction.get_graph_node_names`` reports.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

from .errors import BranchifyError

__all__ = ["Traced", "trace_model"]

SCOPE = "branchify_scope"
QUALNAME = "branchify_qualname"


class _Tracer(NodePathTracer):
    """Records each node's qualified name and the module path it was created in."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._latest_suffix: dict[str, int] = {}

    def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
        # torchvision's version rescans every earlier name with a regex (quadratic: seconds on maxvit);
        # the latest suffix per base name gives the same names in constant time.
        name = module_qualname
        if node.op != "call_module":
            name = f"{name}.{node}" if name else str(node)
        if re.match(r".+_[0-9]+$", name) is not None:
            name = name.rsplit("_", 1)[0]
        index = self._latest_suffix.get(name)
        self._latest_suffix[name] = 0 if index is None else index + 1
        return name if index is None else f"{name}_{index + 1}"

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        proxy.node.meta[SCOPE] = self.current_module_qualname
        proxy.node.meta[QUALNAME] = self.node_to_qualname[proxy.node]
        return proxy


@dataclass
class Traced:
    """A model's train and eval graphs, and the names that resolve to their nodes."""

    model: nn.Module
    graphs: dict[bool, fx.Graph]  # keyed by training mode
    module_paths: list[str] = field(default_factory=list)
    path: str = "fx"  # how it was captured: "fx" or "export"
    roots: dict[bool, nn.Module] = field(default_factory=dict)  # export's modules, for its constants

    def attr(self, target: str, training: bool):
        """The parameter, buffer or module a graph's ``get_attr``/``call_module`` node names; the model's own
        first, so that the exit module shares the model's parameters."""
        for owner in (self.model, self.roots.get(training)):
            if owner is None:
                continue
            obj = owner
            try:
                for part in target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            return obj
        raise BranchifyError(f"internal: graph attribute {target!r} is in neither the model nor its capture")

    def nodes_by_name(self, training: bool) -> dict[str, fx.Node]:
        return {n.meta.get(QUALNAME, n.name): n for n in self.graphs[training].nodes}

    def valid_names(self, training: bool = False) -> list[str]:
        names = [n.meta[QUALNAME] for n in self.graphs[training].nodes if QUALNAME in n.meta]
        return sorted(set(names) | set(self.module_paths))

    def resolve(self, name: str, training: bool, *, what: str) -> fx.Node:
        """The node ``name`` denotes: a module path's last node, else a node name."""
        graph = self.graphs[training]
        prefix = name + "."
        inside = [n for n in graph.nodes
                  if n.op not in ("placeholder", "output")
                  and (n.meta.get(SCOPE) == name or str(n.meta.get(SCOPE, "")).startswith(prefix))]
        if inside:
            return inside[-1]
        by_name = self.nodes_by_name(training)
        if name in by_name:
            return by_name[name]
        by_fx_name = {n.name: n for n in graph.nodes}
        if name in by_fx_name:
            return by_fx_name[name]
        mode = "train" if training else "eval"
        valid = self.valid_names(training)
        close = difflib.get_close_matches(name, [v for v in valid if v != name], n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        if name in self.module_paths or name in self.valid_names(not training):
            raise BranchifyError(
                f"{what}: layer {name!r} is not computed in {mode} mode, so it cannot carry an exit.{hint}")
        also = (", or torchvision.models.feature_extraction.get_graph_node_names(model)" if self.path == "fx"
                else ", or [name for name, _ in model.named_modules()]")
        raise BranchifyError(
            f"{what}: unknown layer {name!r}.{hint} List the exit points with "
            f"bx.list_exit_points(model, example_inputs) (all_nodes=True for every node){also}")


def _snapshot_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def restore_modes(snapshot: list[tuple[nn.Module, bool]]) -> None:
    for module, mode in snapshot:
        module.training = mode


@contextlib.contextmanager
def kept_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may switch ``module``'s modes, then restore every submodule's mode as it was.

    The mode is restored through ``module.train()`` (an exit module swaps its train and eval graphs
    there), then flag by flag (a frozen backbone's norms keep their own flags). The one home of
    mode restore: every function that runs a module in another mode goes through here.
    """
    snapshot = _snapshot_modes(module)
    was_training = module.training
    try:
        yield module
    finally:
        module.train(was_training)
        restore_modes(snapshot)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``module`` in eval mode; modes are restored as ``kept_modes`` does."""
    with kept_modes(module):
        module.eval()
        yield module


def trace_model(model: nn.Module, leaf_modules: list[type] | None = None) -> Traced:
    """Trace ``model`` in train and eval mode; raises ``fx`` errors as they come (for the fallback).

    The model's ``training`` flags are restored afterwards, module by module.
    """
    kwargs = _set_default_tracer_kwargs({"leaf_modules": list(leaf_modules or [])})
    graphs = {}
    with kept_modes(model):
        for training in (True, False):
            model.train(training)
            graphs[training] = _Tracer(**kwargs).trace(model)
    paths = [name for name, _ in model.named_modules() if name]
    return Traced(model, graphs, paths)


def final_output_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes the graph's output is made of (a tensor, or a tuple/namedtuple of them)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return list(output.all_input_nodes)


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def depends_on_input(node: fx.Node) -> bool:
    return node.op == "placeholder" or any(a.op == "placeholder" for a in ancestors(node))
