"""Silent wrong results closed (issues 21 and 23): training that diverges, shared modes, threshold ranges,
quantized models' MACs, exits that are off, registries; each against an independent reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branchify as bx


def _mlp(classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, classes))


def _loader(n: int = 48, batch: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, classes, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


# --- training that goes non-finite (issue 21, item 5) ---------------------------------------------------


def test_fit_stops_at_the_step_whose_loss_is_nan_and_keeps_the_weights_from_before_it():
    torch.manual_seed(0)
    module = bx.attach_exits(_mlp(), bx.ExitSpec(exits=[bx.ExitPoint(layer="2")]), torch.randn(2, 8))
    reference = copy.deepcopy(module)
    bad_step = 4  # 1-based within epoch 0
    calls = {"n": 0}

    def loss(outputs, target):
        calls["n"] += 1
        value = F.cross_entropy(outputs[0], target) + F.cross_entropy(outputs[-1], target)
        return value * float("nan") if calls["n"] == bad_step else value

    with pytest.raises(bx.BranchifyError, match=r"epoch 0, step 4: the loss went non-finite") as err:
        bx.fit(module, _loader(), epochs=2, loss=loss, lr=1e-2, progress=False)
    assert "before this step" in str(err.value)

    # the reference: the same steps by hand, bad_step - 1 of them
    opt = torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    reference.train()
    for i, (x, y) in enumerate(_loader(), start=1):
        if i == bad_step:
            break
        outputs = reference(x)
        value = F.cross_entropy(outputs[0], y) + F.cross_entropy(outputs[-1], y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    mine, theirs = module.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name  # parameters and BatchNorm statistics alike


def test_fit_names_the_exit_whose_logits_went_non_finite():
    torch.manual_seed(0)
    module = bx.attach_exits(_mlp(), bx.ExitSpec(exits=[bx.ExitPoint(layer="2", weight=0.3)]), torch.randn(2, 8))
    x, y = next(iter(_loader()))
    x = x.clone()
    x[0, 0] = float("inf")  # one bad sample: BatchNorm spreads it over the batch
    before = copy.deepcopy(module.state_dict())
    loader = [(x, y)]
    with pytest.raises(bx.BranchifyError, match=r"step 1: .*exit 0 \('2'\) \(its logits\)"):
        bx.fit(module, loader, epochs=1, progress=False)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's statistics were not poisoned either
