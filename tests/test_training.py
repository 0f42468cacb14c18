"""bx.fit against hand-written loops: joint training step for step, heads-only training on a frozen backbone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx
from branchify.placement.heads import train_heads


class Branchy(nn.Module):
    """A small classifier with a data-dependent branch, which torch.fx cannot trace (the hook path)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > -1e9:
            x = self.block(x)
        return self.fc(x.mean((2, 3)))


def tiny() -> nn.Module:
    """BatchNorm (running statistics) and dropout (random numbers) in the backbone."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


X = torch.zeros(1, 3, 8, 8)


def make_module(path: str = "fx", weights: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if path == "fx":
        layers, model = ["2", "6"], tiny()
    else:
        layers, model = ["stem"], Branchy()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, weight=0.3 if weights else None) for layer in layers])
    if path == "fx":
        return bx.attach_exits(model, spec, X).train()
    with pytest.warns(UserWarning, match="forward hooks"):
        return bx.attach_exits(model, spec, X).train()


def data(n: int = 48, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def loader(dataset: TensorDataset, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(2))


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_joint_fit_is_the_plain_loop_step_for_step():
    """SGD with a per-step OneCycle schedule through on_step, validation in between: the same weights as the
    loop one would write by hand, bit for bit, and the same mean loss."""
    module, val = make_module(), data(32, seed=3)
    reference = copy.deepcopy(module)
    epochs = 3

    torch.manual_seed(5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=epochs * 3)
    steps, ends = [], []
    history = bx.fit(module, loader(data()), epochs=epochs, optimizer=optimizer, val_loader=loader(val, False),
                     on_step=lambda s: (steps.append(s), schedule.step()), on_epoch_end=ends.append, progress=False)

    torch.manual_seed(5)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * 3)
    loss_fn = bx.EarlyExitLoss(reference.exit_spec)
    losses, batches = [], loader(data())
    for _ in range(epochs):
        reference.train()
        total, n = 0.0, 0
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(reference(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
        losses.append(total / n)
        reference.eval()  # validation, as fit does: no statistics move, no random numbers drawn

    assert same_state(module, reference)
    assert history.loss == pytest.approx(losses, rel=1e-6)
    assert [(s.epoch, s.step) for s in steps] == [(e, i) for e in range(epochs) for i in (1, 2, 3)]
    assert ends == history.epochs and [e.samples for e in ends] == [48] * epochs
    assert module.training  # modes as before


def test_validation_accuracy_is_each_exits_forced_top1():
    module, val = make_module(), data(40, seed=4)
    history = bx.fit(module, loader(data()), epochs=1, val_loader=loader(val, False), progress=False)
    module.eval()
    with torch.no_grad():
        outputs = module(val.tensors[0])
    expected = [float((z.argmax(1) == val.tensors[1]).double().mean()) for z in outputs]
    assert history.layers == ("2", "6", "final")
    assert history.epochs[0].val_accuracy == pytest.approx(expected, rel=1e-12)


def test_same_seed_same_weights_and_another_seed_other_weights():
    """Shuffling and dropout draw from torch's global generator: the seed decides, fit adds nothing random."""
    module = make_module()
    start = copy.deepcopy(module.state_dict())
    shuffled = DataLoader(data(), batch_size=16, shuffle=True)  # no generator: the global one

    def trained(seed: int) -> dict:
        module.load_state_dict(start)
        torch.manual_seed(seed)
        bx.fit(module, shuffled, epochs=2, progress=False)
        return copy.deepcopy(module.state_dict())

    first, second, other = trained(7), trained(7), trained(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("path", ["fx", "hooks"])
def test_heads_mode_leaves_the_backbone_exactly_as_it_was(path):
    module = make_module(path)
    heads = {id(p) for p in module.exit_heads.parameters()}
    backbone = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("exit_heads.")}
    heads_before = copy.deepcopy(module.exit_heads.state_dict())
    first = next(p for p in module.parameters() if id(p) not in heads)
    first.requires_grad_(False)  # a flag the caller set: kept
    modes = {name: m.training for name, m in module.named_modules()}

    bx.fit(module, loader(data()), epochs=2, mode="heads", val_loader=loader(data(16, 5), False), progress=False)

    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())  # weights and BatchNorm statistics
    assert any(k.endswith("running_mean") for k in backbone) and any(k.endswith("num_batches_tracked")
                                                                     for k in backbone)
    assert not all(torch.equal(after[f"exit_heads.{k}"], v) for k, v in heads_before.items())  # heads learnt
    assert not first.requires_grad
    assert all(p.requires_grad for p in module.parameters() if p is not first)
    assert {name: m.training for name, m in module.named_modules()} == modes


def test_the_sweeps_head_training_is_the_hand_written_heads_loop():
    """train_heads (the sweep's, now bx.fit(mode="heads")) gives the heads the loop one would write by hand: the
    backbone in eval mode and out of autograd, Adam on the heads, their cross-entropies summed."""
    ours, theirs = make_module(weights=False), make_module(weights=False)
    train_heads(ours, loader(data()), epochs=2, lr=3e-3, progress=False)
    heads = list(theirs.exit_heads.parameters())
    head_ids = {id(p) for p in heads}
    for p in theirs.parameters():
        p.requires_grad_(id(p) in head_ids)
    theirs.eval()
    theirs.exit_heads.train()
    optimizer = torch.optim.Adam(heads, lr=3e-3)
    batches = loader(data())  # one loader for both epochs, as train_heads iterates it: its order moves on
    for _ in range(2):
        for x, y in batches:
            outputs = theirs(x)
            loss = sum(F.cross_entropy(z, y) for z in outputs[:-1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert same_state(ours, theirs)
    assert all(p.requires_grad for p in ours.parameters())  # the backbone given back as it was


def test_a_backbone_frozen_before_stays_frozen():
    module = bx.freeze_backbone(make_module())
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    bx.fit(module, loader(data()), epochs=1, mode="heads", progress=False)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == len(list(module.exit_heads.parameters()))
    assert norms and not any(m.training for m in module.train().modules() if isinstance(m, nn.BatchNorm2d))
    bx.unfreeze_backbone(module)
    assert all(p.requires_grad for p in module.parameters()) and all(m.training for m in norms)


def test_history_as_text_html_data_and_plot(tmp_path):
    history = bx.fit(make_module(), loader(data()), epochs=2, val_loader=loader(data(16, 5)), progress=False)
    text = str(history)
    assert text.splitlines()[0] == "FitHistory(joint, 2 epochs, 48 training samples per epoch)"
    assert "val top-1 final" in text and len(text.splitlines()) == 4
    assert "<table>" in history._repr_html_() and "val top-1 6" in history._repr_html_()
    again = json.loads(json.dumps(history.to_dict()))
    assert again["layers"] == ["2", "6", "final"] and len(again["epochs"]) == 2
    assert again["epochs"][1]["loss"] == history.epochs[1].loss
    pytest.importorskip("matplotlib")
    figure = history.plot(tmp_path / "fit.png")
    assert len(figure.axes) == 2 and (tmp_path / "fit.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs=0 must be a positive integer"),
    ({"epochs": 1.5}, "epochs=1.5 must be a positive integer"),
    ({"epochs": True}, "epochs=True must be a positive integer"),
    ({"epochs": 1, "mode": "both"}, "mode='both'; use 'joint'"),
    ({"epochs": 1, "lr": -1.0}, "lr=-1.0 must be a positive number"),
    ({"epochs": 1, "lr": 0.1, "optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}, "but an optimizer was given"),
    ({"epochs": 1, "optimizer": lambda p: "sgd"}, "the optimizer factory returned str"),
    ({"epochs": 1, "optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer or a factory"),
    ({"epochs": 1, "optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)},
     "the optimizer holds none of the module's trainable parameters"),
    ({"epochs": 1, "on_step": 3}, "on_step must be callable"),
    ({"epochs": 1, "loss": lambda outputs, target: outputs[-1]}, "the loss must return a scalar tensor"),
    ({"epochs": 1, "val_loader": []}, "the validation loader yielded no batches"),
])
def test_bad_arguments_are_refused_with_the_way_out(kwargs, message):
    with pytest.raises(bx.BranchifyError) as err:
        bx.fit(make_module(), loader(data()), progress=False, **kwargs)
    assert message in str(err.value)


def test_refusals_that_depend_on_the_module():
    with pytest.raises(bx.BranchifyError, match="fit needs a module made by bx.attach_exits"):
        bx.fit(tiny(), loader(data()), epochs=1)
    with pytest.raises(bx.BranchifyError, match="or train only the heads with mode='heads'"):
        bx.fit(make_module(weights=False), loader(data()), epochs=1, progress=False)
    module = make_module()
    module.exit_heads.requires_grad_(False)
    with pytest.raises(bx.BranchifyError, match="none of the 2 head"):
        bx.fit(module, loader(data()), epochs=1, mode="heads", progress=False)
    with pytest.raises(bx.BranchifyError, match="the training loader yielded no batches"):
        bx.fit(make_module(), [], epochs=1, progress=False)
