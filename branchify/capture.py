"""Capturing a model as graphs: torch.fx first, then torch.export, then (outside this module) forward hooks.

``torch.fx.symbolic_trace`` gives torchvision's node names and keeps leaf modules, so it goes first.
Models it cannot trace (Hugging Face transformers, Proxy iteration, ``co_varnames`` errors) are
exported with ``torch.export`` (non-strict, every input dim dynamic where the model allows, the batch
dim required to stay dynamic so that the runtime can drop samples). Only models neither can capture
get forward hooks. Both graph paths give a ``Traced``: train and eval graphs whose nodes know the
module path they were created in, and whose output is the model's logits.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import fx, nn

from ._inputs import Inputs
from ._outputs import select_output
from ._trace import QUALNAME, SCOPE, Traced, kept_modes, trace_model
from .errors import BranchifyError

__all__ = ["CAPTURES", "capture", "check_model"]

CAPTURES = ("auto", "fx", "export", "hooks")


class CaptureFailed(Exception):
    """A graph capture did not work; ``reason`` is its first line (for the warning and the next path)."""


def check_model(model: nn.Module, path: str) -> None:
    """Refuse models no path can treat exactly: not a module, values on the meta device, and (for the
    graph paths) hooks on the model itself, which a captured graph never runs."""
    if not isinstance(model, nn.Module):
        raise BranchifyError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself, "
            "e.g. torchvision.models.resnet18()")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise BranchifyError(
            f"the model's {meta!r} is on the meta device (it has a shape but no values), so nothing can be computed "
            "or checked; materialise the model first, e.g. model.to_empty(device='cpu') and load its state dict")
    hooks = len(model._forward_hooks) + len(model._forward_pre_hooks)
    if hooks and path != "hooks":
        raise BranchifyError(
            f"{type(model).__name__} has {hooks} forward hook(s) or pre-hook(s) registered on the model itself; a "
            "captured graph does not run them, so the final output would differ from model(x). Remove them "
            "(handle.remove()), register them on a submodule, or pass capture='hooks' (the model's own forward "
            "runs, hooks included)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _set_final(graph: fx.Graph, selector, *, strict: bool, structure=None) -> None:
    """Make the graph's output the model's logits (``select_output``), dropping the rest."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    whole = output.args[0] if structure is None else structure
    final, _ = select_output(whole, selector, strict=strict)
    output.args = (final,)
    output.type = None
    if final is not whole:  # drop what only the other entries needed (hidden states, attentions)
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "call_method") and not node.users and not node.is_impure():
                graph.erase_node(node)


def _fx(model: nn.Module, leaf_modules, selector) -> Traced:
    try:
        traced = trace_model(model, leaf_modules)
    except BranchifyError:
        raise
    except Exception as err:  # data-dependent control flow, Proxy iteration and the like
        raise CaptureFailed(f"torch.fx: {_first_line(err)}") from None
    for training, graph in traced.graphs.items():
        # in train mode googlenet and inception_v3 return a namedtuple of (logits, aux...): kept whole
        _set_final(graph, selector, strict=not training or selector is not None)
    return traced


def _distinct_batch(inputs: Inputs) -> int:
    """A batch size of at least 2 that no other input dim equals, so export cannot tie the batch to one."""
    others = {int(d) for t in inputs.tensors for d in t.shape[1:]}
    batch = max(2, inputs.batch)
    while batch in others:
        batch += 1
    return batch


def _dynamic_shapes(model: nn.Module, inputs: Inputs):
    from torch.export import Dim

    def dims(value):
        # token ids and masks vary in length as well as in number; images keep their size (exporting every
        # dim of an image dynamic costs minutes on some models and buys nothing)
        if not isinstance(value, torch.Tensor):
            return None
        if value.is_floating_point() or value.is_complex():
            return {0: Dim.AUTO}
        return {i: Dim.AUTO for i in range(value.ndim)}

    signature = inspect.signature(model.forward)
    bound = signature.bind(*inputs.args, **inputs.kwargs)
    shapes = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(dims(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: dims(v) for k, v in value.items()}
        else:
            shapes[name] = dims(value)
    return shapes


def _is_check(node: fx.Node) -> bool:
    """Export's own guards and assertions: checks of the example's metadata, not part of the computation."""
    if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
        return True
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return name.startswith(("_assert", "sym_constrain_range"))


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export logs the graph and a guard report when it fails; branchify reports the reason itself.

    What export writes to stderr is held back, and passed on only when the export works.
    """
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._dynamo",
                   "torch.fx", "torch._functorch", "torch._subclasses")


def _export(model: nn.Module, inputs: Inputs, selector) -> Traced:
    from torch.utils._pytree import tree_unflatten

    if any(not isinstance(v, torch.Tensor) for v in (*inputs.args, *inputs.kwargs.values())):
        raise CaptureFailed("torch.export: branchify exports models whose inputs are tensors or named tensors")
    batch = _distinct_batch(inputs)
    example = inputs.map(lambda t: t[torch.arange(batch, device=t.device) % t.shape[0]])
    graphs, roots = {}, {}
    with kept_modes(model):
        for training in (True, False):
            model.train(training)
            try:
                with _quiet_export():
                    program = torch.export.export(model, example.args, example.kwargs,
                                                  dynamic_shapes=_dynamic_shapes(model, example), strict=False)
            except BranchifyError:
                raise
            except Exception as err:
                raise CaptureFailed(f"torch.export: {_first_line(err)}") from None
            gm = program.module()
            graph = gm.graph
            for node in [n for n in graph.nodes if _is_check(n)]:
                graph.erase_node(node)
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            static = [n.name for n in placeholders
                      if isinstance(n.meta.get("val"), torch.Tensor) and isinstance(n.meta["val"].shape[0], int)]
            if static:
                raise CaptureFailed(f"torch.export fixed the batch size of input(s) {static}, so samples cannot be "
                                    "dropped inside a batch")
            graph._codegen = fx.graph.CodeGen()  # plain positional/keyword placeholders, no pytree calling convention
            output = next(n for n in reversed(graph.nodes) if n.op == "output")
            structure = tree_unflatten(list(output.args[0]), program.call_spec.out_spec)
            _set_final(graph, selector, strict=True, structure=structure)
            _name_nodes(graph, model)
            graphs[training], roots[training] = graph, gm
    paths = [name for name, _ in model.named_modules() if name]
    return Traced(model, graphs, paths, path="export", roots=roots)


def _name_nodes(graph: fx.Graph, model: nn.Module) -> None:
    known = {name for name, _ in model.named_modules()}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        scope = ""
        if stack:
            path = list(stack.values())[-1][0]
            scope = path if path in known else ""
        node.meta[SCOPE] = scope
        node.meta[QUALNAME] = node.name


def capture(model: nn.Module, inputs: Inputs, *, path: str = "auto", leaf_modules=None,
            output: str | int | None = None) -> Traced | str:
    """The model's graphs by the first path that works, or the reasons the graph paths failed (a str:
    the caller then uses forward hooks). ``path`` forces one of ``CAPTURES``."""
    if path not in CAPTURES:
        raise BranchifyError(f"capture={path!r} is not a capture path; use one of {list(CAPTURES)}")
    check_model(model, path)
    if path == "hooks":
        return "capture='hooks' was asked for"
    reasons = []
    if path in ("auto", "fx"):
        try:
            return _fx(model, leaf_modules, output)
        except CaptureFailed as err:
            if path == "fx":
                raise BranchifyError(f"capture='fx': {err}; try capture='export' or capture='auto'") from None
            reasons.append(str(err))
    if leaf_modules:
        reasons.append("torch.export: not tried, since leaf_modules applies to torch.fx only")
        return "; ".join(reasons)
    try:
        return _export(model, inputs, output)
    except CaptureFailed as err:
        if path == "export":
            raise BranchifyError(f"capture='export': {err}; try capture='hooks' or capture='auto'") from None
        reasons.append(str(err))
    return "; ".join(reasons)


def is_mapping_call(args: tuple, kwargs: Mapping) -> bool:
    return len(args) == 1 and not kwargs and isinstance(args[0], Mapping)

