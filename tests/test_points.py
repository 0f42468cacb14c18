"""list_exit_points: discoverable names, shapes, layouts and cumulative MACs."""

import pytest
import torch
import torchvision

import branchify as bx


def test_resnet50_points_carry_torchvision_macs():
    points = {p.name: p for p in bx.list_exit_points(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))}
    total = points["layer1"].macs / points["layer1"].macs_fraction
    assert round(total / 1e9, 3) == 4.089  # torchvision's published GMACs for resnet50
    # REFERENCE.md: stem+layer1 19.2%, layer2 25.1%, layer3 35.8% of the MACs
    assert points["layer1"].macs_fraction == pytest.approx(0.192, abs=0.001)
    assert points["layer2"].macs_fraction - points["layer1"].macs_fraction == pytest.approx(0.251, abs=0.001)
    assert points["layer3"].macs_fraction - points["layer2"].macs_fraction == pytest.approx(0.358, abs=0.001)
    assert points["layer1"].shape == (256, 56, 56) and points["layer1"].layout is bx.Layout.NCHW


def test_default_points_are_block_boundaries_in_graph_order():
    points = bx.list_exit_points(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    names = [p.name for p in points]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert "layer1" in names and "layer1.1" not in names  # the same node as layer1: listed once
    assert "fc" not in names and "layer1.0.conv1" not in names
    fractions = [p.macs_fraction for p in points]
    assert fractions == sorted(fractions) and fractions[-1] < 1


def test_all_nodes_lists_node_names_that_attach():
    model = torchvision.models.resnet18()
    points = bx.list_exit_points(model, torch.randn(1, 3, 32, 32), all_nodes=True)
    names = [p.name for p in points]
    assert {"layer1.0.relu:1", "layer1.0.add", "flatten"} <= set(names)
    assert "x" in names and "fc" not in names
    # the second call of the block's ReLU is listed by its call index, with its node name as an alias
    assert next(p for p in points if p.name == "layer1.0.relu:1").aliases == ("layer1.0.relu_1",)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[{"layer": "layer1.0.add"}]), torch.randn(1, 3, 32, 32))
    assert module.exit_points[0].name == "layer1.0.add"


def test_transformer_points_have_token_and_channels_last_layouts():
    vit = bx.list_exit_points(torchvision.models.vit_b_32(image_size=64), torch.randn(1, 3, 64, 64))
    blocks = [p for p in vit if p.name.startswith("encoder.layers.encoder_layer_")]
    assert len(blocks) == 11 and all(p.layout is bx.Layout.NLC and p.shape == (5, 768) for p in blocks)
    swin = bx.list_exit_points(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64))
    stages = {p.name: p for p in swin}
    assert stages["features.1"].layout is bx.Layout.NHWC and stages["features.1"].shape == (16, 16, 96)
    assert str(stages["features.1"]).split()[:3] == ["features.1", "16x16x96", "NHWC"]


def test_points_ignore_batch_size_of_example_inputs():
    model = torchvision.models.resnet18()
    one = bx.list_exit_points(model, torch.randn(1, 3, 32, 32))
    many = bx.list_exit_points(model, torch.randn(8, 3, 32, 32))
    assert [(p.name, p.shape, p.macs) for p in one] == [(p.name, p.shape, p.macs) for p in many]


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "inception_v3", "maxvit_t", "swin_t", "efficientnet_b0"])
def test_node_names_are_the_ones_torchvision_reports(name):
    from torchvision.models.feature_extraction import get_graph_node_names

    from branchify._trace import QUALNAME, trace_model

    model = torchvision.models.get_model(name, weights=None)
    traced = trace_model(model)
    train, evaluation = get_graph_node_names(model)
    assert [n.meta[QUALNAME] for n in traced.graphs[True].nodes if QUALNAME in n.meta] == train
    assert [n.meta[QUALNAME] for n in traced.graphs[False].nodes if QUALNAME in n.meta] == evaluation


def test_exit_points_render_as_a_table():
    points = bx.list_exit_points(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    lines = repr(points).splitlines()
    assert lines[0].split() == ["name", "shape", "layout", "MMACs", "of", "model", "also", "named"]
    assert len(lines) == len(points) + 1 + len(points.legend())  # a legend line per note under the table
    assert any(line.split()[:3] == ["layer1", "64x8x8", "NCHW"] for line in lines)
    html = points._repr_html_()
    assert html.startswith("<table><thead>") and html.count("<tr>") == len(points) + 1
    assert isinstance(points, list) and points[0].name == "conv1"
