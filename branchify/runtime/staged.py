"""Staged routing: the traced model cut at its exits, each stage run only on the samples still going.

After each stage the exit's head judges the remaining samples; the logits of the samples that leave are
written into the result at their batch positions, and only the others are carried on, so later stages
run on ever smaller sub-batches. Per exit there is at most one host synchronisation (to learn how many
samples leave, which fixes the next sub-batch's size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..routing import ExitRule, Judge

__all__ = ["route_stages"]


def route_stages(stages: Sequence[Callable], heads: Sequence[Callable], head_inputs: Sequence[int],
                 rules: Sequence[ExitRule | None], inputs: tuple, first: torch.Tensor,
                 checked: set[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, C)`` and exit index ``(B,)`` of the batch ``inputs`` (``first``: its batch tensor).

    An exit that is off (rule None) is passed by: no head, no synchronisation. ``checked``: the thresholds
    of ``rules`` already checked (``Judge``), kept by the caller across batches."""
    k = len(rules)
    judge = Judge(rules, checked=checked)
    batch = first.shape[0]

    def taking(i: int) -> torch.Tensor:
        return torch.full((batch,), i, dtype=torch.int64, device=first.device)

    exit_index = None  # made with logits, when some samples leave and others go on
    logits = None
    where = None  # original positions of the samples still running; None while that is the whole batch
    values = inputs
    for i in range(k):
        values = stages[i](*values)
        if rules[i] is None:
            continue
        z = heads[i](*values[:head_inputs[i]])
        if batch == 1:  # the sample leaves or goes on: one read of its score decides, nothing to compact
            if judge.fires_one(i, z):
                return z, taking(i)
            continue
        fired = judge.fires(i, z)
        # The one host sync of this exit; one sample's decision is read directly (one operation fewer).
        leaving = int(fired.item()) if fired.shape[0] == 1 else int(torch.count_nonzero(fired))
        if leaving == 0:
            continue
        if leaving == fired.shape[0]:
            if where is None:
                return z, taking(i)
            logits.index_copy_(0, where, z)
            return logits, exit_index.index_fill_(0, where, i)
        # Leavers first, each group in batch order; argsort avoids a second sync (nonzero would sync).
        order = torch.argsort(fired, descending=True, stable=True)
        leave, keep = order[:leaving], order[leaving:]
        if where is None:
            logits, exit_index = z.new_empty((batch, z.shape[1])), taking(k)
            dest, where = leave, keep
        else:
            dest, where = where[leave], where[keep]
        logits.index_copy_(0, dest, z[leave])
        exit_index.index_fill_(0, dest, i)
        # Advanced indexing keeps channels-last tensors channels-last (index_select does not).
        values = tuple(v[keep] if isinstance(v, torch.Tensor) else v for v in values)
        judge.keep(keep)
    final = stages[k](*values)[0]
    if where is None:
        return final, taking(k)
    logits.index_copy_(0, where, final)
    return logits, exit_index
