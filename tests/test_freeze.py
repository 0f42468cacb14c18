import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import branchify as bx
from branchify import heads as heads_module
from branchify.heads import GlobalPool


class Branchy(nn.Module):
    """A small classifier with a data-dependent branch, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = self.block(x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def bn_head(monkeypatch):
    """A head kind with its own BatchNorm, which must keep training while the backbone is frozen."""
    monkeypatch.setattr(heads_module, "_REGISTRY", dict(heads_module._REGISTRY))

    @bx.register_head("bn_linear")  # NCHW exits only, which is all these tests use
    def _(shape, layout, num_classes, spec):
        channels = shape[layout.channel_dim - 1]
        return nn.Sequential(nn.BatchNorm2d(channels), GlobalPool(layout), nn.Linear(channels, num_classes))

    return bx.HeadSpec(kind="bn_linear")


def _fx_module(head):
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", weight=0.3, head=head), bx.ExitPoint(layer="layer3",
                                                                                                  weight=0.3)])
    module = bx.attach_exits(torchvision.models.resnet18(num_classes=5), spec, torch.randn(1, 3, 32, 32))
    assert module.exit_path == "fx"
    return module.train()


def _hook_module(head):
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem", weight=0.3, head=head)])
    with pytest.warns(UserWarning, match="forward hooks"):
        module = bx.attach_exits(Branchy(), spec, torch.randn(1, 3, 16, 16))
    assert module.exit_path == "hooks"
    return module.train()


@pytest.fixture(params=["fx", "hooks"])
def module(request, bn_head):
    return {"fx": _fx_module, "hooks": _hook_module}[request.param](bn_head)


def _backbone_state(module):
    head_names = {f"exit_heads.{name}" for name in module.exit_heads.state_dict()}
    return {name: value.clone() for name, value in module.state_dict().items() if name not in head_names}


def _train_steps(module, steps=2):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss_fn = bx.EarlyExitLoss(module.exit_spec)
    size = 32 if module.exit_path == "fx" else 16
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(module(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()


def _norms(module):
    inside = {id(m) for m in module.exit_heads.modules()}
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside]


def test_a_training_step_after_freezing_changes_the_heads_only(module):
    before = _backbone_state(module)
    heads_before = copy.deepcopy(module.exit_heads.state_dict())
    bx.freeze_backbone(module)
    module.train()
    assert module.training and _norms(module) and not any(n.training for n in _norms(module))
    _train_steps(module)
    after = _backbone_state(module)
    assert before.keys() == after.keys() and any("running_mean" in name for name in before)
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed"
    heads_after = module.exit_heads.state_dict()
    for name, value in heads_before.items():
        if value.is_floating_point():  # weights, biases and the head's own BN statistics all move
            assert not torch.equal(value, heads_after[name]), f"head {name} did not change"


def test_unfreezing_restores_training_of_the_backbone(module):
    bx.unfreeze_backbone(bx.freeze_backbone(module))
    module.train()
    assert all(n.training for n in _norms(module)) and all(p.requires_grad for p in module.parameters())
    assert not any("train" in vars(n) for n in _norms(module))
    before = _backbone_state(module)
    _train_steps(module, steps=1)
    after = _backbone_state(module)
    assert all(not torch.equal(before[name], after[name]) for name in before if name.endswith("running_mean"))


def test_unfreezing_restores_the_requires_grad_flags_as_they_were(module):
    first = next(module.parameters())
    first.requires_grad_(False)  # frozen by the user before, so it stays frozen after
    flags = [p.requires_grad for p in module.parameters()]
    bx.freeze_backbone(module)
    bx.freeze_backbone(module)  # a second freeze changes nothing
    assert [p.requires_grad for p in module.parameters()] != flags
    bx.unfreeze_backbone(module)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert bx.unfreeze_backbone(module) is module  # unfreezing an unfrozen module changes nothing
    assert [p.requires_grad for p in module.parameters()] == flags


@pytest.mark.parametrize("mode_while_frozen", [True, False])
def test_norms_come_back_in_the_mode_last_asked_for(module, mode_while_frozen):
    bx.freeze_backbone(module)
    module.train(mode_while_frozen)
    assert not any(n.training for n in _norms(module))
    assert module.exit_heads.training is mode_while_frozen
    bx.unfreeze_backbone(module)
    assert all(n.training is mode_while_frozen for n in _norms(module))


def test_a_frozen_module_survives_deepcopy_and_pickle(module):
    bx.freeze_backbone(module)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        clone.train()
        assert not any(n.training for n in _norms(clone))
        assert not any(p.requires_grad for name, p in clone.named_parameters() if not name.startswith("exit_heads"))
        bx.unfreeze_backbone(clone).train()
        assert all(n.training for n in _norms(clone)) and all(p.requires_grad for p in clone.parameters())
    assert not any(n.training for n in _norms(module))  # the original stays frozen


def test_freezing_needs_a_module_with_exit_heads():
    with pytest.raises(bx.BranchifyError, match="made by bx.attach_exits.*got ResNet"):
        bx.freeze_backbone(torchvision.models.resnet18())
    with pytest.raises(bx.BranchifyError, match="got ResNet"):
        bx.unfreeze_backbone(torchvision.models.resnet18())
