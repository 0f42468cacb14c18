"""Choosing thresholds: the plain fit to the calibration data, and the certified choice that holds on new data.

The network runs once over the calibration loader (``cache``); everything after is tensor math.

The plain fit (``guarantee=False``). Each exit gets a ladder of candidate thresholds from off (the exit
is never judged, its head never run) to "always fires", the interior rungs at evenly spaced quantiles
of that exit's scores (``grid``). The choice is exact over the product grid: the cheapest combination
whose accuracy drop on the calibration data is within the target, or the most accurate within the MAC
budget. It holds on the calibration data only: measured on digits, a 1-point target lost about 2
points on held-out data.

The certified choice (the default; Learn-then-Test, Angelopoulos et al. 2021). The calibration
samples are split at random (``seed``) into two halves. The first half builds a sequence of threshold
combinations from safe to aggressive: for an accuracy target, all exits off, then the plain solutions
on that half for drop targets ``0, target/32, ..., target``; for a MAC budget, those for budgets
``budget/32, ..., budget``, cheapest first; with 8 evenly spaced steps between neighbours (rung by
rung), so that no step is a leap. The second half tests them in that order, stopping at the first failure:

- accuracy: ``UCB(broken rate) - LCB(fixed rate) <= target``, one-sided Clopper-Pearson bounds at
  level ``delta / 2`` each ("broken": routing makes wrong a sample the final exit gets right; "fixed":
  the reverse). All exits off never changes a prediction, so it passes without a test.
- MACs: a sample's cost is a sum of steps, one per exit it reaches; each step's share is bounded
  above by Clopper-Pearson at level ``delta / m`` (``m`` steps), and the bound must be within the
  budget.

Among the passing combinations the cheapest is taken for an accuracy target (never one cheaper on the
calibration data than the plain choice), the most accurate for a budget. Guarantee: with probability
at least ``1 - delta`` over the draw of the calibration data, the chosen thresholds' expected accuracy
drop (or expected MACs) on new data is within the target. Assumptions: the calibration samples and
the future ones are independent draws from one distribution, and the sequence is fixed before the
second half is looked at. Fixed-sequence testing bounds the chance that ANY passing combination
misses the target by ``delta``, so choosing among them keeps the guarantee. It covers neither a shift
in the data nor thresholds edited afterwards, and it is about the expectation, not the figure measured
on one finite test set.

Patience (``criterion="patience"``) is searched over one integer shared by every exit (PABEE's
patience), from off through ``k`` down to 1; its candidates do not depend on the data, so the
certified choice tests them on every calibration sample, without a split.
"""


from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..cost import ExitCosts, exit_costs
from ..criteria import get_criterion
from ..errors import BranchifyError
from ..exits import exit_module
from ..spec import ExitSpec
from .bounds import cost_upper_bound, drop_upper_bound, samples_for_cost, too_few_samples
from .cache import Cached, collect_logits
from .grid import (
    _MAX_EXITS,
    _PATH_STEPS,
    Target,
    candidate_thresholds,
    cell_costs,
    cheapest_reaching,
    default_grid_size,
    first_rung,
    needed_correct,
    outcome_tables,
    route_rungs,
    select,
)
from .patience import calibrate_patience
from .result import Calibration, figures, warn_unreachable
from .temperature import fit_temperature

__all__ = ["DEFAULT_DELTA", "calibrate", "calibrate_cached"]

DEFAULT_DELTA = 0.1
_INTERPOLATE = 8


def exit_scores(spec: ExitSpec, cached: Cached) -> list[torch.Tensor]:
    return [get_criterion(spec.criterion_of(i)).score(z, cached.targets, temperature=spec.exits[i].temperature)
            for i, z in enumerate(cached.exit_logits)]


def _ladders(spec: ExitSpec, scores: list[torch.Tensor], steps: int) -> list[list[float | None]]:
    return [candidate_thresholds(s, get_criterion(spec.criterion_of(i)), steps,
                                 where=f"exit {i} ({spec.exits[i].layer!r}): ")
            for i, s in enumerate(scores)]


def _rungs(spec: ExitSpec, scores: list[torch.Tensor], ladders: list[list[float | None]]) -> list[torch.Tensor]:
    return [first_rung(s, get_criterion(spec.criterion_of(i)), ladder)
            for i, (s, ladder) in enumerate(zip(scores, ladders))]


def _cell(flat: int, sizes: list[int]) -> tuple[int, ...]:
    return tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), tuple(sizes)))


def _search(spec: ExitSpec, scores: list[torch.Tensor], correct: torch.Tensor, costs: ExitCosts, *,
            target: Target, value: float, steps: int) -> tuple[list[float | None], list[list[float | None]], bool]:
    ladders = _ladders(spec, scores, steps)
    rungs = _rungs(spec, scores, ladders)
    sizes = [len(ladder) for ladder in ladders]
    right, macs = outcome_tables(rungs, sizes, correct, costs)
    flat, met = select(right, macs, samples=correct.shape[1], final_correct=int(correct[-1].sum()),
                       target=target, value=value, original=costs.original)
    cell = _cell(flat, sizes)
    return [ladders[i][j] for i, j in enumerate(cell)], ladders, met


def calibrate_cached(spec: ExitSpec, cached: Cached, costs: ExitCosts, *, target: Target, value: float,
                     guarantee: bool = True, delta: float | None = None, temperature: bool = False,
                     grid_size: int | None = None, seed: int = 0, warn: bool = True) -> Calibration:
    """The search of ``bx.calibrate`` on logits already cached (no network runs)."""
    k = len(spec.exits)
    delta = DEFAULT_DELTA if delta is None else delta
    costs = costs.judging([True] * k)  # every head chargeable; each candidate says which run
    if len(cached.exit_logits) != k:
        raise BranchifyError(f"{len(cached.exit_logits)} cached exits for a spec with {k} exits")
    if k > _MAX_EXITS:
        raise BranchifyError(
            f"calibrate searches a grid over all exits jointly and handles up to {_MAX_EXITS} exits, but the spec "
            f"has {k}; keep the exits that bx.sweep finds worthwhile")
    across = [get_criterion(spec.criterion_of(i)).across_exits for i in range(k)]
    if any(across):
        if not all(across):
            raise BranchifyError(
                f"exits {[i for i, a in enumerate(across) if a]} use 'patience' and the others do not; calibrate "
                "searches one patience shared by every exit, so give every exit criterion='patience' or none")
        if temperature:
            raise BranchifyError("temperature=True changes no prediction, and 'patience' reads only the "
                                 "predictions; drop temperature=True")
        return calibrate_patience(spec, cached, costs, target=target, value=value, guarantee=guarantee, delta=delta,
                         warn=warn)
    steps = grid_size or default_grid_size(k)
    n = cached.samples
    halves = None
    if guarantee:
        if n < 4:
            raise BranchifyError(f"the guarantee splits the calibration data in two, but there are only {n} "
                                 "samples; calibrate on a few hundred samples or more")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        halves = order[: n // 2], order[n // 2:]
    if temperature:
        # With the guarantee the temperatures are part of the sequence, so they may only see the first half.
        fit = halves[0] if halves is not None else torch.arange(n)
        spec = spec.with_exits(temperature=[fit_temperature(z[fit], cached.targets[fit])
                                            for z in cached.exit_logits])
    scores = exit_scores(spec, cached)
    correct = cached.correct()
    thresholds, ladders, met = _search(spec, scores, correct, costs, target=target, value=value, steps=steps)
    plain = figures(spec.with_exits(threshold=thresholds), cached, costs, target=target, value=value,
                    grid=ladders, delta=delta, bound_on=None, held_out=False, guarantee=False, met=met)
    if halves is None:
        if plain.spec.thresholds is None and warn:
            warnings.warn(f"{plain.note}. The result carries met=False", UserWarning, stacklevel=3)
        elif not met and warn:
            warn_unreachable(plain, target, value, cached, spec, costs)
        return plain
    return _certified(spec, cached, costs, scores, correct, plain, halves, target=target, value=value,
                      delta=delta, steps=steps, warn=warn)


def _sequence(right: torch.Tensor, macs: torch.Tensor, sizes: list[int], *, target: Target, value: float,
              samples: int, final_correct: int, original: float) -> list[tuple[int, ...]]:
    """The plain solutions on the tune half, from safe to aggressive for the target's risk, with
    ``_INTERPOLATE`` steps between neighbours (from all exits off to the first, for an accuracy target), so
    that no step of the fixed sequence is a large one: a test stops at the first failure."""
    if target == "max_accuracy_drop":
        needs = [needed_correct(final_correct, samples, value * s / _PATH_STEPS) for s in range(_PATH_STEPS + 1)]
        flats = [f for f in cheapest_reaching(right, macs, needs) if f is not None]
        path = [(0,) * len(sizes)] + [_cell(f, sizes) for f in flats]
    else:
        flats = [select(right, macs, samples=samples, final_correct=final_correct, target=target,
                        value=value * s / _PATH_STEPS, original=original)[0] for s in range(1, _PATH_STEPS + 1)]
        path = [_cell(f, sizes) for f in flats]
    sequence: list[tuple[int, ...]] = []
    for a, b in zip([path[0], *path], path):
        for step in range(1, _INTERPOLATE + 1):
            cell = tuple(round(i + (j - i) * step / _INTERPOLATE) for i, j in zip(a, b))
            if cell not in sequence:
                sequence.append(cell)
    return sequence


def _certified(spec: ExitSpec, cached: Cached, costs: ExitCosts, scores: list[torch.Tensor], correct: torch.Tensor,
               plain: Calibration, halves: tuple[torch.Tensor, torch.Tensor], *, target: Target, value: float,
               delta: float, steps: int, warn: bool) -> Calibration:
    n = cached.samples
    tune, test = halves
    # The sequence is built on the tune half only, so it is fixed with respect to the test half.
    ladders = _ladders(spec, [s[tune] for s in scores], steps)
    sizes = [len(ladder) for ladder in ladders]
    rungs = _rungs(spec, scores, ladders)  # on all samples; each half is read by indexing
    right, macs = outcome_tables([r[tune] for r in rungs], sizes, correct[:, tune], costs)
    sequence = _sequence(right, macs, sizes, target=target, value=value, samples=len(tune),
                         final_correct=int(correct[-1, tune].sum()), original=costs.original)
    off = (0,) * len(sizes)  # rung 0 is off everywhere: predictions are the final exit's, the drop is 0

    def thresholds(cell: tuple[int, ...]) -> ExitSpec:
        return spec.with_exits(threshold=[ladders[i][j] for i, j in enumerate(cell)])

    def result(cell: tuple[int, ...], *, met: bool, note: str | None = None) -> Calibration:
        return figures(thresholds(cell), cached, costs, target=target, value=value, grid=ladders, delta=delta,
                       bound_on=test, held_out=True, guarantee=True, met=met, note=note)

    test_rungs = [r[test] for r in rungs]
    if target == "max_accuracy_drop":
        too_few = too_few_samples(value, delta, len(test), n, split=True)
        if too_few:
            if warn:
                warnings.warn(too_few + ". The result carries met=False", UserWarning, stacklevel=4)
            return result(off, met=False, note=too_few)
        passed = [off]
        for cell in sequence:
            if cell == off:
                continue
            taken = route_rungs(test_rungs, cell)
            routed_right = correct[:, test][taken, torch.arange(len(test))]
            if drop_upper_bound(routed_right, correct[-1, test], delta) > value:
                break
            passed.append(cell)
    else:
        passed = []
        for cell in sequence:
            taken = route_rungs(test_rungs, cell)
            if cost_upper_bound(taken, cell_costs(costs, cell).per_exit, delta) > value * costs.original:
                break
            passed.append(cell)
        if not passed:
            cheapest = result(sequence[0], met=False)
            need = samples_for_cost(route_rungs(test_rungs, sequence[0]), cell_costs(costs, sequence[0]).per_exit,
                                    delta, value * costs.original)
            more = ("calibrate on more samples" if need is None else
                    f"calibrate on about {2 * need} samples ({need} held out) at these shares")
            message = (f"mac_budget={value:g} cannot be certified with delta={delta:g} on {len(test)} held-out "
                       f"samples: even the cheapest thresholds' MAC bound is {cheapest.bounds.mac_fraction:.4f} of "
                       f"the original model's; raise mac_budget to at least {cheapest.bounds.mac_fraction:.4f}, "
                       f"{more}, or attach an earlier exit")
            if warn:
                warnings.warn(message + ". The result carries met=False", UserWarning, stacklevel=4)
            return result(sequence[0], met=False, note=message)

    scored = []
    for cell in passed:
        taken = route_rungs(rungs, cell)
        expected = float(torch.tensor(cell_costs(costs, cell).per_exit, dtype=torch.float64)[taken].mean())
        accuracy = float(correct[taken, torch.arange(n)].double().mean())
        scored.append((cell, expected, accuracy))
    if target == "max_accuracy_drop":
        # certified, but never cheaper on the calibration data than the plain optimum
        allowed = [c for c in scored if c[1] >= plain.expected_macs - 1e-9 * costs.original] or scored[:1]
        cell = min(allowed, key=lambda c: (c[1], -c[2]))[0]
    else:
        cell = min(scored, key=lambda c: (-c[2], c[1]))[0]
    chosen = result(cell, met=True)
    if warn and target == "max_accuracy_drop" and cell == off:
        warnings.warn(
            f"with delta={delta:g}, no thresholds that let samples out early could be certified to keep the "
            f"accuracy drop within {value:g} on {len(test)} held-out calibration samples, so every exit is off; "
            "calibrate on more samples, or loosen max_accuracy_drop or delta. The result carries met=False",
            UserWarning, stacklevel=4)
    return chosen


def _check_fraction(name: str, value, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BranchifyError(f"{name} must be a number in (0, 1), got {value!r}; {hint}")
    if not 0 < value < 1:
        raise BranchifyError(f"{name}={value!r} is outside (0, 1); {hint}")
    return float(value)


def calibrate(module: nn.Module, loader: Iterable, *, max_accuracy_drop: float | None = None,
              mac_budget: float | None = None, guarantee: bool = True, delta: float | None = None,
              temperature: bool = False, example_inputs=None, progress: bool = True, grid_size: int | None = None,
              seed: int = 0) -> Calibration:
    """Choose exit thresholds from data for an accuracy-drop target or a MAC budget, with a guarantee on new data.

    ``max_accuracy_drop=0.01``: the cheapest thresholds whose expected accuracy on new data is at most
    1 point below the final exit's; ``mac_budget=0.6``: the most accurate thresholds whose expected MACs
    on new data are at most 60% of the original model's. Exactly one of the two, in (0, 1). By default
    the target holds on new data from the same distribution with probability ``1 - delta`` (``delta``
    0.1; Learn-then-Test on two halves of the data, ``seed`` picks the split); ``guarantee=False`` gives
    the plain fit, which holds on the calibration data only. Exits may come out off (threshold None)
    when that is cheaper. The network runs once over ``loader`` (pairs of inputs and class indices);
    the search is exact over a grid of score-quantile thresholds (``grid_size`` steps per exit), see
    ``branchify.calibration.search``. ``temperature=True`` fits a temperature per head first.
    ``example_inputs`` (default: one sample of the loader) sizes the MAC count. Every result carries
    bounds (``Calibration.bounds``) and the samples they rest on; an unreachable target gives
    ``met=False`` and a warning.

    >>> import torch, torchvision, branchify as bx
    >>> _ = torch.manual_seed(0)
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(num_classes=4), spec, torch.randn(1, 3, 32, 32))
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,)))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=16)
    >>> cal = bx.calibrate(module, loader, mac_budget=0.9, guarantee=False, progress=False)
    >>> cal.met, cal.mac_fraction <= 0.9, len(cal.spec.exits)
    (True, True, 2)
    """
    spec = exit_module(module, "calibrate").exit_spec
    if (max_accuracy_drop is None) == (mac_budget is None):
        given = "both" if max_accuracy_drop is not None else "neither"
        raise BranchifyError(
            f"calibrate needs exactly one target, got {given} (max_accuracy_drop={max_accuracy_drop!r}, "
            f"mac_budget={mac_budget!r}); pass max_accuracy_drop=0.01 (at most 1 point below the final exit) "
            "or mac_budget=0.6 (at most 60% of the original model's MACs)")
    if max_accuracy_drop is not None:
        target: Target = "max_accuracy_drop"
        value = _check_fraction("max_accuracy_drop", max_accuracy_drop,
                                "give a fraction of accuracy, e.g. 0.01 for one point")
    else:
        target = "mac_budget"
        value = _check_fraction("mac_budget", mac_budget, "give a fraction of the original model's MACs, e.g. 0.6")
    if not isinstance(guarantee, bool):
        raise BranchifyError(f"guarantee must be True or False, got {guarantee!r}")
    if delta is not None:
        _check_fraction("delta", delta, "give a failure probability such as 0.1")
        if not guarantee:
            raise BranchifyError(
                f"delta={delta!r} sets the guarantee's failure probability, but guarantee=False asks for the plain "
                "fit; drop delta, or keep the guarantee")
    if not isinstance(temperature, bool):
        raise BranchifyError(f"temperature must be True or False, got {temperature!r}")
    if grid_size is not None and (isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2):
        raise BranchifyError(f"grid_size must be an integer >= 2 (quantile steps per exit), got {grid_size!r}")
    if any(get_criterion(spec.criterion_of(i)).needs_labels for i in range(len(spec.exits))):
        warnings.warn(
            "the spec's criterion reads the labels, so the calibrated thresholds cannot be deployed; use a "
            "label-free criterion such as 'entropy' or 'confidence'", UserWarning, stacklevel=2)
    cached = collect_logits(module, loader, progress=progress, desc="calibrate: caching exit logits")
    costs = exit_costs(module, example_inputs if example_inputs is not None else cached.example_inputs)
    return calibrate_cached(spec, cached, costs, target=target, value=value, guarantee=guarantee, delta=delta,
                            temperature=temperature, grid_size=grid_size, seed=seed)
