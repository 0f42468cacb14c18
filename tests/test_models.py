"""He et al.'s CIFAR ResNets, model lookup by name, and Distiller's exit placements."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import branchify as bx
from branchify.distiller.models import (
    CIFAR_RESNETS,
    DISTILLER_EXITS,
    ResNetCifar,
    distiller_exits,
    get_model,
    model_names,
)

# He et al. 2016, table 6: parameters of ResNet-20/32/44/56 on CIFAR-10.
PAPER_PARAMS = {"resnet20_cifar": 0.27, "resnet32_cifar": 0.46, "resnet44_cifar": 0.66, "resnet56_cifar": 0.85}
BLOCKS = {"resnet20_cifar": 3, "resnet32_cifar": 5, "resnet44_cifar": 7, "resnet56_cifar": 9}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(CIFAR_RESNETS))
def test_parameter_counts_match_the_paper(arch):
    model = CIFAR_RESNETS[arch]()  # option A, the paper's CIFAR shortcut
    assert round(n_params(model) / 1e6, 2) == PAPER_PARAMS[arch]
    assert n_params(CIFAR_RESNETS[arch](shortcut="B")) == n_params(model) + 2752
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [BLOCKS[arch]] * 3


def test_option_a_shortcut_has_no_parameters_and_option_b_projects():
    a, b = ResNetCifar(3), ResNetCifar(3, shortcut="B")
    # Option B adds a 1x1 conv + BN at the two stage transitions: 16*32 + 32*64 weights, 2*(32 + 64) BN.
    assert n_params(b) - n_params(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    assert n_params(a) == 269_722
    assert a.layer2[0].downsample is not None and n_params(a.layer2[0].downsample) == 0
    assert a.layer1[0].downsample is None and b.layer1[0].downsample is None
    x = torch.randn(2, 16, 32, 32)
    assert a.layer2[0].downsample(x).shape == (2, 32, 16, 16)
    assert torch.equal(a.layer2[0].downsample(x)[:, 8:24], x[:, :, ::2, ::2])


def test_module_names_follow_torchvision():
    model = get_model("resnet32_cifar")
    assert [name for name, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert {"layer1.2", "layer1.2.conv1", "layer1.2.relu2", "layer2.0.downsample"} <= dict(model.named_modules()).keys()


@pytest.mark.parametrize("arch", sorted(CIFAR_RESNETS))
def test_output_shape(arch):
    x = torch.randn(2, 3, 8, 8)
    assert get_model(arch).eval()(x).shape == (2, 10)
    assert get_model(arch, num_classes=100).eval()(x).shape == (2, 100)


# The four depths share one structure: the shallowest (both shortcuts) and the deepest cover it.
@pytest.mark.parametrize(("arch", "shortcut"),
                         [("resnet20_cifar", "A"), ("resnet20_cifar", "B"), ("resnet56_cifar", "A")])
def test_fx_traces_with_exact_output(arch, shortcut):
    model = CIFAR_RESNETS[arch](shortcut=shortcut)
    traced = fx.symbolic_trace(model)
    x = torch.randn(3, 3, 16, 16)  # small maps keep it fast; tracing does not depend on the size
    for training in (False, True):
        model.train(training)
        traced.train(training)
        assert torch.equal(traced(x), model(x))


def test_layer1_2_is_a_16x32x32_exit_point():
    points = bx.list_exit_points(get_model("resnet56_cifar"), torch.randn(1, 3, 32, 32))
    by_name = {p.name: p for p in points}
    assert by_name["layer1.2"].shape == (16, 32, 32)
    assert by_name["layer3"].shape == (64, 8, 8)


@pytest.mark.parametrize("arch", sorted(CIFAR_RESNETS))
def test_distiller_cifar_exit_gives_its_head(arch):
    spec = bx.ExitSpec(exits=distiller_exits(arch))
    module = bx.attach_exits(get_model(arch), spec, torch.randn(1, 3, 32, 32)).eval()
    head = module.exit_heads[0]
    assert isinstance(head[0], nn.AvgPool2d) and head[0].kernel_size == 3
    linear = head[-1]
    assert (linear.in_features, linear.out_features) == (1600, 10)
    assert [tuple(o.shape) for o in module(torch.randn(1, 3, 32, 32))] == [(1, 10), (1, 10)]


def test_distiller_resnet50_exits_give_its_heads():
    spec = bx.ExitSpec(exits=distiller_exits("resnet50_earlyexit"))
    module = bx.attach_exits(get_model("resnet50"), spec, torch.randn(1, 3, 224, 224))
    convs = [head[0] for head in module.exit_heads]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (256, 10, (7, 7), (2, 2), (3, 3)), (512, 12, (7, 7), (2, 2), (3, 3))]
    assert all(isinstance(head[1], nn.MaxPool2d) for head in module.exit_heads)
    assert [(h[-1].in_features, h[-1].out_features) for h in module.exit_heads] == [(1960, 1000), (588, 1000)]


def test_distiller_exits_cover_the_documented_archs():
    assert set(DISTILLER_EXITS) == {"resnet50", *CIFAR_RESNETS}
    assert all(p.threshold is None and p.weight is None for points in DISTILLER_EXITS.values() for p in points)


def test_distiller_exits_elsewhere_ask_for_exit_layers():
    with pytest.raises(bx.BranchifyError, match=r"'resnet18'.*--exit-layers"):
        distiller_exits("resnet18")
    with pytest.raises(bx.BranchifyError, match="not a known arch"):
        distiller_exits("resnet_imaginary")


def test_get_model_builds_torchvision_classifiers_and_distiller_names():
    assert get_model("resnet18", num_classes=10).fc.out_features == 10
    assert get_model("mobilenet_v3_small").classifier[-1].out_features == 1000
    assert isinstance(get_model("resnet32_cifar_earlyexit"), ResNetCifar)
    assert isinstance(get_model("resnet50_earlyexit"), type(get_model("resnet50")))
    assert isinstance(get_model("resnet20_cifar", shortcut="B").layer2[0].downsample, nn.Sequential)
    assert {"resnet20_cifar", "resnet56_cifar", "resnet50", "vit_b_16"} <= set(model_names())


def test_get_model_unknown_arch_lists_close_names():
    with pytest.raises(bx.BranchifyError, match=r"unknown arch 'resnet33_cifar'.*close names: .*resnet32_cifar"):
        get_model("resnet33_cifar")
    with pytest.raises(bx.BranchifyError, match="no close name.*list_models"):
        get_model("qqqqqq")
    with pytest.raises(bx.BranchifyError, match="arch must be a model name"):
        get_model("")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_get_model_rejects_bad_class_counts(num_classes):
    with pytest.raises(bx.BranchifyError, match="num_classes must be a positive int"):
        get_model("resnet20_cifar", num_classes=num_classes)


def test_get_model_never_takes_weights():
    with pytest.raises(bx.BranchifyError, match="random weights"):
        get_model("resnet18", weights="DEFAULT")


def test_resnet_cifar_rejects_bad_arguments():
    with pytest.raises(bx.BranchifyError, match="shortcut must be 'A'"):
        ResNetCifar(3, shortcut="C")
    with pytest.raises(bx.BranchifyError, match="blocks per stage"):
        ResNetCifar(0)
