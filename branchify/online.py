"""Serving under drift: thresholds re-tuned online from an audit stream, with no labels.

``OnlineCalibrator`` wraps a runner (or the routed ONNX file). A random share of the requests (the
audit) runs the whole model as well, so that for each audited sample it is known which answer every
candidate set of thresholds would have served, and whether it differs from the original model's final
answer. The promise is agreement with the original model, so no label is needed (Apparate, SOSP 2024).

The candidates are a path of levels fixed at construction, from safe to aggressive: level 0 switches every
exit off (the original model's answers, disagreement 0); the next levels switch on the exits from the last
one backwards at their strictest thresholds; then every exit's threshold moves from the strictest back to
where it started, the top level being the thresholds the calibrator was given (``bx.calibrate``'s).
Each exit's ladder steps halve the distance to the end of its criterion's score range where it never fires.

The test (fixed-sequence, as Learn-then-Test): on the last ``window`` audited samples, level ``l`` passes
when the one-sided Clopper-Pearson upper bound (level ``delta``) on its disagreement rate is at most
``max_disagreement``; levels are tested from 0 upwards, stopping at the first failure; the thresholds in
force become the highest passing level. That is a tightening as soon as the bound of the thresholds in
force crosses the target, and a loosening only to levels the bound certifies.

What is guaranteed. At each test, with probability at least ``1 - delta``, every level that passes, and so
the thresholds put in force, has a disagreement rate, averaged over the time points of the window's audited
samples, of at most ``max_disagreement``. It holds for each test (per test, not simultaneously over all of
them: a union bound over ``u`` tests would need level ``delta / u`` each). It assumes that the stream does
not react to the calibrator (samples drawn independently, the drift set in advance, however it goes), and
it needs no stationarity inside the window: with independent Bernoulli trials of unequal rates the count is
more concentrated than the binomial of their mean (Hoeffding, 1956), so Clopper-Pearson still covers the mean.
The audit draws are independent of the samples, whatever the audit rate was set to from the past. What it
does not say: the requests served next share the window's rate only as far as the stream drifts slowly
against the window, which is why the drift alarm exists.

The drift alarm: when the lower Clopper-Pearson bound (level ``delta / 10``) on the disagreement of the
thresholds in force, over the last ``alarm_window`` audited samples, exceeds the target, every exit is
switched off at once and the window is emptied (older samples would vouch for the past); levels come back
as fresh audited samples certify them. Until the window first fills (warm-up), the thresholds given rest on
their offline calibration: they are kept unless the alarm fires, and tested as soon as the test can pass.

The audit runs every exit and the final layer on its samples; the result's MACs charge that full cost for
them, and ``audit_macs`` sums what the audit added over serving alone. The audit rate drops to
``min_audit_rate`` while the top level is in force with a bound at most half the target, and goes back to
``audit_rate`` otherwise, so drift is still seen.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calibration.bounds import _binom_cdf, clopper_pearson_upper, samples_to_certify
from .cost import exit_costs
from .criteria import Criterion, get_criterion
from .errors import BranchifyError
from .routing import exit_rules, route_by
from .runtime.onnx_export import threshold_name
from .runtime.result import ExitResult
from .runtime.runner import ExitRunner
from .spec import ExitSpec

__all__ = ["AuditTest", "OnlineCalibrator", "OnlineResult", "level_path"]

_FORMAT = "branchify-online"
_VERSION = 1
_ALARM_SHARE = 10  # the alarm's level is delta / 10: a false alarm costs MACs, not the promise

# The same counts come back at every test of a window: each figure is computed once.
_upper = functools.lru_cache(maxsize=4096)(clopper_pearson_upper)
_cdf = functools.lru_cache(maxsize=65536)(_binom_cdf)


def within(x: int, n: int, value: float, alpha: float) -> bool:
    """``clopper_pearson_upper(x, n, alpha) <= value``, without the bisection: the upper bound is the rate at
    which ``x`` or fewer of ``n`` has probability ``alpha``, and that probability falls as the rate rises."""
    return n > 0 and _cdf(x, n, value) <= alpha


def beyond(x: int, n: int, value: float, alpha: float) -> bool:
    """``clopper_pearson_lower(x, n, alpha) > value``, likewise: ``x`` or more of ``n`` is rarer than ``alpha``
    at the rate ``value``."""
    return x > 0 and 1.0 - _cdf(x - 1, n, value) < alpha


def _ladder(t0: float, crit: Criterion, steps: int) -> list[float]:
    """``steps`` thresholds stricter than ``t0``, strictest first: the distance to the end of the score range
    where the criterion never fires halves at each step (steps of ``|t0| + 1`` when that end is infinite)."""
    sign = 1.0 if crit.exits_when == "above" else -1.0
    edge = crit.high if crit.exits_when == "above" else crit.low
    if math.isfinite(edge):
        out = [edge - (edge - t0) * 0.5 ** j for j in range(1, steps + 1)]
    else:
        out = [t0 + sign * (abs(t0) + 1.0) * j for j in range(1, steps + 1)]
    return out[::-1]


def level_path(spec: ExitSpec, steps: int = 8) -> list[tuple[float | None, ...]]:
    """The levels an ``OnlineCalibrator`` chooses among, safest first; the last is ``spec``'s thresholds.

    >>> import branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.9, criterion="confidence"),
    ...                           bx.ExitPoint(layer="b", threshold=0.8, criterion="confidence")])
    >>> path = level_path(spec, steps=2)
    >>> path[0], path[1], path[-1]
    ((None, None), (None, 0.95), (0.9, 0.8))
    """
    start = [p.threshold for p in spec.exits]
    on = [i for i, t in enumerate(start) if t is not None]
    ladders = {i: _ladder(float(start[i]), get_criterion(spec.criterion_of(i)), steps) for i in on}
    path: list[tuple[float | None, ...]] = [tuple([None] * len(start))]
    for s in range(1, len(on)):  # exits from the last one backwards, at their strictest
        path.append(tuple(ladders[i][0] if i in on[-s:] else None for i in range(len(start))))
    for j in range(steps):
        path.append(tuple(None if t is None else ladders[i][j] for i, t in enumerate(start)))
    path.append(tuple(start))
    return path


class AuditTest:
    """The window of audited samples and the decision it supports (no model: each sample is given as the
    vector of which levels would have served an answer different from the original model's).

    ``add(disagree)`` takes a ``(n, levels)`` boolean tensor and returns the level to put in force, with the
    reason when it changed. See the module's text for the test and what it guarantees.

    >>> test = AuditTest(levels=3, max_disagreement=0.05, delta=0.1, window=100, alarm_window=50)
    >>> test.add(torch.zeros(100, 3, dtype=torch.bool))
    (2, None)
    >>> level, reason = test.add(torch.ones(50, 3, dtype=torch.bool) & (torch.arange(3) == 2))
    >>> level, reason
    (0, 'drift alarm')
    """

    def __init__(self, *, levels: int, max_disagreement: float, delta: float, window: int, alarm_window: int,
                 level: int | None = None) -> None:
        self.levels, self.target, self.delta = levels, max_disagreement, delta
        self.window, self.alarm_window = window, alarm_window
        self.level = levels - 1 if level is None else level
        self.warm = True  # the given thresholds rest on their offline calibration until the window first fills
        self.rows = torch.zeros(0, levels, dtype=torch.bool)
        self.counts = torch.zeros(levels, dtype=torch.int64)

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def upper(self, level: int) -> float:
        """Clopper-Pearson upper bound (level ``delta``) on ``level``'s disagreement over the window."""
        if level == 0:
            return 0.0  # every exit off serves the original model's answers
        return _upper(int(self.counts[level]), self.n, self.delta) if self.n else 1.0

    def passes(self, level: int, value: float | None = None) -> bool:
        """Is ``upper(level)`` at most ``value`` (default: the target)?"""
        value = self.target if value is None else value
        return level == 0 or within(int(self.counts[level]), self.n, value, self.delta)

    def certified(self) -> int:
        """The highest level the fixed-sequence test passes (0 always passes)."""
        chosen = 0
        for level in range(1, self.levels):
            if not self.passes(level):
                break
            chosen = level
        return chosen

    def _alarm(self) -> bool:
        if self.level == 0 or self.n < self.alarm_window:
            return False
        x = int(self.rows[-self.alarm_window:, self.level].sum())
        return beyond(x, self.alarm_window, self.target, self.delta / _ALARM_SHARE)

    def add(self, disagree: torch.Tensor) -> tuple[int, str | None]:
        before = self.level
        self.rows = torch.cat([self.rows, disagree.to(torch.bool).cpu()])[-self.window:]
        self.counts = self.rows.sum(0, dtype=torch.int64)
        if self._alarm():
            self.rows = self.rows[:0]
            self.counts.zero_()
            self.level, self.warm = 0, False
            return 0, "drift alarm"
        chosen = self.certified()
        if self.warm:
            if chosen >= self.level or self.n >= self.window:
                self.warm = False
            else:
                return self.level, None
        self.level = chosen
        if chosen == before:
            return chosen, None
        return chosen, "bound above the target" if chosen < before else "bound certifies a looser level"

    def state(self) -> dict:
        packed = np.packbits(self.rows.numpy().astype(np.uint8), axis=None).tobytes()
        return {"level": self.level, "warm": self.warm, "rows": self.n,
                "samples": base64.b64encode(packed).decode("ascii")}

    def restore(self, state: dict) -> None:
        self.level, self.warm = int(state["level"]), bool(state["warm"])
        count = int(state["rows"]) * self.levels
        bits = np.unpackbits(np.frombuffer(base64.b64decode(state["samples"]), dtype=np.uint8))[:count]
        self.rows = torch.from_numpy(bits.astype(bool)).reshape(-1, self.levels)
        self.counts = self.rows.sum(0, dtype=torch.int64)


def _fraction(name: str, value, hint: str, *, closed: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and 0 < value and (value <= 1 if closed else value < 1)
    if not ok:
        where = "(0, 1]" if closed else "(0, 1)"
        raise BranchifyError(f"{name} must be a number in {where}, got {value!r}; {hint}")
    return float(value)


def _never(crit: Criterion) -> float:
    return math.inf if crit.exits_when == "above" else -math.inf


def _always(crit: Criterion) -> float:
    return -math.inf if crit.exits_when == "above" else math.inf


class _Onnx:
    """The routed ONNX file as the calibrator serves it: thresholds re-tuned in the file's initializers."""

    def __init__(self, path: Path, spec: ExitSpec) -> None:
        try:
            import onnx
            import onnxruntime
        except ImportError:
            raise BranchifyError("serving the ONNX file needs onnx and onnxruntime; pip install 'branchify[onnx]'"
                                 ) from None
        self.onnx, self.ort, self.path = onnx, onnxruntime, path
        self.model = onnx.load(str(path))
        names = {t.name for t in self.model.graph.initializer}
        self.on = [i for i, p in enumerate(spec.exits) if p.threshold is not None]
        missing = [threshold_name(i) for i in self.on if threshold_name(i) not in names]
        if missing:
            raise BranchifyError(
                f"{str(path)!r} has no initializer {missing[0]!r}, so it was not exported from this runner (or "
                "with other exits on); export it again with runner.export_onnx(path) and pass that file")
        if len(self.model.graph.input) != 1:
            raise BranchifyError(f"the ONNX calibrator serves models with one input, and {str(path)!r} has "
                                 f"{len(self.model.graph.input)}; serve it through the torch runner instead")
        self.input = self.model.graph.input[0].name
        self.crits = [get_criterion(spec.criterion_of(i)) for i in range(len(spec.exits))]
        self.options = onnxruntime.SessionOptions()
        self.options.intra_op_num_threads = 1
        # One session per exit with that exit forced to fire (those before never): the audit's exit logits.
        self.audits = [self._session({**{i: _never(self.crits[i]) for i in self.on if i < j},
                                      j: _always(self.crits[j])}) for j in self.on]
        self.final = self._session({i: _never(self.crits[i]) for i in self.on})
        self.serving = None

    def _thresholds(self, values: dict[int, float]):
        model = self.onnx.ModelProto()
        model.CopyFrom(self.model)
        for init in model.graph.initializer:
            for i, value in values.items():
                if init.name == threshold_name(i):
                    init.CopyFrom(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=np.float32), init.name))
        return model

    def _session(self, values: dict[int, float]):
        return self.ort.InferenceSession(self._thresholds(values).SerializeToString(), self.options,
                                         providers=["CPUExecutionProvider"])

    def retune(self, thresholds: Sequence[float | None]) -> None:
        """Write ``thresholds`` (None: never fires) into the file, in place, and serve with them."""
        values = {i: _never(self.crits[i]) if thresholds[i] is None else float(thresholds[i]) for i in self.on}
        model = self._thresholds(values)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.onnx.save(model, str(tmp))
        os.replace(tmp, self.path)  # a reader never sees half a file
        self.model = model
        self.serving = self.ort.InferenceSession(model.SerializeToString(), self.options,
                                                 providers=["CPUExecutionProvider"])

    def serve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, index = self.serving.run(None, {self.input: x.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(index)

    def audit(self, x: torch.Tensor) -> list[torch.Tensor]:
        arr = {self.input: x.numpy()}
        by_exit = {i: torch.from_numpy(s.run(None, arr)[0]) for i, s in zip(self.on, self.audits)}
        final = torch.from_numpy(self.final.run(None, arr)[0])
        k = len(self.crits)
        return [by_exit.get(i, final) for i in range(k)] + [final]


@dataclass(frozen=True)
class OnlineResult(ExitResult):
    """An ``ExitResult`` that also says which samples the audit ran through the whole model (``audited``,
    ``(B,)`` bool); their ``macs`` include the audit."""

    audited: torch.Tensor | None = None


class OnlineCalibrator:
    """Serve like ``runner`` while keeping the served answers' disagreement with the original model within
    ``max_disagreement``, re-tuning thresholds from an audit stream (no labels).

    ``online(batch)`` returns an ``OnlineResult`` (an ``ExitResult`` with the ``audited`` mask); a random
    ``audit_rate`` share of the samples runs the whole model too (their MACs in the result include it). The
    thresholds are tightened as soon as the Clopper-Pearson bound (level ``delta``) on the last ``window``
    audited samples crosses the target (up to every exit off), and loosened only to thresholds the bound
    certifies, never past those the runner started with. The guarantee and its assumptions are in
    ``branchify.online``'s text. ``onnx=path`` serves the runner's routed ONNX file
    (``runner.export_onnx(path)``) and re-tunes its threshold initializers in the file. State: ``spec``,
    ``bound``, ``audited``, ``history``, ``audit_macs``, ``report()``; ``save``/``load``. Calls may come from
    several threads. The calibrator reads the runner's spec once, at construction.

    >>> import torch, branchify as bx
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=0.9, criterion="confidence")])
    >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 8)).eval())
    >>> online = bx.OnlineCalibrator(runner, max_disagreement=0.05, audit_rate=0.5, window=100)
    >>> result = online(torch.randn(32, 8))
    >>> result.logits.shape, 0 < online.audited <= 32, online.spec.thresholds
    (torch.Size([32, 3]), True, [0.9])
    """

    def __init__(self, runner: ExitRunner, *, max_disagreement: float = 0.01, audit_rate: float = 0.05,
                 delta: float = 0.1, window: int = 1000, min_audit_rate: float | None = None,
                 alarm_window: int | None = None, steps: int = 8, onnx: str | os.PathLike | None = None,
                 seed: int = 0) -> None:
        if not isinstance(runner, ExitRunner):
            raise BranchifyError(f"OnlineCalibrator wraps a bx.ExitRunner, got {type(runner).__name__}; build one "
                                 "with bx.ExitRunner(module) (for the ONNX file too: pass onnx=path beside it)")
        if runner.core.module is None:
            raise BranchifyError("this runner was loaded from an archive and has no module to audit with; build "
                                 "the calibrator on bx.ExitRunner(module), or serve the ONNX file with onnx=path")
        self.max_disagreement = _fraction("max_disagreement", max_disagreement,
                                          "give the share of served answers that may differ, e.g. 0.01")
        self.delta = _fraction("delta", delta, "give a failure probability such as 0.1")
        self.audit_rate = _fraction("audit_rate", audit_rate, "give the share of requests audited, e.g. 0.05",
                                    closed=True)
        floor = self.audit_rate / 4 if min_audit_rate is None else min_audit_rate
        self.min_audit_rate = _fraction("min_audit_rate", floor, "give a floor such as audit_rate / 4", closed=True)
        if self.min_audit_rate > self.audit_rate:
            raise BranchifyError(f"min_audit_rate={min_audit_rate!r} is above audit_rate={audit_rate!r}; the floor "
                                 "must be at most the audit rate")
        need = samples_to_certify(self.max_disagreement, 2 * self.delta)
        if isinstance(window, bool) or not isinstance(window, int) or window < need:
            raise BranchifyError(
                f"window={window!r} audited samples cannot certify max_disagreement={self.max_disagreement:g} at "
                f"delta={self.delta:g} even with no disagreement; use window >= {need} (e.g. {max(1000, need)}), "
                "or loosen max_disagreement or delta")
        alarm = max(need, window // 8) if alarm_window is None else alarm_window
        if isinstance(alarm, bool) or not isinstance(alarm, int) or not 1 <= alarm <= window:
            raise BranchifyError(f"alarm_window must be an integer in [1, window={window}], got {alarm_window!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BranchifyError(f"steps must be a positive integer (ladder steps per exit), got {steps!r}")
        runner.core.rules()  # follows the module's spec in force
        spec = runner.core.spec
        if all(p.threshold is None for p in spec.exits):
            raise BranchifyError("the runner's spec has no threshold; calibrate it first "
                                 "(bx.calibrate(module, loader, max_accuracy_drop=0.01)), then wrap the runner")
        exit_rules(spec, deployed=True)  # refuses criteria that read labels
        for i in range(len(spec.exits)):
            if get_criterion(spec.criterion_of(i)).across_exits:
                raise BranchifyError(
                    f"exit {i} uses {spec.criterion_of(i)!r}, a criterion across exits; the online calibrator "
                    "re-tunes per-exit thresholds: use 'entropy' or 'confidence'")
        self.runner, self.window, self.steps, self.seed = runner, window, steps, seed
        self._start = spec
        self.path = level_path(spec, steps)
        self._level_rules = {tuple(t): exit_rules(spec.with_exits(threshold=list(t)), deployed=True)
                             if any(v is not None for v in t) else [None] * len(t) for t in self.path}
        self._test = AuditTest(levels=len(self.path), max_disagreement=self.max_disagreement, delta=self.delta,
                               window=window, alarm_window=alarm)
        self._lock = threading.Lock()
        self._generator = torch.Generator().manual_seed(seed)
        self._rate = self.audit_rate
        self._costs: dict[tuple, object] = {}
        self.history: list[dict] = []
        self.served = self.audited = 0
        self.macs = self.audit_macs = 0.0
        self.served_disagreements = 0  # among audited samples, served answers that differed
        self._onnx = None if onnx is None else _Onnx(Path(onnx), spec)
        if self._onnx is not None:
            self._onnx.retune(self.path[-1])

    @property
    def level(self) -> int:
        """The level in force on ``path`` (0: every exit off; the last: the thresholds started with)."""
        return self._test.level

    @property
    def spec(self) -> ExitSpec:
        """The spec in force: the runner's, with the thresholds of the level in force (None: the exit is off)."""
        return self._start.with_exits(threshold=list(self.path[self.level]))

    @property
    def bound(self) -> float | None:
        """Upper bound (level ``delta``) on the disagreement of the thresholds in force, over the window
        (None before any audit)."""
        with self._lock:
            return None if self._test.n == 0 and self.level else self._test.upper(self.level)

    @property
    def current_audit_rate(self) -> float:
        return self._rate

    @property
    def window_samples(self) -> int:
        """Audited samples in the window now."""
        return self._test.n

    def _base_costs(self, inputs: tuple):
        shapes = tuple(tuple(a.shape[1:]) for a in inputs if isinstance(a, torch.Tensor))
        if shapes not in self._costs:
            example = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in inputs)
            self._costs[shapes] = exit_costs(self.runner.core.module, example if len(example) > 1 else example[0])
        return self._costs[shapes]

    def _judged(self, thresholds: Sequence[float | None]) -> list[bool]:
        if self._onnx is not None:  # the file judges every exit it holds, also one set never to fire
            return [p.threshold is not None for p in self._start.exits]
        return [t is not None for t in thresholds]

    def _rules(self, thresholds: Sequence[float | None]) -> list:
        """The routing rules of one level of the path (made once per level, at construction)."""
        return self._level_rules[tuple(thresholds)]

    def _route(self, thresholds, logits: list[torch.Tensor]) -> torch.Tensor:
        return route_by(self._rules(thresholds), logits[:-1])

    def _serve(self, thresholds, inputs: tuple, names, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._onnx is not None:
            return self._onnx.serve(x)
        runner = self.runner
        return runner.core.route(runner.stages, runner.heads, inputs, names, x, rules=self._rules(thresholds))

    def _audit(self, inputs: tuple, names, x: torch.Tensor) -> list[torch.Tensor]:
        if self._onnx is not None:
            return self._onnx.audit(x)
        module = self.runner.core.module
        out = module(**dict(zip(names, inputs))) if names else module(*inputs)
        return [z.float() for z in out]

    def __call__(self, *args, **kwargs) -> OnlineResult:
        runner = self.runner
        if self._onnx is None and runner.core.module.training:
            raise BranchifyError("the module is in training mode; call module.eval() before serving")
        inputs, names = runner.core.bind(args, kwargs)
        runner.core.check(inputs)
        x = runner.core.batch_tensor(inputs)
        base = self._base_costs(inputs)
        with self._lock:
            thresholds = self.path[self.level]
            level = self.level
            audit = torch.rand(x.shape[0], generator=self._generator) < self._rate
        per_exit = torch.tensor(base.judging(self._judged(thresholds)).per_exit, dtype=torch.float64)
        if self._onnx is None:  # the module's forward runs every head and the final layer
            full = float(base.judging([True] * len(thresholds)).full)
        else:  # one run per exit the file holds, forced to leave there, and one to the end
            full = float(sum(per_exit[i] for i in self._onnx.on) + per_exit[-1])
        picked = audit.nonzero().flatten()
        rest = (~audit).nonzero().flatten()
        k = len(thresholds)
        with torch.inference_mode():
            logits = torch.empty(x.shape[0], runner.num_classes)
            exit_index = torch.full((x.shape[0],), k, dtype=torch.int64)
            if len(rest):
                part = tuple(a[rest] if isinstance(a, torch.Tensor) else a for a in inputs)
                z, e = self._serve(thresholds, part, names, runner.core.batch_tensor(part))
                logits[rest], exit_index[rest] = z.float(), e
            disagree = None
            if len(picked):
                part = tuple(a[picked] if isinstance(a, torch.Tensor) else a for a in inputs)
                all_logits = self._audit(part, names, runner.core.batch_tensor(part))
                taken = self._route(thresholds, all_logits)
                stacked = torch.stack(all_logits)
                served = stacked[taken, torch.arange(len(picked))]
                logits[picked], exit_index[picked] = served, taken
                final = all_logits[-1].argmax(-1)
                rows = torch.arange(len(picked))
                disagree = torch.stack([stacked[self._route(t, all_logits), rows].argmax(-1) != final
                                        for t in self.path], dim=1)
        macs = per_exit[exit_index]
        macs[picked] = full
        with self._lock:
            self.served += x.shape[0]
            self.macs += float(macs.sum())
            if disagree is not None:
                self.audited += len(picked)
                self.audit_macs += float((full - per_exit[exit_index[picked]]).sum())
                self.served_disagreements += int(disagree[:, level].sum())
                before = self._test.level
                after, reason = self._test.add(disagree)
                if after != before:
                    self._changed(before, after, reason)
                top = self._test.level == len(self.path) - 1 and not self._test.warm
                far = top and self._test.passes(self._test.level, self.max_disagreement / 2)
                self._rate = self.min_audit_rate if far else self.audit_rate
        return OnlineResult(logits, exit_index, macs, audit)

    def _changed(self, before: int, after: int, reason: str | None) -> None:
        """Record a change of level (the lock is held) and re-tune the ONNX file."""
        self.history.append({"served": self.served, "audited": self.audited, "from": before, "to": after,
                             "thresholds": list(self.path[after]), "bound": self._test.upper(after),
                             "window": self._test.n, "reason": reason})
        if self._onnx is not None:
            self._onnx.retune(self.path[after])

    def report(self) -> dict:
        """The figures an operator watches: served and audited samples, MACs per sample (serving and audit),
        the disagreement measured on audited samples, the bound, the level and the number of changes."""
        with self._lock:
            served = max(self.served, 1)
            return {"served": self.served, "audited": self.audited, "audit_rate": self._rate,
                    "macs_per_sample": self.macs / served, "audit_macs_per_sample": self.audit_macs / served,
                    "served_disagreement": self.served_disagreements / max(self.audited, 1),
                    "bound": None if self._test.n == 0 else self._test.upper(self._test.level),
                    "level": self._test.level, "levels": len(self.path), "changes": len(self.history)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibrator's state (settings, level, window, history, counters) as JSON; returns the path.

        >>> import tempfile, torch, branchify as bx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=0.9, criterion="confidence")])
        >>> runner = bx.ExitRunner(bx.attach_exits(model, spec, torch.randn(1, 8)).eval())
        >>> online = bx.OnlineCalibrator(runner, max_disagreement=0.05, window=100)
        >>> _ = online(torch.randn(16, 8))
        >>> again = bx.OnlineCalibrator.load(online.save(tempfile.mkdtemp() + "/online.json"), runner)
        >>> again.served, again.spec == online.spec
        (16, True)
        """
        with self._lock:
            state = {"format": _FORMAT, "version": _VERSION,
                     "settings": {"max_disagreement": self.max_disagreement, "audit_rate": self.audit_rate,
                                  "delta": self.delta, "window": self.window, "min_audit_rate": self.min_audit_rate,
                                  "alarm_window": self._test.alarm_window, "steps": self.steps, "seed": self.seed},
                     "start": [p.threshold for p in self._start.exits], "test": self._test.state(),
                     "history": self.history, "rate": self._rate,
                     "counters": {"served": self.served, "audited": self.audited, "macs": self.macs,
                                  "audit_macs": self.audit_macs, "served_disagreements": self.served_disagreements},
                     "generator": base64.b64encode(self._generator.get_state().numpy().tobytes()).decode("ascii")}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, runner: ExitRunner, *, onnx: str | os.PathLike | None = None,
             ) -> OnlineCalibrator:
        """A calibrator written by ``save``, around ``runner`` (the one it was built on), carrying on where it was."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise BranchifyError(f"cannot read an online calibrator's state from {str(path)!r} ({err}); pass the "
                                 "file written by OnlineCalibrator.save") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise BranchifyError(f"{str(path)!r} is not an online calibrator's state (format {_FORMAT!r} version "
                                 f"{_VERSION}); pass the file written by OnlineCalibrator.save")
        start = [p.threshold for p in runner.core.spec.exits]
        if start != state["start"]:
            raise BranchifyError(f"the state was saved around a runner with thresholds {state['start']}, and this "
                                 f"runner has {start}; load it around the runner it was built on")
        online = cls(runner, onnx=onnx, **state["settings"])
        online._test.restore(state["test"])
        online.history = list(state["history"])
        online._rate = float(state["rate"])
        for name, value in state["counters"].items():
            setattr(online, name, value)
        online._generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])),
                                                     dtype=torch.uint8))
        if online._onnx is not None:
            online._onnx.retune(online.path[online.level])
        return online

    def __repr__(self) -> str:
        return (f"OnlineCalibrator(level {self.level}/{len(self.path) - 1}, audited {self.audited}, "
                f"bound {self.bound}, target {self.max_disagreement:g})")
