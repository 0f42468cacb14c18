"""Backbones by name: He et al.'s CIFAR ResNets, every torchvision classifier, and Distiller's exits.

The CIFAR ResNets follow "Deep Residual Learning for Image Recognition" (He et al., 2016, section
4.2): a 3x3 stem conv with 16 channels, three stages of ``n`` BasicBlocks with 16, 32 and 64
channels (the second and third stage halve the map), global average pooling and a linear
classifier; depth ``6n + 2``. Module names follow torchvision's ResNet (``conv1, bn1, relu,
layer1..layer3, avgpool, fc``) and Distiller's ``resnet_cifar`` blocks (``conv1, bn1, relu1, conv2,
bn2, relu2, downsample``), so Distiller's exit point ``layer1.2`` names the same block here.

Shortcuts: option A by default, as He et al. used on CIFAR: where a block changes shape, the
identity is subsampled and zero-padded to the new width, so shortcuts have no parameters and the
counts are the paper's (0.27M, 0.46M, 0.66M, 0.85M). ``shortcut="B"`` uses a 1x1 conv + BatchNorm
projection there instead, as Distiller's ``resnet_cifar`` did (use it to load Distiller
checkpoints); that adds 2,752 parameters at every depth.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..errors import BranchifyError
from ..spec import ExitPoint, HeadSpec

__all__ = [
    "CIFAR_RESNETS",
    "DISTILLER_EXITS",
    "BasicBlock",
    "ResNetCifar",
    "distiller_exits",
    "get_model",
    "model_names",
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet44_cifar",
    "resnet56_cifar",
]

Shortcut = Literal["A", "B"]


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.front = extra // 2
        self.back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, [0, 0, 0, 0, self.front, self.back])


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual connection (He et al.'s CIFAR block)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            if shortcut == "B":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
            else:
                self.downsample = _PadShortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNetCifar(nn.Module):
    """He et al.'s CIFAR ResNet of depth ``6 * blocks + 2``; any input size works (adaptive pooling).

    >>> import torch
    >>> from branchify.distiller.models import ResNetCifar
    >>> ResNetCifar(blocks=1)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, blocks: int, num_classes: int = 10, shortcut: Shortcut = "A") -> None:
        super().__init__()
        if not isinstance(blocks, int) or blocks < 1:
            raise BranchifyError(f"blocks per stage must be a positive int, got {blocks!r} (depth = 6 * blocks + 2)")
        if shortcut not in ("A", "B"):
            raise BranchifyError(
                f"shortcut must be 'A' (zero-padded identity) or 'B' (1x1 conv projection), got {shortcut!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise BranchifyError(f"num_classes must be a positive int, got {num_classes!r}")
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        widths = [16, 32, 64]
        stages = []
        in_channels = 16
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_channels, width, stride, shortcut)]
            stage += [BasicBlock(width, width, 1, shortcut) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        # He et al. initialise convs as in their "Delving deep into rectifiers" paper (fan-out, ReLU gain).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20_cifar(num_classes: int = 10, shortcut: Shortcut = "A") -> ResNetCifar:
    """ResNet-20 for 32x32 inputs (3 blocks per stage, ~0.27M parameters).

    >>> from branchify.distiller.models import resnet20_cifar
    >>> round(sum(p.numel() for p in resnet20_cifar().parameters()) / 1e6, 2)
    0.27
    """
    return ResNetCifar(3, num_classes, shortcut)


def resnet32_cifar(num_classes: int = 10, shortcut: Shortcut = "A") -> ResNetCifar:
    """ResNet-32 for 32x32 inputs (5 blocks per stage, ~0.46M parameters); Distiller's CIFAR example.

    >>> from branchify.distiller.models import resnet32_cifar
    >>> len(resnet32_cifar().layer1)
    5
    """
    return ResNetCifar(5, num_classes, shortcut)


def resnet44_cifar(num_classes: int = 10, shortcut: Shortcut = "A") -> ResNetCifar:
    """ResNet-44 for 32x32 inputs (7 blocks per stage, ~0.66M parameters).

    >>> from branchify.distiller.models import resnet44_cifar
    >>> len(resnet44_cifar().layer3)
    7
    """
    return ResNetCifar(7, num_classes, shortcut)


def resnet56_cifar(num_classes: int = 10, shortcut: Shortcut = "A") -> ResNetCifar:
    """ResNet-56 for 32x32 inputs (9 blocks per stage, ~0.85M parameters).

    >>> from branchify.distiller.models import resnet56_cifar
    >>> len(resnet56_cifar().layer2)
    9
    """
    return ResNetCifar(9, num_classes, shortcut)


CIFAR_RESNETS: dict[str, Callable[..., ResNetCifar]] = {
    "resnet20_cifar": resnet20_cifar,
    "resnet32_cifar": resnet32_cifar,
    "resnet44_cifar": resnet44_cifar,
    "resnet56_cifar": resnet56_cifar,
}

# Distiller's early-exit variants were separate architectures named with this suffix (its
# ``--arch=resnet32_cifar_earlyexit``); here exits are attached to the plain model, so the suffix
# only selects the same backbone.
_DISTILLER_SUFFIX = "_earlyexit"

_CIFAR_EXIT = (ExitPoint(layer="layer1.2", head=HeadSpec(kind="pool", kernel_size=3)),)

DISTILLER_EXITS: dict[str, tuple[ExitPoint, ...]] = {
    "resnet50": (
        ExitPoint(layer="layer1", head=HeadSpec(kind="conv", channels=[10], kernel_size=7, stride=2, pool="max")),
        ExitPoint(layer="layer2", head=HeadSpec(kind="conv", channels=[12], kernel_size=7, stride=2, pool="max")),
    ),
    **{name: _CIFAR_EXIT for name in CIFAR_RESNETS},
}
"""Where Distiller's hand-written early-exit models put their exits, and with which heads.

ResNet-50 (ImageNet): after ``layer1`` and ``layer2``, each a 7x7 stride-2 conv (10 and 12
channels), a 3x3 stride-2 max pool and a linear layer. CIFAR ResNets: after block ``layer1.2``, a
3x3 average pool and a linear layer. Thresholds and loss weights are left unset.
"""


def model_names() -> list[str]:
    """Every architecture ``get_model`` builds: the CIFAR ResNets and torchvision's classifiers.

    >>> from branchify.distiller.models import model_names
    >>> "resnet32_cifar" in model_names() and "resnet18" in model_names()
    True
    """
    return sorted({*CIFAR_RESNETS, *torchvision.models.list_models(module=torchvision.models)})


def _canonical(arch: str) -> str:
    if not isinstance(arch, str) or not arch.strip():
        raise BranchifyError(f"arch must be a model name such as 'resnet32_cifar' or 'resnet18', got {arch!r}")
    name = arch.strip()
    if name.endswith(_DISTILLER_SUFFIX) and name[: -len(_DISTILLER_SUFFIX)] in model_names():
        return name[: -len(_DISTILLER_SUFFIX)]
    return name


def _unknown(arch: str) -> BranchifyError:
    close = difflib.get_close_matches(arch, model_names(), n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "no close name"
    return BranchifyError(
        f"unknown arch {arch!r} ({hint}); give one of the CIFAR ResNets {sorted(CIFAR_RESNETS)} or a torchvision "
        "classification builder (see torchvision.models.list_models(module=torchvision.models))")


def get_model(arch: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build an architecture by name, with random weights (nothing is downloaded).

    ``arch`` is a CIFAR ResNet (``resnet20_cifar`` ... ``resnet56_cifar``) or any torchvision
    classification builder (``resnet18``, ``mobilenet_v3_small``, ...). Distiller's early-exit
    names (``resnet32_cifar_earlyexit``, ``resnet50_earlyexit``) select the plain backbone: the
    exits come from ``DISTILLER_EXITS``. ``num_classes`` defaults to the architecture's own (10 for
    the CIFAR ResNets, 1000 for torchvision's); other keywords go to the builder.

    >>> from branchify.distiller.models import get_model
    >>> get_model("resnet32_cifar_earlyexit").fc
    Linear(in_features=64, out_features=10, bias=True)
    >>> get_model("resnet18", num_classes=10).fc.out_features
    10
    """
    name = _canonical(arch)
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise BranchifyError(f"num_classes must be a positive int, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    if name in CIFAR_RESNETS:
        return CIFAR_RESNETS[name](**kwargs)
    if name not in model_names():
        raise _unknown(arch)
    if "weights" in kwargs:
        raise BranchifyError(
            f"get_model builds {name!r} with random weights (weights=None), never downloading; load a state "
            "dict into the result instead of passing weights=")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def distiller_exits(arch: str) -> list[ExitPoint]:
    """The exits Distiller's early-exit version of ``arch`` had (no thresholds or weights set).

    >>> from branchify.distiller.models import distiller_exits
    >>> [p.layer for p in distiller_exits("resnet50_earlyexit")]
    ['layer1', 'layer2']
    """
    name = _canonical(arch)
    if name not in DISTILLER_EXITS:
        known = "" if name in model_names() else f" (and {arch!r} is not a known arch either)"
        raise BranchifyError(
            f"Distiller had no early-exit model for {arch!r}{known}; it did for {sorted(DISTILLER_EXITS)}. "
            "Choose the exit layers yourself (--exit-layers, or ExitPoint(layer=...)); "
            "`branchify points ARCH` or bx.list_exit_points lists the candidates")
    return list(DISTILLER_EXITS[name])
