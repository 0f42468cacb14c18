"""The result of a calibration: the thresholds, what they achieve, and how it is shown."""

from __future__ import annotations

import html
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
from .cache import Cached, collect_logits
from .grid import Target, always_threshold, never_threshold


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
