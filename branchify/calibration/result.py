"""The result of a calibration: the thresholds, what they achieve, the bounds, and how it is shown."""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._tables import html_table, text_table
from ..cost import ExitCosts, exit_costs
from ..criteria import get_criterion
from ..errors import BranchifyError
from ..exits import exit_module
from ..routing import route
from ..spec import ExitSpec
from .bounds import cost_upper_bound, drop_upper_bound, rate_interval
from .cache import Cached, collect_logits
from .grid import Target

__all__ = ["Bounds", "Calibration"]


@dataclass(frozen=True)
class Bounds:
    """Finite-sample bounds (level ``1 - delta``) on what the thresholds do on new data.

    ``drop``: upper bound on the expected accuracy drop against the final exit; ``mac_fraction``:
    upper bound on the expected MACs as a fraction of the original model's; ``early_share``: interval
    on the share of samples leaving at an early exit. ``samples``: how many samples they rest on;
    ``held_out``: whether those samples played no part in choosing the thresholds (if not, the bounds
    are optimistic: the thresholds were fitted to the very samples they are measured on).
    """

    delta: float
    drop: float
    mac_fraction: float
    early_share: tuple[float, float]
    samples: int
    held_out: bool

    def describe(self) -> str:
        where = "held-out" if self.held_out else "in-sample, optimistic: fitted on the same"
        return (f"with probability {1 - self.delta:.0%}: drop <= {100 * self.drop:.2f} points, MACs <= "
                f"{self.mac_fraction:.1%}, early share in [{self.early_share[0]:.1%}, {self.early_share[1]:.1%}] "
                f"({self.samples} {where} samples)")


@dataclass(frozen=True, repr=False)
class Calibration:
    """Calibrated thresholds, what they achieve on the calibration data, and bounds for new data.

    ``spec`` carries the thresholds (None: the exit is off) and temperatures; ``shares`` are the
    fractions of samples leaving at each of the k + 1 exits (the final one last); ``exit_accuracy``
    the accuracy among the samples leaving at each (None where none leaves); ``expected_macs`` per
    sample, and ``mac_fraction`` of the original model's; ``met`` whether the target holds (with
    ``guarantee``: holds on new data with probability ``1 - delta``; without: on the calibration data
    only); ``bounds`` the finite-sample bounds (``Bounds``) and the samples they rest on; ``grid``
    the candidate thresholds searched per exit; ``note`` what the user should know (e.g. too few
    samples to certify anything).

    >>> import torch, torchvision, branchify as bx
    >>> _ = torch.manual_seed(0)
    >>> module = bx.attach_exits(torchvision.models.resnet18(num_classes=3),
    ...                          bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")]), torch.randn(1, 3, 32, 32))
    >>> data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    >>> cal = bx.calibrate(module, torch.utils.data.DataLoader(data, batch_size=8),
    ...                    max_accuracy_drop=0.05, guarantee=False, progress=False)
    >>> cal.met, cal.accuracy_drop <= 0.05, len(cal.shares), cal.bounds.held_out
    (True, True, 2, False)
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
    bounds: Bounds
    guarantee: bool = False
    grid: list[list[float | None]] = field(default_factory=list)
    note: str | None = None

    @property
    def saving(self) -> float:
        """Fraction of the original model's MACs saved: ``1 - mac_fraction``."""
        return 1.0 - self.mac_fraction

    @property
    def delta(self) -> float:
        """The bounds' failure probability."""
        return self.bounds.delta

    @property
    def drop_bound(self) -> float:
        """Upper confidence bound on the expected accuracy drop (``bounds.drop``)."""
        return self.bounds.drop

    def evaluate(self, module: nn.Module, loader: Iterable, *, example_inputs=None,
                 progress: bool = True) -> Calibration:
        """The same figures for these thresholds on another split (``met``: does the target hold there).

        ``module`` must carry the same exits (``bx.attach_exits`` with ``spec`` or the module that
        was calibrated); its own thresholds are ignored in favour of ``self.spec``'s. The bounds rest
        on the new split's samples, which played no part in choosing the thresholds.
        """
        spec = exit_module(module, "Calibration.evaluate").exit_spec
        if spec.layers != self.spec.layers:
            raise BranchifyError(
                f"the module's exits {spec.layers} differ from the calibrated ones {self.spec.layers}; "
                "evaluate on a module built with bx.attach_exits(model, calibration.spec, example_inputs)")
        cached = collect_logits(module, loader, progress=progress, desc="evaluating calibrated exits")
        costs = exit_costs(module, example_inputs if example_inputs is not None else cached.example_inputs)
        return figures(self.spec, cached, costs, target=self.target, value=self.target_value, grid=self.grid,
                       delta=self.delta, bound_on=None, held_out=True, guarantee=self.guarantee)

    def _rows(self) -> list[list[str]]:
        rows = []
        for i, point in enumerate(self.spec.exits):
            crit = get_criterion(self.spec.criterion_of(i))
            thr = point.threshold
            if thr is None:
                shown = "off"
            elif crit.across_exits:
                shown = f"{int(thr)} agreeing"
            else:
                shown = f"{crit.exits_when} {thr:.4g}"
            rows.append([str(i), point.layer, crit.name, shown, f"{point.temperature:.3g}",
                         f"{self.shares[i]:.1%}", _pct(self.exit_accuracy[i])])
        rows.append(["final", "(model output)", "", "", "", f"{self.shares[-1]:.1%}", _pct(self.exit_accuracy[-1])])
        return rows

    def _headline(self) -> list[str]:
        target = (f"max_accuracy_drop={self.target_value:g}" if self.target == "max_accuracy_drop"
                  else f"mac_budget={self.target_value:g}")
        mode = (f"guaranteed on new data with probability {1 - self.delta:.0%}" if self.guarantee
                else "on the calibration data only")
        lines = [
            f"Calibration({target}, {mode}, met={self.met}, samples={self.samples})",
            f"accuracy {self.accuracy:.2%} (final exit {self.final_accuracy:.2%}, drop "
            f"{100 * self.accuracy_drop:.2f} points)",
            f"expected MACs {self.expected_macs / 1e6:.3f} M per sample = {self.mac_fraction:.1%} of the "
            f"original model's (saving {self.saving:.1%})",
            f"bounds {self.bounds.describe()}",
        ]
        return lines + ([f"note: {self.note}"] if self.note else [])

    def __repr__(self) -> str:
        header = ["exit", "layer", "criterion", "threshold", "T", "share", "accuracy"]
        return "\n".join([*self._headline(), text_table(header, self._rows())])

    def _repr_html_(self) -> str:
        header = ["exit", "layer", "criterion", "threshold", "T", "share", "accuracy"]
        lines = "<br>".join(html.escape(line) for line in self._headline())
        return f"<div><p>{lines}</p>{html_table(header, self._rows())}</div>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def routed(spec: ExitSpec, cached: Cached) -> torch.Tensor:
    """The exit each cached sample takes under ``spec``; with every exit off, the final one."""
    if spec.thresholds is None:
        return torch.full((cached.samples,), len(spec.exits), dtype=torch.int64)
    return route(spec, cached.exit_logits, cached.targets)


def charged(spec: ExitSpec, costs: ExitCosts) -> ExitCosts:
    """``costs`` with the heads ``spec`` judges charged: the spec's one rule (``ExitSpec.judged``), as everywhere."""
    return costs.judging(spec.judged)


NOTHING_ROUTES = (
    "no thresholds that let samples out early could be certified, so every exit is off and the spec routes "
    "nothing (bx.ExitRunner and routed statistics refuse it); calibrate on more samples, loosen the target or "
    "delta, or deploy the model without exits")


def figures(spec: ExitSpec, cached: Cached, costs: ExitCosts, *, target: Target, value: float,
            grid: list[list[float | None]], delta: float, bound_on: torch.Tensor | None, held_out: bool,
            guarantee: bool, met: bool | None = None, note: str | None = None) -> Calibration:
    """Route the cached logits with ``spec`` (the runtime's own rule) and report what it achieves.

    The bounds rest on the samples at ``bound_on`` (None: all of them); ``held_out`` says whether those
    samples played no part in choosing the thresholds."""
    k = len(spec.exits)
    costs = charged(spec, costs)
    taken = routed(spec, cached)
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
    if spec.thresholds is None and met:
        # every exit off is no early-exit model to deploy: the next step (a runner, routed statistics) refuses it
        met, note = False, note or NOTHING_ROUTES
    at = torch.arange(n) if bound_on is None else bound_on
    early = int((taken[at] < k).sum())
    bounds = Bounds(delta=delta, drop=drop_upper_bound(right[at], correct[-1, at], delta),
                    mac_fraction=cost_upper_bound(taken[at], costs.per_exit, delta) / costs.original,
                    early_share=rate_interval(early, len(at), delta), samples=len(at), held_out=held_out)
    return Calibration(spec=spec, accuracy=accuracy, final_accuracy=final_accuracy, accuracy_drop=drop,
                       shares=shares, exit_accuracy=exit_accuracy, expected_macs=expected,
                       mac_fraction=expected / costs.original, met=met, target=target, target_value=value,
                       samples=n, costs=costs, bounds=bounds, guarantee=guarantee, grid=grid, note=note)


def warn_unreachable(result: Calibration, target: Target, value: float, cached: Cached, spec: ExitSpec,
                      costs: ExitCosts) -> None:
    if target == "max_accuracy_drop":
        message = (f"max_accuracy_drop={value:g} is unreachable on the {cached.samples} calibration samples: the "
                   f"best thresholds on the grid lose {100 * result.accuracy_drop:.2f} points against the final exit; "
                   f"ask for max_accuracy_drop >= {result.accuracy_drop:.4f}, or train better exit heads")
    else:
        message = (f"mac_budget={value:g} is unreachable: even the cheapest thresholds need "
                   f"{result.mac_fraction:.4f} of the original model's MACs (leaving at exit 0, "
                   f"{spec.exits[0].layer!r}, costs {costs.exits[0] / costs.original:.4f}); raise mac_budget to at "
                   f"least {result.mac_fraction:.4f}, or attach an earlier exit")
    warnings.warn(message + ". The result carries met=False", UserWarning, stacklevel=4)
