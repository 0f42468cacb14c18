"""Exits that are off (threshold None) and the patience criterion, against per-sample reference loops.

The references walk one sample at a time through the exits in order, as a reader of the rule would:
an exit that is off is skipped; a criterion on one exit's logits compares the score with the
threshold; patience counts the judged exits, ending at this one, that predict the same class.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx
from branchify.criteria import get_criterion
from branchify.routing import route
from tests.exits import expected, spread_heads, with_mix

LAYERS = ["layer1", "layer2", "layer3"]


def reference_exit(spec: bx.ExitSpec, per_exit_logits: list[torch.Tensor]) -> int:
    """The exit one sample takes (logits of that sample, one per early exit)."""
    previous, streak = None, 0
    for i, (point, z) in enumerate(zip(spec.exits, per_exit_logits)):
        if point.threshold is None:
            continue  # off: never judged, no prediction to count
        crit = get_criterion(spec.criterion_of(i))
        prediction = int(z.argmax())
        streak = streak + 1 if prediction == previous else 1
        previous = prediction
        if crit.across_exits:
            if streak >= point.threshold:
                return i
            continue
        score = float(crit.score(z[None], temperature=point.temperature)[0])
        if (score < point.threshold) if crit.exits_when == "below" else (score >= point.threshold):
            return i
    return len(spec.exits)


def reference(spec: bx.ExitSpec, outputs) -> torch.Tensor:
    exits = outputs[:-1]
    return torch.tensor([reference_exit(spec, [z[b] for z in exits]) for b in range(exits[0].shape[0])])


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(24, 3, 32, 32)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in LAYERS]), x[:1])
    module.eval()
    spread_heads(module, x)
    with_mix(module, x)
    return model, module, x


def test_an_exit_that_is_off_is_skipped_by_every_router(resnet):
    model, module, x = resnet
    mixed = module.exit_spec
    module.exit_spec = spec = mixed.with_exits(threshold=[mixed.exits[0].threshold, None, mixed.exits[2].threshold])
    calls = []  # real calls only: counting MACs runs the whole graph on fake tensors
    handle = module.exit_heads[1].register_forward_hook(
        lambda m, args, out: calls.append(1) if not isinstance(out, FakeTensor) else None)
    try:
        with torch.no_grad():
            outputs = module(x)
        calls.clear()
        want = reference(spec, outputs)
        assert torch.equal(route(spec, outputs[:-1]), want)
        result = bx.ExitRunner(module)(x)
        assert torch.equal(result.exit_index, want)
        assert not calls, "the runner must not run the head of an exit that is off"
        assert 1 not in result.exit_index.tolist() and {0, 2}.issubset(set(want.tolist()))
        torch.testing.assert_close(result.logits, expected(outputs, want), rtol=1e-4, atol=1e-5)
        stats = bx.ExitStats(spec)
        stats.update(outputs, torch.zeros(len(x), dtype=torch.long))
        assert [row.taken for row in stats.summary().exits] == torch.bincount(want, minlength=4).tolist()
    finally:
        handle.remove()
        module.exit_spec = mixed


def test_an_exit_that_is_off_costs_what_an_absent_exit_costs(resnet):
    model, module, x = resnet
    mixed = module.exit_spec
    module.exit_spec = mixed.with_exits(threshold=[mixed.exits[0].threshold, None, mixed.exits[2].threshold])
    try:
        costs = bx.exit_costs(module, x[:1])
        absent = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"),
                                                           bx.ExitPoint(layer="layer3")]), x[:1])
        reference_costs = bx.exit_costs(absent, x[:1])
        assert [costs.exits[0], costs.exits[2], costs.full] == pytest.approx(
            [reference_costs.exits[0], reference_costs.exits[1], reference_costs.full], rel=1e-12)
        result = bx.ExitRunner(module)(x)
        per_exit = reference_costs.per_exit
        assert result.macs.tolist() == pytest.approx([per_exit[{0: 0, 2: 1, 3: 2}[e]] for e in
                                                      result.exit_index.tolist()], rel=1e-12)
    finally:
        module.exit_spec = mixed


def test_the_hook_path_skips_an_exit_that_is_off(resnet):
    model, _, x = resnet
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in LAYERS])
    module = bx.attach_exits(model, spec, x[:1], capture="hooks").eval()
    spread_heads(module, x)
    mixed = with_mix(module, x)
    module.exit_spec = spec = mixed.with_exits(threshold=[None, mixed.exits[1].threshold, mixed.exits[2].threshold])
    with torch.no_grad():
        outputs = module(x)
    assert torch.equal(bx.ExitRunner(module)(x).exit_index, reference(spec, outputs))


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_routes_as_the_per_sample_loop_on_both_paths(resnet, patience):
    model, module, x = resnet
    mixed = module.exit_spec
    spec = bx.ExitSpec(exits=[p.model_copy(update={"threshold": float(patience), "criterion": None})
                              for p in mixed.exits], criterion="patience")
    hooked = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in LAYERS]), x[:1],
                             capture="hooks").eval()
    hooked.exit_heads.load_state_dict(module.exit_heads.state_dict())
    try:
        for m in (module, hooked):
            m.exit_spec = spec
            with torch.no_grad():
                outputs = m(x)
            want = reference(spec, outputs)
            assert torch.equal(route(spec, outputs[:-1]), want)
            runner = bx.ExitRunner(m)
            result = runner(x)
            assert torch.equal(result.exit_index, want)
            torch.testing.assert_close(result.logits, expected(outputs, want), rtol=1e-4, atol=1e-5)
            # The same runner again: each call starts its runs of agreeing exits afresh (the runner keeps one
            # judge per spec), whatever the batch before it, down to one sample at a time.
            assert torch.equal(runner(x[5:]).exit_index, want[5:])
            assert [int(runner(x[j:j + 1]).exit_index) for j in range(6)] == want[:6].tolist()
            assert torch.equal(runner(x).exit_index, want)
            stats = bx.ExitStats(spec)
            stats.update(outputs, torch.zeros(len(x), dtype=torch.long))
            assert [row.taken for row in stats.summary().exits] == torch.bincount(want, minlength=4).tolist()
        if patience == 1:
            assert set(want.tolist()) == {0}, "patience 1 lets every sample out at the first judged exit"
    finally:
        module.exit_spec = mixed


def test_patience_counts_only_the_exits_that_are_on(resnet):
    _, module, x = resnet
    mixed = module.exit_spec
    spec = bx.ExitSpec(exits=[p.model_copy(update={"threshold": t, "criterion": None})
                                for p, t in zip(mixed.exits, [None, 2.0, 2.0])],
                       criterion="patience")
    module.exit_spec = spec
    try:
        with torch.no_grad():
            outputs = module(x)
        want = reference(spec, outputs)
        assert torch.equal(bx.ExitRunner(module)(x).exit_index, want)
        assert 0 not in want.tolist() and 1 not in want.tolist(), "exit 1 is the first judged: its run is 1"
    finally:
        module.exit_spec = mixed


@pytest.mark.parametrize("threshold", [0.0, 1.5, -2.0])
def test_a_patience_threshold_must_be_a_positive_integer(threshold):
    with pytest.raises(bx.SpecError, match=rf"criterion 'patience' takes a positive integer threshold.*got "
                                           rf"{threshold!r}"):
        bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=threshold)], criterion="patience")


def test_routing_without_any_threshold_is_refused_with_the_way_out(resnet):
    _, module, x = resnet
    mixed = module.exit_spec
    module.exit_spec = mixed.with_exits(threshold=[None] * 3)
    try:
        with pytest.raises(bx.BranchifyError, match=r"no exit of the spec has a threshold.*bx.calibrate"):
            bx.ExitRunner(module)
        with pytest.raises(bx.BranchifyError, match=r"no exit of the spec has a threshold.*mode='forced'"):
            bx.ExitStats(module.exit_spec)
    finally:
        module.exit_spec = mixed


# --- calibration ---------------------------------------------------------------------------------------


def _linear_module(k: int = 3, seed: int = 0):
    """A backbone of identity blocks (k with exits, then as many again before the classifier, so that leaving
    early saves compute); exit i reads block i of the input, as strong as the data makes it."""
    width, classes = 16 * (k + 1), 4
    blocks = 2 * k
    backbone = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(blocks)],
                             nn.Linear(width, classes))
    with torch.no_grad():
        for layer in backbone[:blocks]:
            layer.weight.copy_(torch.eye(width))
        backbone[blocks].weight.zero_()
        backbone[blocks].weight[:, k * 16:k * 16 + classes] = torch.eye(classes)
        backbone[blocks].bias.zero_()
    module = bx.attach_exits(backbone, bx.ExitSpec(exits=[bx.ExitPoint(layer=str(i)) for i in range(k)]),
                             torch.randn(1, width))
    with torch.no_grad():
        for i, head in enumerate(module.exit_heads):
            head[-1].weight.zero_()
            head[-1].bias.zero_()
            head[-1].weight[:, i * 16:i * 16 + classes] = torch.eye(classes)
    g = torch.Generator().manual_seed(seed)
    n = 1500
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, width, generator=g)
    hard = torch.rand(n, generator=g)
    for b in range(k + 1):
        strength = 6 * ((b + 1) / (k + 1) - hard + 0.5).clamp(0, 1)
        x[:, b * 16:b * 16 + classes] += torch.nn.functional.one_hot(y, classes) * strength[:, None]
    return module.eval(), DataLoader(TensorDataset(x, y), batch_size=500), x, y


def test_patience_calibration_is_the_best_patience_by_brute_force():
    module, loader, x, y = _linear_module()
    module.exit_spec = module.exit_spec.model_copy(update={"criterion": "patience"})
    cal = bx.calibrate(module, loader, max_accuracy_drop=0.03, guarantee=False, progress=False)
    with torch.no_grad():
        outputs = module(x)
    final = outputs[-1].argmax(-1)
    logits = torch.stack(list(outputs))
    best = None
    for t in [None, 1.0, 2.0, 3.0]:
        spec = module.exit_spec.with_exits(threshold=[t] * 3)
        taken = torch.full((len(y),), 3) if t is None else reference(spec, outputs)
        module.exit_spec, built = spec if t is not None else module.exit_spec, module.exit_spec
        costs = bx.exit_costs(module, x[:1])
        module.exit_spec = built
        per_exit = [costs.original] * 4 if t is None else costs.per_exit
        macs = float(torch.tensor(per_exit, dtype=torch.float64)[taken].mean())
        accuracy = float((logits[taken, torch.arange(len(y))].argmax(-1) == y).double().mean())
        drop = float((final == y).double().mean()) - accuracy
        if drop <= 0.03 + 1e-12 and (best is None or (macs, -accuracy) < best[:2]):
            best = (macs, -accuracy, t)
    assert cal.spec.exits[0].threshold == best[2] and cal.expected_macs == pytest.approx(best[0])
    assert best[2] is not None, "the data lets agreeing exits out"


def test_patience_calibration_with_the_guarantee_holds_its_bound():
    module, loader, x, y = _linear_module()
    module.exit_spec = module.exit_spec.model_copy(update={"criterion": "patience"})
    cal = bx.calibrate(module, loader, max_accuracy_drop=0.05, progress=False)
    assert cal.guarantee and cal.met and cal.drop_bound <= 0.05
    assert cal.bounds.samples == len(y), "the patience candidates are fixed in advance: every sample tests them"


def test_calibration_switches_an_exit_off_when_that_is_cheaper():
    module, loader, x, y = _linear_module()
    with torch.no_grad():
        module.exit_heads[1][-1].weight.zero_()  # exit 1 knows nothing: uniform logits, never sure
    cal = bx.calibrate(module, loader, max_accuracy_drop=0.02, guarantee=False, progress=False)
    assert cal.spec.exits[1].threshold is None, "a head that never helps is cheaper off than judged"
    assert cal.spec.exits[0].threshold is not None or cal.spec.exits[2].threshold is not None
    on = [p.threshold is not None for p in cal.spec.exits]
    assert cal.costs.judged == on
    assert cal.costs.full == pytest.approx(cal.costs.original + sum(h for h, j in zip(cal.costs.heads, on) if j))


def test_a_registered_criterion_with_negative_scores_calibrates_like_its_mirror():
    module, loader, x, y = _linear_module()
    entropy = get_criterion("entropy")
    name = "negative_entropy_for_test"
    if name not in bx.criteria.registered_criteria():
        bx.register_criterion(name, lambda z: -entropy.score(z), exits_when="above", low=-10.0, high=0.0)
    module.exit_spec = module.exit_spec.model_copy(update={"criterion": "entropy"})
    plain = bx.calibrate(module, loader, max_accuracy_drop=0.02, guarantee=False, progress=False)
    module.exit_spec = module.exit_spec.model_copy(update={"criterion": name})
    mirrored = bx.calibrate(module, loader, max_accuracy_drop=0.02, guarantee=False, progress=False)
    assert mirrored.met and any(t is not None and t < 0 for t in mirrored.spec.thresholds)
    assert mirrored.expected_macs == pytest.approx(plain.expected_macs)
    assert mirrored.accuracy == pytest.approx(plain.accuracy)


def test_scores_outside_the_declared_range_are_refused():
    module, loader, x, y = _linear_module()
    name = "too_narrow_for_test"
    if name not in bx.criteria.registered_criteria():
        bx.register_criterion(name, lambda z: z.amax(dim=-1), exits_when="above", low=0.0, high=0.5)
    module.exit_spec = module.exit_spec.model_copy(update={"criterion": name})
    with pytest.raises(bx.BranchifyError, match=r"declares scores in \[0, 0.5\], but gave scores in"):
        bx.calibrate(module, loader, max_accuracy_drop=0.02, guarantee=False, progress=False)


def test_the_sweep_searches_patience():
    torch.manual_seed(0)
    _, loader, x, y = _linear_module()
    backbone = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)], nn.Linear(64, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bx.sweep(backbone, loader, loader, candidates=["0", "1", "2"], criterion="patience", epochs=1,
                          max_exits=2, max_accuracy_drop=0.05, progress=False)
    assert result.best.spec.criterion == "patience"
    for point in result.frontier:
        assert len(set(point.thresholds)) <= 1 and all(t is None or float(t).is_integer() for t in point.thresholds)


def test_per_class_exit_distribution_matches_a_count():
    torch.manual_seed(0)
    classes = 3
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.6), bx.ExitPoint(layer="b", threshold=0.6)],
                       criterion="confidence")
    exits = [torch.randn(50, classes) * 3, torch.randn(50, classes) * 3]
    final = torch.randn(50, classes)
    target = torch.randint(0, classes, (50,))
    stats = bx.ExitStats(spec)
    stats.update((*exits, final), target)
    summary = stats.summary()
    taken = reference(spec, (*exits, final))
    logits = torch.stack([*exits, final])
    right = logits[taken, torch.arange(50)].argmax(-1) == target
    for row in summary.per_class:
        mine = target == row.label
        assert row.samples == int(mine.sum())
        for i, (percent, accuracy) in enumerate(zip(row.percent, row.accuracy)):
            here = mine & (taken == i)
            assert percent == pytest.approx(100 * int(here.sum()) / int(mine.sum()))
            assert accuracy == (None if not here.any() else pytest.approx(100 * float(right[here].double().mean())))
    assert summary.to_dict()["per_class"][0]["label"] == summary.per_class[0].label
    assert "per class" in repr(summary) and "per class" in summary._repr_html_()


def test_per_class_rows_cover_every_class_seen():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5)], criterion="confidence")
    stats = bx.ExitStats(spec)
    for labels in itertools.islice(itertools.cycle([[0, 2], [2, 2]]), 3):
        stats.update((torch.tensor([[5.0, 0, 0], [0, 0, 0.1]]), torch.zeros(2, 3)), torch.tensor(labels))
    assert [row.label for row in stats.summary().per_class] == [0, 2]


def test_a_runner_charges_by_the_spec_in_force_at_each_call(resnet):
    _, module, x = resnet
    mixed = module.exit_spec
    runner = bx.ExitRunner(module, x[:1])  # MACs counted with every exit judged
    try:
        module.exit_spec = mixed.with_exits(threshold=[mixed.exits[0].threshold, None, mixed.exits[2].threshold])
        result = runner(x)
        per_exit = bx.exit_costs(module, x[:1]).per_exit
        assert result.macs.tolist() == [per_exit[e] for e in result.exit_index.tolist()]
        assert not bx.exit_costs(module, x[:1]).judged[1]
    finally:
        module.exit_spec = mixed
