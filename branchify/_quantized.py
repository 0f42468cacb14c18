"""Dynamic-quantized ``Linear`` layers (``torch.ao.quantization.quantize_dynamic``), counted as their float twins.

Their weights live in packed parameters that fake tensors cannot copy, and torch's flop counter has no
formula for their op, so the shape pass would fail (blaming the inputs) and a real count would read 0.
A quantized Linear does the multiply-accumulates of the float Linear it was made from, so it is counted
as that: the shape pass runs a float twin (the dequantized weights), the flop counter gets the float
formula for the quantized op, and the layout analysis reads the op as the float Linear's (channels last)
and records a quantized leaf layer as its twin.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

__all__ = ["QUANTIZED_LINEAR_OPS", "float_twin", "float_twins"]

# the ops of dynamic-quantized Linear layers, by name (layout: channels last, as the float Linear)
QUANTIZED_LINEAR_OPS = ("linear_dynamic", "linear_dynamic_fp16")


def _dynamic_linear_types() -> tuple[type, ...]:
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError:  # a torch without torch.ao's dynamic quantization has no such layers
        return ()
    return (Linear,)


_DYNAMIC_LINEAR = _dynamic_linear_types()


def float_twin(module: nn.Module) -> nn.Module:
    """The float ``Linear`` a dynamic-quantized Linear was made from (its weights dequantized); any other
    module as it is. Call it outside a fake mode: packed weights unpack only on real tensors."""
    if not _DYNAMIC_LINEAR or not isinstance(module, _DYNAMIC_LINEAR):
        return module
    weight, bias = module.weight(), module.bias()
    twin = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    with torch.no_grad():
        twin.weight.copy_(weight.dequantize() if weight.is_quantized else weight)
        if bias is not None:
            twin.bias.copy_(bias)
    return twin.eval()


def float_twins(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The float twin of every dynamic-quantized Linear that ``gm``'s graph calls, by target (built outside
    any fake mode: the packed weights unpack only on real tensors)."""
    if not _DYNAMIC_LINEAR:
        return {}
    twins = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in twins:
            module = gm.get_submodule(str(node.target))
            if isinstance(module, _DYNAMIC_LINEAR):
                twins[str(node.target)] = float_twin(module)
    return twins


def _linear_flops(x_shape, _packed, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape) * int(x_shape[-1])  # as aten.addmm counts the float Linear


for _name in QUANTIZED_LINEAR_OPS:
    _op = getattr(torch.ops.quantized, _name, None) if hasattr(torch.ops, "quantized") else None
    if _op is not None and _op not in flop_registry:
        register_flop_formula(_op)(_linear_flops)
