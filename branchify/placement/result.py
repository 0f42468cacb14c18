"""What a sweep proposes: the table of candidates, the best set of exits, and the Pareto frontier."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._tables import html_table, text_table
from ..calibration.result import Calibration
from ..errors import BranchifyError
from ..exits import exit_module
from ..spec import ExitSpec
from ..surgery import attach_exits

__all__ = ["FrontierPoint", "SweepResult", "SweepRow"]


@dataclass(frozen=True)
class SweepRow:
    """One candidate exit point: its cost, its head's size and its head's forced top-1 on val.

    ``macs_fraction``: backbone MACs up to the point over the original model's; ``exit_fraction``:
    the cost of leaving there with only this head, over the original; ``accuracy``: top-1 on val if
    every sample left here.

    >>> SweepRow("layer1", 0.32, 0.33, 0.9, 650, 650.0).layer
    'layer1'
    """

    layer: str
    macs_fraction: float
    exit_fraction: float
    accuracy: float
    params: int
    head_macs: float


@dataclass(frozen=True)
class FrontierPoint:
    """A Pareto-optimal operating point: exits, thresholds, expected MACs (fraction) and val accuracy.

    ``layers`` is empty for the model without exits.

    >>> FrontierPoint((), (), 1.0, 0.97).mac_fraction
    1.0
    """

    layers: tuple[str, ...]
    thresholds: tuple[float | None, ...]
    mac_fraction: float
    accuracy: float


@dataclass(frozen=True, repr=False)
class SweepResult:
    """What a placement sweep found.

    ``table``: a ``SweepRow`` per candidate, in graph order; ``best``: the ``Calibration`` of the
    chosen set on the val data; ``spec``: its ``ExitSpec`` (heads and thresholds), ready for
    ``bx.attach_exits``; ``head_state_dicts``: the trained weights of every candidate head, by
    layer (``load_heads`` / ``attach`` carry them over); ``frontier``: ``FrontierPoint``s by
    increasing MACs.

    >>> import torch, torchvision, branchify as bx
    >>> model = torchvision.models.resnet18(num_classes=3)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=8)
    >>> result = bx.sweep(model, loader, loader, candidates=["layer1", "layer2"], epochs=1, progress=False)
    >>> [row.layer for row in result.table], set(result.spec.layers) <= {"layer1", "layer2"}
    (['layer1', 'layer2'], True)
    >>> len(result.attach(model, torch.randn(1, 3, 32, 32))(torch.randn(2, 3, 32, 32))) == len(result.spec.exits) + 1
    True
    """

    table: list[SweepRow]
    best: Calibration
    frontier: list[FrontierPoint]
    head_state_dicts: dict[str, dict[str, torch.Tensor]]
    final_accuracy: float
    samples: int
    sets_searched: int
    settings: dict = field(default_factory=dict)

    @property
    def spec(self) -> ExitSpec:
        """The chosen exits with their heads and calibrated thresholds."""
        return self.best.spec

    def load_heads(self, module: nn.Module) -> nn.Module:
        """Copy the trained head weights into a module made by ``bx.attach_exits`` (matched by layer)."""
        spec = exit_module(module, "load_heads").exit_spec
        for i, layer in enumerate(spec.layers):
            if layer not in self.head_state_dicts:
                raise BranchifyError(
                    f"exit {i} (layer {layer!r}) was not a sweep candidate, so no trained head exists for it; "
                    f"candidates: {sorted(self.head_state_dicts)}")
            try:
                module.exit_heads[i].load_state_dict(self.head_state_dicts[layer])
            except RuntimeError as err:
                raise BranchifyError(
                    f"exit {i} (layer {layer!r}): the head does not fit the trained one "
                    f"({str(err).strip().splitlines()[0]}); attach with the sweep's HeadSpec, e.g. "
                    "bx.attach_exits(model, result.spec, example_inputs)") from None
        return module

    def attach(self, model: nn.Module, example_inputs, **capture) -> nn.Module:
        """``bx.attach_exits(model, self.spec, example_inputs, **capture)`` with the trained heads loaded
        (``capture``: ``capture=``, ``leaf_modules=``, ``output=``, as the sweep was given)."""
        return self.load_heads(attach_exits(model, self.spec, example_inputs, **capture))

    def to_dict(self) -> dict:
        """Everything but the weights, as JSON-ready values."""
        best = self.best
        return {
            "settings": self.settings,
            "samples": self.samples,
            "final_accuracy": self.final_accuracy,
            "sets_searched": self.sets_searched,
            "candidates": [asdict(row) for row in self.table],
            "best": {
                "layers": best.spec.layers,
                "thresholds": best.spec.thresholds,
                "accuracy": best.accuracy,
                "accuracy_drop": best.accuracy_drop,
                "mac_fraction": best.mac_fraction,
                "shares": best.shares,
                "met": best.met,
            },
            "spec": best.spec.model_dump(mode="json"),
            "frontier": [asdict(point) for point in self.frontier],
        }

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def plot(self, path: str | Path) -> Path:
        """Plot forced accuracy against MACs per candidate, the frontier and the chosen set; save to ``path``.

        Candidate labels are placed where they overlap neither each other nor the chosen set's star."""
        path = Path(path)
        self.figure().savefig(path, dpi=120)
        return path

    def figure(self):
        """The plot of ``plot`` as a matplotlib ``Figure`` (for a notebook, or to adjust before saving)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise BranchifyError(
                "SweepResult.plot needs matplotlib, which is not installed; pip install 'branchify[plot]'") from None
        fig = Figure(figsize=(8, 5), layout="constrained")
        FigureCanvasAgg(fig)  # a renderer, to measure the labels
        ax = fig.add_subplot()
        xs = [100 * row.exit_fraction for row in self.table]
        ys = [100 * row.accuracy for row in self.table]
        ax.scatter(xs, ys, color="tab:blue", zorder=3, label="candidate head, every sample leaving there")
        fx = [100 * p.mac_fraction for p in self.frontier]
        fy = [100 * p.accuracy for p in self.frontier]
        ax.step(fx, fy, where="post", color="tab:orange", marker=".", label="Pareto frontier (sets of exits)")
        ax.scatter([100.0], [100 * self.final_accuracy], color="black", marker="s", zorder=4,
                   label="original model")
        star = ax.scatter([100 * self.best.mac_fraction], [100 * self.best.accuracy], color="tab:red", marker="*",
                          s=200, zorder=5, label=f"chosen: {' + '.join(self.best.spec.layers)}")
        ax.set_xlabel("expected MACs per sample (% of the original model)")
        ax.set_ylabel("top-1 accuracy on val (%)")
        ax.set_title(f"branchify sweep: {len(self.table)} candidates, accuracy drop <= "
                     f"{100 * self.settings.get('max_accuracy_drop', math.nan):g} pt")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        labels: dict[tuple[float, float], list[str]] = {}
        for row, x, y in zip(self.table, xs, ys):  # candidates at the same spot share one label
            labels.setdefault((round(x, 1), round(y, 1)), []).append(row.layer)
        _place_labels(fig, ax, labels, avoid=[star])
        return fig
    def _rows(self) -> list[list[str]]:
        chosen = set(self.best.spec.layers)
        return [["*" if row.layer in chosen else "", row.layer, f"{row.macs_fraction:.1%}", f"{row.exit_fraction:.1%}",
                 f"{row.params:,}", f"{row.accuracy:.1%}"] for row in self.table]

    def _headline(self) -> list[str]:
        best = self.best
        most = self.settings.get("max_exits")
        sets = f"every set of at most {most} of them" if most is not None else "sets of them"
        return [
            f"SweepResult({len(self.table)} candidates; {self.sets_searched} exit sets searched ({sets}); "
            f"max_accuracy_drop={self.settings.get('max_accuracy_drop')}; val samples={self.samples})",
            f"best: {' + '.join(best.spec.layers)}: accuracy {best.accuracy:.2%} (final {self.final_accuracy:.2%}, "
            f"drop {100 * best.accuracy_drop:.2f} points), {best.mac_fraction:.1%} of the original MACs "
            f"(saving {best.saving:.1%})",
            f"frontier: {len(self.frontier)} operating points (a set of exits with thresholds) that no other beats on "
            "both expected MACs and accuracy",
        ]

    _HEADER = ["best", "candidate", "MACs to here", "exit cost", "head params", "forced top-1"]
    _LEGEND = [
        "MACs to here: the backbone's MACs up to the candidate, as a share of the original model's",
        "exit cost: what a sample leaving there costs (those MACs plus its head's), as a share of the original",
        "forced top-1: the head's accuracy on val if every sample left there; best: * marks the chosen exits",
    ]

    def __repr__(self) -> str:
        return "\n".join([*self._headline(), text_table(self._HEADER, self._rows()), *self._LEGEND])

    def _repr_html_(self) -> str:
        lines = "<br>".join(html.escape(line) for line in self._headline())
        legend = "<br>".join(html.escape(line) for line in self._LEGEND)
        return f"<div><p>{lines}</p>{html_table(self._HEADER, self._rows())}<p><small>{legend}</small></p></div>"


# Where a label may go around its point, in points from it: right, above, below, left, then further out.
_OFFSETS = [(5, 4), (5, -12), (-5, 6), (-5, -12), (5, 14), (5, -22), (-5, 16), (-5, -24), (5, 26), (5, -34)]


def _place_labels(fig, ax, labels: dict[tuple[float, float], list[str]], avoid: list) -> None:
    """Annotate each point with its names at the first offset whose box overlaps no label placed before it and
    none of the ``avoid`` artists (the chosen set's star)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the layout, hence the axes' final position, before measuring
    taken = []
    for markers in avoid:  # a scatter's extent is not measured by matplotlib: each marker's box from its size
        half = math.sqrt(float(markers.get_sizes()[0])) / 2 * fig.dpi / 72 * 1.2
        for cx, cy in ax.transData.transform(markers.get_offsets()):
            taken.append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
    for (x, y), names in sorted(labels.items()):
        text = None
        for dx, dy in _OFFSETS:
            if text is not None:
                text.remove()
            text = ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right", zorder=6)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken):
                break
        taken.append(text.get_window_extent(renderer))
