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
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

from .errors import BranchifyError, BranchifyInternalError

__all__ = ["Traced", "split_call", "trace_model"]

SCOPE = "branchify_scope"
QUALNAME = "branchify_qualname"
CALLS = "branchify_calls"  # {module path: which call of it (0, 1, ...) made this node}, for every enclosing module

_CALL = re.compile(r"^(?P<path>.+):(?P<call>[0-9]+)$")


def split_call(name: str) -> tuple[str, int | None]:
    """``"layer1.0.relu:1"`` as ``("layer1.0.relu", 1)`` (the module's second call); a plain name as ``(name, None)``.

    >>> split_call("albert.encoder.albert_layer_groups.0:2"), split_call("layer1")
    (('albert.encoder.albert_layer_groups.0', 2), ('layer1', None))
    """
    match = _CALL.match(name)
    return (match["path"], int(match["call"])) if match else (name, None)


COMPILED_PREFIX = "_orig_mod."


def compiled_name(what: str, name: str) -> str:
    """The refusal of a compiled model's wrapper name: exits name the layers of the module torch.compile wraps."""
    return (f"{what}: unknown layer {name!r}; branchify attaches exits to the module torch.compile wraps, whose "
            f"layers are named as in the model itself: use {name.removeprefix(COMPILED_PREFIX)!r}")


def container_not_called(what: str, path: str, last: str) -> BranchifyError:
    """The refusal of a container (a ``ModuleList``, say) whose modules run but which the forward never calls
    itself: "after it" is not a point of the forward, so the exit must name the call it means."""
    return BranchifyError(
        f"{what}: {path!r} holds modules the forward calls, but the forward never calls {path!r} itself (a "
        f"container such as nn.ModuleList), so it is no point of the forward; to exit after its modules have run, "
        f"name the last of them that runs: {last!r}")


def call_names(path: str, count: int) -> list[str]:
    """The names of a module's calls: its path when it is called once, else ``path:0``, ``path:1``, ..."""
    return [path] if count == 1 else [f"{path}:{k}" for k in range(count)]


def several_calls(what: str, path: str, count: int, where: str) -> BranchifyError:
    """The refusal of a bare module name whose module runs more than once: which call is meant cannot be told."""
    choices = ", ".join(repr(n) for n in call_names(path, count))
    return BranchifyError(
        f"{what}: module {path!r} is called {count} times in {where}, so its name alone does not say after which "
        f"call the exit goes; name the call: {choices} (0 is the first call; bx.list_exit_points lists each)")


class _Tracer(NodePathTracer):
    """Records each node's qualified name and the module path it was created in.

    While it traces, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process; a module
    that another thread runs meanwhile is run as if nothing traced (its own forward, its real attributes), not
    recorded into this graph or refused as "not installed as a submodule"."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._latest_suffix: dict[str, int] = {}
        self._call_count: dict[str, int] = {}
        self._open_calls: dict[str, int] = {}  # the modules whose forward is running, and which call each is
        self._thread = threading.get_ident()

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        try:
            path = self.path_of_module(m)
        except NameError:
            return super().call_module(m, forward, args, kwargs)
        call = self._call_count.get(path, 0)
        self._call_count[path] = call + 1
        outer = self._open_calls.get(path)
        self._open_calls[path] = call
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            if outer is None:
                del self._open_calls[path]
            else:
                self._open_calls[path] = outer

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
        proxy.node.meta[CALLS] = dict(self._open_calls)
        return proxy


@dataclass
class Traced:
    """A model's train and eval graphs, and the names that resolve to their nodes."""

    model: nn.Module
    graphs: dict[bool, fx.Graph]  # keyed by training mode
    module_paths: list[str] = field(default_factory=list)
    path: str = "fx"  # how it was captured: "fx" or "export"
    roots: dict[bool, nn.Module] = field(default_factory=dict)  # export's modules, for its constants
    _calls: dict[bool, dict[str, dict[int, list[fx.Node]]]] = field(default_factory=dict, repr=False)

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
        raise BranchifyInternalError(f"graph attribute {target!r} is in neither the model nor its capture")

    def nodes_by_name(self, training: bool) -> dict[str, fx.Node]:
        return {n.meta.get(QUALNAME, n.name): n for n in self.graphs[training].nodes}

    def valid_names(self, training: bool = False) -> list[str]:
        names = [n.meta[QUALNAME] for n in self.graphs[training].nodes if QUALNAME in n.meta]
        return sorted(set(names) | set(self.module_paths))

    def calls(self, path: str, training: bool) -> list[list[fx.Node]]:
        """The nodes each call of module ``path`` made, call by call (one list per call, in graph order)."""
        if training not in self._calls:
            index: dict[str, dict[int, list[fx.Node]]] = {}
            for node in self.graphs[training].nodes:
                if node.op not in ("placeholder", "output"):
                    for module, call in node.meta.get(CALLS, {}).items():
                        index.setdefault(module, {}).setdefault(call, []).append(node)
            self._calls[training] = index
        groups = self._calls[training].get(path, {})
        return [groups[k] for k in sorted(groups)]

    def _last_inner_call(self, path: str, training: bool) -> str | None:
        """The name of the call that ends last among the modules inside ``path`` (``path.x``), if any ran."""
        self.calls(path, training)  # builds the index
        last: tuple[int, str] | None = None
        order = {n: i for i, n in enumerate(self.graphs[training].nodes)}
        for module, groups in self._calls[training].items():
            if module.startswith(path + "."):
                for call, nodes in groups.items():
                    end = order[nodes[-1]]
                    if last is None or end > last[0]:
                        last = (end, call_names(module, len(groups))[call] if len(groups) > 1 else module)
        return None if last is None else last[1]

    def resolve(self, name: str, training: bool, *, what: str) -> fx.Node:
        """The node ``name`` denotes: the last node of a module's call (``path`` for a module called once,
        ``path:k`` for its k-th call), else a node name. A bare path of a module called more than once is refused
        with the ``path:k`` names, since which call is meant cannot be told."""
        path, call = split_call(name)
        calls = self.calls(path, training)
        mode = "train" if training else "eval"
        if call is not None and calls:
            if call >= len(calls):
                raise BranchifyError(
                    f"{what}: module {path!r} is called {len(calls)} time(s) in the {mode} forward, so there is no "
                    f"call {call}; use one of {', '.join(repr(n) for n in call_names(path, len(calls)))}")
            return calls[call][-1]
        if call is None and len(calls) > 1:
            raise several_calls(what, path, len(calls), f"the {mode} forward")
        if calls:
            return calls[0][-1]
        by_name = self.nodes_by_name(training)
        if name in by_name:
            return by_name[name]
        by_fx_name = {n.name: n for n in self.graphs[training].nodes}
        if name in by_fx_name:
            return by_fx_name[name]
        valid = self.valid_names(training)
        close = difflib.get_close_matches(name, [v for v in valid if v != name], n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        if call is None and name in self.module_paths:
            inner = self._last_inner_call(name, training)
            if inner is not None:
                raise container_not_called(what, name, inner)
        if name in self.module_paths or name in self.valid_names(not training):
            raise BranchifyError(
                f"{what}: layer {name!r} is not computed in {mode} mode, so it cannot carry an exit.{hint}")
        if name.startswith(COMPILED_PREFIX):
            raise BranchifyError(compiled_name(what, name))
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
