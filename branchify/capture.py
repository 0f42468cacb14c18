"""Capturing a model as graphs: torch.fx first, then torch.export, then (outside this module) forward hooks.

``torch.fx.symbolic_trace`` gives torchvision's node names and keeps leaf modules, so it goes first.
Models it cannot trace (Hugging Face transformers, Proxy iteration, ``co_varnames`` errors) are
exported with ``torch.export`` (non-strict, every input dim dynamic where the model allows, the batch
dim required to stay dynamic so that the runtime can drop samples). Only models neither can capture
get forward hooks. Both graph paths give a ``Traced``: train and eval graphs whose nodes know the
module path (and which call of it) they were created in, and whose output is the model's logits.

torch.export captures the model for the input shapes its guards allow (a dim the model branches on,
``if ids.shape[1] > 8``, or one it fixes); those guards are kept, as an ``InputGuard`` right after
the graph's inputs, so that the exit module and every stage cut from it refuse a shape the graph was
not captured for instead of computing another model's logits.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import sys
import threading
from collections.abc import Iterator, Mapping

import torch
from torch import fx, nn

from ._inputs import Inputs, bind
from ._outputs import select_output
from ._trace import CALLS, QUALNAME, SCOPE, Traced, kept_modes, trace_model
from .errors import BranchifyError

__all__ = ["CAPTURES", "InputGuard", "NoGraph", "capture", "check_model", "held_output", "unwrap_compiled"]

CAPTURES = ("auto", "fx", "export", "hooks")


class CaptureFailed(Exception):
    """A graph capture did not work; ``reason`` is its first line (for the warning and the next path)."""


class NoGraph(Exception):
    """No graph path captured the model (or ``capture='hooks'`` was asked for): the caller attaches exits with
    forward hooks instead. ``reasons`` says why, one entry per path tried."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


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


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps, for a compiled model; else ``model``.

    A compiled model's forward is the wrapped module's code: capturing that module gives the same graph, names
    its layers as the model does (``layer1``, not ``_orig_mod.layer1``) and lets torch.fx trace it.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> unwrap_compiled(torch.compile(net)) is net, unwrap_compiled(net) is net
    (True, True)
    """
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def _cache_hint(model: nn.Module) -> str:
    """Why a Hugging Face model with its key/value cache on fails to export, and the switch that keeps the graph."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return ""
    return (" (the model returns its key/value cache, since model.config.use_cache is True; set "
            "model.config.use_cache = False to keep the graph path: the cache serves generation only and the logits "
            "are the same, while on the hook path the runner cannot skip the computation of samples that exit)")


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
        raise CaptureFailed(f"torch.fx: {_first_line(err)}") from err
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


def _widen(inputs: Inputs) -> Inputs:
    """The example export traces: the batch widened by ``_distinct_batch``, and every other dim of size 1 of an
    integer input (a one-token sequence) widened to 2. torch.export fixes a dim of size 1 at 1 (it cannot tell a
    broadcast from a length), so a one-token example would give a graph of one-token inputs; the values are
    repeated, so token ids and masks stay valid."""
    def lengths(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            return t
        for dim in range(1, t.ndim):
            if t.shape[dim] == 1:
                t = t.expand(*t.shape[:dim], 2, *t.shape[dim + 1:]).contiguous()
        return t

    widened = inputs.map(lengths)
    batch = _distinct_batch(widened)
    return widened.map(lambda t: t[torch.arange(batch, device=t.device) % t.shape[0]])


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
    """Export's own checks: its guard call (replaced by an ``InputGuard``) and the asserts in the graph."""
    if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
        return True
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return name.startswith(("_assert", "sym_constrain_range"))


GUARD = "_branchify_input_guard"


class InputGuard(nn.Module):
    """torch.export's guards on a captured graph's inputs: a call whose inputs break one is refused.

    ``checks`` are pairs of Python expressions over the graph's inputs (``args[i]``) and the same condition in
    the inputs' names, for the message; they are torch.export's own (its range constraints, specialisations and
    the guards its tracer recorded), so the module accepts exactly the shapes the graph is valid for.

    >>> guard = InputGuard(["ids"], [("args[0].size()[1] >= 9", "ids.size()[1] >= 9")], "ids=Tensor(2, 12)")
    >>> guard(torch.zeros(2, 12, dtype=torch.long))
    >>> try:
    ...     guard(torch.zeros(2, 5, dtype=torch.long))
    ... except BranchifyError as err:
    ...     print("ids.size()[1] >= 9 does not hold" in str(err))
    True
    """

    _is_impure = True  # a check with no users: dead-code elimination must keep it

    def __init__(self, names: list[str], checks: list[tuple[str, str]], example: str) -> None:
        super().__init__()
        self.names = list(names)
        self.checks = [tuple(c) for c in checks]
        self.example = example
        self._compiled: list | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None}  # code objects do not pickle; compiled again on first call

    def forward(self, *args) -> None:
        if self._compiled is None:
            self._compiled = [compile(code, "<export guard>", "eval") for code, _ in self.checks]
        scope = {"args": args}
        failed = [text for code, (_, text) in zip(self._compiled, self.checks) if not eval(code, _GUARD_GLOBALS, scope)]
        if failed:
            got = ", ".join(f"{name}={_shape(value)}" for name, value in zip(self.names, args))
            raise BranchifyError(
                f"input(s) {got} are outside the shapes the graph was captured for: {' and '.join(failed)} does not "
                f"hold; torch.export captured the model on {self.example}, and its graph is valid only where that "
                "holds (the model's code branches on, or fixes, these sizes). Pass attach_exits an example of the "
                "shape you will use, or capture='hooks' (the model's own forward runs, at any shape)")


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype}"
    return repr(value)


def _guard_globals() -> dict:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return {**SYMPY_INTERP, "math": math, "inf": float("inf"), "torch": torch}


_GUARD_GLOBALS = _guard_globals()


def _input_guard(program, gm: fx.GraphModule, example: Inputs) -> InputGuard:
    """The guards torch.export's own module would check on ``gm``'s inputs, as an ``InputGuard``.

    Built the way ``ExportedProgram.module()`` builds its ``_guards_fn``. A guard that cannot be read is not
    dropped: the export path is refused instead (``CaptureFailed``), and the next path is tried."""
    from torch.export import _unlift
    from torch.utils import _pytree as pytree

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        signature = inspect.signature(gm.forward)
        paths = _unlift._get_input_paths(program.example_inputs, signature)
        codes = _unlift._get_input_guards_for_graph(placeholders, program.range_constraints, paths)
        traced = _unlift._force_ep_signature_match(program._guards_code, paths)
        codes = [*codes, *_unlift._force_gm_signature_match(traced, signature)]
        sources = ["L" + pytree.keystr(path) for path in paths]
        names = [path[0].key + pytree.keystr(path[1:]) for path in paths]
    except Exception as err:
        raise CaptureFailed(f"torch.export: its guards on the input shapes could not be read ({_first_line(err)}), "
                            "and dropping them would accept shapes the graph is not valid for") from err
    checks = []
    # longest first, so that L['x'] never replaces the start of L['x_1']
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    for code in codes:
        actual, text = code, code
        for i in order:
            actual = actual.replace(sources[i], f"args[{i}]")
            text = text.replace(sources[i], names[i])
        if re.search(r"\bL\[", actual):
            raise CaptureFailed(f"torch.export: its guard {code!r} reads a value that is not one of the graph's "
                                "inputs, so it cannot be checked; dropping it would accept shapes the graph is not "
                                "valid for")
        checks.append((actual, text.replace("\n", " ")))
    names = [p.name for p in placeholders]
    try:
        values = bind(gm.graph, example, "example_inputs")
        captured = ", ".join(f"{n}={_shape(v)}" for n, v in zip(names, values))
    except BranchifyError:
        captured = example.describe()
    return InputGuard(names, checks, captured)


def _add_guard(graph: fx.Graph, guard_target: str) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        node = graph.call_module(guard_target, tuple(placeholders))
    node.meta[SCOPE] = ""
    node.meta[CALLS] = {}


class _HeldOutput(logging.Filter):
    """Holds back what the exporting threads log or write to ``sys.stderr``; other threads' output passes.

    One log filter, on the handlers that exist, and one stand-in for ``sys.stderr`` that passes every other
    thread's writes straight to the stream it replaced, for as long as any thread exports (reference-counted
    under a lock). No logger's level changes, and no other thread loses a line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.logs: dict[int, list[logging.LogRecord]] = {}
        self.text: dict[int, list[str]] = {}
        self.handlers: list[logging.Handler] = []
        self.stderr: _ThreadStderr | None = None
        self.depth: dict[int, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        held = self.logs.get(record.thread)
        if held is None:
            return True
        held.append(record)
        return False

    def enter(self) -> None:
        with self.lock:
            me = threading.get_ident()
            self.depth[me] = self.depth.get(me, 0) + 1
            if self.depth[me] > 1:  # nested: the outer block holds (and passes on) everything
                return
            if not self.logs:
                self.handlers = _all_handlers()
                for handler in self.handlers:
                    handler.addFilter(self)
                self.stderr = _ThreadStderr(sys.stderr, self.text)
                sys.stderr = self.stderr
            self.logs[threading.get_ident()] = []
            self.text[threading.get_ident()] = []

    def leave(self) -> tuple[list[logging.LogRecord], str, object]:
        with self.lock:
            me = threading.get_ident()
            self.depth[me] -= 1
            if self.depth[me]:
                return [], "", self.stderr.stream if self.stderr is not None else sys.stderr
            del self.depth[me]
            records = self.logs.pop(threading.get_ident(), [])
            text = "".join(self.text.pop(threading.get_ident(), []))
            original = self.stderr.stream if self.stderr is not None else sys.stderr
            if not self.logs:
                for handler in self.handlers:
                    handler.removeFilter(self)
                self.handlers = []
                if sys.stderr is self.stderr:  # unless someone else has replaced it since
                    sys.stderr = original
                self.stderr = None
        return records, text, original


class _ThreadStderr:
    """``sys.stderr`` for the time threads export: their writes are held, every other thread's pass through."""

    def __init__(self, stream, held: dict[int, list[str]]) -> None:
        self.stream = stream
        self.held = held

    def write(self, text: str) -> int:
        held = self.held.get(threading.get_ident())
        if held is None:
            return self.stream.write(text)
        held.append(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _all_handlers() -> list[logging.Handler]:
    # list() copies the values in one C call, under the GIL: another thread creating a logger meanwhile (torch
    # does, while it exports) cannot change the dict under an iteration ("changed size during iteration")
    known = list(logging.Logger.manager.loggerDict.values())
    loggers = [logging.getLogger(), *(v for v in known if isinstance(v, logging.Logger))]
    handlers = {id(h): h for logger in loggers for h in logger.handlers}
    if logging.lastResort is not None:
        handlers[id(logging.lastResort)] = logging.lastResort
    return list(handlers.values())


_HELD = _HeldOutput()


@contextlib.contextmanager
def held_output() -> Iterator[None]:
    """Hold back what this thread logs or writes to stderr in the block, and pass it on only if the block works.

    torch.export logs the graph and a guard report, and prints the partial graph, when it fails, and a failing
    fake run logs a traceback; branchify reports the reason itself. Other threads' output is never held.
    """
    _HELD.enter()
    ok = False
    try:
        yield
        ok = True
    finally:
        records, text, stream = _HELD.leave()
        if ok:
            for record in records:
                logging.getLogger(record.name).handle(record)
            if text:
                stream.write(text)


def _export(model: nn.Module, inputs: Inputs, selector) -> Traced:
    if any(not isinstance(v, torch.Tensor) for v in (*inputs.args, *inputs.kwargs.values())):
        raise CaptureFailed("torch.export: branchify exports models whose inputs are tensors or named tensors")
    widened = _widen(inputs)
    try:
        return _export_at(model, widened, inputs, selector)
    except CaptureFailed:
        if all(a.shape[1:] == b.shape[1:] for a, b in zip(widened.tensors, inputs.tensors)):
            raise
    # a model that needs its one-token dims to be 1: captured at 1, and its guards say so
    batch = _distinct_batch(inputs)
    return _export_at(model, inputs.map(lambda t: t[torch.arange(batch, device=t.device) % t.shape[0]]), inputs,
                      selector)


def _export_at(model: nn.Module, example: Inputs, given: Inputs, selector) -> Traced:
    from torch.utils._pytree import tree_unflatten

    graphs, roots = {}, {}
    with kept_modes(model):
        for training in (True, False):
            model.train(training)
            try:
                with held_output():
                    program = torch.export.export(model, example.args, example.kwargs,
                                                  dynamic_shapes=_dynamic_shapes(model, example), strict=False)
            except BranchifyError:
                raise
            except Exception as err:
                raise CaptureFailed(f"torch.export: {_first_line(err)}") from err
            gm = program.module()
            guard = _input_guard(program, gm, given)
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
            if guard.checks:
                gm.add_module(GUARD, guard)
                _add_guard(graph, GUARD)
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
        # export keys the k-th call of a module as "path@k" (the first has no suffix)
        node.meta[CALLS] = {path: int(key.rpartition("@")[2]) if "@" in key else 0
                            for key, (path, _) in stack.items() if path in known and path}


def capture(model: nn.Module, inputs: Inputs, *, path: str = "auto", leaf_modules=None,
            output: str | int | None = None) -> Traced:
    """The model's graphs by the first path that works. ``path`` forces one of ``CAPTURES``.

    Raises ``NoGraph`` (with the reasons) when the model is to get forward hooks instead: no graph path
    captured it, or ``path='hooks'``; a forced graph path that fails raises ``BranchifyError``."""
    if path not in CAPTURES:
        raise BranchifyError(f"capture={path!r} is not a capture path; use one of {list(CAPTURES)}")
    check_model(model, path)
    if path == "hooks":
        raise NoGraph(["capture='hooks' was asked for"])
    with _CAPTURING:  # torch.fx patches torch's functions process-wide while it traces: one capture at a time
        return _capture(model, inputs, path, leaf_modules, output)


_CAPTURING = threading.RLock()


def _capture(model: nn.Module, inputs: Inputs, path: str, leaf_modules, output) -> Traced:
    reasons = []
    if path in ("auto", "fx"):
        try:
            return _fx(model, leaf_modules, output)
        except CaptureFailed as err:
            if path == "fx":
                raise BranchifyError(f"capture='fx': {err}; try capture='export' or capture='auto'") from err
            reasons.append(str(err))
    if leaf_modules:
        reasons.append("torch.export: not tried, since leaf_modules applies to torch.fx only")
        raise NoGraph(reasons)
    try:
        return _export(model, inputs, output)
    except CaptureFailed as err:
        reason = f"{err}{_cache_hint(model)}"
        if path == "export":
            raise BranchifyError(f"capture='export': {reason}; try capture='hooks' or capture='auto'") from err
        reasons.append(reason)
    raise NoGraph(reasons)


def is_mapping_call(args: tuple, kwargs: Mapping) -> bool:
    return len(args) == 1 and not kwargs and isinstance(args[0], Mapping)

