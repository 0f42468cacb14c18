"""Early-exit statistics: where samples leave, how accurate each exit is, and Distiller's report.

Two modes, as in Distiller. ``"forced"`` (training): every exit is judged on every sample, as if
every sample left there: top-k accuracy and mean cross-entropy per exit. ``"routed"``
(evaluation): each sample takes the first exit whose criterion fires, else the final one; per exit,
the samples taken, their share and the top-k accuracy over them; totals over all samples.

Counts accumulate as integer tensors on the outputs' device, one ``index_add_`` per batch, so
``update`` neither loops over samples nor waits for the device; numbers reach the host only in
``summary()``/``report()``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Literal, TextIO

import torch
import torch.nn.functional as F

from ._outputs import split_outputs
from ._rows import by_rows
from .cost import ExitCosts
from .criteria import get_criterion
from .errors import BranchifyError
from .exits import Exits
from .routing import route
from .spec import ExitSpec
from .summary import ClassRow, ExitRow, ExitStatsSummary

__all__ = ["ExitRow", "ExitStats", "ExitStatsSummary"]

Mode = Literal["routed", "forced"]


class ExitStats:
    """Accumulate early-exit statistics over batches and print them as Distiller did.

    ``mode="routed"`` (evaluation) routes each sample with the spec's criteria and thresholds;
    ``mode="forced"`` (training) judges every exit on every sample. ``topk`` values above the
    number of classes are clipped to it (Distiller's top-5 on 3 classes is a top-3). With
    ``costs`` (``bx.exit_costs(module, x)``) the report adds MACs per exit, the expected MACs per
    sample and the saving against the original model. Pass ``module.exit_spec``: exits are in
    graph order there, as in the module's outputs.

    The ``"distiller"`` criterion reads the labels, so it is accepted with a warning, to reproduce
    Distiller's numbers only.

    >>> import torch, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)])
    >>> stats = bx.ExitStats(spec, topk=(1, 5))
    >>> outputs = (torch.tensor([[9.0, 0, 0], [0, 0, 0]]), torch.tensor([[0, 9.0, 0], [0, 0, 9.0]]))
    >>> stats.update(outputs, torch.tensor([0, 1]))
    >>> text = stats.report()
    Exit 0: 1
    Exit 1: 1
    Percent Early Exit 0: 50.000
    Percent Early Exit 1: 50.000
    Accuracy Stats for exit 0: top1 = 100.000, top5 = 100.000
    Accuracy Stats for exit 1: top1 = 0.000, top5 = 100.000
    Totals for entire network with early exits: top1 = 50.000, top5 = 100.000
    """

    def __init__(self, spec: ExitSpec, *, topk: Sequence[int] = (1, 5), mode: Mode = "routed",
                 costs: ExitCosts | None = None) -> None:
        if not isinstance(spec, ExitSpec):
            made = isinstance(spec, Exits)
            hint = " (for a module made by bx.attach_exits, pass module.exit_spec)" if made else ""
            raise BranchifyError(f"ExitStats needs a bx.ExitSpec, got {type(spec).__name__}{hint}")
        if mode not in ("routed", "forced"):
            raise BranchifyError(
                f"mode={mode!r}; use 'routed' (evaluation: each sample takes its first firing exit) or "
                "'forced' (training: every exit judged on every sample)")
        self.spec = spec
        self.mode: Mode = mode
        self.topk = _checked_topk(topk)
        self.costs = _checked_costs(costs, spec)
        k = len(spec.exits)
        self._label_exits = [i for i in range(k) if get_criterion(spec.criterion_of(i)).needs_labels]
        if mode == "routed":
            if spec.thresholds is None:
                raise BranchifyError(
                    "routed statistics send each sample out of the first exit whose criterion passes its "
                    "threshold, but no exit of the spec has a threshold; give the exits thresholds "
                    "(spec.with_exits(threshold=[...]); an exit left without one is off), calibrate them with "
                    "bx.calibrate, or use mode='forced' for training statistics")
            if self._label_exits:
                names = sorted({spec.criterion_of(i) for i in self._label_exits})
                warnings.warn(
                    f"criterion {', '.join(map(repr, names))} (exits {self._label_exits}) scores each sample by its "
                    "loss against the label, so it decides with the answer in hand (below a threshold of ln 2 "
                    "every sample it lets out is correct); it cannot run without labels, so use it only to "
                    "reproduce Distiller's numbers and deploy a label-free criterion such as 'entropy'",
                    UserWarning, stacklevel=2)
        self.reset()

    def merge(self, other: ExitStats) -> ExitStats:
        """Add ``other``'s samples to these statistics (the same spec, mode and top-k); returns ``self``.

        For statistics gathered in pieces: on shards of the data, in threads that each keep their own
        ``ExitStats`` (the pattern to use for concurrent updates: one per thread, merged at the end).

        >>> import torch, branchify as bx
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5)])
        >>> one, two = bx.ExitStats(spec), bx.ExitStats(spec)
        >>> one.update((torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 9.0]])), torch.tensor([0]))
        >>> two.update((torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 9.0]])), torch.tensor([1]))
        >>> [row.taken for row in one.merge(two).summary().exits]
        [1, 1]
        """
        if not isinstance(other, ExitStats):
            raise BranchifyError(f"merge needs another bx.ExitStats, got {type(other).__name__}")
        if (other.spec, other.mode, other.topk) != (self.spec, self.mode, self.topk):
            raise BranchifyError(
                "these statistics differ in spec, mode or topk from the ones merged in "
                f"(mode {self.mode!r} vs {other.mode!r}, topk {self.topk} vs {other.topk}, same spec: "
                f"{self.spec == other.spec}); merge statistics made with the same arguments")
        self._counts.add(other._counts)
        return self

    def all_reduce(self, group=None) -> ExitStats:
        """Sum the statistics of every rank of ``group`` (torch.distributed), in place; returns ``self``.

        Each rank updates on its own shard of the data (a ``DistributedSampler``); after this every
        rank's ``summary()`` covers all of it. A rank that saw no batch takes part too. Collective:
        every rank of the group must call it.
        """
        self._counts.all_reduce(group)
        return self

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._counts = _Counts(len(self.spec.exits), max(self.topk))

    def update(self, outputs: Sequence, target: torch.Tensor | None = None) -> None:
        """Add one batch: the module's outputs ``(exit_0, ..., final)`` and the class indices.

        ``target`` may be None in routed mode with label-free criteria: counts and shares are
        then measured, accuracy is not (and every update must then come without targets).
        """
        exits, final = split_outputs(outputs, len(self.spec.exits))
        counts = self._counts
        safe, invalid = _checked_target(counts, target, final, mode=self.mode, label_exits=self._label_exits)
        counts.start(int(final.shape[1]), final.device, labeled=safe is not None, invalid=invalid)
        if self.mode == "routed":
            counts.add_routed(route(self.spec, exits, safe), [*exits, final], safe)
        else:
            counts.add_forced([*exits, final], safe)

    def summary(self) -> ExitStatsSummary:
        """The accumulated figures as an ``ExitStatsSummary``."""
        return _summarise(self._counts, self.spec, self.mode, self.topk, self.costs)

    def report(self, file: TextIO | None = None) -> str:
        """Print the report (to ``file``, default stdout) and return its text.

        Routed: Distiller's ``Exit %d: %d``, ``Percent Early Exit %d: %.3f``, ``Accuracy Stats for
        exit %d: top1 = %.3f, top5 = %.3f`` and ``Totals for entire network with early exits: ...``
        lines, in that order; forced: the accuracy and mean loss of every exit. Then, with costs,
        the MACs at each exit, of the original model, expected per sample, and the saving. Last, a
        line for what Distiller's lines leave unexplained (``summary.explanations()``): an exit nobody
        took, whose accuracy reads 0, and a negative saving.
        """
        summary = self.summary()
        text = "\n".join([*summary.lines(), *summary.explanations()])
        print(text, file=file if file is not None else sys.stdout)
        return text


class _Counts:
    """The counting: integer tables on the outputs' device, one ``index_add_`` per batch, nothing read back.

    ``table`` (exits + 1, maxk + 1): samples by exit and the label's rank there (``maxk``: not in the top
    ``maxk``); ``loss``: summed cross-entropy per exit (forced); ``invalid``: targets out of range;
    ``per_class`` (classes, exits + 1, 2): per class and exit, the samples taken and the top-1 hits among
    them (routed with labels). None until the first batch fixes the classes and the device.
    """

    def __init__(self, exits: int, topk: int) -> None:
        self.exits, self.topk = exits, topk
        self.table: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.invalid: torch.Tensor | None = None
        self.per_class: torch.Tensor | None = None
        self.classes: int | None = None
        self.labeled: bool | None = None

    def allocate(self, classes: int, device: torch.device) -> None:
        k = self.exits
        maxk = min(self.topk, classes)
        self.table = torch.zeros(k + 1, maxk + 1, dtype=torch.int64, device=device)
        self.loss = torch.zeros(k + 1, dtype=torch.float64, device=device)
        self.invalid = torch.zeros((), dtype=torch.int64, device=device)
        self.per_class = torch.zeros(classes, k + 1, 2, dtype=torch.int64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.table, self.loss, self.invalid, self.per_class]

    def start(self, classes: int, device: torch.device, *, labeled: bool, invalid: torch.Tensor | None) -> None:
        """Begin a batch of ``classes`` classes on ``device`` (checked against the earlier ones already)."""
        if self.table is None:
            self.allocate(classes, device)
        self.classes, self.labeled = classes, labeled
        if invalid is not None:
            self.invalid += invalid

    @property
    def maxk(self) -> int:
        return self.table.shape[1] - 1

    def add_routed(self, taken: torch.Tensor, logits: list[torch.Tensor], target: torch.Tensor | None) -> None:
        """Count each sample at the exit it took (``taken``), with the label's rank there."""
        k, maxk = self.exits, self.maxk
        rank = torch.full_like(taken, maxk) if target is None else _taken_ranks(logits, taken, target, maxk)
        if target is not None:
            where = (target * (k + 1) + taken) * 2
            self.per_class.view(-1).index_add_(0, torch.cat([where, where + 1]),
                                               torch.cat([torch.ones_like(where), (rank == 0).long()]))
        self._add_cells(taken * (maxk + 1) + rank)

    def add_forced(self, logits: list[torch.Tensor], target: torch.Tensor) -> None:
        """Count every sample at every exit, with the label's rank and the loss there."""
        maxk = self.maxk
        ranks = torch.stack([_label_rank(z, target, maxk) for z in logits])
        offsets = torch.arange(self.exits + 1, device=ranks.device)[:, None] * (maxk + 1)
        self.loss += torch.stack([by_rows(_sample_losses, z, target).sum(dtype=torch.float64) for z in logits])
        self._add_cells((offsets + ranks).flatten())

    def _add_cells(self, cells: torch.Tensor) -> None:
        # index_add_ rather than bincount, which reads the largest index back to the host on CUDA
        self.table.view(-1).index_add_(0, cells, torch.ones_like(cells))

    def add(self, other: _Counts) -> None:
        """Add ``other``'s counts (``merge``)."""
        if other.table is None:
            return
        if self.table is None:
            self.allocate(other.classes, other.table.device)
        elif (other.classes, other.labeled) != (self.classes, self.labeled):
            raise BranchifyError(
                f"these statistics have {self.classes} classes and were given targets: {self.labeled}; the "
                f"ones merged in {other.classes} and {other.labeled}; merge statistics of one model, "
                "all with targets or all without")
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine += theirs.to(mine.device)
        self.classes, self.labeled = other.classes, other.labeled

    def all_reduce(self, group=None) -> None:
        """Sum every rank's counts (``ExitStats.all_reduce``)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise BranchifyError("all_reduce needs torch.distributed initialised (torchrun, dist.init_process_group); "
                                 "in one process use stats.merge(other)")
        if self.table is not None:
            device = self.table.device
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
                else torch.device("cpu")
        # Agree on what the tables look like first: the classes, and whether targets were given.
        mine = -1 if self.classes is None else self.classes
        labeled = -1 if self.labeled is None else int(self.labeled)
        facts = torch.tensor([mine, -mine if mine >= 0 else -(2**62), labeled, -labeled if labeled >= 0 else -2],
                             dtype=torch.int64, device=device)
        dist.all_reduce(facts, op=dist.ReduceOp.MAX, group=group)
        classes, lowest, labeled_max, labeled_min = int(facts[0]), -int(facts[1]), int(facts[2]), -int(facts[3])
        if classes < 0:
            return  # no rank saw a batch
        if lowest != classes or labeled_max != labeled_min:
            raise BranchifyError(
                "the ranks' statistics differ in the number of classes or in whether targets were given; every rank "
                "must measure the same model, all with targets or all without")
        if self.table is None:
            self.allocate(classes, device)
            self.classes, self.labeled = classes, bool(labeled_max)
        for counts in self.tensors():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)


def _checked_target(counts: _Counts, target, final: torch.Tensor, *, mode: Mode,
                    label_exits: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the batch against the earlier ones and the target against the outputs.

    Returns the target as int64 class indices clamped into range (None without target) and
    how many were out of range.
    """
    batch, classes, device = int(final.shape[0]), int(final.shape[1]), final.device
    if counts.classes is not None and classes != counts.classes:
        raise BranchifyError(
            f"these outputs have {classes} classes but earlier ones had {counts.classes}; call "
            "stats.reset() before measuring another model")
    if counts.table is not None and counts.table.device != device:
        raise BranchifyError(
            f"these outputs are on {device} but earlier ones were on {counts.table.device}; keep the model on "
            "one device, or call stats.reset() before switching")
    labeled = target is not None
    if counts.labeled is not None and labeled != counts.labeled:
        was = "with" if counts.labeled else "without"
        raise BranchifyError(
            f"earlier updates came {was} targets and this one does not match; give targets always or "
            "never, or call stats.reset() in between")
    if not labeled:
        if mode == "forced":
            raise BranchifyError("forced statistics measure accuracy and loss, so update() needs the target")
        if label_exits:
            raise BranchifyError(
                f"exits {label_exits} use a criterion that reads the labels ('distiller'), but no "
                "target was given; pass the target, or use a label-free criterion such as 'entropy'")
        return None, None
    if not isinstance(target, torch.Tensor):
        raise BranchifyError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise BranchifyError(
            f"target has dtype {target.dtype}; ExitStats needs class indices (an integer tensor); for "
            "one-hot or probability targets pass target.argmax(dim=1)")
    if tuple(target.shape) != (batch,):
        raise BranchifyError(
            f"target has shape {tuple(target.shape)} but the outputs have a batch of {batch}; pass one class "
            f"index per sample, shape ({batch},)")
    target = target.to(device=device, dtype=torch.int64, non_blocking=True)
    outside = (target < 0) | (target >= classes)
    invalid = outside.sum()
    # On the CPU the check is free; on an accelerator it would stall every batch, so the count is
    # kept on the device and reported by summary().
    if device.type == "cpu" and invalid:
        raise BranchifyError(
            f"target holds class indices {target[outside][:5].tolist()} outside 0..{classes - 1} (the outputs "
            f"have {classes} classes); pass class indices that fit the model")
    return target.clamp(0, classes - 1), invalid


def _summarise(counts: _Counts, spec: ExitSpec, mode: Mode, topk: tuple[int, ...],
               costs: ExitCosts | None) -> ExitStatsSummary:
    """The reporting: the counts read back once, as an ``ExitStatsSummary``."""
    if counts.table is None:
        raise BranchifyError("no statistics yet: call stats.update(outputs, target) for at least one batch")
    invalid = int(counts.invalid)
    if invalid:
        raise BranchifyError(
            f"{invalid} target(s) were outside 0..{counts.classes - 1} (the outputs have "
            f"{counts.classes} classes), so the statistics are wrong; call stats.reset() and pass class "
            "indices that fit the model")
    table = counts.table.tolist()
    taken = [sum(row) for row in table]
    routed = mode == "routed"
    samples = sum(taken) if routed else taken[0]
    if not samples:
        raise BranchifyError("no samples yet: every batch given to stats.update was empty")
    classes = counts.classes
    labeled = bool(counts.labeled)
    losses = counts.loss.tolist()
    per_exit = costs.per_exit if costs is not None else [None] * len(taken)
    rows = []
    for i, (row, n) in enumerate(zip(table, taken)):
        accuracy = None
        if labeled and n:
            accuracy = {f"top{k}": 100.0 * sum(row[:min(k, classes)]) / n for k in topk}
        rows.append(ExitRow(
            exit=i, layer=spec.exits[i].layer if i < len(spec.exits) else "final",
            taken=n if routed else None, percent=100.0 * n / samples if routed else None,
            accuracy=accuracy, loss=None if routed else losses[i] / samples, macs=per_exit[i]))
    totals = expected = saving = per_class = None
    if routed and labeled:
        per_class = tuple(ClassRow.of(c, counts_hits) for c, counts_hits in enumerate(counts.per_class.tolist())
                          if sum(n for n, _ in counts_hits))
        # Distiller's formula: each exit's accuracy weighted by its share of the samples
        totals = {f"top{k}": sum((r.accuracy or {}).get(f"top{k}", 0.0) * (r.taken / samples) for r in rows)
                  for k in topk}
    if routed and costs is not None:
        shares = [n / samples for n in taken]
        expected = costs.expected(shares)
        saving = 100.0 * costs.saving(shares)
    return ExitStatsSummary(
        mode=mode, samples=samples, num_classes=classes, topk=topk, exits=tuple(rows), totals=totals,
        original_macs=None if costs is None else costs.original, expected_macs=expected,
        saving_percent=saving, per_class=per_class)


def _sample_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="none")


def _compacts(device: torch.device) -> bool:
    """Whether to gather each exit's own samples before ranking them: on the CPU reading the counts costs
    nothing; on an accelerator it would wait for the device, so there every exit ranks every sample."""
    return device.type == "cpu"


def _taken_ranks(logits: Sequence[torch.Tensor], taken: torch.Tensor, target: torch.Tensor,
                 maxk: int) -> torch.Tensor:
    """Per sample, the label's rank (as ``_label_rank``) in the logits of the exit the sample took."""
    if not _compacts(taken.device):
        ranks = torch.stack([_label_rank(z, target, maxk) for z in logits])
        return ranks.gather(0, taken[None]).squeeze(0)
    rank = torch.empty_like(taken)
    for i, z in enumerate(logits):
        rows = (taken == i).nonzero().squeeze(1)
        if len(rows):
            rank[rows] = _label_rank(z.index_select(0, rows), target[rows], maxk)
    return rank


def _label_rank(logits: torch.Tensor, target: torch.Tensor, maxk: int) -> torch.Tensor:
    """Per sample, the label's position among the ``maxk`` top logits (``maxk`` when it is not there)."""
    hits = logits.topk(maxk, dim=1).indices == target[:, None]
    positions = torch.arange(maxk, device=logits.device)
    return torch.where(hits, positions, maxk).amin(dim=1)


def _checked_topk(topk: Sequence[int]) -> tuple[int, ...]:
    values = list(topk) if isinstance(topk, Sequence) and not isinstance(topk, str) else None
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise BranchifyError(f"topk={topk!r} must be a non-empty sequence of positive integers, e.g. (1, 5)")
    if len(set(values)) != len(values):
        raise BranchifyError(f"topk={topk!r} repeats a value; list each k once, e.g. (1, 5)")
    return tuple(sorted(values))


def _checked_costs(costs: ExitCosts | None, spec: ExitSpec) -> ExitCosts | None:
    if costs is None:
        return None
    if not isinstance(costs, ExitCosts):
        raise BranchifyError(f"costs must be the bx.ExitCosts of bx.exit_costs(module, x), got {type(costs).__name__}")
    if len(costs.exits) != len(spec.exits):
        raise BranchifyError(
            f"costs cover {len(costs.exits)} early exit(s) but the spec has {len(spec.exits)}; compute them from "
            "the same module: bx.exit_costs(module, x) with bx.ExitStats(module.exit_spec, ...)")
    return costs.judging(spec.judged)  # an exit this spec switches off is not charged
