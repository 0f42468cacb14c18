"""Routing on the hook path: the model's own forward runs, and stops once every sample has left.

A hook-path module's forward is opaque Python that cannot be cut into stages: the whole batch runs
through the model, each exit judges the batch at the first call of its layer, and the forward is
stopped (by raising from the hook) as soon as no sample is left; if any sample goes on, the forward
finishes for the whole batch.

The exit layers are submodules of the user's model, shared by every thread that calls the runner, so a
hook registered per call would see the other threads' batches. One hook per layer is registered while
any call runs (the first call in registers, the last one out removes them, so the model carries no hook
between calls), and each hook hands the layer's output to the judge of the call running in its own
thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from .._outputs import select_output
from ..routing import ExitRule, Judge

__all__ = ["HookRouter"]


class _BatchExited(Exception):
    """Raised from a forward hook to stop an opaque forward once every sample has left."""


def _dispatch(local: threading.local, index: int, _module, _args, output) -> None:
    judge = getattr(local, "judge", None)
    if judge is not None:  # another thread's forward, or the module's own forward: not this call's
        judge(index, output)  # returns None, so the layer's output is never replaced


class HookRouter:
    """The hook path's routing of one runner, safe to call from several threads at once.

    >>> import torch, branchify as bx
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=9.0)]),
    ...                          torch.randn(1, 4), capture="hooks").eval()
    >>> bx.ExitRunner(module)(torch.randn(5, 4)).exit_index.tolist()
    [0, 0, 0, 0, 0]
    """

    def __init__(self, module) -> None:
        self.module = module
        self._local = threading.local()
        self._lock = threading.Lock()
        self._active = 0
        self._handles: list = []

    def _enter(self) -> None:
        with self._lock:
            if self._active == 0:
                model = self.module.model
                self._handles = [model.get_submodule(path).register_forward_hook(partial(_dispatch, self._local, i))
                                 for i, path in enumerate(self.module.layer_paths)]
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    def _forward(self, judge: Callable, inputs: tuple, names: tuple[str, ...] | None):
        args, kwargs = ((), dict(zip(names, inputs))) if names is not None else (inputs, {})
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])
        self._enter()
        self._local.judge = judge
        try:
            result = self.module.model(*args, **kwargs)
        finally:
            self._local.judge = None
            self._leave()
        return select_output(result, self.module.output)[0]

    def route(self, heads: Sequence[Callable], rules: Sequence[ExitRule | None], inputs: tuple,
              names: tuple[str, ...] | None, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and exit index of the batch ``inputs`` (keywords when ``names`` are given)."""
        batch = first.shape[0]
        exit_index = torch.full((batch,), len(rules), dtype=torch.int64, device=first.device)
        running = torch.ones(batch, dtype=torch.bool, device=first.device)
        state: dict[str, torch.Tensor] = {}
        judged: set[int] = set()
        decide = Judge(rules)

        def judge(i: int, out: torch.Tensor) -> None:
            if i in judged or rules[i] is None:
                return  # judged at the first call of the layer; an exit that is off is never judged
            judged.add(i)
            z = heads[i](out)
            fired = decide.fires(i, z) & running
            state["logits"] = torch.where(fired[:, None], z, state["logits"]) if "logits" in state else z
            exit_index.masked_fill_(fired, i)
            running.logical_and_(~fired)
            if not bool(running.any()):  # the one host sync of this exit
                raise _BatchExited

        try:
            final = self._forward(judge, inputs, names)
        except _BatchExited:
            return state["logits"], exit_index
        if "logits" not in state:
            return final, exit_index
        return torch.where(running[:, None], final, state["logits"]), exit_index
