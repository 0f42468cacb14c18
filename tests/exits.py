"""Shared checks of a model with exits against independent references (the model itself, torch's
flop counter, the multi-output module's routed outputs), for the zoo tests of every model family."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import branchify as bx
from branchify.criteria import get_criterion
from branchify.routing import route


def logits_of(output) -> torch.Tensor:
    """The logits of a model's own output (a tensor, or a Hugging Face ``ModelOutput``)."""
    return output if isinstance(output, torch.Tensor) else output["logits"]


def batch_size(inputs) -> int:
    tensor = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    return int(tensor.shape[0])


def call(fn, inputs):
    return fn(inputs) if isinstance(inputs, torch.Tensor) else fn(**inputs)


def spread_heads(module: nn.Module, x) -> None:
    """Random heads give near-uniform outputs: spread their scores far beyond rounding."""
    with torch.no_grad():
        for head, logits in zip(module.exit_heads, module(x)):
            head[-1].weight.mul_(3.0 / logits.std())


def rounding_margin(scores: torch.Tensor) -> float:
    """A score difference far beyond float32 rounding, at the scores' scale."""
    return 1e-5 * max(1.0, float(scores.abs().max())) if len(scores) else 0.0


def alike(scores: torch.Tensor) -> bool:
    """Whether no two neighbouring scores are further apart than rounding (no threshold splits them robustly)."""
    return len(scores) < 2 or float(scores.sort().values.diff().max()) <= rounding_margin(scores)


def with_mix(module: nn.Module, x, criterion: str = "entropy") -> bx.ExitSpec:
    """Thresholds that send a share of the samples to every exit, each halfway across the widest gap
    between neighbouring scores near the wanted quantile (so rounding cannot flip a decision)."""
    crit = get_criterion(criterion)
    with torch.no_grad():
        outputs = module(x)
    k = len(module.exit_heads)
    running = torch.ones(outputs[0].shape[0], dtype=torch.bool)
    thresholds = []
    for i in range(k):
        scores = crit.score(outputs[i]).double()
        ranked = scores[running].sort().values
        if crit.exits_when == "above":
            ranked = ranked.flip(0)
        n = len(ranked)
        want = max(1, n // (k + 1 - i))
        margin = rounding_margin(ranked)
        gap = lambda j, r=ranked: abs(float(r[j] - r[j - 1]))  # noqa: E731
        near = [j for j in range(max(1, want - 2), min(n - 1, want + 2) + 1) if gap(j) > margin]
        wide = [j for j in range(1, n) if gap(j) > margin]
        if near or wide:  # the widest gap near the quantile, else anywhere
            j = max(near or wide, key=gap)
            thresholds.append(float(ranked[j - 1] + ranked[j]) / 2)
        else:  # scores alike up to rounding (random-weight efficientnet): no sample leaves here, by a margin
            edge = float(ranked[0]) if n else 0.0  # the score nearest to firing (ranked from firing first)
            thresholds.append(edge + margin if crit.exits_when == "above" else edge - margin)
        running &= ~crit.fires(scores, thresholds[-1])
    spec = module.exit_spec.with_exits(threshold=thresholds, criterion=[criterion] * k)
    module.exit_spec = spec
    return spec


def expected(outputs, exit_index: torch.Tensor) -> torch.Tensor:
    """Each sample's logits at the exit it took, from the multi-output module's outputs."""
    stacked = torch.stack(list(outputs))
    return stacked[exit_index, torch.arange(len(exit_index))]


def first_linear(head: nn.Module) -> nn.Linear:
    return next(m for m in head.modules() if isinstance(m, nn.Linear))


def check_exits(model: nn.Module, layers: list[str], make_inputs: Callable[[int], object], *,
                channels: list[int] | None = None, path: str | None = None, **attach_kwargs) -> nn.Module:
    """Attach exits at ``layers`` and check everything a user relies on.

    ``make_inputs(n)`` gives the first ``n`` samples of one fixed batch; ``channels`` are the feature
    widths the model's own metadata gives at the exit layers (timm's ``feature_info``, a transformer's
    hidden size): each head must read that axis. Checks: the final output equals the model's bit for
    bit; exits give (B, classes) logits; backward reaches every head; the runner's decisions and logits
    equal the module's routed outputs at batch 1 and 8; the module's MACs equal torch's flop counter's
    count for the model.
    """
    model.eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers])
    module = bx.attach_exits(model, spec, make_inputs(1), **attach_kwargs).eval()
    if path is not None:
        assert module.exit_path == path
    x8 = make_inputs(8)
    with torch.no_grad():
        outputs = module(x8)
        reference = logits_of(call(model, x8))
    assert torch.equal(outputs[-1], reference), "the final output must equal the model's bit for bit"
    assert all(o.shape == reference.shape for o in outputs[:-1])
    if channels is not None:
        assert [first_linear(h).in_features for h in module.exit_heads] == channels, "a head reads the wrong axis"

    module.train()
    outs = module(make_inputs(2))
    (sum(o.float().sum() for o in outs[:-1]) + logits_of(outs[-1]).float().sum()).backward()
    assert all(p.grad is not None for h in module.exit_heads for p in h.parameters())
    module.zero_grad(set_to_none=True)
    module.eval()

    spread_heads(module, x8)
    spec = with_mix(module, x8)
    runner = bx.ExitRunner(module)
    for n in (1, 8):
        x = make_inputs(n)
        result = runner(x)
        with torch.no_grad():
            outs = module(x)
        decisions = route(spec, outs[:-1])
        assert torch.equal(result.exit_index, decisions)
        torch.testing.assert_close(result.logits, expected(outs, decisions), rtol=1e-4, atol=1e-5)
    # every exit takes samples, but one whose scores are alike up to rounding for the samples that reach it
    # (random-weight lcnet and repvgg collapse their features deep down: with_mix sends none out there)
    taken = runner(x8).exit_index
    with torch.no_grad():
        scores = [get_criterion("entropy").score(o).double() for o in module(x8)[:-1]]
    splittable = {i for i, s in enumerate(scores) if not alike(s[taken >= i])}
    assert splittable, "no exit's scores can be split: the routing check would be vacuous"
    assert splittable | {len(layers)} <= set(taken.tolist()), "every exit should take samples"

    # grad mode on, as bx.exit_costs counts (under no_grad torch's module tracker fails on some models, and
    # attention may take a kernel the counter does not count)
    with FlopCounterMode(display=False) as counter:
        call(model, make_inputs(1))
    assert bx.exit_costs(module, make_inputs(1)).original == counter.get_total_flops() / 2
    return module
