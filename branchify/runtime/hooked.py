"""Routing on the hook path: the model's own forward runs, and stops once every sample has left.

A hook-path module's forward is opaque Python that cannot be cut into stages: the whole batch runs
through the model, each exit judges the batch at the first call of its layer, and the forward is
stopped (by raising from the hook) as soon as no sample is left; if any sample goes on, the forward
finishes for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..routing import ExitRule, Judge

__all__ = ["route_hooks"]


class _BatchExited(Exception):
    """Raised from a forward hook to stop an opaque forward once every sample has left."""


def route_hooks(module, heads: Sequence[Callable], rules: Sequence[ExitRule | None], inputs: tuple,
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
        if names is not None:
            final = module.run_with_hooks(judge, **dict(zip(names, inputs)))
        else:
            final = module.run_with_hooks(judge, *inputs)
    except _BatchExited:
        return state["logits"], exit_index
    if "logits" not in state:
        return final, exit_index
    return torch.where(running[:, None], final, state["logits"]), exit_index
