"""The threshold grid and its exact evaluation: every combination's correct count and MACs at once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..criteria import Criterion
from ..errors import BranchifyError
from ..routing import first_exit

Target = Literal["max_accuracy_drop", "mac_budget"]

# A threshold that no finite score reaches (spec thresholds must be finite and non-negative).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_GRID_CELLS = 2**21
_MAX_EXITS = 12
_MAX_GRID = 128
_PATH_STEPS = 32
_TEMPERATURE_RANGE = (1e-2, 1e2)


def never_threshold(crit: Criterion) -> float:
    """A spec-valid threshold at which no (non-negative, finite) score fires."""
    return 0.0 if crit.exits_when == "below" else FLOAT32_MAX


def always_threshold(crit: Criterion) -> float:
    """A spec-valid threshold at which every (non-negative, finite) score fires."""
    return FLOAT32_MAX if crit.exits_when == "below" else 0.0


def candidate_thresholds(scores: torch.Tensor, crit: Criterion, steps: int, *, where: str = "") -> list[float]:
    """Thresholds from never firing to always firing, the interior ones at ``steps`` score quantiles."""
    finite = scores[torch.isfinite(scores)].float()
    if finite.numel() and float(finite.min()) < 0:
        raise BranchifyError(
            f"{where}criterion {crit.name!r} gives negative scores (min {float(finite.min()):g}), but ExitSpec "
            "thresholds are non-negative; use a criterion with non-negative scores (entropy, confidence, margin)")
    ordered = finite.sort(descending=crit.exits_when == "above").values
    n = ordered.numel()
    inner: list[float] = []
    if n >= 2:
        fired = torch.round(torch.arange(1, steps, dtype=torch.float64) * n / steps).long()
        fired = fired[(fired > 0) & (fired < n)]
        # float32 midpoints compare with float32 scores exactly as the runtime will compare them
        inner = ((ordered[fired - 1] + ordered[fired]) / 2).tolist()
    ladder = [never_threshold(crit), *inner, always_threshold(crit)]
    unique: list[float] = []
    for t in ladder:
        if not unique or t != unique[-1]:
            unique.append(t)
    return unique


def first_rung(scores: torch.Tensor, crit: Criterion, ladder: Sequence[float]) -> torch.Tensor:
    """Per sample, the index of the first threshold on ``ladder`` that lets it out (``len(ladder)``: none)."""
    fired = torch.stack([crit.fires(scores, t) for t in ladder])
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
                   costs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct count and total MACs of every threshold combination on the product grid.

    ``rungs[i]``: each sample's first firing rung at exit ``i`` (``sizes[i]`` rungs, ``sizes[i]``
    meaning never); ``correct``: ``(k + 1, N)``; ``costs``: MACs of leaving at each of the k + 1
    exits. Returns two tensors of shape ``sizes``.

    Both are the final exit's figures plus, per early exit, what changes for the samples that
    leave there (its correctness minus the final's, its cost minus the final's); a sample leaving
    at exit ``o`` depends only on exits ``0..o``, so exit ``o``'s table has ``o + 1`` axes.
    """
    k, n = len(rungs), correct.shape[1]
    right = torch.full(sizes, float(correct[k].sum()), dtype=torch.float64)
    macs = torch.full(sizes, n * float(costs[k]), dtype=torch.float64)
    flat = torch.zeros_like(rungs[0])
    for o in range(k):
        dims = [s + 1 for s in sizes[: o + 1]]
        flat = flat * dims[-1] + rungs[o]
        cells = math.prod(dims)
        gain = correct[o].double() - correct[k].double()
        table = torch.stack([torch.bincount(flat, weights=gain, minlength=cells),
                             torch.bincount(flat, minlength=cells).double()]).reshape(2, *dims)
        reached = _reach(table, o).reshape(2, *sizes[: o + 1], *([1] * (k - o - 1)))
        right = right + reached[0]
        macs = macs + reached[1] * (float(costs[o]) - float(costs[k]))
    return right.round().long(), macs


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
