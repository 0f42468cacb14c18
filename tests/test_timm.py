"""A zoo of timm architectures (CNNs, channels-last models, ViTs, hybrids, MLP mixers) at random weights.

Each model gets two exits on layers its own ``feature_info`` lists, in the first ~70% of the network, and
``check_exits`` checks what a user relies on: the final output equals the model's bit for bit; each head
reads the width ``feature_info`` gives for its layer (so the layout, NCHW, NHWC or tokens, was inferred
right); backward reaches every head; the runner's per-sample decisions and logits match the module's
routed outputs at batch 1 and 8; the MACs match torch's flop counter. Models are small variants at small
inputs (``img_size=`` where the model fixes its resolution), built with ``pretrained=False``. Five diverse
models run by default; the rest run under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
from by_hand import by_hand, check_runner
from exits import check_exits

import branchify as bx

timm = pytest.importorskip("timm")

# name -> (create_model kwargs, input size, exit layers in graph order: feature_info modules)
CASES: dict[str, tuple[dict, int, list[str]]] = {
    # CNNs
    "resnet18": ({}, 32, ["layer1", "layer2"]),
    "resnet50d": ({}, 32, ["layer1", "layer2"]),
    "resnest14d": ({}, 32, ["layer1", "layer2"]),
    "res2net50_14w_8s": ({}, 32, ["layer1", "layer2"]),
    "skresnet18": ({}, 32, ["layer1", "layer2"]),
    "efficientnet_b0": ({}, 32, ["blocks.1", "blocks.2"]),
    "mobilenetv3_small_100": ({}, 32, ["blocks.1", "blocks.3"]),
    "mobilenetv4_conv_small": ({}, 32, ["blocks.1", "blocks.2"]),
    "mixnet_s": ({}, 32, ["blocks.1", "blocks.2"]),
    "lcnet_050": ({}, 32, ["blocks.2", "blocks.4"]),
    "tinynet_e": ({}, 32, ["blocks.2", "blocks.4"]),
    "mnasnet_small": ({}, 32, ["blocks.2", "blocks.4"]),
    "ghostnet_100": ({}, 32, ["blocks.3", "blocks.5"]),
    "ghostnetv2_100": ({}, 64, ["blocks.3", "blocks.5"]),  # its attention pools to 1/2: 32 is too small
    "rexnet_100": ({}, 32, ["features.4", "features.10"]),
    "regnety_002": ({}, 32, ["s1", "s2"]),
    "nf_regnet_b0": ({}, 32, ["stages.0", "stages.1"]),
    "convnext_atto": ({}, 32, ["stages.0", "stages.1"]),
    "inception_next_atto": ({}, 32, ["stages.0", "stages.1"]),
    "densenet121": ({}, 32, ["features.denseblock1", "features.denseblock2"]),
    "rdnet_tiny": ({}, 32, ["dense_stages.0", "dense_stages.1"]),
    "dla34": ({}, 32, ["level2", "level3"]),
    "dpn48b": ({}, 32, ["features.conv2_3", "features.conv3_4"]),
    "vgg11": ({}, 32, ["features.9", "features.14"]),
    "repvgg_a0": ({}, 32, ["stages.0", "stages.1"]),
    "repvit_m1": ({}, 32, ["stages.0", "stages.1"]),
    "gernet_s": ({}, 32, ["stages.0", "stages.1"]),
    "hgnetv2_b0": ({}, 32, ["stages.0", "stages.1"]),
    "ese_vovnet19b_dw": ({}, 32, ["stem.1", "stages.0"]),
    "cspresnet50": ({}, 32, ["stages.0", "stages.1"]),
    "starnet_s050": ({}, 32, ["stages.0", "stages.1"]),
    "selecsls42b": ({}, 32, ["features.1", "features.3"]),
    "xception41": ({}, 64, ["blocks.1.stack.act3", "blocks.2.stack.act3"]),
    "inception_v3": ({}, 96, ["Conv2d_4a_3x3", "Mixed_5d"]),
    "hrnet_w18_small": ({}, 64, ["layer1", "stage2"]),  # see NO_FEATURE_INFO
    "convmixer_1024_20_ks9_p14": ({}, 64, ["blocks.4", "blocks.9"]),
    # channels-last stages (NHWC)
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64, ["layers.0", "layers.1"]),
    "swinv2_tiny_window8_256": ({"img_size": 64, "window_size": 4}, 64, ["layers.0", "layers.1"]),
    "mambaout_femto": ({}, 32, ["stages.0", "stages.1"]),
    "volo_d1_224": ({"img_size": 64}, 64, ["network.0", "network.2"]),
    # ViTs and other token models (NLC)
    "vit_tiny_patch16_224": ({"img_size": 64}, 64, ["blocks.3", "blocks.7"]),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64, ["blocks.2", "blocks.6"]),
    "eva02_tiny_patch14_224": ({"img_size": 56}, 56, ["blocks.3", "blocks.7"]),
    "xcit_nano_12_p16_224": ({"img_size": 64}, 64, ["blocks.3", "blocks.7"]),
    "cait_xxs24_224": ({"img_size": 64}, 64, ["blocks.7", "blocks.15"]),
    "convit_tiny": ({"img_size": 64}, 64, ["blocks.2", "blocks.6"]),
    "pit_ti_224": ({"img_size": 64}, 64, ["transformers.0", "transformers.1"]),
    "twins_svt_small": ({"img_size": 64}, 64, ["blocks.0.1", "blocks.1.1"]),  # see FEATURE_INFO_NAMES
    # hybrids: convolutions with attention, pooling or other token mixers
    "levit_128s": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "coat_lite_tiny": ({"img_size": 64}, 64, ["serial_blocks1.1", "serial_blocks2.1"]),  # see FEATURE_INFO_NAMES
    "visformer_tiny": ({"img_size": 64}, 64, ["stage1", "stage2"]),
    "poolformer_s12": ({}, 64, ["stages.0", "stages.1"]),
    "fastvit_t8": ({}, 64, ["stages.0", "stages.1"]),
    "efficientformer_l1": ({}, 224, ["stages.0", "stages.1"]),  # its attention bias is fixed at 7x7 (224)
    "efficientformerv2_s0": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "maxvit_pico_rw_256": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "coatnet_nano_rw_224": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "mobilevit_xxs": ({}, 64, ["stages.2", "stages.3"]),
    "edgenext_xx_small": ({}, 64, ["stages.0", "stages.1"]),
    "efficientvit_b0": ({}, 64, ["stages.1", "stages.2"]),
    "efficientvit_m0": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "pvt_v2_b0": ({}, 64, ["stages.0", "stages.1"]),
    "gcvit_xxtiny": ({"img_size": 64}, 64, ["stages.0", "stages.1"]),
    "davit_tiny": ({}, 64, ["stages.0", "stages.1"]),
    "focalnet_tiny_srf": ({}, 64, ["layers.0", "layers.1"]),
    "nest_tiny": ({"img_size": 64}, 64, ["levels.0", "levels.1"]),
    # MLP mixers
    "mixer_s16_224": ({"img_size": 64}, 64, ["blocks.1", "blocks.4"]),
    "resmlp_12_224": ({"img_size": 64}, 64, ["blocks.3", "blocks.7"]),
    "gmlp_s16_224": ({"img_size": 64}, 64, ["blocks.9", "blocks.19"]),
}

# The default sample: a CNN, a ViT, a hybrid and an MLP mixer. timm's swin (channels last) is in the slow tier
# (20 s at load 5); torchvision's small swin keeps channels-last routing fast (tests/test_runtime.py).
FAST = {"resnet18", "vit_tiny_patch16_224", "levit_128s", "mixer_s16_224"}

# hrnet's feature_info describes its classifier's incre_modules (128, 256, ... channels) under the names
# "stem", "stage1", ..., which are not the modules of those names ("stem" and "stage1" do not exist,
# "stage2" returns its branches at 18 and 36 channels): its widths cannot be checked against it.
NO_FEATURE_INFO = {"hrnet_w18_small"}

# Exit layers whose feature_info entry has another name: twins' and CoaT's stages are module lists that the
# forward never calls itself (an exit names their last block, as branchify's refusal of the list says), and timm
# names twins' stages "block.i" though the list is ``blocks``.
FEATURE_INFO_NAMES = {"twins_svt_small": {"blocks.0.1": "block.0", "blocks.1.1": "block.1"},
                      "coat_lite_tiny": {"serial_blocks1.1": "serial_blocks1", "serial_blocks2.1": "serial_blocks2"}}

# Failures with a cause outside this file; strict, so a fix shows up as XPASS (then drop the entry).
KNOWN_FAILURES: dict[str, tuple[type[Exception], str]] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs (tests/conftest.py)


def _params():
    for name in CASES:
        marks = [] if name in FAST else [pytest.mark.slow]
        if name in KNOWN_FAILURES:
            error, reason = KNOWN_FAILURES[name]
            marks.append(pytest.mark.xfail(raises=error, reason=reason, strict=True))
        yield pytest.param(name, id=name, marks=marks)


def build(name: str) -> torch.nn.Module:
    kwargs, _, _ = CASES[name]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def widths_of(name: str, model: torch.nn.Module, layers: list[str]) -> list[int] | None:
    """The feature widths timm's ``feature_info`` gives at ``layers``."""
    if name in NO_FEATURE_INFO:
        return None
    widths = {info["module"]: info["num_chs"] for info in model.feature_info}
    names = [FEATURE_INFO_NAMES.get(name, {}).get(layer, layer) for layer in layers]
    assert set(names) <= widths.keys(), f"{name}: exit layers must be feature_info modules, {sorted(widths)}"
    return [widths[n] for n in names]


def test_the_zoo_is_wide():
    assert len(CASES) >= 32
    assert set(CASES) <= set(timm.list_models())


@pytest.mark.parametrize("name", list(_params()))
def test_timm_model_gets_exits(name):
    _, size, layers = CASES[name]
    model = build(name)
    channels = widths_of(name, model, layers)
    batch = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    check_exits(model, layers, lambda n: batch[:n].clone(), channels=channels)


# The families the models page lists (ViT, Swin, ConvNeXt): the runner saved and loaded, and its ONNX file, each
# against by_hand (every image run alone, the rule applied by hand). torch.export of each stage: slow tier.
KEEP = ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto"]


@pytest.mark.slow
@pytest.mark.parametrize("name", KEEP)
def test_the_runner_saves_loads_and_exports_to_onnx(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, size, layers = CASES[name]
    module = bx.attach_exits(build(name).eval(), layers, torch.randn(1, 3, size, size)).eval()
    batch = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    runner = check_runner(module, [batch])
    want_index, want_logits = by_hand(module, module.exit_spec, batch)
    loaded = bx.ExitRunner.load(runner.save(tmp_path / name, example_inputs=batch[:1]))(batch)
    assert torch.equal(loaded.exit_index, want_index)
    torch.testing.assert_close(loaded.logits, want_logits, rtol=1e-4, atol=1e-5)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(runner.export_onnx(tmp_path / f"{name}.onnx", batch[:1])), options,
                                   providers=["CPUExecutionProvider"])
    logits, exit_index = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    assert torch.equal(torch.from_numpy(exit_index), want_index)
    torch.testing.assert_close(torch.from_numpy(logits), want_logits, rtol=1e-4, atol=1e-4)
