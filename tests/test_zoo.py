"""Every torchvision classification builder: exits attach, the final output is exact, gradients flow, and the
runner routes a mixed batch as the module and a per-sample loop do (the fast tier checks the representatives in
``zoo.FAST``, the full tier every builder; each model is built and captured once for all of it)."""

import pytest
import torch
import zoo
from by_hand import oracle, run_and_route
from exits import expected, spread_heads, with_mix

import branchify as bx


@pytest.mark.parametrize("name", zoo.zoo_params())
def test_zoo_model_gets_exits_and_keeps_its_output(name):
    model = zoo.build(name).eval()
    size = zoo.input_size(name)
    x = torch.randn(8, 3, size, size)
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
    two = x[:2]
    with torch.no_grad():
        reference = model(two)
    outputs = module(two)
    assert len(outputs) == 3
    assert torch.equal(outputs[-1], reference)
    for logits in outputs[:-1]:
        assert logits.shape == (2, module.num_classes) == reference.shape

    sum(o.float().sum() for o in outputs).backward()
    assert all(p.grad is not None for p in module.exit_heads.parameters())
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0

    module.eval()
    spread_heads(module, x)
    spec = with_mix(module, x)
    # No mix is asserted here: some random-weight models (efficientnet, googlenet) give every sample the
    # same scores at an exit. The mixes are asserted on tests/test_runtime.py's models.
    runner, result, outputs, decisions = run_and_route(module, spec, x)
    assert torch.equal(result.logits, oracle(runner, x, result.exit_index))
    # Random-weight resnet152 blows activations up to ~1e3, and sub-batch rounding with them: compare at the
    # scale of each sample's logits.
    want = expected(outputs, decisions)
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(result.logits / scale, want / scale, rtol=0, atol=1e-4)
