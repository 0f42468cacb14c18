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

import html
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .cost import ExitCosts, exit_costs
from .criteria import Criterion, get_criterion
from .errors import BranchifyError
from .exits import exit_module
from .inputs import split_batch
from .outputs import split_outputs
from .routing import first_exit, route
from .spec import ExitSpec
from .trace import eval_mode

__all__ = ["Calibration", "calibrate"]

Target = Literal["max_accuracy_drop", "mac_budget"]

# A threshold that no finite score reaches (spec thresholds must be finite and non-negative).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_GRID_CELLS = 2**21
_MAX_EXITS = 12
_MAX_GRID = 128
_PATH_STEPS = 32
_TEMPERATURE_RANGE = (1e-2, 1e2)


# ---------------------------------------------------------------------------------------------
# The cache: one pass of the network
# ---------------------------------------------------------------------------------------------

@dataclass
class Cached:
    """Exit logits, final logits and targets of one pass over a loader (CPU, float32)."""

    exit_logits: list[torch.Tensor]
    final: torch.Tensor
    targets: torch.Tensor
    example_inputs: tuple

    @property
    def samples(self) -> int:
        return int(self.targets.shape[0])

    def correct(self) -> torch.Tensor:
        """``(k + 1, N)`` booleans: is exit ``i`` (the final one last) right on each sample."""
        logits = [*self.exit_logits, self.final]
        return torch.stack([z.argmax(dim=-1) == self.targets for z in logits])


def module_device(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def collect_logits(module: nn.Module, loader: Iterable, *, progress: bool = True,
                   desc: str = "caching exit logits") -> Cached:
    """Run ``module`` once over ``loader`` in eval mode and keep every exit's logits on the CPU."""
    k = len(exit_module(module, "caching exit logits").exit_spec.exits)
    device = module_device(module)
    exits: list[list[torch.Tensor]] = [[] for _ in range(k)]
    finals, targets, example = [], [], None
    with eval_mode(module):
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
                inputs, target = split_batch(batch)
                if example is None:
                    example = inputs.map(lambda x: x[:1])
                exit_logits, final = split_outputs(inputs.map(lambda x: x.to(device)).call(module), k)
                for store, logits in zip(exits, exit_logits):
                    store.append(logits.detach().float().cpu())
                finals.append(final.detach().float().cpu())
                targets.append(target.detach().cpu().reshape(-1))
    if example is None:
        raise BranchifyError("the loader yielded no batches; pass a loader over at least one labelled batch")
    cached = Cached([torch.cat(e) for e in exits], torch.cat(finals), torch.cat(targets), example)
    _check_targets(cached)
    return cached


def _check_targets(cached: Cached) -> None:
    targets, classes = cached.targets, cached.final.shape[-1]
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise BranchifyError(
            f"targets must be integer class indices, got dtype {targets.dtype}; convert them with .long()")
    if targets.shape[0] != cached.final.shape[0]:
        raise BranchifyError(f"{targets.shape[0]} targets for {cached.final.shape[0]} samples; give one per sample")
    bad = (targets < 0) | (targets >= classes)
    if bool(bad.any()):
        raise BranchifyError(
            f"target {int(targets[bad][0])} is not a class index of a {classes}-class model; "
            f"targets must lie in [0, {classes - 1}]")
    cached.targets = targets.long()


# ---------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------

def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature ``T`` minimising the NLL of ``logits / T`` (Guo et al.), kept in [0.01, 100].

    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> fit_temperature(logits, torch.tensor([0, 1, 1, 0])) > 1  # half wrong: soften
    True
    """
    z = logits.detach().double()
    y = targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    low, high = (math.log(v) for v in _TEMPERATURE_RANGE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped inside the loss so that separable data (optimum T -> 0) cannot run off to infinity.
        loss = F.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    return value if math.isfinite(value) else 1.0


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``logits / temperature``."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


# ---------------------------------------------------------------------------------------------
# The grid and its exact evaluation
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Risk control
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Calibration:
    """Calibrated thresholds and what they achieve on the calibration data.

    ``spec`` carries the thresholds (and temperatures); ``shares`` are the fractions of samples
    leaving at each of the k + 1 exits (the final one last); ``exit_accuracy`` the accuracy among
    the samples leaving at each (None where none leaves); ``expected_macs`` per sample, and
    ``mac_fraction`` of the original model's; ``met`` whether the target holds; ``grid`` the
    candidate thresholds searched per exit; ``risk_bound`` the certified upper bound on the
    accuracy drop when ``delta`` was given.

    >>> import torch, torchvision, branchify as bx
    >>> _ = torch.manual_seed(0)
    >>> module = bx.attach_exits(torchvision.models.resnet18(num_classes=3),
    ...                          bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")]), torch.randn(1, 3, 32, 32))
    >>> data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    >>> cal = bx.calibrate(module, torch.utils.data.DataLoader(data, batch_size=8),
    ...                    max_accuracy_drop=0.0, progress=False)
    >>> cal.met, cal.accuracy_drop <= 0.0, len(cal.shares)
    (True, True, 2)
    """

    spec: ExitSpec
    accuracy: float
    final_accuracy: float
    accuracy_drop: float
    shares: list[float]
    exit_accuracy: list[float | None]
    expected_macs: float
    mac_fraction: float
    met: bool
    target: Target
    target_value: float
    samples: int
    costs: ExitCosts
    grid: list[list[float]] = field(default_factory=list)
    delta: float | None = None
    risk_bound: float | None = None

    @property
    def saving(self) -> float:
        """Fraction of the original model's MACs saved: ``1 - mac_fraction``."""
        return 1.0 - self.mac_fraction

    def evaluate(self, module: nn.Module, loader: Iterable, *, example_inputs=None,
                 progress: bool = True) -> Calibration:
        """The same figures for these thresholds on another split (``met``: does the target hold there).

        ``module`` must carry the same exits (``bx.attach_exits`` with ``spec`` or the module that
        was calibrated); its own thresholds are ignored in favour of ``self.spec``'s.
        """
        spec = exit_module(module, "Calibration.evaluate").exit_spec
        if spec.layers != self.spec.layers:
            raise BranchifyError(
                f"the module's exits {spec.layers} differ from the calibrated ones {self.spec.layers}; "
                "evaluate on a module built with bx.attach_exits(model, calibration.spec, example_inputs)")
        cached = collect_logits(module, loader, progress=progress, desc="evaluating calibrated exits")
        costs = exit_costs(module, example_inputs if example_inputs is not None else cached.example_inputs)
        return figures(self.spec, cached, costs, target=self.target, value=self.target_value,
                       grid=self.grid, delta=self.delta, risk_bound=self.risk_bound)

    def _rows(self) -> list[list[str]]:
        rows = []
        for i, point in enumerate(self.spec.exits):
            crit = get_criterion(self.spec.criterion_of(i))
            thr = point.threshold
            if thr is not None and thr == never_threshold(crit):
                shown = "off"
            elif thr is not None and thr == always_threshold(crit):
                shown = "always"
            else:
                shown = f"{crit.exits_when} {thr:.4g}"
            rows.append([str(i), point.layer, crit.name, shown, f"{point.temperature:.3g}",
                         f"{self.shares[i]:.1%}", _pct(self.exit_accuracy[i])])
        rows.append(["final", "(model output)", "", "", "", f"{self.shares[-1]:.1%}", _pct(self.exit_accuracy[-1])])
        return rows

    def _headline(self) -> list[str]:
        target = (f"max_accuracy_drop={self.target_value:g}" if self.target == "max_accuracy_drop"
                  else f"mac_budget={self.target_value:g}")
        if self.delta is not None:
            target += f", delta={self.delta:g} (certified drop <= {self.risk_bound:.4f})"
        return [
            f"Calibration({target}, met={self.met}, samples={self.samples})",
            f"accuracy {self.accuracy:.2%} (final exit {self.final_accuracy:.2%}, drop "
            f"{100 * self.accuracy_drop:.2f} points)",
            f"expected MACs {self.expected_macs / 1e6:.3f} M per sample = {self.mac_fraction:.1%} of the "
            f"original model's (saving {self.saving:.1%})",
        ]

    def __repr__(self) -> str:
        header = ["exit", "layer", "criterion", "threshold", "T", "share", "accuracy"]
        return "\n".join([*self._headline(), text_table(header, self._rows())])

    def _repr_html_(self) -> str:
        header = ["exit", "layer", "criterion", "threshold", "T", "share", "accuracy"]
        lines = "<br>".join(html.escape(line) for line in self._headline())
        return f"<div><p>{lines}</p>{html_table(header, self._rows())}</div>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figures(spec: ExitSpec, cached: Cached, costs: ExitCosts, *, target: Target, value: float,
            grid: list[list[float]], met: bool | None = None, delta: float | None = None,
            risk_bound: float | None = None) -> Calibration:
    """Route the cached logits with ``spec`` (the runtime's own rule) and report what it achieves."""
    k = len(spec.exits)
    taken = route(spec, cached.exit_logits, cached.targets)
    correct = cached.correct()
    n = cached.samples
    right = correct[taken, torch.arange(n)]
    counts = torch.bincount(taken, minlength=k + 1)
    shares = (counts.double() / n).tolist()
    exit_accuracy = [float(right[taken == i].double().mean()) if int(counts[i]) else None for i in range(k + 1)]
    accuracy = float(right.double().mean())
    final_accuracy = float(correct[-1].double().mean())
    expected = costs.expected(shares)
    drop = final_accuracy - accuracy
    if met is None:
        met = (drop <= value + 1e-12 if target == "max_accuracy_drop"
               else expected <= value * costs.original * (1 + 1e-12))
    return Calibration(spec=spec, accuracy=accuracy, final_accuracy=final_accuracy, accuracy_drop=drop,
                       shares=shares, exit_accuracy=exit_accuracy, expected_macs=expected,
                       mac_fraction=expected / costs.original, met=met, target=target, target_value=value,
                       samples=n, costs=costs, grid=grid, delta=delta, risk_bound=risk_bound)


# ---------------------------------------------------------------------------------------------
# The search on cached logits
# ---------------------------------------------------------------------------------------------

def default_grid_size(k: int) -> int:
    """Quantile steps per exit: 128 for one or two exits, 64 for three, fewer beyond (at most 2M grid cells).

    Always a power of two, so a coarser default grid's rungs are among a finer one's.
    """
    steps = _MAX_GRID
    while steps > 2 and (steps + 1) ** k > _GRID_CELLS:
        steps //= 2
    return steps


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
