"""The sweep's search tables: per set of exits, the correct count and MACs of every threshold choice."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..calibration.cache import Cached
from ..calibration.grid import candidate_thresholds, first_rung, outcome_tables
from ..cost import ExitCosts
from ..routing import route
from ..spec import ExitPoint, ExitSpec
from .result import FrontierPoint

_SEARCH_STEPS = 16


def subset_costs(costs: ExitCosts, chosen: Sequence[int]) -> ExitCosts:
    """The costs of a module that keeps only the exits ``chosen`` (sorted, in graph order)."""
    return ExitCosts.of([costs.backbone[i] for i in chosen], [costs.heads[i] for i in chosen], costs.original)


def _pareto(macs: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Indices of the points no other point beats in both MACs (lower) and correct count (higher).

    Per correct count the cheapest point; it is on the frontier when every more accurate point
    costs more. Ties go to the first index. No sort: counts are small integers.
    """
    right = right.clamp(min=0)
    top = int(right.max())
    inf = torch.tensor(math.inf, dtype=torch.float64)
    lowest = torch.full((top + 1,), math.inf, dtype=torch.float64).scatter_reduce(0, right, macs, reduce="amin")
    above = torch.cat([lowest.flip(0).cummin(0).values.flip(0)[1:], inf.reshape(1)])  # cheapest with more correct
    on_frontier = torch.isfinite(lowest) & (lowest < above)
    hits = on_frontier[right] & (macs == lowest[right])
    index = torch.arange(right.numel())
    first = torch.full((top + 1,), right.numel(), dtype=torch.long).scatter_reduce(
        0, right[hits], index[hits], reduce="amin")
    return first[on_frontier]


def _grid_tables(cached: Cached, correct: torch.Tensor, costs: ExitCosts, layers: list[str], crit):
    """Per exit set, the correct counts and MACs of every threshold combination on the grid."""
    scores = [crit.score(z, cached.targets) for z in cached.exit_logits]
    ladders = [candidate_thresholds(s, crit, _SEARCH_STEPS, where=f"candidate {layers[i]!r}: ")
               for i, s in enumerate(scores)]
    rungs = [first_rung(s, crit, ladder) for s, ladder in zip(scores, ladders)]
    m = len(layers)

    def tables(chosen: tuple[int, ...]):
        sizes = [len(ladders[i]) for i in chosen]
        right, macs = outcome_tables([rungs[i] for i in chosen], sizes, correct[[*chosen, m]],
                                     subset_costs(costs, chosen))

        def thresholds_of(flat: int) -> tuple[float | None, ...]:
            cell = torch.unravel_index(torch.tensor(flat), tuple(sizes))
            return tuple(ladders[i][int(j)] for i, j in zip(chosen, cell))

        return right, macs, thresholds_of

    return tables


def _patience_tables(cached: Cached, correct: torch.Tensor, costs: ExitCosts, layers: list[str], criterion: str):
    """Per exit set, the correct counts and MACs of each patience (off, then 1 .. the set's size)."""
    m, n = len(layers), cached.samples

    def tables(chosen: tuple[int, ...]):
        candidates = [None, *map(float, range(1, len(chosen) + 1))]
        sub = subset_costs(costs, chosen)
        right, macs = [], []
        for t in candidates:
            if t is None:
                taken, paid = torch.full((n,), len(chosen), dtype=torch.int64), sub.judging([False] * len(chosen))
            else:
                spec = ExitSpec(exits=[ExitPoint(layer=layers[i], threshold=t) for i in chosen], criterion=criterion)
                taken, paid = route(spec, [cached.exit_logits[i] for i in chosen]), sub
            right.append(int(correct[[*chosen, m]][taken, torch.arange(n)].sum()))
            macs.append(float(torch.tensor(paid.per_exit, dtype=torch.float64)[taken].sum()))
        return (torch.tensor(right), torch.tensor(macs, dtype=torch.float64),
                lambda flat: (candidates[flat],) * len(chosen))

    return tables


def _frontier(points_macs: list[torch.Tensor], points_right: list[torch.Tensor],
              points_where: list[tuple[tuple[int, ...], tuple[float | None, ...]]], layers: list[str],
              costs: ExitCosts, n: int, final_correct: int) -> list[FrontierPoint]:
    macs = torch.cat([*points_macs, torch.tensor([costs.original * n], dtype=torch.float64)])
    right = torch.cat([*points_right, torch.tensor([final_correct])])
    frontier = []
    for index in _pareto(macs, right).tolist():
        if index == len(points_where):
            frontier.append(FrontierPoint((), (), 1.0, final_correct / n))
            continue
        chosen, thresholds = points_where[index]
        frontier.append(FrontierPoint(layers=tuple(layers[i] for i in chosen), thresholds=thresholds,
                                      mac_fraction=float(macs[index]) / (costs.original * n),
                                      accuracy=int(right[index]) / n))
    return frontier
