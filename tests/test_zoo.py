"""Every torchvision classification builder: exits attach, the final output is exact, gradients flow (the fast
tier checks the representatives in ``zoo.FAST``, the full tier every builder)."""

import pytest
import torch
import zoo

import branchify as bx


@pytest.mark.parametrize("name", zoo.zoo_params())
def test_zoo_model_gets_exits_and_keeps_its_output(name):
    model = zoo.build(name).eval()
    size = zoo.input_size(name)
    x = torch.randn(2, 3, size, size)
    points = bx.list_exit_points(model, x[:1])
    inner = [p for p in points if 0.15 < p.macs_fraction < 0.9]
    assert len(inner) >= 2, f"{name}: too few exit points {[p.name for p in points]}"
    chosen = [inner[2 * len(inner) // 3], inner[len(inner) // 3]]  # out of graph order on purpose
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=p.name) for p in chosen])
    with pytest.raises(bx.errors.ExitOrderError) as refused:  # refused with the order that works, not reordered
        bx.attach_exits(model, spec, x[:1])
    assert refused.value.graph_order == [chosen[1].name, chosen[0].name]
    module = bx.attach_exits(model, refused.value.graph_order, x[:1]).eval()

    assert module.exit_spec.layers == [chosen[1].name, chosen[0].name]  # the declared order
    with torch.no_grad():
        reference = model(x)
    outputs = module(x)
    assert len(outputs) == 3
    assert torch.equal(outputs[-1], reference)
    for logits in outputs[:-1]:
        assert logits.shape == (2, module.num_classes) == reference.shape

    sum(o.float().sum() for o in outputs).backward()
    assert all(p.grad is not None for p in module.exit_heads.parameters())
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
