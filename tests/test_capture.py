"""Capture paths (torch.fx, torch.export, forward hooks): the same exits give the same heads and decisions.

Each test here failed before the fix it names (issue 11's defects).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from exits import check_exits, expected, spread_heads, with_mix
from torch import nn

import branchify as bx
from branchify.routing import route

X32 = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def same_heads(source: nn.Module, target: nn.Module) -> None:
    target.exit_heads.load_state_dict(source.exit_heads.state_dict())


def first_linear(head: nn.Module) -> nn.Linear:
    return next(m for m in head.modules() if isinstance(m, nn.Linear))


# ---- one layout analysis for every path ----------------------------------------------------------

def test_hook_path_reads_convnext_maps_channels_first_like_the_fx_path():
    # CNBlock ends in a Linear, but its forward returns channels-first maps (96, 8, 8)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="features.1")])
    fx = bx.attach_exits(model, spec, X32[:1])
    hooks = bx.attach_exits(model, spec, X32[:1], capture="hooks")
    assert fx.exit_points[0].layout is hooks.exit_points[0].layout is bx.Layout.NCHW
    assert first_linear(hooks.exit_heads[0]).in_features == 96
    same_heads(fx, hooks)
    with torch.no_grad():
        torch.testing.assert_close(hooks(X32)[0], fx(X32)[0])


def test_hook_path_reads_patch_embedding_tokens_on_the_channel_axis():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="patch_embed")])  # returns (B, L=16, C=192)
    fx = bx.attach_exits(model, spec, X32[:1])
    hooks = bx.attach_exits(model, spec, X32[:1], capture="hooks")
    assert fx.exit_points[0].layout is hooks.exit_points[0].layout is bx.Layout.NLC
    assert first_linear(hooks.exit_heads[0]).in_features == 192


class Square(nn.Module):
    """A (B, C, L) map with C == L, turned to tokens by ``.mT``: only the graph tells the axes apart."""

    def __init__(self, transpose: str = "mT"):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.transpose = transpose
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x)
        h = h.mT if self.transpose == "mT" else h.transpose(1, 2)
        return self.fc(h.relu()).mean(1)


@pytest.mark.parametrize("transpose", ["mT", "transpose"])
def test_mT_on_a_square_map_moves_the_channels(transpose):
    model = Square(transpose).eval()
    x = torch.randn(2, 4, 6)
    points = {p.name: p for p in bx.list_exit_points(model, x, all_nodes=True)}
    assert points["conv"].layout is bx.Layout.NCL
    moved = [p for name, p in points.items() if name.startswith(("getattr", "transpose"))]
    assert [p.layout for p in moved] == [bx.Layout.NLC]


# ---- heads read the value the layer returned ------------------------------------------------------

def test_hook_path_heads_read_activations_before_later_in_place_ops():
    # layer1.0.bn2's output is changed by `out += identity` and ReLU(inplace=True) right after it
    model = torchvision.models.resnet18(num_classes=10).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1.0.bn2")])
    fx = bx.attach_exits(model, spec, X32[:1])
    hooks = bx.attach_exits(model, spec, X32[:1], capture="hooks")
    same_heads(fx, hooks)
    spread_heads(fx, X32)
    same_heads(fx, hooks)
    with torch.no_grad():
        torch.testing.assert_close(hooks(X32)[0], fx(X32)[0], rtol=1e-5, atol=1e-6)
    spec = with_mix(fx, X32)
    hooks.exit_spec = spec
    with torch.no_grad():
        decisions = route(spec, hooks(X32)[:-1])
    assert torch.equal(bx.ExitRunner(hooks)(X32).exit_index, decisions)
    assert torch.equal(bx.ExitRunner(fx)(X32).exit_index, decisions)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_conv_head_before_an_in_place_relu_trains(capture):
    model = torchvision.models.resnet18(num_classes=10)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="bn1", head=bx.HeadSpec(kind="conv", channels=[4]))])
    module = bx.attach_exits(model, spec, X32[:1], capture=capture).train()
    outputs = module(X32[:4])
    sum(o.sum() for o in outputs).backward()  # autograd's in-place error before the fix
    assert module.exit_heads[0][0].weight.grad is not None


class Gate(nn.Module):
    """Data-dependent control flow (or not), a layer called twice, and in-place ops after the exits."""

    def __init__(self, branchy: bool):
        super().__init__()
        self.branchy = branchy
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU(inplace=True)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.deep = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(x)
        if not self.branchy or x.abs().sum() >= 0:  # always true: only the branchy twin branches on a value
            x = self.mix(self.mix(x))
        y = self.deep(x)
        y += 1.0
        return self.fc(self.act(y).mean((2, 3)))


def test_the_hook_path_gives_what_the_fx_path_gives_on_a_traceable_twin():
    torch.manual_seed(0)
    traceable, branchy = Gate(branchy=False).eval(), Gate(branchy=True).eval()
    branchy.load_state_dict(traceable.state_dict())
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem"), bx.ExitPoint(layer="deep")])
    fx = bx.attach_exits(traceable, spec, X32[:1])
    with pytest.warns(UserWarning, match="forward hooks"):
        hooks = bx.attach_exits(branchy, spec, X32[:1])
    assert (fx.exit_path, hooks.exit_path) == ("fx", "hooks")
    assert [p.layout for p in hooks.exit_points] == [p.layout for p in fx.exit_points]
    assert [p.shape for p in hooks.exit_points] == [p.shape for p in fx.exit_points]
    assert [p.macs for p in hooks.exit_points] == [p.macs for p in fx.exit_points]
    spread_heads(fx, X32)
    same_heads(fx, hooks)
    spec = with_mix(fx, X32)
    hooks.exit_spec = spec
    with torch.no_grad():
        fx_out, hook_out = fx(X32), hooks(X32)
    for a, b in zip(fx_out, hook_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    decisions = route(spec, fx_out[:-1])
    for module in (fx, hooks):
        result = bx.ExitRunner(module)(X32)
        assert torch.equal(result.exit_index, decisions)
        torch.testing.assert_close(result.logits, expected(fx_out, decisions), rtol=1e-4, atol=1e-5)


# ---- what the model is and what it gets ------------------------------------------------------------

def test_hooks_on_the_model_itself_are_refused_on_graph_paths_and_kept_on_the_hook_path():
    model = torchvision.models.resnet18(num_classes=10).eval()
    handle = model.register_forward_hook(lambda m, a, out: out * 2)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    try:
        with pytest.raises(bx.BranchifyError, match=r"1 forward hook\(s\).*registered on the model itself.*"
                                                    r"capture='hooks'"):
            bx.attach_exits(model, spec, X32[:1])
        module = bx.attach_exits(model, spec, X32[:1], capture="hooks")
        with torch.no_grad():
            assert torch.equal(module(X32)[-1], model(X32))
    finally:
        handle.remove()


def test_the_runner_takes_timm_vit_calls_with_defaulted_arguments():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              num_classes=10)
    # forward(x, attn_mask=None, is_causal=False): "ExitRunner takes 3 input tensor(s)" before the fix
    check_exits(model, ["blocks.0", "blocks.2"], lambda n: X32[:n], channels=[192, 192], path="fx")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = x * 0.5
        return self.fc(self.b(x).mean((2, 3)))


def test_exit_points_are_listed_for_every_model_attach_accepts():
    points = bx.list_exit_points(DataDependent(), X32[:1])  # raw torch.fx error before the fix
    assert [p.name for p in points][:2] == ["a.0", "a.1"]
    assert all(p.layout is bx.Layout.NCHW for p in points)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=points[1].name)])
    with pytest.warns(UserWarning, match="forward hooks"):
        assert bx.attach_exits(DataDependent(), spec, X32[:1]).exit_points[0].macs == points[1].macs


def test_a_model_on_the_meta_device_is_refused_with_the_way_out():
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    for call in (lambda: bx.attach_exits(model, spec, X32[:1]), lambda: bx.list_exit_points(model, X32[:1])):
        with pytest.raises(bx.BranchifyError, match=r"'conv1.weight' is on the meta device.*to_empty"):
            call()


def test_an_empty_example_batch_is_refused_everywhere():
    model = torchvision.models.resnet18(num_classes=10)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    module = bx.attach_exits(model, spec, X32[:1])
    empty = X32[:0]
    for call in (lambda: bx.attach_exits(model, spec, empty), lambda: bx.list_exit_points(model, empty),
                 lambda: bx.exit_costs(module, empty)):
        with pytest.raises(bx.BranchifyError, match=r"batch size 0.*at least one sample"):
            call()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_tuple_output_is_described_and_its_logits_picked(capture):
    model = TupleOut().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="body.1", threshold=0.5)])
    with pytest.raises(bx.BranchifyError, match=r"returns a tuple \(entries: 0, 1\).*output=0"):
        bx.attach_exits(model, spec, X32[:1], capture=capture)
    module = bx.attach_exits(model, spec, X32[:1], capture=capture, output=0)
    with torch.no_grad():
        assert torch.equal(module(X32)[-1], model(X32)[0])
    assert bx.ExitRunner(module.eval()).num_classes == 10


def test_capture_can_be_forced_and_bad_names_are_refused():
    model = torchvision.models.resnet18(num_classes=10)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    exported = bx.attach_exits(model, spec, X32[:1], capture="export")
    assert exported.exit_path == "export"
    with torch.no_grad():
        assert torch.equal(exported.eval()(X32)[-1], model.eval()(X32))
    with pytest.raises(bx.BranchifyError, match=r"capture='graph' is not a capture path.*'auto', 'fx', 'export'"):
        bx.attach_exits(model, spec, X32[:1], capture="graph")
    with pytest.raises(bx.BranchifyError, match=r"capture='fx': torch.fx: .*try capture='export'"):
        bx.attach_exits(DataDependent(), spec, X32[:1], capture="fx")


def test_a_model_with_a_child_named_like_a_protocol_method_keeps_it():
    # timm's convnext, levit, maxvit, poolformer, fastvit... have a child called `stages`
    model = nn.Sequential()
    model.add_module("stages", nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 10))
    module = bx.attach_exits(model.eval(), bx.ExitSpec(exits=[bx.ExitPoint(layer="stages.0")]), X32[:1])
    with torch.no_grad():
        assert torch.equal(module(X32)[-1], model(X32))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_constant_filled_in_place_is_rebuilt_with_its_writes_in_every_stage(capture):
    # timm's ConViT builds tensors in forward and fills them in place (through a view on the export path)
    class Filled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv1(x)
            bias = torch.zeros(1, 8, 1, 1)
            bias[:, :4] = 5.0
            return self.fc(self.conv2(x + bias).mean((2, 3)))

    model = Filled().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="conv1", threshold=0.0)])  # nobody leaves: the final stage runs
    module = bx.attach_exits(model, spec, X32[:1], capture=capture)
    with torch.no_grad():
        assert torch.equal(bx.ExitRunner(module)(X32).logits, model(X32))


class DropClassToken(nn.Module):
    def forward(self, t):
        return t[:, 1:]


class ToMap(nn.Module):
    def forward(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 8, 8)


class ClassToken(nn.Module):
    """PiT-like: tokens with a class token, the class token dropped by t[:, 1:], back to a map."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.mix = nn.Linear(16, 16)
        self.drop = DropClassToken()
        self.to_map = ToMap()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        e = self.embed(x)
        t = torch.cat([self.cls.expand(e.shape[0], -1, -1), e.flatten(2).transpose(1, 2)], 1)
        return self.fc(self.to_map(self.drop(self.mix(t))).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_basic_indexing_keeps_track_of_the_channels(capture):
    model = ClassToken().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="drop"), bx.ExitPoint(layer="to_map")])
    module = bx.attach_exits(model, spec, X32[:1], capture=capture)  # "cannot tell the layout" before the fix
    assert [p.layout for p in module.exit_points] == [bx.Layout.NLC, bx.Layout.NCHW]
    assert [first_linear(h).in_features for h in module.exit_heads] == [16, 16]
