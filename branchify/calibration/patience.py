"""Calibrating patience (``criterion="patience"``): one integer shared by every exit, searched directly.

The candidates are off, then ``k`` agreeing exits down to 1. They do not depend on the data, so the
certified choice tests them in that order (from off to the most aggressive for an accuracy target,
from the cheapest up for a MAC budget) on every calibration sample, without a split; the plain
fit takes the best candidate on the calibration data.
"""

from __future__ import annotations

import warnings

import torch

from ..cost import ExitCosts
from ..spec import ExitSpec
from .bounds import cost_upper_bound, drop_upper_bound, too_few_samples
from .cache import Cached
from .grid import Target
from .result import Calibration, charged, figures, routed, warn_unreachable

__all__ = ["calibrate_patience"]


def calibrate_patience(spec: ExitSpec, cached: Cached, costs: ExitCosts, *, target: Target, value: float,
                       guarantee: bool, delta: float, warn: bool) -> Calibration:
    k, n = len(spec.exits), cached.samples
    grid: list[list[float | None]] = [[None, *map(float, range(1, k + 1))] for _ in range(k)]
    correct = cached.correct()
    final = correct[-1]

    def candidate(t: int | None) -> tuple[ExitSpec, torch.Tensor]:
        s = spec.with_exits(threshold=[None if t is None else float(t)] * k)
        return s, routed(s, cached)

    def figures_of(t: int | None, *, met: bool | None = None, note: str | None = None) -> Calibration:
        s, _ = candidate(t)
        return figures(s, cached, costs, target=target, value=value, grid=grid, delta=delta, bound_on=None,
                       held_out=guarantee, guarantee=guarantee, met=met, note=note)

    def expected(t: int | None) -> float:
        s, taken = candidate(t)
        return float(torch.tensor(charged(s, costs).per_exit, dtype=torch.float64)[taken].mean())

    def accuracy(t: int | None) -> float:
        _, taken = candidate(t)
        return float(correct[taken, torch.arange(n)].double().mean())

    safe_first = [None, *range(k, 0, -1)]  # from off to the most aggressive
    if not guarantee:
        if target == "max_accuracy_drop":
            ok = [t for t in safe_first if float(final.double().mean()) - accuracy(t) <= value + 1e-12]
            return figures_of(min(ok, key=lambda t: (expected(t), -accuracy(t))))
        ok = [t for t in safe_first if expected(t) <= value * costs.original * (1 + 1e-12)]
        if ok:
            return figures_of(max(ok, key=lambda t: (accuracy(t), -expected(t))))
        result = figures_of(min(safe_first, key=lambda t: (expected(t), -accuracy(t))), met=False)
        if warn:
            warn_unreachable(result, target, value, cached, spec, costs)
        return result
    if target == "max_accuracy_drop":
        too_few = too_few_samples(value, delta, n, n, split=False)
        if too_few:
            if warn:
                warnings.warn(too_few + ". The result carries met=False", UserWarning, stacklevel=4)
            return figures_of(None, met=False, note=too_few)
        passed: list[int | None] = [None]
        for t in safe_first[1:]:
            _, taken = candidate(t)
            if drop_upper_bound(correct[taken, torch.arange(n)], final, delta) > value:
                break
            passed.append(t)
        return figures_of(min(passed, key=lambda t: (expected(t), -accuracy(t))), met=True)
    passed = []
    for t in range(1, k + 1):  # cheapest first; all off costs the whole model, beyond any budget below 1
        s, taken = candidate(t)
        if cost_upper_bound(taken, charged(s, costs).per_exit, delta) > value * costs.original:
            break
        passed.append(t)
    if not passed:
        result = figures_of(1, met=False)
        message = (f"mac_budget={value:g} cannot be certified with delta={delta:g} on {n} samples: even patience 1 "
                   f"has a MAC bound of {result.bounds.mac_fraction:.4f}; raise mac_budget or calibrate on more "
                   "samples")
        if warn:
            warnings.warn(message + ". The result carries met=False", UserWarning, stacklevel=4)
        return figures_of(1, met=False, note=message)
    return figures_of(max(passed, key=lambda t: (accuracy(t), -expected(t))), met=True)
