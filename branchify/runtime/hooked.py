"""Routing on the hook path: the model's own forward runs, and stops once every sample has left.

A hook-path module's forward is opaque Python that cannot be cut into stages: the whole batch runs
through the model, each exit judges the batch at its call of its layer (``layer:k``; most layers run
once), and the forward is stopped (by raising from the hook) as soon as no sample is left; if any sample
goes on, the forward
finishes for the whole batch.

The exit layers are submodules of the user's model, shared by every thread that calls the runner; the
module's ``run_with_hooks`` hands each thread's judge only its own forward's outputs (``fallback``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..routing import ExitRule, Judge

__all__ = ["HookRouter"]


class _BatchExited(Exception):
    """Raised from a forward hook to stop an opaque forward once every sample has left."""


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

    def route(self, heads: Sequence[Callable], rules: Sequence[ExitRule | None], inputs: tuple,
              names: tuple[str, ...] | None, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and exit index of the batch ``inputs`` (keywords when ``names`` are given)."""
        batch = first.shape[0]
        exit_index = torch.full((batch,), len(rules), dtype=torch.int64, device=first.device)
        running = torch.ones(batch, dtype=torch.bool, device=first.device)
        state: dict[str, torch.Tensor] = {}
        judged: set[int] = set()
        decide = Judge(rules)

        def judge(i: int, out: torch.Tensor, *extras: torch.Tensor) -> None:
            if i in judged or rules[i] is None:
                return  # judged at the first call of the layer; an exit that is off is never judged
            judged.add(i)
            z = heads[i](out, *extras)  # extras: the attention mask of a head that skips padding
            fired = decide.fires(i, z) & running
            state["logits"] = torch.where(fired[:, None], z, state["logits"]) if "logits" in state else z
            exit_index.masked_fill_(fired, i)
            running.logical_and_(~fired)
            if not bool(running.any()):  # the one host sync of this exit
                raise _BatchExited

        try:
            final = (self.module.run_with_hooks(judge, **dict(zip(names, inputs))) if names is not None
                     else self.module.run_with_hooks(judge, *inputs))
        except _BatchExited:
            return state["logits"], exit_index
        if "logits" not in state:
            return final, exit_index
        return torch.where(running[:, None], final, state["logits"]), exit_index
