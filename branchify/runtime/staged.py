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

# Per device, each exit's index as a (1,) int64 tensor, which a sample leaving at batch 1 gets a clone of (a
# clone costs less than torch.full); normal tensors, so that their clones under inference mode are inference tensors.
_ONE_EXIT: dict[torch.device, list[torch.Tensor]] = {}


def _one_exit(i: int, device: torch.device) -> torch.Tensor:
    rows = _ONE_EXIT.get(device)
    if rows is None or len(rows) <= i:
        with torch.inference_mode(False):
            rows = _ONE_EXIT[device] = [torch.full((1,), j, dtype=torch.int64, device=device)
                                        for j in range(max(i + 1, 8))]
    return rows[i].clone()


def route_stages(stages: Sequence[Callable], heads: Sequence[Callable], head_inputs: Sequence[int],
                 rules: Sequence[ExitRule | None], inputs: tuple, first: torch.Tensor,
                 judge: Judge | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, C)`` and exit index ``(B,)`` of the batch ``inputs`` (``first``: its batch tensor).

    An exit that is off (rule None) is passed by: no head, no synchronisation. ``judge``: a ``Judge`` of
    ``rules`` the caller keeps across batches (with the thresholds it has checked); this batch is judged by
    its ``fresh()``."""
    k = len(rules)
    judge = Judge(rules) if judge is None else judge.fresh()
    batch = first.shape[0]
    if batch == 1:
        return _route_one(stages, heads, head_inputs, rules, inputs, judge, first.device)

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


def _route_one(stages: Sequence[Callable], heads: Sequence[Callable], head_inputs: Sequence[int],
               rules: Sequence[ExitRule | None], values: tuple, judge: Judge,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_stages`` for one sample: it leaves or goes on, so one read of its score decides at each exit and
    nothing is compacted."""
    k = len(rules)
    for i in range(k):
        values = stages[i](*values)
        if rules[i] is None:
            continue
        z = heads[i](*values[:head_inputs[i]])
        if judge.fires_one(i, z):
            return z, _one_exit(i, device)
    return stages[k](*values)[0], _one_exit(k, device)
