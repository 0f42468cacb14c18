"""Exit heads: small classifiers built to fit the activation at an exit point.

Every size is inferred: a head's layers are run on a fake tensor of the exit point's shape, and the
final ``Linear`` takes whatever comes out. A factory registered with ``register_head`` receives the
inferred shape (without the batch dim), the layout, the number of classes and the ``HeadSpec``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.ops.misc import Permute

from . import _registry
from ._propagate import fake_mode
from ._trace import eval_mode
from .errors import BranchifyError
from .layout import Layout

if TYPE_CHECKING:
    from .spec import HeadSpec

__all__ = ["GlobalPool", "HeadFactory", "HeadKind", "MaskedPoolHead", "build_head", "head_kind", "register_head",
           "registered_heads"]

HeadFactory = Callable[..., nn.Module]
# Fields every kind reads: where the channels are, and how tokens are pooled.
SHARED_FIELDS = frozenset({"layout", "token"})


@dataclass(frozen=True)
class HeadKind:
    """A head kind: its name, the ``HeadSpec`` fields it reads (beyond ``layout`` and ``token``), its build,
    and an optional check of a spec's values (returning an error message, or None)."""

    name: str
    fields: frozenset[str]
    build: HeadFactory
    check: Callable[[HeadSpec], str | None] | None = None


_REGISTRY: dict[str, HeadKind] = {}


class GlobalPool(nn.Module):
    """Average over the spatial or token dims of a layout, or take the class token."""

    def __init__(self, layout: Layout, token: str = "mean") -> None:
        super().__init__()
        if token == "cls" and layout is not Layout.NLC:
            raise BranchifyError(
                f"token='cls' takes the first token of a token sequence (NLC), but this exit's layout is "
                f"{layout.value}; use token='mean'")
        self.dims: list[int] = list(layout.spatial_dims)
        self.take_first = token == "cls"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.take_first:
            return x[:, 0]
        if len(self.dims) == 0:
            return x
        return x.mean(dim=self.dims)

    def extra_repr(self) -> str:
        return "token=cls" if self.take_first else f"dims={self.dims}"


class MaskedPoolHead(nn.Sequential):
    """A pooling head whose mean skips padding: ``forward(x, mask)`` with ``mask`` (B, L), 1 at real tokens.

    The same layers as the head it is made from (so the same parameter names).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1), 1 at real tokens
        x = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        for layer in self[1:]:
            x = layer(x)
        return x


def masked(head: nn.Module) -> MaskedPoolHead | None:
    """``head`` as a ``MaskedPoolHead`` if it starts by averaging over tokens, else None."""
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], GlobalPool) \
            and not head[0].take_first and head[0].dims == [1]:
        return MaskedPoolHead(*head)
    return None


def register_head(kind: str, factory: HeadFactory | None = None, *, fields: Iterable[str] = ("options",),
                  replace: bool = False):
    """Register a head kind by name (usable as ``HeadSpec(kind=...)``); works as a decorator.

    The factory is called as ``factory(shape=..., layout=..., num_classes=..., spec=...)`` where
    ``shape`` is the exit point's shape without the batch dim, and returns an ``nn.Module`` mapping
    ``(B, *shape)`` to ``(B, num_classes)``. ``fields`` are the ``HeadSpec`` fields the kind reads
    (default: its free-form ``options``); a spec of this kind that sets another field is refused.
    A kind already registered is refused unless ``replace=True``; built-in kinds are never replaced.

    >>> import torch, branchify as bx
    >>> @bx.register_head("first_channel_linear")
    ... def _(shape, layout, num_classes, spec):
    ...     return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
    >>> bx.HeadSpec(kind="first_channel_linear").kind
    'first_channel_linear'
    """
    if not isinstance(kind, str) or not kind:
        raise BranchifyError(f"head kind must be a non-empty string, got {kind!r}")
    if kind in _BUILTIN:
        raise BranchifyError(f"head kind {kind!r} is built in; register yours under another name")

    fields = frozenset(fields)

    def add(fn: HeadFactory) -> HeadFactory:
        if not callable(fn):
            raise BranchifyError(f"head factory for {kind!r} must be callable, got {fn!r}")
        _registry.add(_REGISTRY, kind, HeadKind(kind, fields, fn), what="head kind", builtin=_BUILTIN, replace=replace)
        return fn

    return add(factory) if factory is not None else add


def registered_heads() -> list[str]:
    """Names usable as ``HeadSpec.kind``."""
    return sorted(_REGISTRY)


def head_kind(kind: str) -> HeadKind:
    """The registered kind ``kind``; an unknown one lists the registered kinds."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise BranchifyError(
            f"unknown head kind {kind!r}; registered: {registered_heads()}. "
            "Add your own with bx.register_head(kind, factory)") from None


def _activation(name: str | None) -> list[nn.Module]:
    return {"relu": [nn.ReLU()], "gelu": [nn.GELU()]}.get(name or "none", [])


def _to_channels_first(layout: Layout, kind: str) -> list[nn.Module]:
    if layout is Layout.NCHW:
        return []
    if layout is Layout.NHWC:
        return [Permute([0, 3, 1, 2])]
    raise BranchifyError(
        f"head kind {kind!r} works on a spatial map (NCHW or NHWC), but this exit's layout is "
        f"{layout.value}; use kind='linear' or kind='mlp', which pool over {layout.value}")


def _fake_output_shape(layers: Sequence[nn.Module], shape: Sequence[int], what: str) -> torch.Size:
    """Run ``layers`` in eval mode on a fake ``(2, *shape)`` tensor; a layer that fails is named.

    Eval mode and a batch of 2 keep batch norms after pooling working; the batch dim is reported as 1.
    """
    with contextlib.ExitStack() as modes:
        for layer in layers:
            modes.enter_context(eval_mode(layer))
        with fake_mode() as mode:
            x = mode.from_tensor(torch.empty(2, *shape))
            for layer in layers:
                before = tuple(x.shape[1:])
                try:
                    x = layer(x)
                except Exception as err:
                    text = _first_line(err)
                    hint = ("the map shrinks below 1x1: use a smaller stride or kernel_size, or fewer convs"
                            if "too small" in text or "can't be greater" in text else "check the head's layers")
                    raise BranchifyError(
                        f"{what}: {layer} cannot take an input of shape {before} ({text}); {hint}") from None
                if any(d < 1 for d in x.shape[1:]):
                    raise BranchifyError(
                        f"{what}: {layer} shrinks {before} to {tuple(x.shape[1:])}; use a smaller stride or "
                        "kernel_size, or fewer convs")
    return torch.Size((1, *x.shape[1:]))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _linear_head(shape, layout, num_classes, spec):
    return nn.Sequential(GlobalPool(layout, spec.token), nn.Linear(shape[layout.channel_dim - 1], num_classes))


def _mlp_head(shape, layout, num_classes, spec):
    channels = shape[layout.channel_dim - 1]
    hidden = spec.hidden or channels
    return nn.Sequential(GlobalPool(layout, spec.token), nn.Linear(channels, hidden),
                         *(_activation(spec.activation or "relu")), nn.Linear(hidden, num_classes))


def _flatten_linear(layers: list[nn.Module], shape, num_classes: int, what: str) -> nn.Sequential:
    layers.append(nn.Flatten())
    features = _fake_output_shape(layers, shape, what)[1]
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def _conv_head(shape, layout, num_classes, spec):
    layers = _to_channels_first(layout, "conv")
    channels = shape[layout.channel_dim - 1]
    for out in spec.channels:
        layers.append(nn.Conv2d(channels, out, spec.kernel_size, spec.stride, spec.kernel_size // 2))
        layers.extend(_activation(spec.activation))
        channels = out
    pool = nn.MaxPool2d if spec.pool == "max" else nn.AvgPool2d
    layers.append(pool(3, 2, 1))
    return _flatten_linear(layers, shape, num_classes, "conv head")


def _pool_head(shape, layout, num_classes, spec):
    layers = _to_channels_first(layout, "pool")
    layers.append(nn.AvgPool2d(spec.kernel_size))
    return _flatten_linear(layers, shape, num_classes, "pool head")


def _conv_needs_channels(spec: HeadSpec) -> str | None:
    return None if spec.channels else "head kind 'conv' needs channels, e.g. HeadSpec(kind='conv', channels=[10])"


_BUILTIN = {kind.name: kind for kind in [
    HeadKind("linear", frozenset(), _linear_head),
    HeadKind("conv", frozenset({"channels", "kernel_size", "stride", "pool", "activation"}), _conv_head,
             _conv_needs_channels),
    HeadKind("pool", frozenset({"kernel_size"}), _pool_head),
    HeadKind("mlp", frozenset({"hidden", "activation"}), _mlp_head),
]}
_REGISTRY.update(_BUILTIN)


def build_head(spec: HeadSpec, shape: Sequence[int], layout: Layout, num_classes: int, *,
               where: str = "", device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """Build the head ``spec`` describes for an activation of ``shape`` (no batch dim) and check it."""
    spec.check_kind()  # a kind may have been registered after the spec was made
    shape = tuple(int(d) for d in shape)
    if len(shape) + 1 != layout.ndim:
        raise BranchifyError(
            f"{where}: layout {layout.value} needs {layout.ndim}-D activations, but this point is "
            f"{len(shape) + 1}-D (batch, {', '.join(map(str, shape))}); declare the right HeadSpec(layout=...)")
    try:
        head = head_kind(spec.kind).build(shape=shape, layout=layout, num_classes=num_classes, spec=spec)
    except BranchifyError as err:
        raise BranchifyError(f"{where}: {err}") from None
    if not isinstance(head, nn.Module):
        raise BranchifyError(f"{where}: head factory {spec.kind!r} returned {type(head).__name__}, not an nn.Module")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in head.parameters()):
        with torch.no_grad():
            head(torch.zeros(1, *shape))  # materialise lazy layers at their inferred size
    head = head.to(device=device, dtype=dtype)
    out = _fake_output_shape([head], shape, f"{where}: head {spec.kind!r}")
    if tuple(out) != (1, num_classes):
        raise BranchifyError(
            f"{where}: head {spec.kind!r} maps (1, {', '.join(map(str, shape))}) to {tuple(out)}, "
            f"but an exit must give (batch, {num_classes}) logits")
    return head
