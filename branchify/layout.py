"""Tensor layouts at exit points, and how they are recognised.

A head has to know which dimension holds the channels: a ``Linear`` sized for the wrong dimension
builds and runs silently wrong (swin's stages are channels-last, vit's blocks are token sequences).
The layout of a graph node is inferred by following the channel dimension through the graph from
the operations that define it (convolutions and batch norms put channels at dim 1, linear layers and
layer norms at the last dim) across the operations that move it (permute, transpose, reshape).
"""

from __future__ import annotations

import builtins
import enum
import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from ._propagate import fake_mode
from ._quantized import QUANTIZED_LINEAR_OPS, float_twin
from ._record import record
from ._trace import eval_mode
from .errors import BranchifyError

__all__ = ["Layout"]


class Layout(str, enum.Enum):
    """Where the batch and the channels are in a batched activation.

    ``LNC`` is a sequence-first token sequence (``nn.TransformerEncoderLayer(batch_first=False)``, RNNs):
    tokens, batch, channels.

    >>> Layout.NHWC.channel_dim, Layout.NLC.spatial_dims, Layout.LNC.batch_dim
    (3, (1,), 1)
    """

    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"
    NCL = "NCL"
    NC = "NC"
    LNC = "LNC"

    @property
    def ndim(self) -> int:
        return len(self.value)

    @property
    def channel_dim(self) -> int:
        return self.value.index("C")

    @property
    def batch_dim(self) -> int:
        return self.value.index("N")

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """The dims a global pool averages over (space or tokens)."""
        return tuple(i for i, c in enumerate(self.value) if c not in "NC")

    def channels(self, shape: Sequence[int]) -> int:
        """The number of channels of a per-sample ``shape`` (the batch dim left out)."""
        return int(shape[self.channel_dim - (self.batch_dim < self.channel_dim)])

    def batched(self, shape: Sequence[int], batch: int) -> tuple[int, ...]:
        """The batched shape of ``batch`` samples of per-sample ``shape``: the batch dim put where it belongs."""
        shape = tuple(shape)
        return (*shape[:self.batch_dim], batch, *shape[self.batch_dim:])

    @classmethod
    def from_channel_dim(cls, ndim: int, channel_dim: int, batch_dim: int = 0) -> Layout | None:
        for layout in cls:
            if layout.ndim == ndim and layout.channel_dim == channel_dim and layout.batch_dim == batch_dim:
                return layout
        return None


# Operations named as torch.fx (``torch.conv2d``, ``"permute"``), torch.export (``aten.conv2d``) and the
# recorded forward of ``branchify._record`` (the same torch functions) name them; see ``op_name``.
_CHANNELS_FIRST_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "max_pool1d", "max_pool2d",
    "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "group_norm", "native_group_norm", "instance_norm", "local_response_norm",
}
# addmm and mm: the linear layers of GPT-2 (transformers' Conv1D: x.view(-1, C) @ W + b)
_CHANNELS_LAST_OPS = {"linear", "matmul", "bilinear", "layer_norm", "native_layer_norm", "addmm", "mm", "bmm",
                      "baddbmm", *QUANTIZED_LINEAR_OPS}
_CAT_OPS = {"cat", "concat", "concatenate"}


def op_name(node: torch.fx.Node) -> str:
    """The operation a node performs, by the name torch gives it at every capture level."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is builtins.getattr and len(node.args) == 2 and isinstance(node.args[1], str):
        return node.args[1]  # x.mT, x.T
    name = getattr(target, "__name__", "")
    if name == "__get__":  # a property read recorded through __torch_function__ (Tensor.mT.__get__)
        return getattr(getattr(target, "__self__", None), "__name__", "")
    return name


def _leaf_channel_dim(module: nn.Module, node: torch.fx.Node, shapes: dict, cdims: dict[str, int]) -> int | None:
    """The channel dim of a leaf module's output: its forward is recorded on fake inputs and analysed
    like any graph, seeded with the channel dims of its inputs."""
    args = list(node.args)
    if node.kwargs or not args or not all(isinstance(a, torch.fx.Node) and a.name in shapes for a in args):
        return None
    module = float_twin(module)  # a quantized Linear is recorded as its float twin (fake tensors cannot run it)
    try:
        with eval_mode(module), fake_mode(), torch.no_grad():
            inputs = {f"in{i}": torch.empty(shapes[a.name]) for i, a in enumerate(args)}
            recording, out = record(module, inputs)
    except Exception:  # a leaf that does not take float inputs of these shapes: its layout stays unknown
        return None
    produced = recording.node_of(out) if isinstance(out, torch.Tensor) else None
    if produced is None:
        return None
    seeds = {f"in{i}": cdims[a.name] for i, a in enumerate(args) if a.name in cdims}
    return channel_dims(recording.graph, recording.shapes, seeds=seeds).get(produced.name)


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


def channel_dims(graph: torch.fx.Graph, shapes: dict[str, tuple[int, ...]], *,
                 modules: dict[str, nn.Module] | None = None, seeds: dict[str, int] | None = None) -> dict[str, int]:
    """Follow the channel dimension through ``graph``.

    ``shapes`` maps node names to (batched) output shapes; ``modules`` resolves ``call_module``
    targets (leaf modules); ``seeds`` gives the channel dims of placeholders (by default 1 for 2-D and
    4-D inputs, unknown otherwise). Returns the channel dim of every node
    whose layout the graph determines. Operations that keep their input's shape and are not known to
    move dimensions are taken to keep its layout (activations, dropout, residual adds, attention
    blocks); an operation that moves dimensions in a way this analysis cannot follow ends the trail.
    The same analysis serves graphs from torch.fx, torch.export and a recorded forward.
    """
    modules = modules or {}
    cdims: dict[str, int] = {}
    for node in graph.nodes:
        shape = shapes.get(node.name)
        if shape is None:
            continue
        ndim = len(shape)
        found: int | None = None
        tensor_args = [a for a in node.all_input_nodes if a.name in shapes]
        first = tensor_args[0] if tensor_args else None
        in_cdim = cdims.get(first.name) if first is not None else None
        name = op_name(node)
        if node.op == "placeholder":
            if seeds is not None:
                found = seeds.get(node.name)
            else:
                found = 1 if ndim in (2, 4) else None  # a 3-D input may be audio (NCL) or tokens (NLC)
        elif node.op == "call_module":
            found = _leaf_channel_dim(modules[node.target], node, shapes, cdims)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] is not None \
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].name not in shapes \
                and node.args[1] == 0:
            found = _role(op_name(node.args[0]), ndim)  # the first result of batch_norm and the like
        elif node.op in ("call_function", "call_method"):
            found = _role(name, ndim)
            if found is None and name in _CAT_OPS:
                found = _cat_channel_dim(node, cdims, shapes, ndim)
            elif found is None and in_cdim is not None and first is not None:
                found = _moved_channel_dim(node, name, in_cdim, shapes[first.name], shape)
        if found is None and in_cdim is not None and first is not None and shapes[first.name] == shape \
                and node.op != "call_module" and name not in _MOVING:
            found = in_cdim
        if found is None and node.op != "call_module" and name not in _MOVING:
            # an op on a constant and a tensor (cat with a class token, add of a position embedding)
            for arg in tensor_args[1:]:
                if arg.name in cdims and shapes[arg.name] == shape:
                    found = cdims[arg.name]
                    break
        if found is not None:
            cdims[node.name] = found
    return cdims


def _role(name: str, ndim: int) -> int | None:
    if name in _CHANNELS_FIRST_OPS:
        return 1
    if name in _CHANNELS_LAST_OPS:
        return ndim - 1
    return None


def _cat_channel_dim(node: torch.fx.Node, cdims: dict[str, int], shapes: dict, ndim: int) -> int | None:
    # joining along any dim (channels included: inception's branches) keeps the channels where they are
    known = {cdims[a.name] for a in node.all_input_nodes if a.name in cdims and len(shapes[a.name]) == ndim}
    return known.pop() if len(known) == 1 else None


_MOVING = {"getitem", "__getitem__", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis",
           "reshape", "view", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "mT", "mH", "T", "H",
           "t", "adjoint", "select", "slice"}


def _moved_channel_dim(node: torch.fx.Node, name: str, cdim: int, in_shape: tuple[int, ...],
                       out_shape: tuple[int, ...]) -> int | None:
    rest = [a for a in node.args[1:]]
    ndim = len(in_shape)
    if name == "permute":
        perm = _as_dims(rest, ndim)
        return perm.index(cdim) if perm is not None else None
    if name in ("transpose", "swapaxes", "swapdims") and len(rest) >= 2 and all(isinstance(d, int) for d in rest[:2]):
        a, b = (d % ndim for d in rest[:2])
        return b if cdim == a else a if cdim == b else cdim
    if name in ("mT", "mH", "adjoint") and ndim >= 2:
        a, b = ndim - 2, ndim - 1
        return b if cdim == a else a if cdim == b else cdim
    if name in ("T", "H", "t"):
        return ndim - 1 - cdim
    if name in ("reshape", "view", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"):
        return _reshaped_channel_dim(in_shape, cdim, out_shape)
    if name == "slice" and rest and isinstance(rest[0], int) and len(out_shape) == ndim:
        return cdim if rest[0] % ndim != cdim else None
    if name in ("getitem", "__getitem__") and rest:
        return _indexed_channel_dim(rest[0], ndim, cdim)
    if name == "select" and rest and isinstance(rest[0], int):
        dim = rest[0] % ndim
        return None if dim == cdim else cdim - 1 if dim < cdim else cdim
    return None




def _indexed_channel_dim(index, ndim: int, cdim: int) -> int | None:
    """Where the channel dim lands after basic indexing (``x[:, 1:]``, ``x[..., 0]``, ``x[None]``)."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items) or \
            any(isinstance(i, bool) for i in items) or items.count(Ellipsis) > 1:
        return None  # advanced (tensor) indexing: not followed
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > ndim:
        return None
    fill = (slice(None),) * (ndim - consumed)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + fill + items[at + 1:]
    else:
        items = items + fill
    out = dim = 0
    for item in items:
        if item is None:
            out += 1
            continue
        if dim == cdim:
            return None if isinstance(item, int) else out
        out += isinstance(item, slice)
        dim += 1
    return None


def layout_of(shape: Sequence[int], cdim: int | None, batch_dim: int | None = 0) -> Layout | None:
    """The layout of a batched activation whose channel dim and batch dim the analysis found (None: unknown)."""
    if batch_dim is None:
        return None
    if len(shape) == 2:
        return Layout.NC if batch_dim == 0 else None
    return None if cdim is None else Layout.from_channel_dim(len(shape), cdim, batch_dim)


def batch_dim(shapes: Sequence[Sequence[int]], batches: Sequence[int]) -> int | None:
    """The dim of an activation that holds the batch, from its shapes at two batch sizes: the one dim that
    changes, and is the batch size each time; None when no single dim is the batch (a flattened or a
    batch-independent value)."""
    first, second = (tuple(s) for s in shapes)
    if len(first) != len(second):
        return None
    changed = [d for d in range(len(first)) if first[d] != second[d]]
    if len(changed) != 1 or (first[changed[0]], second[changed[0]]) != tuple(batches):
        return None
    return changed[0]


def other_batch(inputs) -> int:
    """A batch size other than ``inputs``' that no other input dim equals, to find the batch dims with."""
    others = {int(d) for t in inputs.tensors for d in t.shape[1:]} | {inputs.batch}
    batch = inputs.batch + 1
    while batch in others:
        batch += 1
    return batch


def widened(inputs, batch: int):
    """``inputs`` with their samples repeated to ``batch`` (along each tensor's batch dim, 0)."""
    return inputs.map(lambda t: t[torch.arange(batch, device=t.device) % t.shape[0]] if t.ndim else t)


def graph_batch_dims(gm: torch.fx.GraphModule, inputs, shapes: dict[str, tuple[int, ...]]) -> dict[str, int | None]:
    """The batch dim of every tensor node of ``gm``, found by a second fake pass at another batch size
    (``shapes``: each node's shape at ``inputs``' batch). A model that does not run at another batch size
    leaves every batch dim unknown."""
    from ._propagate import propagate

    other = other_batch(inputs)
    try:
        facts, _ = propagate(gm, widened(inputs, other))
    except BranchifyError:
        return {}
    return {name: batch_dim((shape, facts[name].shape), (inputs.batch, other)) for name, shape in shapes.items()
            if name in facts and facts[name].shape is not None}


def choose_layout(declared: Layout | None, inferred: Layout | None, shape, what: str,
                  batch: int | None = 0) -> Layout:
    """The declared layout (checked against the activation's rank and batch dim), else the inferred one;
    refuses to guess. ``batch`` is the dim the analysis found to hold the batch (None: not found)."""
    if declared is not None:
        if declared.ndim != len(shape):
            raise BranchifyError(
                f"{what}: declared layout {declared.value} is {declared.ndim}-D but the activation has shape "
                f"{tuple(shape)}; declare a layout with {len(shape)} dims")
        if batch is not None and declared.batch_dim != batch:
            fits = [layout.value for layout in Layout if layout.ndim == len(shape) and layout.batch_dim == batch]
            raise BranchifyError(
                f"{what}: declared layout {declared.value} has the batch at dim {declared.batch_dim}, but the batch "
                f"of this activation (shape {tuple(shape)}) is dim {batch}; declare "
                f"{' or '.join(repr(f) for f in fits) or 'nothing: no head reads it'}, or pick another layer")
        return declared
    if batch is None or not any(layout.ndim == len(shape) and layout.batch_dim == batch for layout in Layout):
        where = "is not one dim of it" if batch is None else f"is dim {batch}"
        raise BranchifyError(
            f"{what}: the batch of this activation of shape {tuple(shape)} {where} (found by running the model at "
            "two batch sizes), so no head can pool it per sample; pick a layer whose output keeps the batch in one "
            "dim (first, or second in a sequence-first LNC token sequence)")
    if inferred is None:
        options = [layout.value for layout in Layout if layout.ndim == len(shape) and layout.batch_dim == batch]
        raise BranchifyError(
            f"{what}: cannot tell the layout of an activation of shape {tuple(shape)} from the operations that "
            "made it; "
            f"declare it, e.g. HeadSpec(layout={options[0]!r}) (options for {len(shape)}-D: {options})")
    return inferred
