"""Placement sweep on a small trained CNN over synthetic colour images."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx

CLASSES = 4
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.6, 0.6]])


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def colour_images(n: int, seed: int) -> TensorDataset:
    """Each class is a colour; noise grows with a per-sample difficulty, so some samples are easy."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    noise = 0.3 + 1.5 * torch.rand(n, 1, 1, 1, generator=g)
    x = COLOURS[y][:, :, None, None] + noise * torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tiny_cnn()
    train = colour_images(512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    train_loader = DataLoader(train, batch_size=64, shuffle=True)
    val_loader = DataLoader(colour_images(256, seed=1), batch_size=128)
    return model, train_loader, val_loader


@pytest.fixture(scope="module")
def swept(trained):
    model, train_loader, val_loader = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bx.sweep(model, train_loader, val_loader, epochs=2, lr=1e-2, max_accuracy_drop=0.02, progress=False)
    return result, before


def test_the_table_lists_every_default_candidate(trained, swept):
    model, _, _ = trained
    result, _ = swept
    points = bx.list_exit_points(model, torch.randn(1, 3, 16, 16))
    expected = [p.name for p in points if p.macs_fraction < 0.99]
    assert [row.layer for row in result.table] == expected
    assert len(expected) >= 6
    fractions = [row.macs_fraction for row in result.table]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 0.99
    assert all(row.exit_fraction > row.macs_fraction and row.params > 0 and 0 <= row.accuracy <= 1
               for row in result.table)
    assert max(row.accuracy for row in result.table) > 0.6, "trained heads beat chance (0.25) by far"
    assert result.sets_searched == sum(math.comb(len(expected), size) for size in (1, 2, 3))


def test_the_best_set_meets_the_target_and_saves(swept):
    result, _ = swept
    best = result.best
    assert best.met and best.accuracy_drop <= 0.02 + 1e-12
    assert 1 <= len(result.spec.exits) <= 3
    assert set(result.spec.layers) <= {row.layer for row in result.table}
    assert best.mac_fraction < 1.0
    # The best set is the cheapest point of the frontier that keeps within the target.
    within = [p for p in result.frontier if result.final_accuracy - p.accuracy <= 0.02 + 1e-12]
    assert best.mac_fraction <= min(p.mac_fraction for p in within) + 1e-9


def test_the_frontier_is_pareto(swept):
    result, _ = swept
    frontier = result.frontier
    assert len(frontier) >= 2
    macs = [p.mac_fraction for p in frontier]
    accuracy = [p.accuracy for p in frontier]
    assert macs == sorted(macs) and all(a < b for a, b in zip(accuracy, accuracy[1:]))
    assert all(len(p.layers) == len(p.thresholds) <= 3 for p in frontier)
    assert any(p.mac_fraction < 0.5 for p in frontier)


def test_the_spec_and_weights_carry_over(trained, swept):
    model, _, val_loader = trained
    result, _ = swept
    module = result.attach(model, torch.randn(1, 3, 16, 16))
    assert module.exit_spec.layers == result.spec.layers
    for i, layer in enumerate(module.exit_spec.layers):
        for key, value in module.exit_heads[i].state_dict().items():
            assert torch.equal(value, result.head_state_dicts[layer][key])
    again = result.best.evaluate(module, val_loader, progress=False)
    assert again.accuracy == pytest.approx(result.best.accuracy)
    assert again.shares == pytest.approx(result.best.shares)
    plain = bx.attach_exits(model, result.spec, torch.randn(1, 3, 16, 16))
    assert result.load_heads(plain) is plain


def test_the_backbone_is_left_untouched(trained, swept):
    model, _, _ = trained
    _, before = swept
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights and BatchNorm statistics unchanged"
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_json_and_plot(swept, tmp_path):
    result, _ = swept
    data = json.loads(result.to_json(tmp_path / "sweep.json").read_text())
    assert [c["layer"] for c in data["candidates"]] == [row.layer for row in result.table]
    assert bx.ExitSpec.model_validate(data["spec"]) == result.spec
    assert len(data["frontier"]) == len(result.frontier) and data["best"]["met"] is True
    png = result.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_repr(swept):
    result, _ = swept
    text = repr(result)
    assert "SweepResult(" in text and "best:" in text and result.table[0].layer in text
    assert "<table>" in result._repr_html_()


@pytest.mark.slow  # sweeps twice; the other sweep tests run one
def test_deterministic_under_a_seed(trained):
    model, train_loader, val_loader = trained
    kwargs = dict(candidates=["1", "4", "7"], epochs=1, max_exits=2, progress=False)
    first = bx.sweep(model, train_loader, val_loader, seed=3, **kwargs)
    second = bx.sweep(model, train_loader, val_loader, seed=3, **kwargs)
    other = bx.sweep(model, train_loader, val_loader, seed=4, **kwargs)
    assert first.table == second.table and first.frontier == second.frontier and first.spec == second.spec
    for layer, state in first.head_state_dicts.items():
        assert all(torch.equal(v, second.head_state_dicts[layer][k]) for k, v in state.items())
    assert not all(torch.equal(v, other.head_state_dicts["1"][k]) for k, v in first.head_state_dicts["1"].items())


def test_load_heads_rejects_unknown_layers(trained, swept):
    model, _, _ = trained
    result, _ = swept
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="9")]), torch.randn(1, 3, 16, 16))
    with pytest.raises(bx.BranchifyError, match="was not a sweep candidate"):
        result.load_heads(module)


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"max_exits": 0}, "max_exits must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"max_accuracy_drop": 1.5}, "max_accuracy_drop must be a fraction"),
    ({"candidates": "4"}, "candidates must be a non-empty list"),
    ({"candidates": ["nope"]}, "unknown layer 'nope'"),
    ({"head": "linear"}, "head must be a bx.HeadSpec"),
    ({"criterion": "nope"}, "unknown criterion 'nope'"),
])
def test_bad_arguments(trained, kwargs, match):
    model, train_loader, val_loader = trained
    with pytest.raises(bx.BranchifyError, match=match):
        bx.sweep(model, train_loader, val_loader, progress=False, **kwargs)


class DataDependent(nn.Module):
    """torch.fx cannot trace it: the forward branches on a value."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.deeper = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.sum() > 0:
            x = x * 1.0
        return self.head(self.deeper(x))


def test_untraceable_models_sweep_through_hooks_with_listed_or_given_candidates():
    model = DataDependent().eval()
    loader = DataLoader(colour_images(64, seed=2), batch_size=32)
    with pytest.warns(UserWarning, match="forward hooks"):
        listed = bx.sweep(model, loader, loader, epochs=1, progress=False)
    # the hook path lists the block boundaries that ran (a module once its forward returned)
    assert [row.layer for row in listed.table][:3] == ["features.0", "features.1", "features"]
    with pytest.warns(UserWarning, match="forward hooks"):
        result = bx.sweep(model, loader, loader, candidates=["features", "deeper"], epochs=1, progress=False)
    assert [row.layer for row in result.table] == ["features", "deeper"]
    assert result.table[0].macs_fraction < result.table[1].macs_fraction < 1


def test_the_sweep_captures_the_model_as_attach_exits_does():
    model = torchvision.models.resnet18(num_classes=3)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(bx.BranchifyError, match="capture='sideways'"):
        bx.sweep(model, loader, loader, epochs=1, max_exits=1, capture="sideways", progress=False)
    result = bx.sweep(model, loader, loader, candidates=["layer1", "layer2"], epochs=1, max_exits=1,
                      capture="hooks", progress=False)
    assert result.attach(model, torch.randn(1, 3, 32, 32), capture="hooks").exit_path == "hooks"
