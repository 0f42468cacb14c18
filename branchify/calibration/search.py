"""Threshold calibration: exit thresholds chosen from data for an accuracy or a compute target.

The network runs once over the calibration loader; every exit's logits are cached, and everything
after that is tensor math on the cache.

The search. Each exit gets a ladder of candidate thresholds ordered from "never fires" to "always
fires", with the interior rungs at evenly spaced quantiles of that exit's scores (midpoints between
neighbouring sorted scores, so a rung separates samples rather than sitting on one). Because the
sets of samples an exit lets out are nested along its ladder, each sample is summarised per exit
by the first rung at which it leaves. A histogram over those rung tuples, turned into prefix sums
along each exit's axis ("passed exits before ``i``, leaves at ``i``"), gives the exact number of
correct samples and the expected MACs of EVERY combination on the product grid at once, without
touching the samples again. The choice is then exact over the grid: the cheapest combination whose
accuracy drop is within the target, or the most accurate within the MAC budget (ties: the more
accurate, then the cheaper, then the more conservative). The grid has ``grid_size`` quantile steps
per exit (default: 128 for one or two exits, 64 for three, fewer beyond: the grid stays within 2M cells;
up to 12 exits).

Temperature scaling (``temperature=True``, Guo et al. 2017) fits one temperature per exit head by
minimising the negative log-likelihood of its cached logits (LBFGS on ``log T``) before the search.

Risk control (``delta``), Learn-then-Test style (Angelopoulos et al. 2021). The per-sample loss
compares the routed prediction with the final exit's: ``loss = 1[final right] - 1[routed right]``,
+1 when routing breaks a sample that the final exit gets right ("broken"), -1 when it fixes one
("fixed"), 0 otherwise; its mean is the accuracy drop, and its expectation the drop on the
distribution. The calibration samples are split at random (``seed``) into two halves. The first
half builds a sequence of threshold combinations from conservative to aggressive: the plain
solutions, on its own grid, for accuracy-drop targets ``0, target/32, ..., target``. The second half
tests them in that order: a combination passes when ``UCB(broken rate) - LCB(fixed rate) <= target``,
with one-sided Clopper-Pearson bounds at level ``delta / 2`` each, and the testing stops at the first
failure. Among the passing combinations (the all-off one, which never changes a prediction, passes
without a test) the cheapest is taken, but never one that is cheaper on the calibration data than
the plain (uncertified) choice.

Guarantee: with probability at least ``1 - delta`` over the draw of the calibration data, the
chosen thresholds have an expected accuracy drop against the final exit of at most the target on
new data. Assumptions: the calibration samples and the future ones are independent draws from one
distribution (the binomial bounds need it), and the sequence is fixed before the second half is
looked at (it is built on the first half only). Fixed-sequence testing bounds the chance that ANY
passing combination has a drop above the target by ``delta``, so choosing among them keeps the
guarantee. It covers neither a shift in the data nor thresholds edited afterwards, and it is about
the expected drop, not the drop measured on one finite test set.
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
from .bounds import drop_upper_bound
from .cache import Cached, collect_logits
from .grid import (
    _MAX_EXITS,
    _PATH_STEPS,
    Target,
    candidate_thresholds,
    cheapest_reaching,
    default_grid_size,
    first_rung,
    needed_correct,
    outcome_tables,
    route_rungs,
    select,
)
from .result import Calibration, figures
from .temperature import fit_temperature


def exit_scores(spec: ExitSpec, cached: Cached) -> list[torch.Tensor]:
    return [get_criterion(spec.criterion_of(i)).score(z, cached.targets, temperature=spec.exits[i].temperature)
            for i, z in enumerate(cached.exit_logits)]


def _ladders(spec: ExitSpec, scores: list[torch.Tensor], steps: int) -> list[list[float]]:
    return [candidate_thresholds(s, get_criterion(spec.criterion_of(i)), steps,
                                 where=f"exit {i} ({spec.exits[i].layer!r}): ")
            for i, s in enumerate(scores)]


def _rungs(spec: ExitSpec, scores: list[torch.Tensor], ladders: list[list[float]]) -> list[torch.Tensor]:
    return [first_rung(s, get_criterion(spec.criterion_of(i)), ladder)
            for i, (s, ladder) in enumerate(zip(scores, ladders))]


def _search(spec: ExitSpec, scores: list[torch.Tensor], correct: torch.Tensor, costs: ExitCosts, *,
            target: Target, value: float, steps: int) -> tuple[list[float], list[list[float]], bool]:
    ladders = _ladders(spec, scores, steps)
    rungs = _rungs(spec, scores, ladders)
    sizes = [len(ladder) for ladder in ladders]
    right, macs = outcome_tables(rungs, sizes, correct, costs.per_exit)
    flat, met = select(right, macs, samples=correct.shape[1], final_correct=int(correct[-1].sum()),
                       target=target, value=value, original=costs.original)
    chosen = torch.unravel_index(torch.tensor(flat), tuple(sizes))
    return [ladders[i][int(j)] for i, j in enumerate(chosen)], ladders, met


def calibrate_cached(spec: ExitSpec, cached: Cached, costs: ExitCosts, *, target: Target, value: float,
                     temperature: bool = False, delta: float | None = None, grid_size: int | None = None,
                     seed: int = 0, warn: bool = True) -> Calibration:
    """The search of ``bx.calibrate`` on logits already cached (no network runs)."""
    k = len(spec.exits)
    if len(cached.exit_logits) != k:
        raise BranchifyError(f"{len(cached.exit_logits)} cached exits for a spec with {k} exits")
    if k > _MAX_EXITS:
        raise BranchifyError(
            f"calibrate searches a grid over all exits jointly and handles up to {_MAX_EXITS} exits, but the spec "
            f"has {k}; keep the exits that bx.sweep finds worthwhile")
    steps = grid_size or default_grid_size(k)
    n = cached.samples
    halves = None
    if delta is not None:
        if n < 4:
            raise BranchifyError(f"risk control splits the calibration data in two, but there are only {n} "
                                 "samples; calibrate on a few hundred samples or more")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        halves = order[: n // 2], order[n // 2:]
    if temperature:
        # With risk control the temperatures are part of the sequence, so they may only see the first half.
        fit = halves[0] if halves is not None else torch.arange(n)
        spec = spec.with_exits(temperature=[fit_temperature(z[fit], cached.targets[fit])
                                            for z in cached.exit_logits])
    scores = exit_scores(spec, cached)
    correct = cached.correct()
    thresholds, ladders, met = _search(spec, scores, correct, costs, target=target, value=value, steps=steps)
    plain = figures(spec.with_exits(threshold=thresholds), cached, costs, target=target, value=value,
                    grid=ladders, met=met)
    if not met and warn:
        _warn_unreachable(plain, target, value, cached, spec, costs)
    if delta is None or halves is None:
        return plain
    return _risk_controlled(spec, cached, costs, scores, correct, plain, halves, value=value, delta=delta,
                            steps=steps, warn=warn)


def _warn_unreachable(result: Calibration, target: Target, value: float, cached: Cached, spec: ExitSpec,
                      costs: ExitCosts) -> None:
    if target == "max_accuracy_drop":
        message = (f"max_accuracy_drop={value:g} is unreachable on the {cached.samples} calibration samples: the "
                   f"best thresholds on the grid lose {100 * result.accuracy_drop:.2f} points against the final exit; "
                   f"ask for max_accuracy_drop >= {result.accuracy_drop:.4f}, or train better exit heads")
    else:
        message = (f"mac_budget={value:g} is unreachable: even the cheapest thresholds on the grid need "
                   f"{result.mac_fraction:.4f} of the original model's MACs (every sample leaving at exit 0, "
                   f"{spec.exits[0].layer!r}, costs {costs.exits[0] / costs.original:.4f}); raise mac_budget to at "
                   f"least {result.mac_fraction:.4f}, or attach an earlier exit")
    warnings.warn(message + ". The result carries met=False", UserWarning, stacklevel=4)


def _risk_controlled(spec: ExitSpec, cached: Cached, costs: ExitCosts, scores: list[torch.Tensor],
                     correct: torch.Tensor, plain: Calibration, halves: tuple[torch.Tensor, torch.Tensor], *,
                     value: float, delta: float, steps: int, warn: bool) -> Calibration:
    n = cached.samples
    tune, test = halves
    # The sequence is built on the tune half only, so it is fixed with respect to the test half.
    ladders = _ladders(spec, [s[tune] for s in scores], steps)
    sizes = [len(ladder) for ladder in ladders]
    rungs = _rungs(spec, scores, ladders)  # on all samples; each half is read by indexing
    right, macs = outcome_tables([r[tune] for r in rungs], sizes, correct[:, tune], costs.per_exit)
    tune_final = int(correct[-1, tune].sum())
    needs = [needed_correct(tune_final, len(tune), value * step / _PATH_STEPS) for step in range(_PATH_STEPS + 1)]
    sequence: list[tuple[int, ...]] = []
    for flat in cheapest_reaching(right, macs, needs):
        if flat is None:
            continue
        cell = tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), tuple(sizes)))
        if cell not in sequence:
            sequence.append(cell)

    off = (0,) * len(sizes)  # rung 0 never fires: predictions are the final exit's, the drop is 0
    passed: list[tuple[tuple[int, ...], float]] = [(off, 0.0)] if value >= 0 else []
    if passed:
        for cell in sequence:
            if cell == off:
                continue
            taken = route_rungs([r[test] for r in rungs], cell)
            routed_right = correct[:, test][taken, torch.arange(len(test))]
            bound = drop_upper_bound(routed_right, correct[-1, test], delta)
            if bound > value:
                break
            passed.append((cell, bound))

    if not passed:
        result = figures(spec.with_exits(threshold=[ladder[0] for ladder in ladders]), cached, costs,
                         target="max_accuracy_drop", value=value, grid=ladders, met=False, delta=delta,
                         risk_bound=math.nan)
        if warn:
            warnings.warn(
                f"max_accuracy_drop={value:g} cannot be certified with delta={delta:g}: no thresholds, not even "
                "all exits off (which never changes a prediction), have a drop bound below it; ask for "
                "max_accuracy_drop >= 0. The result carries met=False", UserWarning, stacklevel=4)
        return result
    per_exit = torch.tensor(costs.per_exit, dtype=torch.float64)
    best: tuple[float, float, tuple[int, ...], float] | None = None
    for cell, bound in passed:
        taken = route_rungs(rungs, cell)
        expected = float(per_exit[taken].mean())
        if expected < plain.expected_macs - 1e-9 * costs.original:
            continue  # certified, but cheaper than the plain optimum: never less conservative than it
        accuracy = float(correct[taken, torch.arange(n)].double().mean())
        if best is None or (expected, -accuracy) < best[:2]:
            best = (expected, -accuracy, cell, bound)
    assert best is not None  # the all-off cell costs the most of all, so it always qualifies
    _, _, cell, bound = best
    chosen = figures(spec.with_exits(threshold=[ladders[i][j] for i, j in enumerate(cell)]), cached, costs,
                     target="max_accuracy_drop", value=value, grid=ladders, met=True, delta=delta, risk_bound=bound)
    if warn and len(passed) == 1 and any(share > 0 for share in plain.shares[:-1]):
        warnings.warn(
            f"with delta={delta:g}, no thresholds that let samples out early could be certified to keep the "
            f"accuracy drop within {value:g} on {len(test)} held-out calibration samples, so every exit is off; "
            "calibrate on more samples, or loosen max_accuracy_drop or delta", UserWarning, stacklevel=4)
    return chosen


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------

def _check_number(name: str, value, *, low: float, high: float, low_open: bool = False,
                  high_open: bool = False, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BranchifyError(f"{name} must be a finite number, got {value!r}; {hint}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise BranchifyError(f"{name}={value!r} is outside {lo}{low:g}, {high:g}{hi}; {hint}")
    return float(value)


def calibrate(module: nn.Module, loader: Iterable, *, max_accuracy_drop: float | None = None,
              mac_budget: float | None = None, temperature: bool = False, delta: float | None = None,
              example_inputs=None, progress: bool = True, grid_size: int | None = None,
              seed: int = 0) -> Calibration:
    """Choose exit thresholds from data for an accuracy-drop target or a MAC budget.

    ``max_accuracy_drop=0.01``: the thresholds with the fewest expected MACs whose accuracy is at
    most 1 point below the final exit's on this data. ``mac_budget=0.6``: the most accurate
    thresholds whose expected MACs are at most 60% of the original model's. Exactly one of the two.
    The network runs once over ``loader`` (pairs of inputs and class indices); the search is exact
    over a grid of score-quantile thresholds (``grid_size`` steps per exit), see the module notes.
    ``temperature=True`` fits a temperature per head first. ``delta`` (with ``max_accuracy_drop``)
    certifies the drop on new data with probability ``1 - delta`` (Learn-then-Test; ``seed`` picks
    the split). ``example_inputs`` (default: one sample of the loader) sizes the MAC count.
    An unreachable target gives ``met=False`` and a warning.

    >>> import torch, torchvision, branchify as bx
    >>> _ = torch.manual_seed(0)
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(num_classes=4), spec, torch.randn(1, 3, 32, 32))
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,)))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=16)
    >>> cal = bx.calibrate(module, loader, mac_budget=0.9, progress=False)
    >>> cal.met, cal.mac_fraction <= 0.9, len(cal.spec.thresholds)
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
        value = _check_number("max_accuracy_drop", max_accuracy_drop, low=-1.0, high=1.0,
                              hint="give a fraction of accuracy, e.g. 0.01 for one point")
    else:
        target = "mac_budget"
        value = _check_number("mac_budget", mac_budget, low=0.0, high=math.inf, low_open=True, high_open=True,
                              hint="give a fraction of the original model's MACs, e.g. 0.6")
    if delta is not None:
        _check_number("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True,
                      hint="give a failure probability such as 0.05")
        if target != "max_accuracy_drop":
            raise BranchifyError(
                f"delta={delta!r} certifies an accuracy drop, but the target is mac_budget={mac_budget!r}; "
                "use delta with max_accuracy_drop, or drop delta")
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
    return calibrate_cached(spec, cached, costs, target=target, value=value, temperature=temperature,
                            delta=delta, grid_size=grid_size, seed=seed)
