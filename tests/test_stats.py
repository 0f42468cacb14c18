import json
import math
import re

import pytest
import torch

import branchify as bx
from branchify import _rows as rows

# --- an independent oracle: Distiller's validation loop, one sample at a time (REFERENCE.md section 1) ---


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(z - top) for z in row))
    return [z - lse for z in row]


def cross_entropy(row, label):
    return -_log_softmax(row)[label]


def entropy(row, _label):
    return -sum(math.exp(lp) * lp for lp in _log_softmax(row))


def confidence(row, _label):
    return max(math.exp(lp) for lp in _log_softmax(row))


def in_top(row, label, k):
    ranked = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
    return label in ranked[:k]


def oracle(batches, rules, topk=(1, 5)):
    """Distiller's per-sample walk: the first exit whose rule fires takes the sample, else the final one.

    ``rules[i](row, label) -> (score, fires)``. Returns the report lines Distiller printed, the
    per-exit taken counts, and the smallest distance of a score to its threshold (to know that the
    float32 scores under test cannot land on the other side).
    """
    num_exits = len(rules) + 1
    taken = [0] * num_exits
    correct = [[0] * len(topk) for _ in range(num_exits)]
    closest = math.inf
    for outputs, target in batches:
        rows = [o.tolist() for o in outputs]
        for b, label in enumerate(target.tolist()):
            chosen = num_exits - 1
            for i, rule in enumerate(rules):
                distance, fires = rule(rows[i][b], label)
                closest = min(closest, distance)
                if fires:
                    chosen = i
                    break
            taken[chosen] += 1
            classes = len(rows[chosen][b])
            for j, k in enumerate(topk):
                correct[chosen][j] += in_top(rows[chosen][b], label, min(k, classes))
    total = sum(taken)
    accuracy = [[100.0 * c / taken[i] if taken[i] else 0.0 for c in correct[i]] for i in range(num_exits)]
    lines = [f"Exit {i}: {taken[i]}" for i in range(num_exits) if taken[i]]
    lines += [f"Percent Early Exit {i}: {taken[i] * 100.0 / total:.3f}" for i in range(num_exits) if taken[i]]
    names = [f"top{k}" for k in topk]
    for i in range(num_exits):
        lines.append(f"Accuracy Stats for exit {i}: " + ", ".join(
            f"{name} = {acc:.3f}" for name, acc in zip(names, accuracy[i])))
    totals = [sum(accuracy[i][j] * taken[i] / total for i in range(num_exits)) for j in range(len(topk))]
    lines.append("Totals for entire network with early exits: " + ", ".join(
        f"{name} = {acc:.3f}" for name, acc in zip(names, totals)))
    return lines, taken, accuracy, totals, closest


def below(score_fn, threshold):
    def rule(row, label):
        score = score_fn(row, label)
        return abs(score - threshold), score < threshold
    return rule


def above(score_fn, threshold):
    def rule(row, label):
        score = score_fn(row, label)
        return abs(score - threshold), score >= threshold
    return rule


def random_batches(num_exits, classes, sizes=(37, 64, 5, 50), scale=3.0):
    return [(tuple(torch.randn(n, classes) * scale for _ in range(num_exits + 1)), torch.randint(0, classes, (n,)))
            for n in sizes]


def _spec(thresholds, criterion="entropy"):
    layers = ["layer1", "layer2", "layer3"]
    return bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, threshold=t) for layer, t in zip(layers, thresholds)],
                       criterion=criterion)


@pytest.fixture(params=["whole batches", "blocks of 3 rows", "blocks, ranks on every sample"])
def processing(request, monkeypatch):
    """The oracle tests' batches are small, so they are also run scored in blocks of rows (as large CPU
    batches are) and with the accelerators' way of ranking (every exit ranks every sample)."""
    if request.param != "whole batches":
        monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 30)  # 3 rows of 10 classes
    if request.param == "blocks, ranks on every sample":
        monkeypatch.setattr(bx.stats, "_compacts", lambda device: False)
    return request.param


def _run(stats, batches):
    for outputs, target in batches:
        stats.update(outputs, target)
    return stats


# --- routed statistics against the oracle ---


@pytest.mark.parametrize("classes", [10, 3])
def test_the_distiller_criterion_matches_distillers_loop_exactly(classes, capsys, processing):
    # exit 1 is never taken: off (a threshold of 0 would be refused, as no loss is below it)
    thresholds = [1.5, None, 2.5] if classes == 10 else [0.4, None, 0.8]
    batches = random_batches(3, classes)
    rules = [below(cross_entropy, t) if t is not None else (lambda row, label: (float("inf"), False))
             for t in thresholds]
    lines, taken, accuracy, totals, closest = oracle(batches, rules)
    assert closest > 1e-5 and taken[0] > 0 and taken[1] == 0 and taken[2] > 0 and taken[3] > 0
    with pytest.warns(UserWarning, match="'distiller'.*with the answer in hand.*'entropy'"):
        stats = bx.ExitStats(_spec(thresholds, "distiller"))
    summary = _run(stats, batches).summary()
    assert [row.taken for row in summary.exits] == taken
    for row, acc in zip(summary.exits, accuracy):
        assert row.percent == pytest.approx(100.0 * row.taken / sum(taken), rel=1e-12)
        if row.taken:
            assert [row.accuracy["top1"], row.accuracy["top5"]] == pytest.approx(acc, rel=1e-12)
        else:
            assert row.accuracy is None
    assert [summary.totals["top1"], summary.totals["top5"]] == pytest.approx(totals, rel=1e-12)
    # Distiller's lines exactly, then one line on the exit nobody took (its accuracy reads 0)
    note = "Note: no sample left at exit 1, so its accuracy above reads 0 (Distiller's convention), not a measured 0%"
    assert stats.report().splitlines() == [*lines, note]
    assert capsys.readouterr().out.splitlines() == [*lines, note]
    assert summary.lines() == lines
    if classes == 3:  # top-5 is clipped to the 3 classes, so every sample is in it
        assert summary.totals["top5"] == 100.0


@pytest.mark.parametrize(("criterion", "score_fn", "rule", "thresholds"), [
    ("entropy", entropy, below, [0.3, 0.9]),
    ("confidence", confidence, above, [0.95, 0.8]),
])
def test_label_free_criteria_match_a_per_sample_reference(criterion, score_fn, rule, thresholds, processing):
    batches = random_batches(2, 10)
    lines, taken, *_, closest = oracle(batches, [rule(score_fn, t) for t in thresholds])
    assert closest > 1e-5 and all(taken)
    stats = _run(bx.ExitStats(_spec(thresholds, criterion)), batches)
    assert [row.taken for row in stats.summary().exits] == taken
    assert stats.summary().lines() == lines


def test_per_exit_temperature_and_criterion_are_used_for_routing(processing):
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5, temperature=4.0),
                              bx.ExitPoint(layer="b", threshold=0.9, criterion="confidence")])
    batches = random_batches(2, 10)
    rules = [below(lambda row, y: entropy([z / 4.0 for z in row], y), 0.5), above(confidence, 0.9)]
    _, taken, *_, closest = oracle(batches, rules)
    assert closest > 1e-5
    assert [row.taken for row in _run(bx.ExitStats(spec), batches).summary().exits] == taken


def test_a_sample_with_nan_logits_never_leaves_early():
    stats = bx.ExitStats(_spec([0.6]))  # below log 2, the most two classes can reach: [5, 0] fires, NaN does not
    exit0 = torch.tensor([[float("nan"), 0.0], [5.0, 0.0]])
    stats.update((exit0, torch.tensor([[0.0, 1.0], [0.0, 1.0]])), torch.tensor([1, 0]))
    assert [row.taken for row in stats.summary().exits] == [1, 1]
    assert stats.summary().exits[1].accuracy["top1"] == 100.0


def test_routed_statistics_without_labels_give_counts_only(capsys, processing):
    stats = bx.ExitStats(_spec([0.3, 0.9]))
    batches = random_batches(2, 10)
    for outputs, _ in batches:
        stats.update(outputs)
    _, taken, *_ = oracle(batches, [below(entropy, 0.3), below(entropy, 0.9)])
    summary = stats.summary()
    assert [row.taken for row in summary.exits] == taken
    assert summary.totals is None and not summary.labeled and all(row.accuracy is None for row in summary.exits)
    text = stats.report()
    assert "Accuracy Stats" not in text and text.endswith("Accuracy not measured: update() was given no targets")


# --- forced statistics ---


def test_forced_statistics_judge_every_exit_on_every_sample(processing):
    batches = random_batches(2, 10)
    stats = _run(bx.ExitStats(_spec([0.3, 0.9]), mode="forced"), batches)
    summary = stats.summary()
    total = sum(len(t) for _, t in batches)
    assert summary.samples == total and len(summary.exits) == 3
    for i, row in enumerate(summary.exits):
        samples = [(o[i][b].tolist(), y) for o, t in batches for b, y in enumerate(t.tolist())]
        for k in (1, 5):
            expected = 100.0 * sum(in_top(r, y, k) for r, y in samples) / total
            assert row.accuracy[f"top{k}"] == pytest.approx(expected, rel=1e-12)
        logits = torch.cat([o[i] for o, _ in batches])
        target = torch.cat([t for _, t in batches])
        assert row.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-5)
        assert row.taken is None and row.percent is None
    lines = summary.lines()
    assert lines[:3] == [f"Accuracy Stats for exit {i}: top1 = {r.accuracy['top1']:.3f}, top5 = "
                         f"{r.accuracy['top5']:.3f}" for i, r in enumerate(summary.exits)]
    assert lines[3:] == [f"Mean loss for exit {i}: {r.loss:.5f}" for i, r in enumerate(summary.exits)]


def test_forced_statistics_need_no_thresholds_but_do_need_targets():
    stats = bx.ExitStats(bx.ExitSpec(exits=[bx.ExitPoint(layer="a")]), mode="forced", topk=(1, 2))
    with pytest.raises(bx.BranchifyError, match="forced statistics measure accuracy and loss.*needs the target"):
        stats.update((torch.zeros(2, 3), torch.zeros(2, 3)))
    stats.update((torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]])), torch.tensor([1]))
    assert [row.accuracy for row in stats.summary().exits] == [{"top1": 0.0, "top2": 100.0},
                                                               {"top1": 0.0, "top2": 100.0}]


# --- the report and the summary object ---


def _costs():
    return bx.ExitCosts(exits=[1.0e6, 2.5e6], full=4.4e6, original=4.0e6, backbone=[0.9e6, 2.2e6],
                        heads=[0.1e6, 0.2e6])


def test_report_lines_come_in_distillers_order_then_the_macs():
    stats = _run(bx.ExitStats(_spec([0.3, 0.9]), costs=_costs()), random_batches(2, 10))
    lines = stats.summary().lines()
    patterns = [r"Exit \d: \d+", r"Percent Early Exit \d: \d+\.\d{3}",
                r"Accuracy Stats for exit \d: top1 = \d+\.\d{3}, top5 = \d+\.\d{3}",
                r"Totals for entire network with early exits: top1 = \d+\.\d{3}, top5 = \d+\.\d{3}",
                r"MACs at exit \d( \(final\))?: \d+\.\d{3} MMACs", r"MACs of the original model: \d+\.\d{3} MMACs",
                r"Expected MACs per sample: \d+\.\d{3} MMACs", r"Saving vs the original model: -?\d+\.\d{3}%"]
    kinds = []
    for line in lines:
        matches = [j for j, p in enumerate(patterns) if re.fullmatch(p, line)]
        assert matches, f"unexpected line {line!r}"
        kinds.append(matches[0])
    assert kinds == sorted(kinds) and set(kinds) == set(range(len(patterns)))
    assert lines[-6:-2] == ["MACs at exit 0: 1.000 MMACs", "MACs at exit 1: 2.500 MMACs",
                            "MACs at exit 2 (final): 4.400 MMACs", "MACs of the original model: 4.000 MMACs"]


def test_expected_macs_and_saving_follow_the_shares():
    stats = _run(bx.ExitStats(_spec([0.3, 0.9]), costs=_costs()), random_batches(2, 10))
    summary = stats.summary()
    shares = [row.taken / summary.samples for row in summary.exits]
    expected = 1.0e6 * shares[0] + 2.5e6 * shares[1] + 4.4e6 * shares[2]
    assert summary.expected_macs == pytest.approx(expected)
    assert summary.saving_percent == pytest.approx(100.0 * (1 - expected / 4.0e6))
    assert [row.macs for row in summary.exits] == [1.0e6, 2.5e6, 4.4e6] and summary.original_macs == 4.0e6
    assert summary.lines()[-2:] == [f"Expected MACs per sample: {expected / 1e6:.3f} MMACs",
                                    f"Saving vs the original model: {100.0 * (1 - expected / 4.0e6):.3f}%"]


def test_summary_is_plain_data_with_a_readable_repr_and_html():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="blocks<1>", threshold=0.5)])
    stats = bx.ExitStats(spec, costs=bx.ExitCosts(exits=[1e6], full=3e6, original=2.5e6, backbone=[0.5e6],
                                                  heads=[0.5e6]))
    stats.update((torch.tensor([[9.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 9.0], [0.0, 9.0]])),
                 torch.tensor([0, 0]))
    summary = stats.summary()
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["mode"] == "routed" and data["samples"] == 2 and data["topk"] == [1, 5]
    assert data["exits"][0] == {"exit": 0, "layer": "blocks<1>", "taken": 1, "percent": 50.0,
                                "accuracy": {"top1": 100.0, "top5": 100.0}, "loss": None, "macs": 1e6}
    assert data["exits"][1]["accuracy"] == {"top1": 0.0, "top5": 100.0} and data["totals"]["top1"] == 50.0
    assert data["expected_macs"] == 2e6 and data["saving_percent"] == pytest.approx(20.0)
    text = repr(summary)
    assert text.splitlines()[0] == "ExitStatsSummary(mode='routed', samples=2, num_classes=2)"
    assert re.search(r"^0\s+blocks<1>\s+1\s+50\.000\s+100\.000\s+100\.000\s+1\.000$", text, re.M)
    assert re.search(r"^all\s+2\s+100\.000\s+50\.000\s+100\.000\s+2\.000$", text, re.M)
    page = summary._repr_html_()
    assert page.startswith("<table>") and page.split("</table>")[0].count("<tr>") == 4 and "blocks&lt;1&gt;" in page
    assert "<th>top5</th>" in page and "expected saving: 20.000%" in page


def test_reset_forgets_everything():
    stats = _run(bx.ExitStats(_spec([0.3])), random_batches(1, 10))
    stats.reset()
    with pytest.raises(bx.BranchifyError, match="no statistics yet"):
        stats.summary()
    stats.update((torch.zeros(2, 4), torch.zeros(2, 4)), torch.tensor([0, 1]))  # another class count is fine now
    assert stats.summary().samples == 2 and stats.summary().num_classes == 4


# --- bad input ---


def test_a_wrong_number_of_outputs_is_rejected():
    stats = bx.ExitStats(_spec([0.3, 0.9]))
    with pytest.raises(bx.BranchifyError, match=r"got 2 outputs but the spec has 2 exits, so 3 outputs"):
        stats.update((torch.zeros(2, 3), torch.zeros(2, 3)), torch.tensor([0, 1]))


@pytest.mark.parametrize(("target", "message"), [
    (torch.tensor([[0], [1]]), r"target has shape \(2, 1\) but the outputs have a batch of 2; .*shape \(2,\)"),
    (torch.tensor([0, 1, 2]), r"target has shape \(3,\) but the outputs have a batch of 2"),
    (torch.tensor([0.0, 1.0]), r"target has dtype torch.float32; .*class indices.*argmax"),
    (torch.tensor([True, False]), r"target has dtype torch.bool"),
    ([0, 1], "target must be a tensor of class indices, got list"),
    (torch.tensor([0, 7]), r"class indices \[7\] outside 0..2 \(the outputs have 3 classes\)"),
    (torch.tensor([-1, 0]), r"class indices \[-1\] outside 0..2"),
])
@pytest.mark.parametrize("mode", ["routed", "forced"])
def test_targets_that_do_not_fit_are_rejected(target, message, mode):
    stats = bx.ExitStats(_spec([0.3]), mode=mode)
    with pytest.raises(bx.BranchifyError, match=message):
        stats.update((torch.zeros(2, 3), torch.zeros(2, 3)), target)
    with pytest.raises(bx.BranchifyError, match="no statistics yet"):  # nothing was counted
        stats.summary()


def test_int32_targets_are_accepted():
    stats = bx.ExitStats(_spec([0.3]))
    stats.update((torch.zeros(2, 3), torch.eye(3)[:2]), torch.tensor([0, 1], dtype=torch.int32))
    assert stats.summary().totals["top1"] == 100.0


def test_routed_statistics_need_thresholds():
    with pytest.raises(bx.BranchifyError,
                       match=r"no exit of the spec has a threshold.*with_exits\(threshold=.*mode='forced'"):
        bx.ExitStats(bx.ExitSpec(exits=[bx.ExitPoint(layer="a")]))


def test_the_distiller_criterion_needs_labels():
    with pytest.warns(UserWarning, match="distiller"):
        stats = bx.ExitStats(_spec([0.3, 0.9], "distiller"))
    with pytest.raises(bx.BranchifyError, match=r"exits \[0, 1\] use a criterion that reads the labels"):
        stats.update((torch.zeros(2, 3),) * 3)


def test_forced_statistics_do_not_warn_about_the_distiller_criterion(recwarn):
    bx.ExitStats(_spec([0.3], "distiller"), mode="forced")
    assert not [w for w in recwarn if "distiller" in str(w.message)]


def test_targets_must_be_given_always_or_never():
    stats = bx.ExitStats(_spec([0.3]))
    stats.update((torch.zeros(2, 3),) * 2, torch.tensor([0, 1]))
    with pytest.raises(bx.BranchifyError, match="earlier updates came with targets"):
        stats.update((torch.zeros(2, 3),) * 2)


def test_a_different_number_of_classes_is_rejected():
    stats = bx.ExitStats(_spec([0.3]))
    stats.update((torch.zeros(2, 3),) * 2, torch.tensor([0, 1]))
    with pytest.raises(bx.BranchifyError, match=r"4 classes but earlier ones had 3; call stats.reset\(\)"):
        stats.update((torch.zeros(2, 4),) * 2, torch.tensor([0, 1]))


def test_only_empty_batches_give_no_summary():
    stats = bx.ExitStats(_spec([0.3]))
    stats.update((torch.zeros(0, 3),) * 2, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(bx.BranchifyError, match="no samples yet"):
        stats.summary()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "eval"}, "mode='eval'; use 'routed'.*or 'forced'"),
    ({"topk": (0, 5)}, r"topk=\(0, 5\) must be a non-empty sequence of positive integers"),
    ({"topk": ()}, r"topk=\(\) must be"),
    ({"topk": "15"}, r"topk='15' must be"),
    ({"topk": (1, 1)}, "repeats a value"),
    ({"costs": {"exits": [1.0]}}, "costs must be the bx.ExitCosts"),
    ({"costs": bx.ExitCosts(exits=[1.0], full=2.0, original=1.5, backbone=[1.0], heads=[0.0])},
     r"costs cover 1 early exit\(s\) but the spec has 2"),
])
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(bx.BranchifyError, match=message):
        bx.ExitStats(_spec([0.3, 0.9]), **kwargs)


def test_a_module_instead_of_a_spec_points_to_exit_spec():
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="1")]), torch.randn(1, 2))
    with pytest.raises(bx.BranchifyError, match="pass module.exit_spec"):
        bx.ExitStats(module)


def test_outputs_on_another_device_are_rejected():
    stats = bx.ExitStats(_spec([0.3]))
    stats.update((torch.zeros(2, 3),) * 2, torch.tensor([0, 1]))
    with pytest.raises(bx.BranchifyError, match="these outputs are on meta but earlier ones were on cpu"):
        stats.update((torch.zeros(2, 3, device="meta"),) * 2, torch.tensor([0, 1]))
