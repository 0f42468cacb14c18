import math

import numpy as np
import pytest
import torch

import branchify as bx
from branchify import _rows as rows
from branchify import criteria
from branchify.criteria import get_criterion
from branchify.routing import exit_rules, route


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
    # register_criterion writes to a module-level registry: keep each test's registrations to itself
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))


def _softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 4.9, -3.0, 1.0]])


def test_entropy_is_softmax_entropy_in_nats():
    scores = get_criterion("entropy").score(LOGITS)
    expected = [-sum(p * math.log(p) for p in _softmax(row)) for row in LOGITS.tolist()]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)
    assert scores[1].item() == pytest.approx(math.log(4), rel=1e-6)


def test_confidence_is_max_probability():
    scores = get_criterion("confidence").score(LOGITS)
    assert scores.tolist() == pytest.approx([max(_softmax(r)) for r in LOGITS.tolist()], rel=1e-6)


def test_margin_is_top1_minus_top2_probability():
    scores = get_criterion("margin").score(LOGITS)
    expected = [sorted(_softmax(r))[-1] - sorted(_softmax(r))[-2] for r in LOGITS.tolist()]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_margin_of_a_single_class_is_full_confidence():
    assert get_criterion("margin").score(torch.tensor([[3.0], [-1.0]])).tolist() == [1.0, 1.0]


def test_distiller_is_per_sample_cross_entropy_against_the_label():
    target = torch.tensor([0, 3, 1])
    scores = get_criterion("distiller").score(LOGITS, target)
    expected = [-math.log(_softmax(r)[t]) for r, t in zip(LOGITS.tolist(), target.tolist())]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_distiller_without_labels_is_refused():
    with pytest.raises(bx.BranchifyError, match="reads the labels.*entropy"):
        get_criterion("distiller").score(LOGITS)


@pytest.mark.parametrize(("name", "direction"), [("entropy", "below"), ("confidence", "above"),
                                                 ("margin", "above"), ("distiller", "below")])
def test_direction_and_the_boundary(name, direction):
    crit = get_criterion(name)
    assert crit.exits_when == direction
    scores = crit.score(LOGITS, torch.tensor([0, 1, 2]))
    at_threshold = crit.fires(scores, float(scores[0]))[0].item()
    # "below" is strict (Distiller and BranchyNet), "above" includes the threshold
    assert at_threshold is (direction == "above")
    low, high = float(scores.min()) - 1, float(scores.max()) + 1
    assert crit.fires(scores, high).all() == (direction == "below")
    assert crit.fires(scores, low).all() == (direction == "above")


@pytest.mark.parametrize("name", ["entropy", "confidence", "margin", "distiller"])
def test_a_nan_score_never_exits(name):
    crit = get_criterion(name)
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [9.0, 0.0, 0.0]])
    scores = crit.score(logits, torch.tensor([0, 0]))
    assert math.isnan(scores[0].item())
    for threshold in (-math.inf, 0.0, 0.5, math.inf):
        assert not crit.fires(scores, threshold)[0]


@pytest.mark.parametrize("name", ["entropy", "confidence", "margin"])
def test_a_rule_lets_out_the_samples_a_float32_comparison_with_its_threshold_does(name):
    # ExitRule compares with its threshold held as a 0-dim tensor (issue 25); the mask must be numpy's float32
    # comparison with the float, at thresholds on scores and halfway between neighbouring float32 values.
    crit = get_criterion(name)
    logits = torch.randn(64, 10) * 3
    scores = crit.score(logits)
    above = torch.nextafter(scores, torch.tensor(math.inf))
    thresholds = scores[:8].double().tolist() + ((scores[:8].double() + above[:8].double()) / 2).tolist()
    for threshold in thresholds:
        rule = exit_rules(bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=threshold, criterion=name)]))[0]
        s32, t32 = scores.numpy().astype(np.float32), np.float32(threshold)
        expected = s32 < t32 if crit.exits_when == "below" else s32 >= t32
        assert rule.fires(logits).tolist() == expected.tolist()
        # one sample at a time (the runner's batch-1 path): its score read back and compared in Python
        assert [rule.fires_one(logits[j:j + 1]) for j in range(len(logits))] == expected.tolist()


def _one_sample_logits():
    # Rows of many widths and scales, ties (equal logits: entropy log C exactly at the top), infinities and NaN.
    generator = torch.Generator().manual_seed(0)
    rows = []
    for classes in (1, 2, 3, 7, 8, 9, 10, 16, 17, 100, 1001):
        for scale in (1e-3, 1.0, 5.0, 40.0):
            rows += list(torch.randn(20, classes, generator=generator) * scale)
        rows += [torch.zeros(classes), torch.full((classes,), 7.0)]
        if classes > 1:
            rest = [0.0] * (classes - 1)
            rows += [torch.tensor([math.inf, *rest]), torch.tensor([-math.inf, *rest]), torch.tensor([math.nan, *rest])]
    return rows


@pytest.mark.parametrize("name", ["entropy", "confidence", "margin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_samples_score_read_back_is_the_batch_formulas_bit_for_bit(name, dtype):
    # Criterion.one (the runner's batch-1 path; entropy negates after the read-back) must give exactly
    # score(...).item(), NaN where it is NaN, and a float32 value.
    crit = get_criterion(name)
    for row in _one_sample_logits():
        z = row[None].to(dtype)
        for temperature in (1.0, 0.7):
            expected = crit.score(z, temperature=temperature)
            assert expected.dtype == torch.float32
            got = crit.one(z if temperature == 1.0 else z / temperature)
            assert type(got) is float
            assert (math.isnan(got) and math.isnan(expected.item())) or got == expected.item(), (row, temperature)


@pytest.mark.parametrize("name", ["entropy", "confidence", "margin"])
def test_one_sample_is_judged_as_in_a_batch_nan_included(name):
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [9.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    past_float32 = (1e39,) if get_criterion(name).exits_when == "below" else ()  # rounds to inf in float32
    for threshold in (0.0, 0.05, 0.5, 0.9999, 1.0, *past_float32):
        rule = exit_rules(bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=threshold, criterion=name)]))[0]
        assert [rule.fires_one(logits[j:j + 1]) for j in range(3)] == rule.fires(logits).tolist()


def test_temperature_divides_the_logits_before_scoring():
    crit = get_criterion("entropy")
    assert torch.allclose(crit.score(LOGITS, temperature=2.0), crit.score(LOGITS / 2.0))
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5, temperature=3.0)])
    cold = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5)])
    logits = torch.tensor([[4.0, 0.0, 0.0]])  # entropy 0.07 at T=1, 0.8 at T=3
    assert exit_rules(cold)[0].fires(logits).tolist() == [True]
    assert exit_rules(spec)[0].fires(logits).tolist() == [False]


def test_register_criterion_is_usable_in_a_spec_and_per_exit():
    crit = bx.register_criterion("top_logit", lambda z: z.amax(dim=-1), exits_when="above")
    assert crit.needs_labels is False and "top_logit" in criteria.registered_criteria()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=1.0, criterion="top_logit"),
                              bx.ExitPoint(layer="b", threshold=1.0)])
    assert spec.criterion_of(0) == "top_logit" and spec.criterion_of(1) == "entropy"
    logits = torch.tensor([[3.0, 0.0], [0.5, 0.4]])
    assert exit_rules(spec)[0].fires(logits).tolist() == [True, False]


def test_register_criterion_rejects_bad_input():
    with pytest.raises(bx.BranchifyError, match="built in"):
        bx.register_criterion("entropy", lambda z: z.sum(-1))
    with pytest.raises(bx.BranchifyError, match="exits_when"):
        bx.register_criterion("x", lambda z: z.sum(-1), exits_when="sideways")
    with pytest.raises(bx.BranchifyError, match="callable"):
        bx.register_criterion("x", 3)
    with pytest.raises(bx.BranchifyError, match="non-empty"):
        bx.register_criterion("", lambda z: z.sum(-1))


def test_an_unknown_criterion_lists_the_registered_ones():
    with pytest.raises(bx.BranchifyError, match=r"unknown criterion 'entropyy'.*'entropy'.*register_criterion"):
        get_criterion("entropyy")


def test_route_takes_the_first_exit_that_fires_else_the_final():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.9), bx.ExitPoint(layer="b", threshold=0.9)],
                       criterion="confidence")
    sure, unsure = [9.0, 0.0], [0.0, 0.0]
    exit0 = torch.tensor([sure, unsure, unsure, sure])
    exit1 = torch.tensor([sure, sure, unsure, unsure])
    taken = route(spec, [exit0, exit1])
    assert taken.dtype == torch.int64 and taken.tolist() == [0, 1, 2, 0]


def test_route_honours_per_exit_criteria_and_labels():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5, criterion="distiller"),
                              bx.ExitPoint(layer="b", threshold=0.9, criterion="confidence")])
    exit0 = torch.tensor([[9.0, 0.0], [9.0, 0.0], [0.0, 0.0]])
    exit1 = torch.tensor([[0.0, 0.0], [0.0, 9.0], [0.0, 0.0]])
    assert route(spec, [exit0, exit1], torch.tensor([0, 1, 1])).tolist() == [0, 1, 2]


def test_route_rejects_a_wrong_number_of_exits_and_missing_thresholds():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5)])
    with pytest.raises(bx.BranchifyError, match="2 exit outputs for a spec with 1 exits"):
        route(spec, [torch.zeros(2, 3), torch.zeros(2, 3)])
    with pytest.raises(bx.BranchifyError, match="no exit of the spec has a threshold"):
        route(bx.ExitSpec(exits=[bx.ExitPoint(layer="a")]), [torch.zeros(2, 3)])


@pytest.mark.parametrize("name", ["entropy", "confidence", "margin", "distiller"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_large_cpu_batches_are_scored_in_blocks_with_the_same_scores(name, temperature, monkeypatch):
    torch.manual_seed(0)
    logits, target = torch.randn(50, 7) * 3, torch.randint(0, 7, (50,))
    crit = get_criterion(name)
    whole = crit.score(logits, target, temperature=temperature)
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 21)  # blocks of 3 rows, the last one of 2
    seen = []
    counted = criteria.Criterion(name, lambda z, *y: seen.append(len(z)) or crit.score_fn(z, *y), crit.exits_when,
                                 crit.needs_labels)
    blocks = counted.score(logits, target, temperature=temperature)
    assert seen == [3] * 16 + [2]
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)


def test_by_rows_splits_every_input_alike_and_leaves_small_or_empty_batches_whole(monkeypatch):
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 8)
    z, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    calls = []

    def fn(a, b):
        calls.append(len(a))
        return a[:, 0] * 100 + b

    assert torch.equal(rows.by_rows(fn, z, y), z[:, 0] * 100 + y) and calls == [4, 4, 2]
    calls.clear()
    assert rows.by_rows(fn, z[:3], y[:3]).shape == (3,) and calls == [3]
    calls.clear()
    assert rows.by_rows(fn, z[:0], y[:0]).shape == (0,) and calls == [0]


def test_entropy_has_the_right_gradient():
    # the entropy writes in place when nothing needs its gradient; with autograd on it must not
    logits = (torch.randn(6, 5) * 2).requires_grad_()
    (grad,) = torch.autograd.grad(get_criterion("entropy").score(logits).sum(), logits)
    p = torch.softmax(logits.detach(), dim=-1)
    entropy = -(p * p.log()).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -p * (p.log() + entropy))


def test_rules_of_the_built_in_criteria_pickle_and_judge_alike_after():
    # Rules travel to worker processes (data loaders, process groups): their criteria, Criterion.one included,
    # must pickle, and judge one sample as before.
    import pickle

    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, threshold=0.5, criterion=name)
                              for layer, name in (("a", "entropy"), ("b", "confidence"), ("c", "margin"))])
    rules = exit_rules(spec)
    again = pickle.loads(pickle.dumps(rules))
    logits = torch.randn(8, 5) * 2
    for rule, twin in zip(rules, again):
        rows = [logits[j:j + 1] for j in range(8)]
        assert [twin.fires_one(z) for z in rows] == [rule.fires_one(z) for z in rows] == rule.fires(logits).tolist()
