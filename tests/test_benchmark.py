"""bx.benchmark: its figures follow from its timings, its MACs from an independent count; its clock is faked,
so no assertion here depends on how fast anything ran."""

from __future__ import annotations

import json
import statistics
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx
from branchify._inputs import Inputs
from branchify.criteria import get_criterion
from branchify.runtime import benchmark as bench


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


N = 24


@pytest.fixture(scope="module")
def setup():
    """A module with two exits whose thresholds sit halfway between neighbouring scores: a third of the
    samples leave at each exit, far from any threshold, so batch sizes do not flip decisions."""
    torch.manual_seed(0)
    x = torch.randn(N, 3, 8, 8)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="2"), bx.ExitPoint(layer="4")])
    module = bx.attach_exits(tiny(), spec, x[:1]).eval()
    entropy = get_criterion("entropy")
    with torch.no_grad():
        outputs = module(x)
    running, thresholds = torch.ones(N, dtype=torch.bool), []
    for i in range(2):
        ranked = entropy.score(outputs[i])[running].sort().values
        n = N // 3
        thresholds.append(float(ranked[n - 1] + ranked[n]) / 2)
        running &= ~entropy.fires(entropy.score(outputs[i]), thresholds[-1])
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds)
    return module, bx.ExitRunner(module), x


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real timings on a shared machine may spread: not under test here
        return fn(*args, **kwargs)


def test_figures_follow_from_the_timings(setup):
    _, runner, x = setup
    result = quiet(bx.benchmark, runner, x, batch_sizes=(8, 1), repeats=3)
    assert [(row.batch_size, row.batches, row.samples) for row in result.rows] == [(1, N, N), (8, 3, N)]
    for row in result.rows:
        model, routed = statistics.median(row.model_seconds), statistics.median(row.runner_seconds)
        assert len(row.model_seconds) == len(row.runner_seconds) == 3
        assert row.speedup == pytest.approx(model / routed, rel=1e-12)
        assert row.model_latency == pytest.approx(model / row.batches, rel=1e-12)
        assert row.runner_throughput == pytest.approx(N / routed, rel=1e-12)
        assert row.speedup == pytest.approx(row.model_latency / row.runner_latency, rel=1e-12)
        assert row.mac_speedup == pytest.approx(1 / (1 - row.mac_saving))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["repeats"] == 3 and [r["batch_size"] for r in data["rows"]] == [1, 8]
    text = repr(result)
    assert "speedup" in text and "MACs saved" in text and len(text.splitlines()) >= 4
    assert "<table>" in result._repr_html_()


def test_mac_saving_is_the_routed_statistics_count(setup):
    module, runner, x = setup
    costs = bx.exit_costs(module, x[:1])
    stats = bx.ExitStats(module.exit_spec, mode="routed", costs=costs)
    with torch.no_grad():
        stats.update(module(x), torch.zeros(N, dtype=torch.long))
    summary = stats.summary()
    result = quiet(bx.benchmark, runner, x, batch_sizes=(1, 6, N), repeats=2)
    assert result.original_macs == costs.original
    for row in result.rows:
        assert row.mac_saving == pytest.approx(summary.saving_percent / 100, rel=1e-9)
        assert row.mac_speedup == pytest.approx(costs.original / summary.expected_macs, rel=1e-9)
        assert list(row.shares) == pytest.approx([r.percent / 100 for r in summary.exits], rel=1e-12)
    assert 0 < result.rows[0].mac_saving < 1 and all(0 < s < 1 for s in result.rows[0].shares)


def test_the_original_model_is_the_stages_in_turn(setup):
    module, runner, x = setup
    with torch.inference_mode():
        final = bench._model_call(runner, Inputs.of(x))()[0]
        assert torch.equal(final, module(x)[-1])


def test_a_loader_gives_the_samples_of_a_tensor(setup):
    _, runner, x = setup
    loader = DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=5)
    one, other = quiet(bx.benchmark, runner, loader, batch_sizes=(4,), repeats=2), \
        quiet(bx.benchmark, runner, x, batch_sizes=(4,), repeats=2)
    assert one.rows[0].batches == other.rows[0].batches == 6
    assert one.rows[0].shares == other.rows[0].shares and one.rows[0].mac_fraction == other.rows[0].mac_fraction


class FakeTime:
    """A clock that only moves when a stage or a head runs: ``cost`` seconds per sample it sees."""

    def __init__(self, runner: bx.ExitRunner, costs: dict[str, float]) -> None:
        self.now = 0.0
        self.reads = 0
        self.extra = 0.0  # times the number of reads, added at every read: later timings take longer and longer
        self.handles = [stage.register_forward_pre_hook(self._advance(costs[f"stage_{i}"]))
                        for i, stage in enumerate(runner.stages)]
        self.handles += [head.register_forward_pre_hook(self._advance(costs[f"head_{i}"]))
                         for i, head in enumerate(runner.heads)]

    def _advance(self, cost: float):
        def hook(_module, args) -> None:
            self.now += cost * args[0].shape[0]
        return hook

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.extra * self.reads
        return self.now


def test_with_a_faked_clock_the_times_are_the_work_done(setup, monkeypatch):
    """Model: every stage on every sample; runner: each stage and head on the samples that reach it."""
    module = setup[0]
    runner = bx.ExitRunner(module)  # its own stages, so the clock's hooks stay here
    costs = {"stage_0": 1.0, "stage_1": 2.0, "stage_2": 4.0, "head_0": 0.5, "head_1": 0.25}
    fake = FakeTime(runner, costs)
    monkeypatch.setattr(bench, "clock", fake)
    try:
        check_faked(runner, fake, setup[2])
    finally:
        for handle in fake.handles:  # the heads are the module's, shared with the other tests
            handle.remove()


def check_faked(runner: bx.ExitRunner, fake: FakeTime, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spread, so no warning
        result = bx.benchmark(runner, x, batch_sizes=(1, 8), repeats=3)
    taken = runner(x).exit_index
    reach = [N, int((taken >= 1).sum()), int((taken >= 2).sum())]
    model = N * (1.0 + 2.0 + 4.0)
    routed = 1.0 * reach[0] + 0.5 * reach[0] + 2.0 * reach[1] + 0.25 * reach[1] + 4.0 * reach[2]
    for row in result.rows:
        assert row.model_seconds == pytest.approx((model,) * 3) and row.runner_seconds == pytest.approx((routed,) * 3)
        assert row.speedup == pytest.approx(model / routed) and max(row.model_spread, row.runner_spread) < 1e-9
    assert not result.loaded and "loaded" not in repr(result)

    fake.reads, fake.extra = 0, 5.0
    with pytest.warns(UserWarning, match="the machine is loaded.*Read the ratios"):
        loaded = bx.benchmark(runner, x, batch_sizes=(8,), repeats=5)
    assert loaded.loaded and loaded.spread > 0.10 and "read the ratios, not the absolute times" in repr(loaded)


def test_hook_path_runner(setup):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            if x.sum() > -1e9:
                x = x * 2
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Branchy()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem", threshold=1.0)])
    with pytest.warns(UserWarning, match="forward hooks"):
        module = bx.attach_exits(model, spec, torch.zeros(1, 3, 8, 8))
    runner = bx.ExitRunner(module.eval())
    x = setup[2]
    with torch.inference_mode():
        assert torch.equal(bench._model_call(runner, Inputs.of(x))(), model(x))
    result = quiet(bx.benchmark, runner, x, batch_sizes=(4,), repeats=2)
    assert result.rows[0].batches == 6 and len(result.rows[0].shares) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 1}, "repeats=1 must be an integer >= 2"),
    ({"batch_sizes": (0,)}, "batch_sizes=(0,) must be a non-empty sequence of positive integers"),
    ({"batch_sizes": ()}, "must be a non-empty sequence"),
    ({"batch_sizes": (64,)}, "batch size 64 needs at least 64 samples, but the inputs hold 24"),
])
def test_bad_arguments(setup, kwargs, message):
    with pytest.raises(bx.BranchifyError) as err:
        bx.benchmark(setup[1], setup[2], **kwargs)
    assert message in str(err.value)


def test_refusals_that_name_the_way_out(setup, tmp_path):
    module, runner, x = setup
    with pytest.raises(bx.BranchifyError, match=r"benchmark needs a bx.ExitRunner, got ExitModule"):
        bx.benchmark(module, x)
    with pytest.raises(bx.BranchifyError, match="the loader yielded no batches"):
        bx.benchmark(runner, DataLoader(TensorDataset(x[:0]), batch_size=4))
    loaded = bx.ExitRunner.load(runner.save(tmp_path / "runner", example_inputs=x[:1]))
    with pytest.raises(bx.BranchifyError, match="loaded from a folder"):
        bx.benchmark(loaded, x)


@pytest.mark.parametrize("shuffle", [False, True])
def test_interleaved_runs_every_variant_once_per_unit_and_shuffled_puts_each_after_every_other(shuffle):
    # A rotation keeps each variant after the same neighbour (benchmarks/runtime.py's runner always ran after the
    # original model); shuffle=True must put each variant after each of the others, and still run each once per
    # unit and repeat.
    calls: list[str] = []
    units = [{name: (lambda name=name: calls.append(name)) for name in "abcd"} for _ in range(4)]
    totals = bench.interleaved(units, repeats=6, shuffle=shuffle)
    assert {name: len(t) for name, t in totals.items()} == dict.fromkeys("abcd", 6)
    timed = calls[len("abcd") * len(units):]  # after the warm-up pass
    rounds = [timed[j:j + 4] for j in range(0, len(timed), 4)]
    assert len(rounds) == 6 * len(units) and all(sorted(r) == list("abcd") for r in rounds)
    per_repeat = len(units) * 4
    repeats = [timed[j:j + per_repeat] for j in range(0, len(timed), per_repeat)]
    after_a = {n for r in repeats for p, n in zip(r, r[1:]) if p == "a"}
    assert after_a == ({"b", "c", "d"} if shuffle else {"b"})
