"""What ``ExitStats`` reports: one row per exit, the totals, the MACs, and where each class leaves."""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import Any

__all__ = ["ClassRow", "ExitRow", "ExitStatsSummary"]

_MEGA = 1e6


@dataclass(frozen=True)
class ExitRow:
    """One exit's figures in an ``ExitStatsSummary``; percentages are 0-100, as Distiller printed them.

    ``exit`` counts from 0; the last row is the final exit (``layer == "final"``). ``taken`` and
    ``percent`` are the samples that left here and their share of all samples (routed mode; None in
    forced mode). ``accuracy`` maps ``"top1"``, ``"top5"``, ... to the accuracy over the samples
    judged here (taken ones when routed, all when forced); None when none were, or without labels.
    ``loss`` is the mean cross-entropy over all samples (forced mode); ``macs`` the MACs a sample
    leaving here costs (when the stats were given costs).

    >>> import branchify as bx
    >>> row = bx.stats.ExitRow(exit=0, layer="layer1", taken=3, percent=75.0, accuracy={"top1": 100.0},
    ...                        loss=None, macs=None)
    >>> row.accuracy["top1"]
    100.0
    """

    exit: int
    layer: str
    taken: int | None
    percent: float | None
    accuracy: dict[str, float] | None
    loss: float | None
    macs: float | None


@dataclass(frozen=True)
class ExitStatsSummary:
    """The figures ``ExitStats`` has accumulated, as data; percentages are 0-100.

    ``exits`` holds one ``ExitRow`` per exit, the final one last. ``totals`` is the top-k accuracy
    over all samples with early exits taken (routed mode with labels). With costs:
    ``original_macs`` (the unmodified model), and in routed mode ``expected_macs`` (per sample,
    given the shares taken) and ``saving_percent`` (``100 * (1 - expected / original)``).
    ``per_class`` (routed mode with labels): for each class seen, where its samples leave and how
    accurate each exit is on them (``ClassRow``). ``lines()`` gives the report's lines, ``to_dict()``
    plain data for JSON.

    >>> import torch, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)])
    >>> stats = bx.ExitStats(spec)
    >>> stats.update((torch.tensor([[9.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 9.0], [0.0, 9.0]])),
    ...              torch.tensor([0, 1]))
    >>> summary = stats.summary()
    >>> [row.taken for row in summary.exits], summary.totals["top1"]
    ([1, 1], 100.0)
    >>> summary.to_dict()["exits"][0]["percent"]
    50.0
    """

    mode: str
    samples: int
    num_classes: int
    topk: tuple[int, ...]
    exits: tuple[ExitRow, ...]
    totals: dict[str, float] | None
    original_macs: float | None
    expected_macs: float | None
    saving_percent: float | None
    per_class: tuple[ClassRow, ...] | None = None

    @property
    def labeled(self) -> bool:
        """Whether accuracy was measured (targets were given)."""
        return self.mode == "forced" or self.totals is not None

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data (dicts, lists, numbers, strings), ready for ``json.dumps``."""
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The report's lines: Distiller's, in Distiller's order and formats, then the MACs."""
        rows = self.exits
        lines: list[str] = []
        if self.mode == "routed":
            lines += [f"Exit {r.exit}: {r.taken}" for r in rows if r.taken]
            lines += [f"Percent Early Exit {r.exit}: {r.percent:.3f}" for r in rows if r.taken]
            if self.totals is None:
                lines.append("Accuracy not measured: update() was given no targets")
            else:
                # Distiller prints 0 for an exit that no sample took
                lines += [f"Accuracy Stats for exit {r.exit}: {self._topk_text(r.accuracy)}" for r in rows]
                lines.append(f"Totals for entire network with early exits: {self._topk_text(self.totals)}")
        else:
            lines += [f"Accuracy Stats for exit {r.exit}: {self._topk_text(r.accuracy)}" for r in rows]
            lines += [f"Mean loss for exit {r.exit}: {r.loss:.5f}" for r in rows]
        if self.original_macs is not None:
            for r in rows:
                which = " (final)" if r.layer == "final" else ""
                lines.append(f"MACs at exit {r.exit}{which}: {r.macs / _MEGA:.3f} MMACs")
            lines.append(f"MACs of the original model: {self.original_macs / _MEGA:.3f} MMACs")
            if self.expected_macs is not None:
                lines.append(f"Expected MACs per sample: {self.expected_macs / _MEGA:.3f} MMACs")
                lines.append(f"Saving vs the original model: {self.saving_percent:.3f}%")
        return lines

    def explanations(self) -> list[str]:
        """What Distiller's lines leave unexplained: an exit nobody took prints top1 = 0, and exits that let few
        samples out cost more than they save."""
        if self.mode != "routed":
            return []
        notes = []
        idle = [r for r in self.exits if not r.taken]
        if idle and self.totals is not None:
            notes.append(f"Note: no sample left at exit{'s' if len(idle) > 1 else ''} "
                         f"{', '.join(str(r.exit) for r in idle)}, so {'their' if len(idle) > 1 else 'its'} "
                         "accuracy above reads 0 (Distiller's convention), not a measured 0%")
        if self.saving_percent is not None and self.saving_percent < 0:
            notes.append(f"Note: the saving is negative: every sample pays for the heads it is judged by "
                         f"({self.expected_macs / _MEGA:.3f} MMACs expected against {self.original_macs / _MEGA:.3f} "
                         "without exits), and too few leave early to make up for them; loosen the thresholds "
                         "(bx.calibrate) or drop the exits nobody takes")
        return notes

    def _topk_text(self, accuracy: dict[str, float] | None) -> str:
        return ", ".join(f"top{k} = {(accuracy or {}).get(f'top{k}', 0.0):.3f}" for k in self.topk)

    def _grid(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Column names, one row of cells per exit, and notes below the table."""
        routed, costs = self.mode == "routed", self.original_macs is not None
        names = ["exit", "layer"] + (["taken", "percent"] if routed else [])
        keys = [f"top{k}" for k in self.topk] if self.labeled else []
        names += keys + ([] if routed else ["loss"]) + (["MMACs"] if costs else [])

        def cells(exit_, layer, taken, percent, accuracy, loss, macs) -> list[str]:
            out = [str(exit_), layer] + ([str(taken), f"{percent:.3f}"] if routed else [])
            out += [f"{accuracy[k]:.3f}" if accuracy else "-" for k in keys]
            out += [] if routed else [f"{loss:.5f}"]
            return out + ([f"{macs / _MEGA:.3f}"] if costs else [])

        grid = [cells(r.exit, r.layer, r.taken, r.percent, r.accuracy, r.loss, r.macs) for r in self.exits]
        if routed:
            grid.append(cells("all", "", self.samples, 100.0, self.totals, None, self.expected_macs or 0.0))
        notes = []
        if costs:
            notes.append(f"original model: {self.original_macs / _MEGA:.3f} MMACs")
            if self.saving_percent is not None:
                notes.append(f"expected saving: {self.saving_percent:.3f}%")
        return names, grid, [*notes, *self.explanations()]

    def __repr__(self) -> str:
        names, grid, notes = self._grid()
        widths = [max(len(row[j]) for row in [names, *grid]) for j in range(len(names))]
        head = f"ExitStatsSummary(mode={self.mode!r}, samples={self.samples}, num_classes={self.num_classes})"
        body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [names, *grid]]
        return "\n".join([head, *body, *notes, *self._class_lines()])

    def _class_grid(self) -> tuple[list[str], list[list[str]]]:
        k = len(self.exits)
        names = ["class", "samples"] + [f"exit {i} % (top1)" if i < k - 1 else "final % (top1)" for i in range(k)]
        grid = [[str(row.label), str(row.samples)]
                + [f"{p:.1f} ({'-' if a is None else f'{a:.1f}'})" for p, a in zip(row.percent, row.accuracy)]
                for row in self.per_class or ()]
        return names, grid

    def _class_lines(self) -> list[str]:
        if not self.per_class:
            return []
        names, grid = self._class_grid()
        widths = [max(len(row[j]) for row in [names, *grid]) for j in range(len(names))]
        return ["per class: share leaving at each exit, and the top-1 accuracy there",
                *["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [names, *grid]]]

    def _repr_html_(self) -> str:
        names, grid, notes = self._grid()
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in grid)
        caption = html.escape(f"ExitStatsSummary: {self.mode}, {self.samples} samples, {self.num_classes} classes")
        foot = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        table = f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>{foot}"
        if self.per_class:
            names, grid = self._class_grid()
            head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in grid)
            table += (f"<table><caption>per class: share leaving at each exit (top-1 accuracy there)</caption>"
                      f"<tr>{head}</tr>{body}</table>")
        return table


@dataclass(frozen=True)
class ClassRow:
    """Where the samples of one class leave: ``percent[i]`` of its ``samples`` leave at exit ``i`` (the final
    one last, 0-100), with top-1 accuracy ``accuracy[i]`` among them (None where none leave)."""

    label: int
    samples: int
    percent: tuple[float, ...]
    accuracy: tuple[float | None, ...]

    @classmethod
    def of(cls, label: int, counts_hits: list[list[int]]) -> ClassRow:
        samples = sum(n for n, _ in counts_hits)
        return cls(label, samples, tuple(100.0 * n / samples for n, _ in counts_hits),
                   tuple(100.0 * hit / n if n else None for n, hit in counts_hits))
