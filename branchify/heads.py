"""Exit heads: small classifiers built to fit the activation at an exit point.

Every size is inferred: a head's layers are run on a fake tensor of the exit point's shape, and the
final ``Linear`` takes whatever comes out. A factory registered with ``register_head`` receives the
inferred shape (without the batch dim), the layout, the number of classes and the ``HeadSpec``.
"""

from __future__ import annotations

import contextlib
import sys
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

__all__ = ["GlobalPool", "HeadFactory", "HeadKind", "MaskedPoolHead", "build_head", "default_token", "head_kind",
           "mask_reading", "register_head", "registered_heads"]

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


TOKEN_LAYOUTS = (Layout.NLC, Layout.LNC)  # token sequences, batch first or sequence first


class GlobalPool(nn.Module):
    """Average over the spatial or token dims of a layout, or take one token of a token sequence.

    ``token="cls"`` takes the first token, ``token="last"`` the last position; with a padding mask
    (``masked``), ``"mean"`` averages the real tokens only and ``"last"`` takes the last real one.
    """

    def __init__(self, layout: Layout, token: str = "mean") -> None:
        super().__init__()
        if token in ("cls", "last") and layout not in TOKEN_LAYOUTS:
            raise BranchifyError(
                f"token={token!r} takes the {'first' if token == 'cls' else 'last'} token of a token sequence (NLC), "
                f"but this exit's layout is "
                f"{layout.value}; use token='mean'")
        self.dims: list[int] = list(layout.spatial_dims)
        self.token = token
        self.take_first = token == "cls"
        # the one token dim of a token sequence (1 in NLC, 0 in LNC); -1 for maps and flat features (an int
        # either way, so that the head scripts)
        self.token_dim: int = layout.spatial_dims[0] if layout in TOKEN_LAYOUTS else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token == "cls":  # only on token layouts (refused at construction otherwise)
            return x.select(self.token_dim, 0)
        if self.token == "last":
            return x.select(self.token_dim, -1)
        if len(self.dims) == 0:
            return x
        return x.mean(dim=self.dims)

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` skipping padding: ``mask`` is (B, L), 1 at real tokens."""
        if self.token_dim < 0 or self.token == "cls":
            return self(x)
        if self.token_dim != 1:
            x = x.movedim(self.token_dim, 1)  # (B, L, C)
        if self.token == "last":
            # the rightmost real token, whichever side the padding is on (as transformers'
            # GPT2ForSequenceClassification picks it; a row without real tokens takes position 0)
            positions = torch.arange(x.shape[1], device=x.device)
            last = (positions * (mask != 0).to(positions.dtype)).argmax(-1)
            return x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1), 1 at real tokens
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def extra_repr(self) -> str:
        return f"token={self.token}" if self.token != "mean" else f"dims={self.dims}"


class MaskedPoolHead(nn.Sequential):
    """A pooling head that skips padding: ``forward(x, mask)`` with ``mask`` (B, L), 1 at real tokens.

    The same layers as the head it is made from (so the same parameter names); its first layer, a
    ``GlobalPool``, averages the real tokens (``token="mean"``) or takes the last real one (``"last"``).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self[0].masked(x, mask)
        for layer in self[1:]:
            x = layer(x)
        return x


def masked(head: nn.Module) -> MaskedPoolHead | None:
    """``head`` as a ``MaskedPoolHead`` if it starts by pooling over tokens in a way padding changes, else None."""
    if isinstance(head, MaskedPoolHead):
        return head
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], GlobalPool) \
            and head[0].token_dim >= 0 and head[0].token in ("mean", "last"):
        return MaskedPoolHead(*head)
    return None


def mask_reading(head: nn.Module, layout: Layout, shape: Sequence[int], mask_shape: Sequence[int] | None,
                 what: str) -> nn.Module:
    """The head an exit runs given the model's padding mask of ``mask_shape`` (None: the model takes none).

    ``shape`` is the activation's batched shape. A token head whose pooling padding changes reads the
    mask (a ``MaskedPoolHead``); one whose tokens do not line up with the mask is refused, never guessed.
    """
    reading = masked(head)
    if mask_shape is None or reading is None:
        return head
    batch_dim = layout.batch_dim
    tokens = (shape[batch_dim], shape[head[0].token_dim])
    if tuple(mask_shape) != tuple(tokens):
        pooled = "the last real token" if head[0].token == "last" else "a mean over the real tokens"
        raise BranchifyError(
            f"{what}: the model takes an attention mask of shape {tuple(mask_shape)}, but this exit's tokens are "
            f"{tuple(shape)}, so {pooled} cannot be found; use HeadSpec(token='cls'), or an exit "
            "whose tokens line up with the mask")
    return reading


def default_token(model: nn.Module) -> str:
    """The token pooling a head on ``model`` gets when its ``HeadSpec`` leaves ``token`` unset: ``"last"`` on a
    causal decoder (a Hugging Face model whose every attention module is causal: GPT-2, Llama, Qwen2, ...,
    whose own classifiers read the last real token), else ``"mean"``.

    >>> import torchvision
    >>> default_token(torchvision.models.resnet18())
    'mean'
    """
    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        return "mean"  # only transformers' models say for certain whether their attention is causal
    causal = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return "last" if causal and all(causal) else "mean"


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


def _fake_output_shape(layers: Sequence[nn.Module], shape: Sequence[int], what: str,
                       layout: Layout | None = None) -> torch.Size:
    """Run ``layers`` in eval mode on a fake batch of 2 of ``shape`` (the batch where ``layout`` has it, else
    first); a layer that fails is named.

    Eval mode and a batch of 2 keep batch norms after pooling working; the batch dim is reported as 1.
    """
    with contextlib.ExitStack() as modes:
        for layer in layers:
            modes.enter_context(eval_mode(layer))
        with fake_mode() as mode:
            x = mode.from_tensor(torch.empty(layout.batched(shape, 2) if layout is not None else (2, *shape)))
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
    return nn.Sequential(GlobalPool(layout, spec.token), nn.Linear(layout.channels(shape), num_classes))


def _mlp_head(shape, layout, num_classes, spec):
    channels = layout.channels(shape)
    hidden = spec.hidden or channels
    return nn.Sequential(GlobalPool(layout, spec.token), nn.Linear(channels, hidden),
                         *(_activation(spec.activation or "relu")), nn.Linear(hidden, num_classes))


def _flatten_linear(layers: list[nn.Module], shape, num_classes: int, what: str) -> nn.Sequential:
    layers.append(nn.Flatten())
    features = _fake_output_shape(layers, shape, what)[1]
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def _conv_head(shape, layout, num_classes, spec):
    layers = _to_channels_first(layout, "conv")
    channels = layout.channels(shape)
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
               dtype: torch.dtype | None = None, token: str = "mean") -> nn.Module:
    """Build the head ``spec`` describes for an activation of ``shape`` (no batch dim) and check it.

    ``token`` is the pooling of a token sequence when the spec leaves it unset (``default_token``)."""
    spec.check_kind()  # a kind may have been registered after the spec was made
    shape = tuple(int(d) for d in shape)
    if len(shape) + 1 != layout.ndim:
        raise BranchifyError(
            f"{where}: layout {layout.value} needs {layout.ndim}-D activations, but this point is "
            f"{len(shape) + 1}-D (batch, {', '.join(map(str, shape))}); declare the right HeadSpec(layout=...)")
    if spec.token is None:
        spec = spec.model_copy(update={"token": token if layout in TOKEN_LAYOUTS else "mean"})
    try:
        head = head_kind(spec.kind).build(shape=shape, layout=layout, num_classes=num_classes, spec=spec)
    except BranchifyError as err:
        raise BranchifyError(f"{where}: {err}") from None
    if not isinstance(head, nn.Module):
        raise BranchifyError(f"{where}: head factory {spec.kind!r} returned {type(head).__name__}, not an nn.Module")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in head.parameters()):
        with torch.no_grad():
            head(torch.zeros(layout.batched(shape, 1)))  # materialise lazy layers at their inferred size
    head = head.to(device=device, dtype=dtype)
    out = _fake_output_shape([head], shape, f"{where}: head {spec.kind!r}", layout)
    if tuple(out) != (1, num_classes):
        raise BranchifyError(
            f"{where}: head {spec.kind!r} maps (1, {', '.join(map(str, shape))}) to {tuple(out)}, "
            f"but an exit must give (batch, {num_classes}) logits")
    return head
