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

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .._inputs import split_batch
from ..calibration.cache import Cached, collect_logits
from ..calibration.grid import default_grid_size, select
from ..calibration.search import calibrate_cached
from ..cost import exit_costs
from ..criteria import get_criterion
from ..errors import BranchifyError, ExitOrderError
from ..points import list_exit_points
from ..spec import ExitPoint, ExitSpec, HeadSpec
from ..surgery import attach_exits
from .heads import train_heads
from .result import SweepResult, SweepRow
from .tables import _SEARCH_STEPS, _frontier, _grid_tables, _pareto, _patience_tables, subset_costs

__all__ = ["sweep"]

LAST_POINT_FRACTION = 0.99


def default_candidates(model: nn.Module, example_inputs, **capture) -> list[str]:
    """The exit points of ``model`` below 99% of its MACs (an exit at the very end saves nothing)."""
    points = list_exit_points(model, example_inputs, **capture)
    return [p.name for p in points if p.macs_fraction < LAST_POINT_FRACTION]


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
        try:
            module = attach_exits(model, spec, example_inputs, **captured)
        except ExitOrderError as err:  # candidates are a set to search: any order the user lists them in will do
            spec = ExitSpec(exits=[ExitPoint(layer=c, head=head) for c in err.graph_order], criterion=criterion)
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
