"""Tensor layouts at exit points, and how they are recognised.

A head has to know which dimension holds the channels: a ``Linear`` sized for the wrong dimension
builds and runs silently wrong (swin's stages are channels-last, vit's blocks are token sequences).
The layout of a graph node is inferred by following the channel dimension through the graph from
the operations that define it (convolutions and batch norms put channels at dim 1, linear layers and
layer norms at the last dim) across the operations that move it (permute, transpose, reshape).
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops.misc import Permute

__all__ = ["Layout"]


class Layout(str, enum.Enum):
    """Where the channels are in a batched activation.

    >>> Layout.NHWC.channel_dim, Layout.NLC.spatial_dims
    (3, (1,))
    """

    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"
    NCL = "NCL"
    NC = "NC"

    @property
    def ndim(self) -> int:
        return len(self.value)

    @property
    def channel_dim(self) -> int:
        return self.value.index("C")

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """The dims a global pool averages over (space or tokens)."""
        return tuple(i for i, c in enumerate(self.value) if c not in "NC")

    @classmethod
    def from_channel_dim(cls, ndim: int, channel_dim: int) -> Layout | None:
        for layout in cls:
            if layout.ndim == ndim and layout.channel_dim == channel_dim:
                return layout
        return None


_CHANNELS_FIRST_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.LocalResponseNorm,
)
_CHANNELS_LAST_MODULES = (nn.Linear, nn.Bilinear)
_CHANNELS_FIRST_FUNCTIONS = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.batch_norm,
    nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d, nn.functional.batch_norm,
    nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.max_pool3d,
    nn.functional.avg_pool1d, nn.functional.avg_pool2d, nn.functional.avg_pool3d,
    nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
    nn.functional.adaptive_max_pool1d, nn.functional.adaptive_max_pool2d,
    nn.functional.group_norm, nn.functional.instance_norm,
}
_CHANNELS_LAST_FUNCTIONS = {nn.functional.linear, torch.matmul, operator.matmul}


def module_channel_dim(module: nn.Module, ndim: int, in_cdim: int | None = None) -> int | None:
    """The channel dim of a leaf module's output, when the module's type defines it.

    Leaf containers (torchvision.ops' ``Conv2dNormActivation``, ``MLP``) are judged by their last
    layer that defines a layout; ``Permute`` moves the input's channel dim.
    """
    dims = getattr(module, "dims", None)
    if isinstance(module, Permute) and isinstance(dims, (list, tuple)):
        perm = _as_dims(dims, ndim)
        return perm.index(in_cdim) if perm is not None and in_cdim is not None else None
    for sub in reversed(list(module.modules())):
        if isinstance(sub, _CHANNELS_FIRST_MODULES):
            return 1
        if isinstance(sub, _CHANNELS_LAST_MODULES):
            return ndim - 1
        if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) == 1 and type(sub) is nn.LayerNorm:
            return ndim - 1
    return None


def _as_dims(args: Sequence, ndim: int) -> list[int] | None:
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if not all(isinstance(d, int) for d in dims) or len(dims) != ndim:
        return None
    return [d % ndim for d in dims]


def _reshaped_channel_dim(in_shape: Sequence[int], cdim: int, out_shape: Sequence[int]) -> int | None:
    """Where the channel dim lands after a reshape, if it survives as a whole dimension."""
    before = math.prod(in_shape[:cdim])
    for j in range(len(out_shape)):
        if math.prod(out_shape[:j]) == before and out_shape[j] == in_shape[cdim]:
            return j
    return None


def propagate_channel_dims(gm: torch.fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Follow the channel dimension through ``gm``'s graph.

    ``shapes`` maps node names to (batched) output shapes. Returns the channel dim of every node
    whose layout the graph determines. Unknown operations that keep their input's shape are taken
    to keep its layout (activations, dropout, residual adds, attention blocks).
    """
    modules = dict(gm.named_modules())
    cdims: dict[str, int] = {}
    for node in gm.graph.nodes:
        shape = shapes.get(node.name)
        if shape is None:
            continue
        ndim = len(shape)
        found: int | None = None
        tensor_args = [a for a in node.all_input_nodes if a.name in shapes]
        first = tensor_args[0] if tensor_args else None
        in_cdim = cdims.get(first.name) if first is not None else None
        if node.op == "placeholder":
            found = 1 if ndim in (2, 4) else None  # a 3-D input may be audio (NCL) or tokens (NLC)
        elif node.op == "call_module":
            found = module_channel_dim(modules[node.target], ndim, in_cdim)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if target in _CHANNELS_FIRST_FUNCTIONS:
                found = 1
            elif target in _CHANNELS_LAST_FUNCTIONS or target is nn.functional.layer_norm:
                found = ndim - 1
            elif in_cdim is not None and first is not None:
                found = _moved_channel_dim(node, in_cdim, shapes[first.name], shape)
        if found is None and in_cdim is not None and first is not None and shapes[first.name] == shape:
            if not _moves_dims(node):
                found = in_cdim
        if found is None:
            # an op on a constant and a tensor (cat with a class token, add of a position embedding)
            for arg in tensor_args[1:]:
                if arg.name in cdims and shapes[arg.name] == shape:
                    found = cdims[arg.name]
                    break
        if found is not None:
            cdims[node.name] = found
    return cdims


_MOVING = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "reshape", "view", "flatten",
           "unflatten", "squeeze", "unsqueeze", "mT", "t"}


def _moves_dims(node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in _MOVING


def _moved_channel_dim(node: torch.fx.Node, cdim: int, in_shape: tuple[int, ...],
                       out_shape: tuple[int, ...]) -> int | None:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    rest = [a for a in node.args[1:]]
    if name == "permute":
        perm = _as_dims(rest, len(in_shape))
        return perm.index(cdim) if perm is not None else None
    if name in ("transpose", "swapaxes", "swapdims") and len(rest) >= 2:
        a, b = (d % len(in_shape) for d in rest[:2])
        return b if cdim == a else a if cdim == b else cdim
    if name in ("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze"):
        return _reshaped_channel_dim(in_shape, cdim, out_shape)
    return None


def layout_from_shape(shape: Sequence[int], input_spatial: Sequence[int] | None) -> Layout | None:
    """Guess a 4-D layout from which two dims look like a downsampled copy of the input's H, W."""
    if len(shape) == 2:
        return Layout.NC
    if len(shape) != 4 or not input_spatial or len(input_spatial) != 2:
        return None
    h, w = input_spatial

    def looks_spatial(a: int, b: int) -> bool:
        return a * w == b * h and a <= h

    first, last = looks_spatial(shape[2], shape[3]), looks_spatial(shape[1], shape[2])
    if first and not last:
        return Layout.NCHW
    if last and not first:
        return Layout.NHWC
    return None
