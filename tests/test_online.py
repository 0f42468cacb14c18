"""The online calibrator: the bound's coverage under drift, tightening, recovery, ONNX re-tuning, threads, state."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

import branchify as bx
from branchify.calibration.bounds import clopper_pearson_upper
from branchify.errors import BranchifyError
from branchify.online import AuditTest, level_path

TARGET = 0.05


def _model() -> torch.nn.Module:
    """A module whose exit answers exactly as the final layer on clean inputs (x[:, 3] == 0) and ignores the
    drift channel x[:, 3], which pushes the final layer towards class 2: the truth is known by construction."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity(), torch.nn.Linear(4, 3))
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=0.9, criterion="confidence")])
    module = bx.attach_exits(model, spec, torch.randn(1, 4)).eval()
    final = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 20.0]])
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
        model[2].weight.copy_(final)
        model[2].bias.zero_()
        module.exit_heads[0][1].weight.copy_(final * torch.tensor([1.0, 1, 1, 0]))
        module.exit_heads[0][1].bias.zero_()
    return module


def _batch(n: int, drift: float, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 4, generator=generator)
    x[:, 3] = drift
    return x


def _online(module, **kwargs) -> bx.OnlineCalibrator:
    settings = dict(max_disagreement=TARGET, audit_rate=0.5, window=200, seed=0)
    return bx.OnlineCalibrator(bx.ExitRunner(module), **{**settings, **kwargs})


def _outputs(module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(module(x))


def test_level_path_runs_from_all_off_to_the_thresholds_given():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=1.0, criterion="entropy"),
                              bx.ExitPoint(layer="b", threshold=0.8, criterion="confidence")])
    path = level_path(spec, steps=3)
    assert path[0] == (None, None) and path[-1] == (1.0, 0.8)
    on = [p for p in path if None not in p]
    # each step loosens both exits: entropy thresholds rise, confidence thresholds fall
    assert [p[0] for p in on] == sorted(p[0] for p in on)
    assert [p[1] for p in on] == sorted((p[1] for p in on), reverse=True)


def _stream(rng: torch.Generator, rates: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Rows of which levels disagree: one uniform per sample, level l disagrees below its rate at that time
    (levels nested, as stricter thresholds let fewer samples out)."""
    u = torch.rand(len(times), 1, generator=rng)
    return u < rates[times]


def test_bound_covers_the_window_mean_over_many_drifting_streams():
    """Per test, P(the level put in force has a true window-mean disagreement above the target) <= delta."""
    levels, window, delta, steps = 6, 300, 0.1, 60
    base = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.04, 0.045])
    horizon = 3000
    drift = 1 + 2.0 * torch.arange(horizon) / horizon  # rates rise three-fold, the top level's beyond the target
    rates = drift[:, None] * base[None, :]  # (time, level), known by construction
    violations = tests = static_violations = 0
    chosen = []
    for seed in range(30):
        rng = torch.Generator().manual_seed(seed)
        test = AuditTest(levels=levels, max_disagreement=TARGET, delta=delta, window=window, alarm_window=100)
        times: list[int] = []
        for start in range(0, horizon, steps):
            t = torch.arange(start, start + steps)
            test.add(_stream(rng, rates, t))
            times = (times + t.tolist())[-test.n:] if test.n else []
            if test.warm:
                continue
            tests += 1
            mean = float(rates[times, test.level].mean()) if times else 0.0
            violations += mean > TARGET
            static_violations += float(rates[times, -1].mean()) > TARGET if times else 0
            chosen.append(test.level)
    assert tests > 1000
    assert violations / tests <= delta
    assert static_violations / tests > 0.3  # the drift breaks the starting thresholds: the test is not vacuous
    assert sum(chosen) / len(chosen) > 1  # and the calibrator does not just keep every exit off


def test_no_change_while_nothing_drifts():
    module = _model()
    online = _online(module)
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        online(_batch(50, 0.0, rng))
    assert online.audited > online.window and online.history == []
    assert online.spec == module.exit_spec
    assert online.bound == clopper_pearson_upper(0, online.window_samples, online.delta)


def test_drift_switches_the_exit_off_and_recovery_brings_it_back():
    module = _model()
    online = _online(module)
    rng = torch.Generator().manual_seed(2)
    for _ in range(6):
        online(_batch(50, 0.0, rng))
    for _ in range(6):
        result = online(_batch(50, 1.0, rng))
    assert online.history and online.history[0]["to"] < online.history[0]["from"]
    assert {h["reason"] for h in online.history} <= {"drift alarm", "bound above the target"}
    assert [p.threshold for p in online.spec.exits] == [None]
    x = _batch(64, 1.0, rng)
    result = online(x)
    assert torch.equal(result.exit_index, torch.ones(64, dtype=torch.int64))
    torch.testing.assert_close(result.logits, _outputs(module, x)[-1])  # the original model's answers
    for _ in range(20):
        online(_batch(50, 0.0, rng))
    assert online.spec == module.exit_spec  # back to the thresholds given
    assert online.history[-1]["reason"] == "bound certifies a looser level"


def test_served_answers_and_macs_against_the_module():
    module = _model()
    online = _online(module, audit_rate=0.3)
    costs = bx.exit_costs(module, torch.randn(1, 4))
    x = _batch(200, 0.0, torch.Generator().manual_seed(3))
    result = online(x)
    outputs = _outputs(module, x)
    expected = torch.stack(outputs)[result.exit_index, torch.arange(200)]
    torch.testing.assert_close(result.logits, expected)
    assert torch.equal(result.exit_index, bx.ExitRunner(module)(x).exit_index)
    audited = result.audited
    assert int(audited.sum()) == online.audited > 0
    assert torch.equal(result.macs[audited], torch.full((online.audited,), costs.full, dtype=torch.float64))
    served = torch.tensor(costs.per_exit, dtype=torch.float64)[result.exit_index]
    assert torch.equal(result.macs[~audited], served[~audited])
    assert online.report()["audit_macs_per_sample"] == pytest.approx(float((costs.full - served[audited]).sum()) / 200)


def test_audit_rate_drops_to_its_floor_when_the_bound_is_far_from_the_target():
    online = _online(_model(), audit_rate=0.5, min_audit_rate=0.1, max_disagreement=0.2, window=100)
    rng = torch.Generator().manual_seed(4)
    for _ in range(8):
        online(_batch(50, 0.0, rng))
    assert online.current_audit_rate == 0.1
    for _ in range(8):
        online(_batch(50, 1.0, rng))
    assert online.current_audit_rate == 0.5


@pytest.mark.slow  # the ONNX export takes about half a minute on a loaded machine
def test_onnx_thresholds_are_retuned_in_the_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    module = _model()
    runner = bx.ExitRunner(module)
    path = runner.export_onnx(tmp_path / "model.onnx", torch.randn(1, 4))

    def threshold() -> float:
        model = onnx.load(str(path))
        init = next(t for t in model.graph.initializer if t.name == "exit_0_threshold")
        return float(onnx.numpy_helper.to_array(init))

    online = bx.OnlineCalibrator(runner, max_disagreement=TARGET, audit_rate=0.5, window=200, onnx=path)
    rng = torch.Generator().manual_seed(5)
    for _ in range(12):
        online(_batch(50, 1.0 if _ >= 4 else 0.0, rng))
    assert [p.threshold for p in online.spec.exits] == [None] and threshold() == math.inf
    x = _batch(40, 1.0, rng)
    result = online(x)
    torch.testing.assert_close(result.logits, _outputs(module, x)[-1], rtol=1e-5, atol=1e-5)
    for _ in range(20):
        online(_batch(50, 0.0, rng))
    assert threshold() == pytest.approx(0.9) and online.spec == module.exit_spec


def test_several_threads_keep_the_counts_and_the_answers():
    module = _model()
    online = _online(module, audit_rate=0.2)
    batches = [[_batch(25, float(t % 2), torch.Generator().manual_seed(10 * t + j)) for j in range(15)]
               for t in range(4)]
    results: dict[int, list] = {}

    def work(t: int) -> None:
        results[t] = [online(x) for x in batches[t]]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert online.served == 4 * 15 * 25
    assert online.audited == sum(int(r.audited.sum()) for rs in results.values() for r in rs)
    for t, rs in results.items():
        for x, r in zip(batches[t], rs):
            expected = torch.stack(_outputs(module, x))[r.exit_index, torch.arange(len(x))]
            torch.testing.assert_close(r.logits, expected)
    assert [h["served"] for h in online.history] == sorted(h["served"] for h in online.history)


def test_state_saved_and_loaded_carries_on_identically(tmp_path):
    module = _model()
    online = _online(module)
    rng = torch.Generator().manual_seed(6)
    for drift in [0.0] * 4 + [1.0] * 4:
        online(_batch(50, drift, rng))
    path = online.save(tmp_path / "online.json")
    again = bx.OnlineCalibrator.load(path, bx.ExitRunner(module))
    assert (again.level, again.history, again.bound, again.audited, again.window_samples) == \
        (online.level, online.history, online.bound, online.audited, online.window_samples)
    for _ in range(6):
        x = _batch(50, 0.0, rng)
        a, b = online(x), again(x)
        assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.macs, b.macs)
    assert again.report() == online.report()
    assert json.loads(path.read_text())["format"] == "branchify-online"


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_disagreement=0.0), ["max_disagreement", "0.0", "e.g. 0.01"]),
    (dict(max_disagreement=True), ["max_disagreement", "True"]),
    (dict(delta=1.5), ["delta", "1.5", "0.1"]),
    (dict(audit_rate=0), ["audit_rate", "e.g. 0.05"]),
    (dict(audit_rate=0.1, min_audit_rate=0.2), ["min_audit_rate=0.2", "audit_rate=0.1"]),
    (dict(window=40), ["window=40", "window >= 45"]),
    (dict(window=200, alarm_window=500), ["alarm_window", "500"]),
    (dict(steps=0), ["steps", "0"]),
])
def test_bad_arguments_are_refused_with_the_way_out(kwargs, words):
    with pytest.raises(BranchifyError) as err:
        _online(_model(), **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_refuses_what_it_cannot_serve(tmp_path):
    module = _model()
    with pytest.raises(BranchifyError, match="bx.ExitRunner"):
        bx.OnlineCalibrator(module)
    with pytest.raises(BranchifyError, match="OnlineCalibrator.save"):
        bx.OnlineCalibrator.load(tmp_path / "missing.json", bx.ExitRunner(module))


def test_the_tests_shortcuts_agree_with_the_clopper_pearson_bounds():
    from branchify.calibration.bounds import clopper_pearson_lower
    from branchify.online import beyond, within
    for n, x in [(50, 0), (50, 1), (300, 4), (300, 9), (1000, 30), (1000, 52)]:
        for value in (0.01, 0.03, 0.05):
            assert within(x, n, value, 0.1) == (clopper_pearson_upper(x, n, 0.1) <= value)
            assert beyond(x, n, value, 0.01) == (clopper_pearson_lower(x, n, 0.01) > value)


@pytest.mark.slow  # starts a LitServe server (a few seconds) and sends it a bounded load on 127.0.0.1
def test_example_server_answers_a_bounded_loopback_load():
    pytest.importorskip("litserve")
    import importlib.util
    from pathlib import Path

    from sklearn.datasets import load_digits

    path = Path(__file__).resolve().parents[1] / "examples" / "serve" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    figures = load_test.run(requests=60, threads=4, deadline=120.0)
    assert figures["requests"] == 60
    images = load_digits().images
    assert all(set(a) == {"label", "exit", "audited"} and 0 <= a["label"] < 10 and a["exit"] in (0, 1)
               for a in figures["answers"])
    assert 0 < figures["audited"] < 60 and len(images) > 60
    assert figures["saved"] is not None and figures["saved"]["format"] == "branchify-online"
