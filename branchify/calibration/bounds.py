"""Finite-sample confidence bounds on binomial rates (Clopper-Pearson) and on the accuracy drop."""

from __future__ import annotations

import math

import torch


def _binom_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(x + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p))
    return min(1.0, float(torch.logsumexp(log_pmf, 0).exp()))


def _bisect(fn, low: float, high: float) -> float:
    """The point in [low, high] where the decreasing ``fn`` crosses zero."""
    for _ in range(80):
        mid = (low + high) / 2
        if fn(mid) > 0:
            low = mid
        else:
            high = mid
    return high


def clopper_pearson_upper(x: int, n: int, alpha: float) -> float:
    """One-sided upper confidence bound (level ``1 - alpha``) on a binomial rate with ``x`` of ``n``.

    >>> round(clopper_pearson_upper(0, 100, 0.05), 4)  # 1 - 0.05 ** (1 / 100)
    0.0295
    """
    if x >= n:
        return 1.0
    return _bisect(lambda p: _binom_cdf(x, n, p) - alpha, x / n, 1.0)


def clopper_pearson_lower(x: int, n: int, alpha: float) -> float:
    """One-sided lower confidence bound (level ``1 - alpha``) on a binomial rate with ``x`` of ``n``.

    >>> clopper_pearson_lower(0, 100, 0.05), round(clopper_pearson_lower(100, 100, 0.05), 4)
    (0.0, 0.9705)
    """
    if x <= 0:
        return 0.0
    return _bisect(lambda p: alpha - (1.0 - _binom_cdf(x - 1, n, p)), 0.0, x / n)


def drop_upper_bound(routed_right: torch.Tensor, final_right: torch.Tensor, delta: float) -> float:
    """Upper bound (level ``1 - delta``) on the expected accuracy drop of routed against final predictions.

    ``UCB(broken rate) - LCB(fixed rate)``, each one-sided Clopper-Pearson at level ``delta / 2``.

    >>> import torch
    >>> final = torch.ones(200, dtype=torch.bool)
    >>> routed = torch.arange(200) >= 2  # two samples broken, none fixed
    >>> 0.01 < drop_upper_bound(routed, final, 0.1) < 0.04
    True
    """
    n = int(routed_right.numel())
    broken = int((final_right & ~routed_right).sum())
    fixed = int((routed_right & ~final_right).sum())
    return clopper_pearson_upper(broken, n, delta / 2) - clopper_pearson_lower(fixed, n, delta / 2)


def cost_upper_bound(taken: torch.Tensor, per_exit: list[float], delta: float) -> float:
    """Upper bound (level ``1 - delta``) on the expected per-sample MACs when each sample leaves at ``taken``.

    A sample's cost is ``per_exit[0]`` plus, for each later exit ``j`` it reaches, the step
    ``per_exit[j] - per_exit[j - 1]``; the share reaching ``j`` is a binomial rate, bounded above by
    Clopper-Pearson at level ``delta / m`` (``m`` steps that cost anything; Bonferroni over them).

    >>> import torch
    >>> cost_upper_bound(torch.zeros(100, dtype=torch.long), [1.0, 3.0], 0.1) > 1.0  # new data may go on
    True
    """
    n = int(taken.numel())
    steps = [(j, per_exit[j] - per_exit[j - 1]) for j in range(1, len(per_exit)) if per_exit[j] > per_exit[j - 1]]
    bound = per_exit[0]
    for j, step in steps:
        bound += step * clopper_pearson_upper(int((taken >= j).sum()), n, delta / len(steps))
    return bound


def rate_interval(x: int, n: int, delta: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval (level ``1 - delta``) on a binomial rate with ``x`` of ``n``."""
    return clopper_pearson_lower(x, n, delta / 2), clopper_pearson_upper(x, n, delta / 2)


def samples_to_certify(max_drop: float, delta: float) -> int:
    """The fewest held-out samples on which a drop bound can reach ``max_drop`` at all (no sample broken).

    >>> samples_to_certify(0.01, 0.1)  # (1 - 0.01) ** n <= 0.05
    299
    """
    return math.ceil(math.log(delta / 2) / math.log1p(-max_drop))


def too_few_samples(value: float, delta: float, held_out: int, total: int, split: bool) -> str | None:
    """The message when ``held_out`` samples cannot certify a drop of ``value`` even if no sample broke."""
    if clopper_pearson_upper(0, held_out, delta / 2) <= value:
        return None
    need = samples_to_certify(value, delta)
    if split:
        need_text = f"{2 * need} calibration samples ({need} held out to test the thresholds)"
    else:
        need_text = f"{need} calibration samples"
    return (f"max_accuracy_drop={value:g} with delta={delta:g} needs at least {need_text}, but there are {total}: "
            "with fewer, not even thresholds that change no prediction could be certified, so every exit is off. "
            "Calibrate on more samples, or loosen max_accuracy_drop or delta (guarantee=False fits the calibration "
            "data only)")


def samples_for_cost(taken: torch.Tensor, per_exit: list[float], delta: float, budget: float,
                     limit: int = 10**7) -> int | None:
    """About how many held-out samples would certify MACs within ``budget`` at the shares ``taken`` shows (the
    same shares reaching each exit, more samples); None when the shares themselves cost more than the budget.

    >>> import torch
    >>> samples_for_cost(torch.zeros(50, dtype=torch.long), [1.0, 3.0], 0.1, 1.05)  # 2 (1 - 0.1 ** (1 / m)) <= 0.05
    91
    """
    n = int(taken.numel())
    shares = [float((taken >= j).sum()) / n for j in range(len(per_exit))]
    if per_exit[0] + sum((per_exit[j] - per_exit[j - 1]) * shares[j] for j in range(1, len(per_exit))) >= budget:
        return None
    steps = [j for j in range(1, len(per_exit)) if per_exit[j] > per_exit[j - 1]]

    def bound(m: int) -> float:
        return per_exit[0] + sum((per_exit[j] - per_exit[j - 1])
                                 * clopper_pearson_upper(round(shares[j] * m), m, delta / len(steps)) for j in steps)

    low, high = 1, n
    while bound(high) > budget:
        low, high = high, 2 * high
        if high > limit:
            return None
    while high - low > max(1, low // 100):  # to within 1%
        mid = (low + high) // 2
        low, high = (mid, high) if bound(mid) > budget else (low, mid)
    return high
