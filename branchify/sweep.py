"""Placement sweep: where do exits pay off? Every candidate point is tried in one training run.

Heads are attached at every candidate at once and trained together on a frozen backbone: the
backbone runs in eval mode (BatchNorm statistics do not move) with its parameters excluded from
autograd, so each batch costs ONE backbone forward, and only the heads get gradients. The heads'
losses are summed and their parameters are disjoint, so each head trains exactly as it would alone.

Then one pass over the validation data caches every head's logits, and the search runs on the
cache: for every set of at most ``max_exits`` candidates, the thresholds that minimise expected
MACs under the accuracy target are found exactly on a 16-step score-quantile grid (the search of
``bx.calibrate``). The cheapest set wins (ties: the more accurate, then the smaller set); its
thresholds are then refined on ``bx.calibrate``'s default 128-step grid, which contains the 16-step
one, so the refinement can only save more. The Pareto frontier of accuracy against expected MACs
comes from the same tables: every threshold combination of every set, plus the model without exits.

Default candidates: ``bx.list_exit_points(model, example_inputs)`` without the points at 99% or more
of the model's MACs (the end of the backbone: an exit there saves nothing and costs its head).
"""

from __future__ import annotations

import html
import itertools
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._inputs import split_batch
from ._tables import html_table, text_table
from ._trace import kept_modes
from .calibration.cache import Cached, collect_logits, module_device
from .calibration.grid import candidate_thresholds, default_grid_size, first_rung, outcome_tables, select
from .calibration.result import Calibration
from .calibration.search import calibrate_cached
from .cost import ExitCosts, exit_costs
from .criteria import get_criterion
from .errors import BranchifyError
from .exits import exit_module
from .points import list_exit_points
from .routing import route
from .spec import ExitPoint, ExitSpec, HeadSpec
from .surgery import attach_exits

__all__ = ["FrontierPoint", "SweepResult", "SweepRow", "sweep"]

LAST_POINT_FRACTION = 0.99
_SEARCH_STEPS = 16


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
        """Plot forced accuracy against MACs per candidate, the frontier and the chosen set; save to ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise BranchifyError(
                "SweepResult.plot needs matplotlib, which is not installed; pip install 'branchify[plot]'") from None
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        xs = [100 * row.exit_fraction for row in self.table]
        ys = [100 * row.accuracy for row in self.table]
        ax.scatter(xs, ys, color="tab:blue", zorder=3, label="candidate head, every sample leaving there")
        labels: dict[tuple[float, float], list[str]] = {}
        for row, x, y in zip(self.table, xs, ys):  # candidates at the same spot share one label
            labels.setdefault((round(x, 1), round(y, 1)), []).append(row.layer)
        for (x, y), names in labels.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fx = [100 * p.mac_fraction for p in self.frontier]
        fy = [100 * p.accuracy for p in self.frontier]
        ax.step(fx, fy, where="post", color="tab:orange", marker=".", label="Pareto frontier (sets of exits)")
        ax.scatter([100.0], [100 * self.final_accuracy], color="black", marker="s", zorder=4,
                   label="original model")
        ax.scatter([100 * self.best.mac_fraction], [100 * self.best.accuracy], color="tab:red", marker="*", s=200,
                   zorder=5, label=f"chosen: {' + '.join(self.best.spec.layers)}")
        ax.set_xlabel("expected MACs per sample (% of the original model)")
        ax.set_ylabel("top-1 accuracy on val (%)")
        ax.set_title(f"branchify sweep: {len(self.table)} candidates, accuracy drop <= "
                     f"{100 * self.settings.get('max_accuracy_drop', math.nan):g} pt")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path

    def _rows(self) -> list[list[str]]:
        chosen = set(self.best.spec.layers)
        return [["*" if row.layer in chosen else "", row.layer, f"{row.macs_fraction:.1%}", f"{row.exit_fraction:.1%}",
                 f"{row.params:,}", f"{row.accuracy:.1%}"] for row in self.table]

    def _headline(self) -> list[str]:
        best = self.best
        return [
            f"SweepResult({len(self.table)} candidates, {self.sets_searched} exit sets searched, "
            f"max_accuracy_drop={self.settings.get('max_accuracy_drop')}, val samples={self.samples})",
            f"best: {' + '.join(best.spec.layers)}: accuracy {best.accuracy:.2%} (final {self.final_accuracy:.2%}, "
            f"drop {100 * best.accuracy_drop:.2f} points), {best.mac_fraction:.1%} of the original MACs "
            f"(saving {best.saving:.1%}); frontier: {len(self.frontier)} points",
        ]

    _HEADER = ["best", "candidate", "MACs", "exit MACs", "head params", "forced top-1"]

    def __repr__(self) -> str:
        return "\n".join([*self._headline(), text_table(self._HEADER, self._rows())])

    def _repr_html_(self) -> str:
        lines = "<br>".join(html.escape(line) for line in self._headline())
        return f"<div><p>{lines}</p>{html_table(self._HEADER, self._rows())}</div>"


def default_candidates(model: nn.Module, example_inputs, **capture) -> list[str]:
    """The exit points of ``model`` below 99% of its MACs (an exit at the very end saves nothing)."""
    points = list_exit_points(model, example_inputs, **capture)
    return [p.name for p in points if p.macs_fraction < LAST_POINT_FRACTION]


def train_heads(module: nn.Module, loader: Iterable, *, epochs: int, lr: float, progress: bool = True,
                desc: str = "sweep: training heads") -> list[float]:
    """Train every exit head of ``module`` on a frozen backbone; returns the mean loss per epoch.

    The backbone runs in eval mode with its parameters taken out of autograd, so one forward per
    batch feeds all heads and no backbone state (weights, BatchNorm statistics) changes.
    """
    heads = list(module.exit_heads.parameters())
    head_ids = {id(p) for p in heads}
    backbone = [p for p in module.parameters() if id(p) not in head_ids]
    flags = [p.requires_grad for p in backbone]
    k = len(module.exit_heads)
    device = module_device(module)
    optimizer = torch.optim.Adam(heads, lr=lr)
    losses = []
    with kept_modes(module):
        for p in backbone:
            p.requires_grad_(False)
        try:
            module.eval()
            module.exit_heads.train()  # heads with dropout or normalisation train as heads; the backbone stays put
            for epoch in range(epochs):
                total, batches = 0.0, 0
                bar = tqdm(loader, desc=f"{desc}, epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
                for batch in bar:
                    inputs, target = split_batch(batch)
                    target = target.to(device).long()
                    outputs = inputs.map(lambda x: x.to(device)).call(module)
                    loss = sum(F.cross_entropy(z, target) for z in outputs[:k])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach())
                    batches += 1
                    bar.set_postfix(loss=f"{total / batches / k:.3f}")
                losses.append(total / max(batches, 1) / k)
        finally:
            for p, flag in zip(backbone, flags):
                p.requires_grad_(flag)
    return losses


def subset_costs(costs: ExitCosts, chosen: Sequence[int]) -> ExitCosts:
    """The costs of a module that keeps only the exits ``chosen`` (sorted, in graph order)."""
    return ExitCosts.of([costs.backbone[i] for i in chosen], [costs.heads[i] for i in chosen], costs.original)


def _pareto(macs: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Indices of the points no other point beats in both MACs (lower) and correct count (higher).

    Per correct count the cheapest point; it is on the frontier when every more accurate point
    costs more. Ties go to the first index. No sort: counts are small integers.
    """
    right = right.clamp(min=0)
    top = int(right.max())
    inf = torch.tensor(math.inf, dtype=torch.float64)
    lowest = torch.full((top + 1,), math.inf, dtype=torch.float64).scatter_reduce(0, right, macs, reduce="amin")
    above = torch.cat([lowest.flip(0).cummin(0).values.flip(0)[1:], inf.reshape(1)])  # cheapest with more correct
    on_frontier = torch.isfinite(lowest) & (lowest < above)
    hits = on_frontier[right] & (macs == lowest[right])
    index = torch.arange(right.numel())
    first = torch.full((top + 1,), right.numel(), dtype=torch.long).scatter_reduce(
        0, right[hits], index[hits], reduce="amin")
    return first[on_frontier]


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BranchifyError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def sweep(model: nn.Module, train_loader: Iterable, val_loader: Iterable, *, example_inputs=None,
          candidates: Sequence[str] | None = None, head: HeadSpec | None = None, epochs: int = 3,
          lr: float = 3e-3, max_exits: int = 3, max_accuracy_drop: float = 0.01, criterion: str = "entropy",
          seed: int = 0, progress: bool = True, capture: str = "auto", leaf_modules: list[type] | None = None,
          output: str | int | None = None) -> SweepResult:
    """Train a head at every candidate exit point at once and propose the best set of exits.

    ``train_loader`` and ``val_loader`` yield (inputs, class index) pairs. The backbone stays frozen
    (and unchanged); heads train together, ``epochs`` epochs of Adam at ``lr``, one backbone
    forward per batch. On val: each head's forced top-1, then the set of at most ``max_exits``
    exits with the fewest expected MACs whose accuracy drop against the final exit is at most
    ``max_accuracy_drop``, and the Pareto frontier. Deterministic under ``seed``.
    ``example_inputs`` (default: one val sample) sizes the MAC count. ``capture``, ``leaf_modules`` and
    ``output`` mean what they mean for ``bx.attach_exits``.

    >>> import torch, torchvision, branchify as bx
    >>> model = torchvision.models.resnet18(num_classes=3)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=8)
    >>> result = bx.sweep(model, loader, loader, epochs=1, max_exits=1, progress=False)
    >>> result.table[0].layer, all(row.macs_fraction < 0.99 for row in result.table)
    ('conv1', True)
    """
    if not isinstance(model, nn.Module):
        raise BranchifyError(f"sweep needs the model (a torch.nn.Module), got {type(model).__name__}")
    epochs = _check_int("epochs", epochs, 1)
    max_exits = _check_int("max_exits", max_exits, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise BranchifyError(f"lr must be a positive number, got {lr!r}")
    if (isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float))
            or not 0 <= max_accuracy_drop <= 1):
        raise BranchifyError(
            f"max_accuracy_drop must be a fraction in [0, 1], got {max_accuracy_drop!r}; e.g. 0.01 for one point")
    head = head if head is not None else HeadSpec()
    if not isinstance(head, HeadSpec):
        raise BranchifyError(f"head must be a bx.HeadSpec, got {type(head).__name__}")
    get_criterion(criterion)
    settings = {"epochs": epochs, "lr": float(lr), "max_exits": max_exits,
                "max_accuracy_drop": float(max_accuracy_drop), "criterion": criterion, "seed": seed,
                "head": head.model_dump(mode="json")}

    captured = {"capture": capture, "leaf_modules": leaf_modules, "output": output}
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # the seed governs the sweep without touching the caller's RNG
        torch.manual_seed(seed)
        if example_inputs is None:
            inputs, _ = split_batch(next(iter(val_loader)))
            example_inputs = inputs.map(lambda x: x[:1])
        if candidates is None:
            candidates = default_candidates(model, example_inputs, **captured)
            if not candidates:
                raise BranchifyError(
                    "the model has no exit point below 99% of its MACs; pass candidates=[...] "
                    "(see bx.list_exit_points(model, example_inputs, all_nodes=True))")
        else:
            if isinstance(candidates, str) or not candidates:
                raise BranchifyError(f"candidates must be a non-empty list of layer names, got {candidates!r}")
            candidates = list(candidates)
        spec = ExitSpec(exits=[ExitPoint(layer=c, head=head) for c in candidates], criterion=criterion)
        module = attach_exits(model, spec, example_inputs, **captured)
        train_heads(module, train_loader, epochs=epochs, lr=lr, progress=progress)

    cached = collect_logits(module, val_loader, progress=progress, desc="sweep: caching val logits")
    costs = exit_costs(module, example_inputs)
    layers = module.exit_spec.layers
    correct = cached.correct()
    table = [SweepRow(layer=layer, macs_fraction=costs.backbone[i] / costs.original,
                      exit_fraction=(costs.backbone[i] + costs.heads[i]) / costs.original,
                      accuracy=float(correct[i].double().mean()),
                      params=sum(p.numel() for p in module.exit_heads[i].parameters()),
                      head_macs=costs.heads[i])
             for i, layer in enumerate(layers)]
    states = {layer: {k: v.detach().cpu().clone() for k, v in module.exit_heads[i].state_dict().items()}
              for i, layer in enumerate(layers)}

    crit = get_criterion(criterion)
    n, m = cached.samples, len(layers)
    final_correct = int(correct[-1].sum())
    if crit.across_exits:
        tables = _patience_tables(cached, correct, costs, layers, criterion)
    else:
        tables = _grid_tables(cached, correct, costs, layers, crit)
    sets = [c for size in range(1, min(max_exits, m) + 1) for c in itertools.combinations(range(m), size)]
    best_key, best_set = None, None
    points_macs, points_right, points_where = [], [], []
    for chosen in tqdm(sets, desc="sweep: searching exit sets", disable=not progress, leave=False):
        right, macs, thresholds_of = tables(chosen)
        flat, met = select(right, macs, samples=n, final_correct=final_correct, target="max_accuracy_drop",
                           value=max_accuracy_drop, original=costs.original)
        if met:
            key = (float(macs.reshape(-1)[flat]), -int(right.reshape(-1)[flat]), len(chosen))
            if best_key is None or key < best_key:
                best_key, best_set = key, chosen
        keep = _pareto(macs.reshape(-1), right.reshape(-1))
        points_macs.append(macs.reshape(-1)[keep])
        points_right.append(right.reshape(-1)[keep])
        points_where.extend((chosen, thresholds_of(int(f))) for f in keep)
    assert best_set is not None  # every set meets a non-negative target with its exits off

    frontier = _frontier(points_macs, points_right, points_where, layers, costs, n, final_correct)
    chosen_spec = ExitSpec(exits=[module.exit_spec.exits[i] for i in best_set], criterion=criterion)
    sub_cached = Cached([cached.exit_logits[i] for i in best_set], cached.final, cached.targets,
                        cached.example_inputs)
    steps = max(default_grid_size(len(best_set)), _SEARCH_STEPS)
    best = calibrate_cached(chosen_spec, sub_cached, subset_costs(costs, best_set), target="max_accuracy_drop",
                            value=float(max_accuracy_drop), guarantee=False, grid_size=steps)
    if best.mac_fraction >= 1.0:
        warnings.warn(
            f"no set of at most {max_exits} exits saves compute within max_accuracy_drop={max_accuracy_drop:g} on "
            f"the {n} val samples (the best needs {best.mac_fraction:.1%} of the original MACs); train the backbone "
            "or the heads longer, allow a larger drop, or try other candidates", UserWarning, stacklevel=2)
    return SweepResult(table=table, best=best, frontier=frontier, head_state_dicts=states,
                       final_accuracy=final_correct / n, samples=n, sets_searched=len(sets), settings=settings)


def _grid_tables(cached: Cached, correct: torch.Tensor, costs: ExitCosts, layers: list[str], crit):
    """Per exit set, the correct counts and MACs of every threshold combination on the grid."""
    scores = [crit.score(z, cached.targets) for z in cached.exit_logits]
    ladders = [candidate_thresholds(s, crit, _SEARCH_STEPS, where=f"candidate {layers[i]!r}: ")
               for i, s in enumerate(scores)]
    rungs = [first_rung(s, crit, ladder) for s, ladder in zip(scores, ladders)]
    m = len(layers)

    def tables(chosen: tuple[int, ...]):
        sizes = [len(ladders[i]) for i in chosen]
        right, macs = outcome_tables([rungs[i] for i in chosen], sizes, correct[[*chosen, m]],
                                     subset_costs(costs, chosen))

        def thresholds_of(flat: int) -> tuple[float | None, ...]:
            cell = torch.unravel_index(torch.tensor(flat), tuple(sizes))
            return tuple(ladders[i][int(j)] for i, j in zip(chosen, cell))

        return right, macs, thresholds_of

    return tables


def _patience_tables(cached: Cached, correct: torch.Tensor, costs: ExitCosts, layers: list[str], criterion: str):
    """Per exit set, the correct counts and MACs of each patience (off, then 1 .. the set's size)."""
    m, n = len(layers), cached.samples

    def tables(chosen: tuple[int, ...]):
        candidates = [None, *map(float, range(1, len(chosen) + 1))]
        sub = subset_costs(costs, chosen)
        right, macs = [], []
        for t in candidates:
            if t is None:
                taken, paid = torch.full((n,), len(chosen), dtype=torch.int64), sub.judging([False] * len(chosen))
            else:
                spec = ExitSpec(exits=[ExitPoint(layer=layers[i], threshold=t) for i in chosen], criterion=criterion)
                taken, paid = route(spec, [cached.exit_logits[i] for i in chosen]), sub
            right.append(int(correct[[*chosen, m]][taken, torch.arange(n)].sum()))
            macs.append(float(torch.tensor(paid.per_exit, dtype=torch.float64)[taken].sum()))
        return (torch.tensor(right), torch.tensor(macs, dtype=torch.float64),
                lambda flat: (candidates[flat],) * len(chosen))

    return tables


def _frontier(points_macs: list[torch.Tensor], points_right: list[torch.Tensor],
              points_where: list[tuple[tuple[int, ...], tuple[float | None, ...]]], layers: list[str],
              costs: ExitCosts, n: int, final_correct: int) -> list[FrontierPoint]:
    macs = torch.cat([*points_macs, torch.tensor([costs.original * n], dtype=torch.float64)])
    right = torch.cat([*points_right, torch.tensor([final_correct])])
    frontier = []
    for index in _pareto(macs, right).tolist():
        if index == len(points_where):
            frontier.append(FrontierPoint((), (), 1.0, final_correct / n))
            continue
        chosen, thresholds = points_where[index]
        frontier.append(FrontierPoint(layers=tuple(layers[i] for i in chosen), thresholds=thresholds,
                                      mac_fraction=float(macs[index]) / (costs.original * n),
                                      accuracy=int(right[index]) / n))
    return frontier
