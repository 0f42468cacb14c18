"""Specs from files and lists, and exits in the declared order (issue 15)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import branchify as bx

X = torch.randn(2, 3, 32, 32)


def test_a_saved_spec_loads_equal_and_stays_short_enough_to_edit(tmp_path):
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5, weight=0.2, temperature=1.5),
                              bx.ExitPoint(layer="layer2", weight=0.1, head=bx.HeadSpec(kind="mlp", hidden=32))],
                       criterion="confidence")
    path = spec.save(tmp_path / "nested" / "spec.json")
    assert bx.ExitSpec.load(path) == spec
    written = json.loads(path.read_text())
    assert "kind" not in written["exits"][0].get("head", {})  # defaults left out
    path.write_text('{"exits": [{"layer": "layer1", "threshold": 2.0}]}')  # by hand
    assert bx.ExitSpec.load(path).exits[0].threshold == 2.0


def test_spec_files_that_cannot_be_read_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(bx.BranchifyError, match="no spec file at"):
        bx.ExitSpec.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"exits": [{"layer": "layer1", "weight": 2}]}')
    with pytest.raises(bx.SpecError, match="bad.json.*sum to 2"):
        bx.ExitSpec.load(bad)


def test_attach_exits_takes_a_spec_file_or_a_list_of_layer_names(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
    path = spec.save(tmp_path / "spec.json")
    want = bx.attach_exits(model, spec, X)
    for given in (path, str(path), ["layer1", "layer3"]):
        module = bx.attach_exits(model, given, X)
        assert module.exit_spec == spec
        assert [h.__class__ for h in module.exit_heads] == [h.__class__ for h in want.exit_heads]
    with pytest.raises(bx.BranchifyError, match=r"pass \['layer1'\]"):
        bx.attach_exits(model, "layer1", X)


class Wrapped(nn.Module):
    """Untraceable (data-dependent Python branch), so it takes the hook path."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def forward(self, x):
        if float(x.sum()) > 1e9:
            return self.net(x) * 2
        return self.net(x)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_exits_out_of_graph_order_are_refused_with_the_order_that_works(capture):
    model = (torchvision.models.resnet18(num_classes=10) if capture == "fx" else Wrapped()).eval()
    prefix = "" if capture == "fx" else "net."
    layers = [f"{prefix}layer3", f"{prefix}layer1", f"{prefix}layer2"]
    with pytest.raises(bx.errors.ExitOrderError) as caught:
        bx.attach_exits(model, layers, X, capture=capture)
    want = [f"{prefix}layer1", f"{prefix}layer2", f"{prefix}layer3"]
    assert caught.value.graph_order == want
    assert str(want) in str(caught.value)
    # The declared order is the outputs' order: each output is its own exit's head on its own layer.
    module = bx.attach_exits(model, want, X, capture=capture).eval()
    assert module.exit_spec.layers == want


def test_the_sweep_takes_candidates_in_any_order():
    model = torchvision.models.resnet18(num_classes=3)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    result = bx.sweep(model, loader, loader, candidates=["layer2", "layer1"], epochs=1, max_exits=1, progress=False)
    assert [row.layer for row in result.table] == ["layer1", "layer2"]
