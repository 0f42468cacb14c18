import pytest
import torch
import torchvision
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor

import branchify as bx
from branchify.fallback import attach_exits_with_hooks

# Distiller's ImageNet head after layer1:
# Conv2d(256, 10, 7, 2, 3) -> MaxPool2d(3, 2, 1) -> Flatten -> Linear(1960, 1000)
DISTILLER_HEAD = bx.HeadSpec(kind="conv", channels=[10], kernel_size=7, stride=2, pool="max")
LAYERS = ["layer1", "layer2", "layer3"]


def _fake_macs(module, shape):
    """MACs of one forward of ``module`` on a fake tensor of ``shape``, counted independently of branchify."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.empty(*shape))
        with FlopCounterMode(display=False) as counter:
            module(x)
    return counter.get_total_flops() / 2


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", head=DISTILLER_HEAD),
                              bx.ExitPoint(layer="layer2"), bx.ExitPoint(layer="layer3")])
    x = torch.randn(1, 3, 224, 224)
    module = bx.attach_exits(model, spec, x)
    return model, module, bx.exit_costs(module, x)


def test_resnet50_costs_what_torchvision_publishes(resnet50):
    _, _, costs = resnet50
    published = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["_ops"]
    assert round(costs.original / 1e9, 3) == published == 4.089


def test_backbone_share_is_the_model_cut_at_the_exit(resnet50):
    model, _, costs = resnet50
    for layer, backbone in zip(LAYERS, costs.backbone):
        cut = create_feature_extractor(model, {layer: "out"})
        assert backbone == _fake_macs(cut, (1, 3, 224, 224)), layer


def test_head_costs_match_the_heads_alone_and_a_hand_count(resnet50):
    _, module, costs = resnet50
    for head, point, macs in zip(module.exit_heads, module.exit_points, costs.heads):
        assert macs == _fake_macs(head, (1, *point.shape))
    conv = 10 * 28 * 28 * 256 * 7 * 7  # out channels x output map x in channels x kernel
    assert costs.heads[0] == conv + 1960 * 1000
    assert costs.heads[1:] == [512 * 1000, 1024 * 1000]  # global average pool (free) + Linear(C, 1000)


def test_a_sample_leaving_at_an_exit_pays_the_backbone_and_every_head_on_the_way(resnet50):
    _, _, costs = resnet50
    for i, cost in enumerate(costs.exits):
        assert cost == costs.backbone[i] + sum(costs.heads[: i + 1])
    assert costs.exits == sorted(costs.exits) and len(set(costs.exits)) == 3
    assert costs.full == costs.original + sum(costs.heads)
    assert costs.per_exit == [*costs.exits, costs.full]
    assert costs.exits[-1] < costs.original < costs.full


def test_expected_and_saving_arithmetic():
    costs = bx.ExitCosts(exits=[1.0, 3.0], full=10.0, original=8.0, backbone=[0.5, 2.0], heads=[0.5, 0.5])
    assert costs.expected([0.5, 0.25, 0.25]) == pytest.approx(0.5 + 0.75 + 2.5)
    assert costs.saving([0.5, 0.25, 0.25]) == pytest.approx(1 - 3.75 / 8.0)
    assert costs.saving([0.0, 0.0, 1.0]) == pytest.approx(-0.25)  # nobody leaves: the heads are pure overhead
    with pytest.raises(bx.BranchifyError, match=r"2 shares for 3 exits"):
        costs.expected([0.5, 0.5])


def test_costs_are_per_sample_whatever_the_example_batch():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
    module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 64, 64))
    assert bx.exit_costs(module, torch.randn(4, 3, 64, 64)) == bx.exit_costs(module, torch.randn(1, 3, 64, 64))


def test_the_hook_fallback_counts_the_same_as_the_fx_module():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", head=DISTILLER_HEAD), bx.ExitPoint(layer="layer3")])
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    fx_module = bx.attach_exits(model, spec, x)
    hook_module = attach_exits_with_hooks(model, spec, (x,), reason="forced for the test")
    assert fx_module.exit_path == "fx" and hook_module.exit_path == "hooks"
    fx_costs, hook_costs = bx.exit_costs(fx_module, x), bx.exit_costs(hook_module, x)
    assert hook_costs == fx_costs


def test_exit_costs_needs_a_module_with_exits():
    with pytest.raises(bx.BranchifyError, match="made by bx.attach_exits, got ResNet"):
        bx.exit_costs(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))


def test_costs_of_a_training_module_leave_its_train_graph_in_place():
    # exit_costs runs the eval graph; it used to restore the flags but not the graph, so googlenet lost
    # its auxiliary outputs until .train() was called again
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    x = torch.randn(2, 3, 64, 64)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="inception3b")]), x[:1]).train()
    bx.exit_costs(module, x[:1])
    final = module(x)[-1]
    assert module.training and isinstance(final, tuple) and len(final) == 3
