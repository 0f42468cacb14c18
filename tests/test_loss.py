import math

import pytest
import torch
import torchvision

import branchify as bx


def _spec(weights=(0.2, 0.3)):
    layers = ["layer1", "layer3", "layer2"][: len(weights)]
    return bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, weight=w) for layer, w in zip(layers, weights)])


def _log_softmax(row, temperature=1.0):
    row = [z / temperature for z in row]
    top = max(row)
    lse = top + math.log(sum(math.exp(z - top) for z in row))
    return [z - lse for z in row]


def _ce(logits, target, smoothing=0.0):
    """Mean cross-entropy over the batch, by hand (label smoothing as torch defines it)."""
    values = []
    for row, t in zip(logits.tolist(), target.tolist()):
        logp = _log_softmax(row)
        values.append((1 - smoothing) * -logp[t] + smoothing * -sum(logp) / len(logp))
    return sum(values) / len(values)


def _kl_to_teacher(student, teacher, temperature):
    """Batch-mean KL(softmax(teacher / T) || softmax(student / T)), by hand."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        log_q, log_p = _log_softmax(s_row, temperature), _log_softmax(t_row, temperature)
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / len(student)


@pytest.fixture
def batch():
    outputs = tuple(torch.randn(5, 4) * 2 for _ in range(3))
    return outputs, torch.tensor([0, 3, 1, 1, 2])


def test_the_loss_is_distillers_weighted_sum(batch):
    outputs, target = batch
    total = bx.EarlyExitLoss(_spec())(outputs, target)
    expected = 0.2 * _ce(outputs[0], target) + 0.3 * _ce(outputs[1], target) + 0.5 * _ce(outputs[2], target)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_explicit_weights_override_the_spec(batch):
    outputs, target = batch
    for spec in (_spec(), bx.ExitSpec(exits=[bx.ExitPoint(layer="a"), bx.ExitPoint(layer="b")])):
        loss_fn = bx.EarlyExitLoss(spec, weights=[0.1, 0.05])
        expected = 0.1 * _ce(outputs[0], target) + 0.05 * _ce(outputs[1], target) + 0.85 * _ce(outputs[2], target)
        assert loss_fn(outputs, target).item() == pytest.approx(expected, rel=1e-5)
        assert loss_fn.weights == [0.1, 0.05] and loss_fn.final_weight == pytest.approx(0.85)


def test_return_terms_gives_each_unweighted_detached_term(batch):
    outputs = tuple(o.requires_grad_() for o in batch[0])
    target = batch[1]
    total, terms = bx.EarlyExitLoss(_spec())(outputs, target, return_terms=True)
    assert sorted(terms) == ["exit_0", "exit_1", "final"]
    for name, logits in zip(["exit_0", "exit_1", "final"], outputs):
        assert terms[name].item() == pytest.approx(_ce(logits, target), rel=1e-5)
        assert not terms[name].requires_grad
    assert total.requires_grad
    assert total.item() == pytest.approx(0.2 * terms["exit_0"] + 0.3 * terms["exit_1"] + 0.5 * terms["final"])


def test_label_smoothing_passes_through(batch):
    outputs, target = batch
    total, terms = bx.EarlyExitLoss(_spec(), label_smoothing=0.1)(outputs, target, return_terms=True)
    for name, logits in zip(["exit_0", "exit_1", "final"], outputs):
        assert terms[name].item() == pytest.approx(_ce(logits, target, smoothing=0.1), rel=1e-5)
    plain = bx.EarlyExitLoss(_spec())(outputs, target)
    assert total.item() != pytest.approx(plain.item())


def test_a_custom_base_loss_replaces_cross_entropy(batch):
    outputs, target = batch

    def squares(logits, _target):
        return (logits**2).mean()

    total = bx.EarlyExitLoss(_spec(), base_loss=squares)(outputs, target)
    expected = 0.2 * squares(outputs[0], 0) + 0.3 * squares(outputs[1], 0) + 0.5 * squares(outputs[2], 0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_probabilities_and_int32_indices_are_accepted(batch):
    outputs, target = batch
    loss_fn = bx.EarlyExitLoss(_spec())
    reference = loss_fn(outputs, target)
    one_hot = torch.nn.functional.one_hot(target, 4).float()
    assert loss_fn(outputs, one_hot).item() == pytest.approx(reference.item(), rel=1e-6)
    assert loss_fn(outputs, target.int()).item() == pytest.approx(reference.item(), rel=1e-6)


def test_self_distillation_matches_a_hand_computation(batch):
    outputs, target = batch
    alpha, temp = 0.4, 2.0
    total, terms = bx.EarlyExitLoss(_spec(), distill_alpha=alpha, distill_temperature=temp)(
        outputs, target, return_terms=True)
    expected = 0.5 * _ce(outputs[2], target)
    for i, weight in enumerate([0.2, 0.3]):
        distill = temp**2 * _kl_to_teacher(outputs[i], outputs[2], temp)
        assert terms[f"distill_{i}"].item() == pytest.approx(distill, rel=1e-5)
        expected += weight * ((1 - alpha) * _ce(outputs[i], target) + alpha * distill)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_an_exit_that_agrees_with_the_final_one_has_no_distillation_loss():
    final = torch.randn(6, 5)
    _, terms = bx.EarlyExitLoss(_spec((0.3,)), distill_alpha=1.0)((final.clone(), final), torch.zeros(6).long(),
                                                                  return_terms=True)
    assert terms["distill_0"].item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_does_not_pull_on_the_final_exit(batch):
    outputs = tuple(o.clone().requires_grad_() for o in batch[0])
    target = batch[1]
    total = bx.EarlyExitLoss(_spec(), distill_alpha=1.0, distill_temperature=3.0)(outputs, target)
    grads = torch.autograd.grad(total, outputs)
    final = outputs[2].detach().requires_grad_()
    (only_final,) = torch.autograd.grad(0.5 * torch.nn.functional.cross_entropy(final, target), final)
    torch.testing.assert_close(grads[2], only_final)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


@pytest.fixture(scope="module")
def resnet_module():
    torch.manual_seed(0)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", weight=0.3), bx.ExitPoint(layer="layer3", weight=0.3)])
    return bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, torch.randn(1, 3, 32, 32)).train()


# the backbone stages in order, and where each exit sits in it
_STAGES = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
_EXIT_STAGE = {0: "layer1", 1: "layer3"}


@pytest.mark.parametrize("index", [0, 1])
def test_an_exits_loss_reaches_the_backbone_before_it_and_nothing_after(resnet_module, index):
    module = resnet_module
    module.zero_grad(set_to_none=True)
    outputs = module(torch.randn(4, 3, 32, 32))
    # only exit ``index`` stays attached to the graph, so the gradient is its term's alone
    outputs = tuple(o if i == index else o.detach() for i, o in enumerate(outputs))
    bx.EarlyExitLoss(module.exit_spec)(outputs, torch.tensor([0, 1, 2, 3])).backward()
    last = _STAGES.index(_EXIT_STAGE[index])
    for name, param in module.named_parameters():
        if name.startswith("exit_heads."):
            reached = name.startswith(f"exit_heads.{index}.")
        else:
            reached = _STAGES.index(name.split(".")[0]) <= last
        if reached:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_the_whole_loss_reaches_every_parameter(resnet_module):
    module = resnet_module
    module.zero_grad(set_to_none=True)
    loss_fn = bx.EarlyExitLoss(module.exit_spec, distill_alpha=0.5)
    loss_fn(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(("weights", "message"), [
    ([0.2], r"1 loss weight\(s\) \[0.2\] for 2 early exit\(s\) \['layer1', 'layer3'\]; give exactly one weight"),
    ([0.2, 0.3, 0.1], r"3 loss weight\(s\).*for 2 early exit"),
    ([0.6, 0.5], r"\[0.6, 0.5\] sum to 1.1; the sum must be < 1"),
    ([0.5, 0.5], r"sum to 1; the sum must be < 1"),
    ([-0.1, 0.3], r"loss weight -0.1 of exit 0 \('layer1'\) must be a finite number >= 0"),
    ([float("nan"), 0.3], r"loss weight nan of exit 0"),
    ([0.1, "0.2"], r"loss weight '0.2' of exit 1"),
    (0.3, r"weights must be a sequence of 2 number"),
])
def test_bad_weights_are_rejected_with_the_value_and_the_fix(weights, message):
    with pytest.raises(bx.BranchifyError, match=message):
        bx.EarlyExitLoss(_spec(), weights=weights)


def test_a_spec_without_weights_says_how_to_give_them():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    with pytest.raises(bx.BranchifyError, match=r"no loss weights.*with_exits\(weight=.*EarlyExitLoss\(spec, weights="):
        bx.EarlyExitLoss(spec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"label_smoothing": 0.1, "base_loss": lambda z, y: z.sum()}, "build the smoothing into base_loss"),
    ({"label_smoothing": 1.5}, r"label_smoothing=1.5 must be in \[0, 1\]"),
    ({"base_loss": "ce"}, "base_loss must be callable"),
    ({"distill_alpha": 1.2}, r"distill_alpha=1.2 must be in \[0, 1\]"),
    ({"distill_temperature": 0.0}, "distill_temperature=0.0 must be a positive number"),
    ({"distill_temperature": float("inf")}, "distill_temperature=inf must be a positive number"),
])
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(bx.BranchifyError, match=message):
        bx.EarlyExitLoss(_spec(), **kwargs)


def test_a_module_instead_of_a_spec_points_to_exit_spec(resnet_module):
    with pytest.raises(bx.BranchifyError, match="pass module.exit_spec"):
        bx.EarlyExitLoss(resnet_module)


def test_bad_outputs_and_targets_are_rejected(batch):
    outputs, target = batch
    loss_fn = bx.EarlyExitLoss(_spec())
    with pytest.raises(bx.BranchifyError, match=r"got 2 outputs but the spec has 2 exits, so 3 outputs"):
        loss_fn(outputs[:2], target)
    with pytest.raises(bx.BranchifyError, match=r"target has shape \(4,\) but the outputs have a batch of 5"):
        loss_fn(outputs, target[:4])
    with pytest.raises(bx.BranchifyError, match=r"dtype torch.bool"):
        loss_fn(outputs, target > 1)
    with pytest.raises(bx.BranchifyError, match=r"class probabilities and must be shaped like the logits \(5, 4\)"):
        loss_fn(outputs, target.float())
    with pytest.raises(bx.BranchifyError, match="must be a tensor"):
        loss_fn(outputs, [0, 1, 2, 3, 0])
