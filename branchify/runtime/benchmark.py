"""Timing the runner against the original model in one run: ``bx.benchmark``.

The two run back to back on each batch, their order swapping every repeat (A B, then B A, ...), so
that the load of a shared machine, which drifts, falls on both alike; the device is synchronised
around every timed call. ``interleaved`` is that timing loop; ``benchmarks/runtime.py`` times its
variants with it too.

"The original model" is the runner's own stages run in turn on the whole batch, without heads or
routing: the model's computation exactly as the runner holds it (its final output equals the
module's final output). On the hook path, where there are no stages, it is the model itself.
"""

from __future__ import annotations

import functools
import html
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._inputs import Inputs, split_batch
from .._tables import html_table, text_table
from ..cost import exit_costs
from ..errors import BranchifyError
from .runner import ExitRunner

__all__ = ["BenchmarkResult", "BenchmarkRow", "benchmark", "interleaved", "synchronize"]

clock = time.perf_counter  # the clock every timing reads
SPREAD_LIMIT = 0.10  # an interquartile range above 10% of the median: the machine is too loaded to trust times


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA, MPS), so that a clock read after it has finished.

    >>> from branchify.runtime.benchmark import synchronize
    >>> synchronize("cpu")  # the CPU runs synchronously: nothing to wait for
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


def interleaved(units: Sequence[Mapping[str, Callable[[], object]]], repeats: int,
                device: torch.device | str | None = None, *, shuffle: bool = False) -> dict[str, list[float]]:
    """Each variant's seconds over all ``units`` in each repeat, under ``torch.inference_mode``.

    A unit maps variant names to calls (one unit per batch, say). The variants run back to back on
    each unit, in an order that rotates every repeat; one untimed pass warms them up first. A rotation
    keeps each variant after the same one (with three or more, whatever that one leaves in the caches,
    or evicts, falls on it alone): ``shuffle=True`` draws the order at random for every unit and repeat
    instead (seeded, so that runs repeat).

    >>> from branchify.runtime.benchmark import interleaved
    >>> totals = interleaved([{"a": lambda: None, "b": lambda: None}], repeats=3)
    >>> sorted(totals), len(totals["a"])
    (['a', 'b'], 3)
    """
    names = list(units[0])
    totals: dict[str, list[float]] = {name: [] for name in names}
    draw = random.Random(0)
    with torch.inference_mode():
        for unit in units:  # warm-up: first-call allocations, lazy initialisation, MAC counts
            for fn in unit.values():
                fn()
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            spent = dict.fromkeys(names, 0.0)
            for unit in units:
                if shuffle:
                    order = draw.sample(names, len(names))
                for name in order:
                    synchronize(device)
                    start = clock()
                    unit[name]()
                    synchronize(device)
                    spent[name] += clock() - start
            for name in names:
                totals[name].append(spent[name])
    return totals


def _spread(seconds: Sequence[float]) -> float:
    """The interquartile range over the median."""
    q1, q2, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return (q3 - q1) / q2 if q2 > 0 else 0.0


@dataclass(frozen=True)
class BenchmarkRow:
    """One batch size: ``batches`` batches of ``batch_size`` samples, timed ``repeats`` times each way.

    ``model_seconds`` and ``runner_seconds`` hold each repeat's total over all batches; the rest is
    derived from their medians: latency (seconds per batch), throughput (samples per second), their
    spreads (interquartile range over the median), ``speedup`` (the model's median over the
    runner's). ``mac_fraction``: the runner's mean MACs per sample over the original model's (from
    its ``ExitResult.macs``), so ``mac_saving = 1 - mac_fraction`` and ``mac_speedup = 1 /
    mac_fraction`` is the speedup the MACs alone promise. ``shares``: where the samples left, the
    final exit last.

    >>> row = BenchmarkRow(64, 2, (0.2, 0.3, 0.2), (0.1, 0.1, 0.12), 0.5, (0.5, 0.5))
    >>> row.speedup, row.model_latency, row.mac_speedup
    (2.0, 0.1, 2.0)
    """

    batch_size: int
    batches: int
    model_seconds: tuple[float, ...]
    runner_seconds: tuple[float, ...]
    mac_fraction: float
    shares: tuple[float, ...]

    @property
    def samples(self) -> int:
        return self.batch_size * self.batches

    @property
    def model_latency(self) -> float:
        """Median seconds per batch of the original model."""
        return statistics.median(self.model_seconds) / self.batches

    @property
    def runner_latency(self) -> float:
        """Median seconds per batch of the runner."""
        return statistics.median(self.runner_seconds) / self.batches

    @property
    def model_throughput(self) -> float:
        """Samples per second of the original model (at the median)."""
        return self.samples / statistics.median(self.model_seconds)

    @property
    def runner_throughput(self) -> float:
        """Samples per second of the runner (at the median)."""
        return self.samples / statistics.median(self.runner_seconds)

    @property
    def model_spread(self) -> float:
        return _spread(self.model_seconds)

    @property
    def runner_spread(self) -> float:
        return _spread(self.runner_seconds)

    @property
    def speedup(self) -> float:
        """The original model's median time over the runner's."""
        return statistics.median(self.model_seconds) / statistics.median(self.runner_seconds)

    @property
    def mac_saving(self) -> float:
        return 1.0 - self.mac_fraction

    @property
    def mac_speedup(self) -> float:
        """The speedup if time followed the MACs: the original's MACs over the runner's."""
        return 1.0 / self.mac_fraction

    def to_dict(self) -> dict[str, Any]:
        keys = ("batch_size", "batches", "samples", "model_latency", "runner_latency", "model_throughput",
                "runner_throughput", "model_spread", "runner_spread", "speedup", "mac_fraction", "mac_saving",
                "mac_speedup")
        data = {key: getattr(self, key) for key in keys}
        data.update(shares=list(self.shares), model_seconds=list(self.model_seconds),
                    runner_seconds=list(self.runner_seconds))
        return data


@dataclass(frozen=True, repr=False)
class BenchmarkResult:
    """``bx.benchmark``'s measurements: a ``BenchmarkRow`` per batch size, and how they were taken.

    ``loaded`` is True when some spread exceeds ``spread_limit``: the times are then unreliable,
    the ratios less so (both sides met the same load). ``repr`` gives a text table,
    ``_repr_html_`` the same as HTML, ``to_dict()`` plain data.

    >>> result = BenchmarkResult((BenchmarkRow(1, 4, (0.4, 0.4), (0.2, 0.2), 0.5, (0.5, 0.5)),), 2, "cpu", 2, 1e6)
    >>> print(result)  # doctest: +NORMALIZE_WHITESPACE
    BenchmarkResult: ExitRunner against the original model, cpu, 2 threads, 2 interleaved repeats (medians;
    spread: interquartile range over the median)
      batch  model ms/batch  runner ms/batch  model samples/s  runner samples/s  speedup  MACs saved  MAC-ideal
      1      100 (0%)        50 (0%)          10               20                2.00x    50.0%       2.00x
    >>> result.loaded
    False
    """

    rows: tuple[BenchmarkRow, ...]
    repeats: int
    device: str
    threads: int
    original_macs: float
    spread_limit: float = SPREAD_LIMIT

    @property
    def spread(self) -> float:
        """The largest spread of any timing."""
        return max(max(row.model_spread, row.runner_spread) for row in self.rows)

    @property
    def loaded(self) -> bool:
        return self.spread > self.spread_limit

    def to_dict(self) -> dict[str, Any]:
        """The settings and every row as JSON-ready values."""
        return {"repeats": self.repeats, "device": self.device, "threads": self.threads,
                "original_macs": self.original_macs, "spread_limit": self.spread_limit, "spread": self.spread,
                "loaded": self.loaded, "rows": [row.to_dict() for row in self.rows]}

    _HEADER = ["batch", "model ms/batch", "runner ms/batch", "model samples/s", "runner samples/s", "speedup",
               "MACs saved", "MAC-ideal"]

    def _rows(self) -> list[list[str]]:
        return [[str(r.batch_size), f"{1e3 * r.model_latency:.4g} ({r.model_spread:.0%})",
                 f"{1e3 * r.runner_latency:.4g} ({r.runner_spread:.0%})", f"{r.model_throughput:,.0f}",
                 f"{r.runner_throughput:,.0f}", f"{r.speedup:.2f}x", f"{r.mac_saving:.1%}", f"{r.mac_speedup:.2f}x"]
                for r in self.rows]

    def _lines(self) -> list[str]:
        lines = [f"BenchmarkResult: ExitRunner against the original model, {self.device}, {self.threads} threads, "
                 f"{self.repeats} interleaved repeats (medians; spread: interquartile range over the median)"]
        if self.loaded:
            lines.append(f"The spread reaches {self.spread:.0%} (above {self.spread_limit:.0%}): the machine is "
                         "loaded; read the ratios, not the absolute times.")
        return lines

    def __repr__(self) -> str:
        return "\n".join([*self._lines(), text_table(self._HEADER, self._rows())])

    def _repr_html_(self) -> str:
        lines = "<br>".join(html.escape(line) for line in self._lines())
        return f"<div><p>{lines}</p>{html_table(self._HEADER, self._rows())}</div>"


def benchmark(runner: ExitRunner, inputs, batch_sizes: Sequence[int] = (1, 64), repeats: int = 5) -> BenchmarkResult:
    """Time ``runner`` against the original model at each batch size, interleaved, and count the MACs saved.

    ``inputs``: a tensor of samples (or a dict of named tensors), or a loader of batches (``(inputs,
    target)`` pairs, dicts, or tensors); the samples are pooled, moved to the runner's device and cut
    into batches of each size (``len // size`` full batches; keep it to a few hundred samples, as batch
    1 runs them one by one). Each way runs ``repeats`` times after a warm-up, A B then B A, ...; the
    result holds medians, spreads, throughputs, the speedup, the MAC saving of the runner's
    decisions and the MAC-ideal speedup. A ``UserWarning`` says when the spread exceeds 10% (a loaded
    machine): then read the ratios, not the absolute times.

    >>> import torch, branchify as bx
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(288, 4))
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)])
    >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 3, 8, 8)).eval())
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # timings this short spread on a busy machine, which warns
    ...     result = bx.benchmark(runner, torch.randn(8, 3, 8, 8), batch_sizes=(1, 4), repeats=3)
    >>> [(row.batch_size, row.batches) for row in result.rows], 0 < result.rows[0].mac_fraction <= 1.01
    ([(1, 8), (4, 2)], True)
    """
    if not isinstance(runner, ExitRunner):
        raise BranchifyError(f"benchmark needs a bx.ExitRunner, got {type(runner).__name__}; build one with "
                             "bx.ExitRunner(module)")
    module = runner.core.module
    if module is None:
        raise BranchifyError(
            "this runner was loaded from a folder, without the module it was built from, so the original model's "
            "MACs are unknown; benchmark bx.ExitRunner(module) built from the module")
    sizes = _checked_sizes(batch_sizes)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise BranchifyError(f"repeats={repeats!r} must be an integer >= 2 (a spread needs two timings), e.g. 5")
    device = runner.core.device or torch.device("cpu")
    pool = _pooled(inputs).map(lambda t: t.to(device))
    count = pool.batch
    if count < max(sizes):
        raise BranchifyError(f"batch size {max(sizes)} needs at least {max(sizes)} samples, but the inputs hold "
                             f"{count}; pass more samples or smaller batch_sizes")
    original = exit_costs(module, pool.map(lambda t: t[:1])).original
    k = len(module.exit_spec.exits)
    rows = []
    for size in sizes:
        batches = [pool.map(functools.partial(_slice, start=i * size, stop=(i + 1) * size))
                   for i in range(count // size)]
        with torch.inference_mode():
            results = [batch.call(runner) for batch in batches]
        macs = torch.cat([r.macs for r in results]).double()
        taken = torch.cat([r.exit_index for r in results]).bincount(minlength=k + 1)
        units = [{"model": _model_call(runner, batch), "runner": functools.partial(batch.call, runner)}
                 for batch in batches]
        totals = interleaved(units, repeats, device)
        rows.append(BenchmarkRow(batch_size=size, batches=len(batches), model_seconds=tuple(totals["model"]),
                                 runner_seconds=tuple(totals["runner"]), mac_fraction=float(macs.mean()) / original,
                                 shares=tuple((taken.double() / len(macs)).tolist())))
    result = BenchmarkResult(rows=tuple(rows), repeats=repeats, device=str(device), threads=torch.get_num_threads(),
                             original_macs=original)
    if result.loaded:
        warnings.warn(
            f"the timings spread by up to {result.spread:.0%} between repeats (interquartile range over the median; "
            f"above {SPREAD_LIMIT:.0%}): the machine is loaded, or its clock changes speed. Read the ratios "
            "(speedup), which the interleaving keeps fair, not the absolute times; for steadier times use more "
            "repeats on a quiet machine", UserWarning, stacklevel=2)
    return result


def _slice(t: torch.Tensor, *, start: int, stop: int) -> torch.Tensor:
    return t[start:stop]


def _model_call(runner: ExitRunner, batch: Inputs) -> Callable[[], object]:
    """The original model on ``batch``: ``runner.original`` (its stages in turn; the model on the hook path)."""
    return functools.partial(batch.call, runner.original)


def _pooled(inputs) -> Inputs:
    """Every sample of ``inputs`` (a tensor, a dict of named tensors, or an iterable of batches) in one ``Inputs``."""
    if isinstance(inputs, (torch.Tensor, Mapping)):
        pool = Inputs.of(inputs)
        pool.check_batch("benchmark")
        return pool
    if not isinstance(inputs, Iterable):
        raise BranchifyError(f"inputs must be a tensor of samples or a loader of batches, got {type(inputs).__name__}")
    parts = [Inputs.of(b) if isinstance(b, torch.Tensor) or (isinstance(b, Mapping) and "labels" not in b)
             else split_batch(b)[0] for b in inputs]
    if not parts:
        raise BranchifyError("the loader yielded no batches; pass a loader over at least one batch, or a tensor")
    first = parts[0]
    if any(len(p.args) != len(first.args) or p.kwargs.keys() != first.kwargs.keys() for p in parts):
        raise BranchifyError("the loader's batches differ in their inputs; every batch must hold the same inputs")
    return Inputs(tuple(torch.cat([p.args[i] for p in parts]) for i in range(len(first.args))),
                  {key: torch.cat([p.kwargs[key] for p in parts]) for key in first.kwargs})


def _checked_sizes(batch_sizes) -> list[int]:
    values = list(batch_sizes) if isinstance(batch_sizes, Sequence) and not isinstance(batch_sizes, str) else None
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise BranchifyError(f"batch_sizes={batch_sizes!r} must be a non-empty sequence of positive integers, "
                             "e.g. (1, 64)")
    return sorted(set(values))
