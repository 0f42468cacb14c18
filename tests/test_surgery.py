"""attach_exits: heads sized by inference, graph order, train/eval behaviour, gradients, bad input."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import branchify as bx
import branchify.criteria
import branchify.heads
import branchify.routing


def resnet18(**kwargs):
    return torchvision.models.resnet18(**kwargs).eval()


X32 = torch.randn(1, 3, 32, 32)


def test_distiller_imagenet_heads_are_inferred_exactly():
    spec = bx.ExitSpec(exits=[
        bx.ExitPoint(layer="layer1", head=bx.HeadSpec(kind="conv", channels=[10], kernel_size=7, stride=2)),
        bx.ExitPoint(layer="layer2", head=bx.HeadSpec(kind="conv", channels=[12], kernel_size=7, stride=2)),
    ])
    module = bx.attach_exits(torchvision.models.resnet50(), spec, torch.randn(1, 3, 224, 224))
    linears = [[m for m in head.modules() if isinstance(m, nn.Linear)][-1] for head in module.exit_heads]
    assert [(m.in_features, m.out_features) for m in linears] == [(1960, 1000), (588, 1000)]
    convs = [[m for m in head.modules() if isinstance(m, nn.Conv2d)][0] for head in module.exit_heads]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (256, 10, (7, 7), (2, 2), (3, 3)), (512, 12, (7, 7), (2, 2), (3, 3))]


def test_distiller_cifar_pool_head_is_inferred_exactly():
    class Stage(nn.Module):  # a 16x32x32 exit point, as after Distiller's CIFAR layer1.2
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="conv", head=bx.HeadSpec(kind="pool", kernel_size=3))])
    module = bx.attach_exits(Stage(), spec, X32)
    assert module.exit_heads[0][-1].in_features == 1600 and module.exit_heads[0][-1].out_features == 10


def test_exits_out_of_graph_order_are_refused_not_reordered():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer3", threshold=0.3),
                              bx.ExitPoint(layer="layer1.0.conv2", threshold=0.1)])
    with pytest.raises(bx.BranchifyError, match=r"in the order \['layer1.0.conv2', 'layer3'\]"):
        bx.attach_exits(resnet18(), spec, X32)
    module = bx.attach_exits(resnet18(), spec.model_copy(update={"exits": spec.exits[::-1]}), X32)
    assert module.exit_spec.layers == ["layer1.0.conv2", "layer3"]
    assert module.exit_spec.thresholds == [0.1, 0.3]
    assert [p.shape for p in module.exit_points] == [(64, 8, 8), (256, 2, 2)]


def test_module_path_resolves_to_last_node_and_node_names_are_accepted():
    model = resnet18()
    names = torchvision.models.feature_extraction.get_graph_node_names(model)[1]
    assert "layer1.0.relu_1" in names and "layer1.0.add" in names
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1.0.add"), bx.ExitPoint(layer="layer2")])
    module = bx.attach_exits(model, spec, X32)
    assert [p.node for p in module.exit_points] == ["layer1.0.add", "layer2.1.relu_1"]


@pytest.mark.parametrize("kind", [{"kind": "linear"}, {"kind": "mlp", "hidden": 32},
                                  {"kind": "conv", "channels": [8, 8], "activation": "relu"},
                                  {"kind": "pool", "kernel_size": 2}])
def test_every_head_kind_gives_batch_by_classes(kind):
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer2", head=bx.HeadSpec(**kind))])
    module = bx.attach_exits(resnet18(num_classes=7), spec, X32).eval()
    out = module(torch.randn(3, 3, 32, 32))
    assert out[0].shape == (3, 7)


@pytest.mark.slow  # swin_t and vit_b_32; test_points checks both layouts on small models fast
def test_channels_last_and_token_layouts_get_matching_heads():
    swin = torchvision.models.swin_t(num_classes=5).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="features.3"),
                              bx.ExitPoint(layer="features.5", head=bx.HeadSpec(kind="conv", channels=[4]))])
    module = bx.attach_exits(swin, spec, torch.randn(1, 3, 64, 64)).eval()
    assert [p.layout for p in module.exit_points] == [bx.Layout.NHWC, bx.Layout.NHWC]
    assert module.exit_heads[0][-1].in_features == 192  # channels are last in swin's stages
    assert all(o.shape == (2, 5) for o in module(torch.randn(2, 3, 64, 64)))

    vit = torchvision.models.vit_b_32(image_size=64, num_classes=5).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="encoder.layers.encoder_layer_3", head=bx.HeadSpec(token="cls"))])
    module = bx.attach_exits(vit, spec, torch.randn(1, 3, 64, 64)).eval()
    assert module.exit_points[0].layout is bx.Layout.NLC and module.exit_points[0].shape == (5, 768)
    x = torch.randn(2, 3, 64, 64)
    tokens = {}
    handle = vit.encoder.layers[3].register_forward_hook(lambda m, a, out: tokens.setdefault("x", out))
    vit(x)  # the original model's own forward gives the reference tokens
    handle.remove()
    out = module(x)
    linear = module.exit_heads[0][-1]
    assert torch.allclose(out[0], linear(tokens["x"][:, 0]), atol=1e-6)


def test_registered_head_receives_inferred_shape_layout_and_classes():
    seen = {}

    @bx.register_head("test_spy_head")
    def spy(shape, layout, num_classes, spec):
        seen.update(shape=shape, layout=layout, num_classes=num_classes, spec=spec)
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), num_classes))

    head = bx.HeadSpec(kind="test_spy_head", options={"note": 1})
    module = bx.attach_exits(resnet18(num_classes=3), bx.ExitSpec(exits=[{"layer": "layer3", "head": head}]), X32)
    # the factory gets the spec with the token pooling resolved (unset: the model's default, "mean" here)
    assert seen == {"shape": (256, 2, 2), "layout": bx.Layout.NCHW, "num_classes": 3,
                    "spec": head.model_copy(update={"token": "mean"})}
    assert module.eval()(torch.randn(2, 3, 32, 32))[0].shape == (2, 3)


def test_head_factory_with_wrong_output_is_rejected():
    bx.register_head("test_bad_head", lambda shape, layout, num_classes, spec: nn.Flatten())
    spec = bx.ExitSpec(exits=[{"layer": "layer3", "head": {"kind": "test_bad_head"}}])
    with pytest.raises(bx.BranchifyError, match=r"maps \(1, 256, 2, 2\) to \(1, 1024\).*\(batch, 1000\)"):
        bx.attach_exits(resnet18(), spec, X32)


def _state(model):
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m), id(m), m.training) for n, m in model.named_modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def test_input_model_is_not_modified():
    model = torchvision.models.resnet18()
    model.layer1.register_forward_hook(lambda *a: None)
    model.layer2.eval()  # a mixed-mode model must keep its mixed flags
    before = _state(model)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
    module = bx.attach_exits(model, spec, X32)
    after = _state(model)
    assert before["modules"] == after["modules"] and before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])
    assert module.training is True and model.training is True
    assert not hasattr(model, "exit_heads")


@pytest.mark.parametrize("name", ["googlenet", pytest.param("inception_v3", marks=pytest.mark.slow)])  # one fast
def test_auxiliary_outputs_follow_train_and_eval(name):
    size = 299 if name == "inception_v3" else 64  # the train-mode aux head needs its full input size
    model = torchvision.models.get_model(name, weights=None, num_classes=4, aux_logits=True, init_weights=True)
    layer = "inception4a" if name == "googlenet" else "Mixed_5d"
    module = bx.attach_exits(model, bx.ExitSpec(exits=[{"layer": layer}]), torch.randn(1, 3, size, size))
    x = torch.randn(2, 3, size, size)
    model.train(), module.train()
    torch.manual_seed(1)
    reference = model(x)
    torch.manual_seed(1)
    outputs = module(x)
    assert type(outputs[-1]) is type(reference) and len(outputs[-1]) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(outputs[-1], reference))
    model.eval(), module.eval()
    outputs = module(x)
    assert isinstance(outputs[-1], torch.Tensor) and torch.equal(outputs[-1], model(x))


def test_stochastic_depth_follows_the_mode():
    model = torchvision.models.efficientnet_b0(num_classes=4, stochastic_depth_prob=0.5)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[{"layer": "features.3"}]), torch.randn(1, 3, 64, 64))
    x = torch.randn(4, 3, 64, 64)
    module.train(), model.train()
    torch.manual_seed(3)
    reference = model(x)
    torch.manual_seed(3)
    trained = module(x)[-1]
    assert torch.equal(trained, reference)
    torch.manual_seed(4)
    assert not torch.equal(module(x)[-1], trained)  # stochastic depth (and dropout) are live in train mode
    module.eval(), model.eval()
    assert torch.equal(module(x)[-1], module(x)[-1]) and torch.equal(module(x)[-1], model(x))


def test_loss_on_an_exit_reaches_only_the_backbone_before_it():
    model = resnet18(num_classes=4)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
    module = bx.attach_exits(model, spec, X32)
    outputs = module(torch.randn(2, 3, 32, 32))
    outputs[0].sum().backward()
    before = [model.conv1.weight, *model.layer1.parameters()]
    after = [*model.layer2.parameters(), *model.layer3.parameters(), *model.layer4.parameters(), model.fc.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in before)
    assert all(p.grad is None for p in after)
    assert all(p.grad is None for p in module.exit_heads[1].parameters())


def test_deepcopy_keeps_both_graphs_spec_and_heads():
    module = bx.attach_exits(torchvision.models.googlenet(num_classes=4, aux_logits=True, init_weights=True),
                             bx.ExitSpec(exits=[{"layer": "inception4a", "threshold": 0.5}]),
                             torch.randn(1, 3, 64, 64))
    clone = copy.deepcopy(module)
    assert clone.exit_spec == module.exit_spec and clone.num_classes == 4
    assert clone.exit_heads[0][-1].weight is not module.exit_heads[0][-1].weight
    x = torch.randn(2, 3, 64, 64)
    clone.eval(), module.eval()
    assert all(torch.equal(a, b) for a, b in zip(clone(x), module(x)))
    assert len(clone.train()(x)[-1]) == 3  # the train graph (aux outputs) survived the copy


def test_scripts_exports_and_compiles():
    module = bx.attach_exits(resnet18(num_classes=4), bx.ExitSpec(exits=[{"layer": "layer2"}]), X32).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = module(x)
    scripted = torch.jit.script(module)
    assert all(torch.equal(a, b) for a, b in zip(scripted(x), expected))
    exported = torch.export.export(module, (x,))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(exported.module()(x), expected))


# ---- bad input ---------------------------------------------------------------------------------

class Sized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        n = x.size(0)
        h = self.conv(x).mean((2, 3)).view(n, -1)
        self.unused(h)
        return self.fc(h)


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, x):
        grid = torch.relu(self.fc1(x)).view(x.shape[0], 4, 4, 4) * 2  # no layout evidence in a 4x4x4 grid
        return self.fc2(grid.flatten(1))


def _attach(model, layer, inputs=X32, **head):
    return bx.attach_exits(model, bx.ExitSpec(exits=[{"layer": layer, "head": head}]), inputs)


@pytest.mark.parametrize(
    ("make", "layer", "inputs", "head", "pattern"),
    [
        (resnet18, "layr1", X32, {}, r"unknown layer 'layr1'\. Closest: 'layer1'.*list_exit_points"),
        (Sized, "size", X32, {}, r"not a tensor"),
        (resnet18, "fc", X32, {}, r"final output, which is already the last exit"),
        (Sized, "unused", X32, {}, r"not on the path to the final output"),
        (lambda: torchvision.models.googlenet(aux_logits=True, init_weights=True).eval(), "aux1",
         torch.randn(1, 3, 64, 64), {}, r"'aux1' is not computed in eval mode"),
        (resnet18, "layer4", X32, {"kind": "pool", "kernel_size": 3},
         r"shrinks below 1x1: use a smaller stride or kernel_size"),
        (resnet18, "layer2", torch.randn(1, 4, 32, 32), {}, r"rejects example_inputs \(Tensor\(1, 4, 32, 32\)"),
        (Flat, "mul", torch.randn(1, 64), {}, r"cannot tell the layout.*HeadSpec\(layout='NCHW'\)"),
        (resnet18, "layer2", X32, {"layout": "NLC"}, r"declared layout NLC is 3-D"),
        (resnet18, "layer2", X32, {"token": "cls"}, r"token='cls'.*NCHW; use token='mean'"),
        (lambda: torchvision.models.vit_b_32(image_size=64), "encoder.layers.encoder_layer_1",
         torch.randn(1, 3, 64, 64), {"kind": "conv", "channels": [4]}, r"works on a spatial map.*NLC"),
    ],
)
def test_bad_input_gets_a_clear_error(make, layer, inputs, head, pattern):
    with pytest.raises(bx.BranchifyError, match=pattern):
        _attach(make(), layer, inputs, **head)


def test_declared_layout_unblocks_an_undetermined_one():
    module = _attach(Flat(), "mul", torch.randn(1, 64), layout="NCHW")
    assert module.eval()(torch.randn(2, 64))[0].shape == (2, 2)


def test_two_exits_at_the_same_node_are_rejected():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer1.1")])
    with pytest.raises(bx.BranchifyError, match=r"resolve to the same node 'layer1.1.relu_1'; keep one"):
        bx.attach_exits(resnet18(), spec, X32)


@pytest.mark.parametrize(("make", "spec", "inputs", "pattern"), [
    (lambda: (lambda x: x), {"exits": [{"layer": "a"}]}, X32, r"expected a torch.nn.Module, got function"),
    (resnet18, "layer1", X32, r"spec must be a bx.ExitSpec"),
    (resnet18, {"exits": [{"layer": "layer1"}]}, [[1, 2]], r"hold no tensor with a batch dim"),
    (resnet18, {"exits": [{"layer": "layer1"}]}, "img", r"must be a tensor, a tuple of tensors or a dict"),
])
def test_wrong_argument_types_are_named(make, spec, inputs, pattern):
    with pytest.raises(bx.BranchifyError, match=pattern):
        bx.attach_exits(make(), spec, inputs)


# ---- untraceable models ------------------------------------------------------------------------

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.fc(self.block(x).mean((2, 3)))


def test_untraceable_model_falls_back_to_hooks_and_says_so():
    model = Branchy().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem"), bx.ExitPoint(layer="block")])
    with pytest.warns(UserWarning, match="Branchy cannot be captured as a graph.*torch.fx.*torch.export.*hooks"):
        module = bx.attach_exits(model, spec, X32)
    assert module.exit_path == "hooks"
    assert module.exit_spec.layers == ["stem", "block"]  # execution order
    assert [p.layout for p in module.exit_points] == [bx.Layout.NCHW, bx.Layout.NCHW]
    x = torch.randn(4, 3, 32, 32)
    outputs = module.eval()(x)
    assert len(outputs) == 3 and torch.equal(outputs[-1], model(x))
    assert outputs[0].shape == (4, 3)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())  # hooks live only during a forward
    outputs[0].sum().backward()
    assert model.stem.weight.grad is not None and model.fc.weight.grad is None


def test_fallback_rejects_node_names_with_module_hints():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(bx.BranchifyError, match=r"exits must name modules.*Closest: 'block'"):
            bx.attach_exits(Branchy(), bx.ExitSpec(exits=[{"layer": "blok"}]), X32)


def test_head_with_batch_norm_after_pooling_builds_and_keeps_train_mode():
    # Regression: heads were checked in train mode on a batch of 1, so BatchNorm1d failed with a
    # misleading "shrinks below 1x1" message.
    @bx.register_head("test_bn1d_head")
    def bn_head(shape, layout, num_classes, spec):
        return nn.Sequential(bx.heads.GlobalPool(layout), nn.BatchNorm1d(shape[0]), nn.Linear(shape[0], num_classes))

    spec = bx.ExitSpec(exits=[{"layer": "layer2", "head": {"kind": "test_bn1d_head"}}])
    module = bx.attach_exits(resnet18(num_classes=3).train(), spec, X32)
    assert module.exit_heads[0].training and module.exit_heads[0][1].training
    assert module(torch.randn(4, 3, 32, 32))[0].shape == (4, 3)


def test_exit_spec_can_take_new_thresholds_but_not_new_layers():
    # Regression: assigning a spec for other layers made the runner return an activation as logits.
    module = bx.attach_exits(resnet18(num_classes=4), bx.ExitSpec(exits=[{"layer": "layer1"}, {"layer": "layer2"}]),
                             X32)
    module.exit_spec = module.exit_spec.with_exits(threshold=[0.5, 0.7])
    assert module.exit_spec.thresholds == [0.5, 0.7]
    with pytest.raises(bx.SpecError, match=r"built with exits at \['layer1', 'layer2'\].*not the layers or heads"):
        module.exit_spec = bx.ExitSpec(exits=[{"layer": "layer3", "threshold": 0.5}])
    with pytest.raises(bx.SpecError, match="not the layers or heads"):
        module.exit_spec = module.exit_spec.with_exits(head=[bx.HeadSpec(kind="mlp"), bx.HeadSpec()])
    assert module.exit_spec.layers == ["layer1", "layer2"]


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block(self.stem(x))
        if x.mean() > -1e9:  # untraceable: the hook fallback
            x = self.block(x)  # the same block runs twice
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("call", [0, 1])
def test_hook_fallback_judges_a_twice_called_layer_at_the_named_call_everywhere(call):
    # Regression: the forward used the last call, the runner the first, so their decisions differed; now the
    # spec names the call ("block:k"), and the bare name of a module called twice is refused.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(bx.BranchifyError, match="'block:0', 'block:1'"):
            bx.attach_exits(Twice().eval(), bx.ExitSpec(exits=[{"layer": "block"}]), X32)
        module = bx.attach_exits(Twice().eval(), bx.ExitSpec(exits=[{"layer": f"block:{call}"}]), X32).eval()
    x = torch.randn(6, 3, 32, 32)
    calls = []
    handle = module.model.block.register_forward_hook(lambda m, a, out: calls.append(out))
    outputs = module(x)
    handle.remove()
    assert len(calls) == 2 and torch.allclose(outputs[0], module.exit_heads[0](calls[call]))
    scores = bx.criteria.get_criterion("entropy").score(outputs[0])
    threshold = float(scores.median())
    module.exit_spec = module.exit_spec.with_exits(threshold=[threshold])
    expected = branchify.routing.route(module.exit_spec, list(module(x)[:-1]))
    assert 0 < int((expected == 0).sum()) < 6
    assert torch.equal(bx.ExitRunner(module)(x).exit_index, expected)


def test_an_exit_module_pickles_as_an_exit_module_with_both_graphs():
    # GraphModule's own pickling gave back a plain GraphModule of the current graph only
    import pickle

    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False).eval()
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="inception3b", threshold=1.0)]),
                             torch.randn(1, 3, 64, 64))
    clone = pickle.loads(pickle.dumps(module))
    assert isinstance(clone, bx.ExitModule) and clone.exit_spec == module.exit_spec
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(clone.eval()(x), module.eval()(x)))
    assert len(clone.train()(x)[-1]) == 3  # the train graph came along: auxiliary outputs
