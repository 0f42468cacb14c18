"""The threshold grid and its exact evaluation: every combination's correct count and MACs at once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..cost import ExitCosts
from ..criteria import Criterion
from ..errors import BranchifyError
from ..routing import first_exit

Target = Literal["max_accuracy_drop", "mac_budget"]

_GRID_CELLS = 2**21
_MAX_EXITS = 12
_MAX_GRID = 128
_PATH_STEPS = 32


def _float32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def always_threshold(scores: torch.Tensor, crit: Criterion) -> float:
    """A threshold at which every sample fires: the end of the criterion's score range where it is finite,
    else just past the most extreme score seen (so a more extreme score on new data would not fire)."""
    if crit.exits_when == "above":
        edge = crit.low if math.isfinite(crit.low) else float(scores.min())
        return edge
    edge = crit.high if math.isfinite(crit.high) else float(scores.max())
    # float32, as the scores are compared: strictly above the edge
    return float(torch.nextafter(_float32(edge), _float32(math.inf)))


def candidate_thresholds(scores: torch.Tensor, crit: Criterion, steps: int, *,
                         where: str = "") -> list[float | None]:
    """Thresholds from off (None: never judged) to always firing, the interior ones at ``steps`` score quantiles.

    Scores outside the range the criterion declares are refused: a registered criterion says where its scores
    lie (``bx.register_criterion(..., low=, high=)``), and calibration places thresholds only inside it.
    """
    finite = scores[torch.isfinite(scores)].float()
    if finite.numel() == 0:
        return [None]
    low, high = float(finite.min()), float(finite.max())
    if low < crit.low or high > crit.high:
        raise BranchifyError(
            f"{where}criterion {crit.name!r} declares scores in [{crit.low:g}, {crit.high:g}], but gave scores in "
            f"[{low:g}, {high:g}]; register it with the range its scores take (bx.register_criterion(name, fn, "
            "exits_when, low=..., high=...))")
    ordered = finite.sort(descending=crit.exits_when == "above").values
    n = ordered.numel()
    inner: list[float] = []
    if n >= 2:
        fired = torch.round(torch.arange(1, steps, dtype=torch.float64) * n / steps).long()
        fired = fired[(fired > 0) & (fired < n)]
        # float32 midpoints compare with float32 scores exactly as the runtime will compare them
        inner = ((ordered[fired - 1] + ordered[fired]) / 2).tolist()
    ladder: list[float | None] = [None, *inner, always_threshold(finite, crit)]
    unique: list[float | None] = []
    for t in ladder:
        if not unique or t != unique[-1]:
            unique.append(t)
    return unique


def first_rung(scores: torch.Tensor, crit: Criterion, ladder: Sequence[float | None]) -> torch.Tensor:
    """Per sample, the index of the first threshold on ``ladder`` that lets it out (``len(ladder)``: none);
    None (off) lets no sample out."""
    none = torch.zeros_like(scores, dtype=torch.bool)
    fired = torch.stack([none if t is None else crit.fires(scores, t) for t in ladder])
    return torch.where(fired.any(dim=0), fired.to(torch.uint8).argmax(dim=0), len(ladder))


def _reach(table: torch.Tensor, outcome: int) -> torch.Tensor:
    """Sum ``table`` over the first rungs of samples that pass exits before ``outcome`` and leave at it.

    ``table`` has one axis per exit ``0..outcome`` (plus a leading channel axis), indexed by the
    first rung ``r`` at which that exit fires; in the result the axis is the chosen rung ``j``: a
    sample passes exit ``d`` when ``r > j`` and leaves there when ``r <= j``.
    """
    for d in range(outcome + 1):
        axis = d + 1
        size = table.shape[axis]
        before = table.cumsum(axis).narrow(axis, 0, size - 1)  # r <= j
        table = before if d == outcome else table.sum(axis, keepdim=True) - before  # r > j
    return table


def outcome_tables(rungs: Sequence[torch.Tensor], sizes: Sequence[int], correct: torch.Tensor,
                   costs: ExitCosts) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct count and total MACs of every threshold combination on the product grid.

    ``rungs[i]``: each sample's first firing rung at exit ``i`` (``sizes[i]`` rungs, rung 0 being off,
    ``sizes[i]`` meaning never); ``correct``: ``(k + 1, N)``; ``costs``: the backbone and head MACs.
    Returns two tensors of shape ``sizes``.

    Both are the final exit's figures plus, per early exit, what changes for the samples that leave
    there (its correctness minus the final's, its backbone cost minus the whole backbone's); a sample
    leaving at exit ``o`` depends only on exits ``0..o``, so exit ``o``'s table has ``o + 1`` axes.
    Head ``o`` is charged for every sample that reaches exit ``o`` (leaves at none before it), and only
    on the rungs where exit ``o`` is on.
    """
    k, n = len(rungs), correct.shape[1]
    right = torch.full(sizes, float(correct[k].sum()), dtype=torch.float64)
    macs = torch.full(sizes, n * float(costs.original), dtype=torch.float64)
    left = torch.zeros([1] * k, dtype=torch.float64)  # samples that left before the exit at hand
    flat = torch.zeros_like(rungs[0])
    for o in range(k):
        dims = [s + 1 for s in sizes[: o + 1]]
        flat = flat * dims[-1] + rungs[o]
        cells = math.prod(dims)
        gain = correct[o].double() - correct[k].double()
        table = torch.stack([torch.bincount(flat, weights=gain, minlength=cells),
                             torch.bincount(flat, minlength=cells).double()]).reshape(2, *dims)
        reached = _reach(table, o).reshape(2, *sizes[: o + 1], *([1] * (k - o - 1)))
        on = (torch.arange(sizes[o]) > 0).double().reshape(*([1] * o), sizes[o], *([1] * (k - o - 1)))
        macs = macs + float(costs.heads[o]) * (n - left) * on
        right = right + reached[0]
        macs = macs + reached[1] * (float(costs.backbone[o]) - float(costs.original))
        left = left + reached[1]
    return right.round().long(), macs


def cell_costs(costs: ExitCosts, cell: Sequence[int]) -> ExitCosts:
    """The costs when exit ``i`` uses rung ``cell[i]`` (rung 0: off, its head not charged)."""
    return costs.judging([c > 0 for c in cell])


def _lexmin(primary: torch.Tensor, secondary: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
    """The first flat index minimising ``primary``, then ``secondary``, among the ``allowed`` cells."""
    inf = torch.tensor(math.inf, dtype=torch.float64)
    first = primary if allowed is None else torch.where(allowed, primary, inf)
    second = torch.where(first == first.min(), secondary, inf)
    return int((second == second.min()).nonzero()[0])


def cheapest_reaching(right: torch.Tensor, macs: torch.Tensor, needs: Sequence[int]) -> list[int | None]:
    """Per required correct count, the flat index of the cheapest cell reaching it, None if none does.

    Ties go to the more accurate cell, then to the first one. One pass serves every requirement:
    the cheapest cell per correct count, then a suffix minimum over the counts.
    """
    flat_right, flat_macs = right.reshape(-1), macs.reshape(-1)
    top = int(flat_right.max())
    lowest = torch.full((top + 1,), math.inf, dtype=torch.float64).scatter_reduce(
        0, flat_right.clamp(min=0), flat_macs, reduce="amin")
    suffix = lowest.flip(0).cummin(0).values.flip(0)  # suffix[r]: cheapest cell with at least r correct
    found: dict[int, int | None] = {}
    chosen: list[int | None] = []
    for need in needs:
        start = max(int(need), 0)
        if start > top:
            chosen.append(None)
            continue
        cheapest = suffix[start]
        count = start + int((lowest[start:] == cheapest).nonzero().max())  # the most accurate of the cheapest
        if count not in found:
            found[count] = int(((flat_right == count) & (flat_macs == cheapest)).nonzero()[0])
        chosen.append(found[count])
    return chosen


def needed_correct(final_correct: int, samples: int, max_drop: float) -> int:
    """The fewest correct samples whose accuracy is at most ``max_drop`` below the final exit's."""
    return math.ceil(final_correct - max_drop * samples - 1e-9)


def select(right: torch.Tensor, macs: torch.Tensor, *, samples: int, final_correct: int, target: Target,
           value: float, original: float) -> tuple[int, bool]:
    """The flat index of the chosen grid cell and whether it meets the target.

    An unreachable target falls back to the cell closest to it: the most accurate (then cheapest)
    for an accuracy target, the cheapest (then most accurate) for a budget.
    """
    flat_right, flat_macs = right.reshape(-1).double(), macs.reshape(-1)
    if target == "max_accuracy_drop":
        cell = cheapest_reaching(right, macs, [needed_correct(final_correct, samples, value)])[0]
        if cell is not None:
            return cell, True
        return _lexmin(-flat_right, flat_macs), False
    feasible = flat_macs <= value * original * samples * (1 + 1e-12)
    if bool(feasible.any()):
        return _lexmin(-flat_right, flat_macs, feasible), True
    return _lexmin(flat_macs, -flat_right), False


def route_rungs(rungs: Sequence[torch.Tensor], chosen: Sequence[int]) -> torch.Tensor:
    """The exit each sample takes when exit ``i`` uses rung ``chosen[i]``."""
    return first_exit([rung <= c for rung, c in zip(rungs, chosen)])


def default_grid_size(k: int) -> int:
    """Quantile steps per exit: 128 for one or two exits, 64 for three, fewer beyond (at most 2M grid cells).

    Always a power of two, so a coarser default grid's rungs are among a finer one's.
    """
    steps = _MAX_GRID
    while steps > 2 and (steps + 1) ** k > _GRID_CELLS:
        steps //= 2
    return steps
