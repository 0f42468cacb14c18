"""The routing rule applied by hand, one sample at a time: the independent reference for the runner and for
``branchify.routing.route`` (tests/test_runtime.py, tests/test_properties.py); ``check_runner`` and
``run_and_route``, the runner held to it and to the routed module (tests/test_decoders.py, tests/test_transformers.py,
tests/test_zoo.py); ``oracle``, each stage run by hand on exactly the samples that reach it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from exits import expected, logits_of, spread_heads, with_mix
from torch import nn

import branchify as bx
from branchify.routing import route


def hand_score(criterion: str, logits: torch.Tensor, temperature: float) -> float:
    """One sample's score under ``criterion``, written out in float64 apart from branchify's criteria."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    if criterion == "entropy":
        return float(-torch.special.xlogy(p, p).sum())
    top = p.sort(descending=True).values
    if criterion == "confidence":
        return float(top[0])
    if criterion == "margin":
        return float(top[0] - top[1]) if len(top) > 1 else float(top[0])
    raise NotImplementedError(f"no hand-written rule for criterion {criterion!r}")


def by_hand(module: nn.Module, spec: bx.ExitSpec, x: torch.Tensor | Mapping[str, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample run through the module alone and routed by the rule applied by hand: it leaves at the first
    exit that is on and whose score passes its threshold (entropy below; confidence and margin at or above),
    else at the final exit. ``x`` is a batch tensor or a dict of them (a tokenizer's output). Returns the exit
    each sample took and its logits there."""
    taken, logits = [], []
    n = len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
    with torch.no_grad():
        for i in range(n):
            one = {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, Mapping) else x[i:i + 1]
            outputs = [*module(one)]
            outputs[-1] = logits_of(outputs[-1])  # a Hugging Face model's final output holds its logits
            exit_index = len(spec.exits)
            for j, point in enumerate(spec.exits):
                if point.threshold is None:
                    continue
                criterion = spec.criterion_of(j)
                score = hand_score(criterion, outputs[j][0], point.temperature)
                if score < point.threshold if criterion == "entropy" else score >= point.threshold:
                    exit_index = j
                    break
            taken.append(exit_index)
            logits.append(outputs[exit_index][0])
    return torch.tensor(taken, dtype=torch.int64), torch.stack(logits)


def check_runner(module: nn.Module, batches: list) -> bx.ExitRunner:
    """The runner against the routed module and the per-sample loop, on each of ``batches`` and its first
    sample alone; thresholds are placed (``exits.with_mix``) on ``batches[0]`` so that every exit takes
    samples. Returns the runner."""
    spread_heads(module, batches[0])
    spec = with_mix(module, batches[0])
    runner = bx.ExitRunner(module)
    seen = set()
    for inputs in batches:
        n = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
        for size in sorted({1, n}):
            part = {k: v[:size] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:size]
            result = runner(part)
            with torch.no_grad():
                outs = module(part)
            decisions = route(spec, outs[:-1])
            assert torch.equal(result.exit_index, decisions)
            torch.testing.assert_close(result.logits, expected(outs, decisions), rtol=1e-4, atol=1e-5)
            alone_index, alone_logits = by_hand(module, spec, part)
            assert torch.equal(result.exit_index, alone_index)
            torch.testing.assert_close(result.logits, alone_logits, rtol=1e-4, atol=1e-5)
            seen |= set(result.exit_index.tolist())
    assert seen == set(range(len(module.exit_heads) + 1)), "every exit should take samples, or the check is vacuous"
    return runner


def oracle(runner: bx.ExitRunner, x: torch.Tensor, exit_index: torch.Tensor) -> torch.Tensor:
    """Each stage run directly on exactly the samples that reach it, in batch order."""
    k = len(runner.heads)
    logits = torch.empty(len(x), runner.num_classes, dtype=x.dtype)
    values, where = (x,), torch.arange(len(x))
    with torch.no_grad():
        for i, stage in enumerate(runner.stages):
            values = stage(*values)
            z = runner.heads[i](values[0]) if i < k else values[0]
            leave = exit_index[where] == i
            logits[where[leave]] = z[leave]
            values, where = tuple(v[~leave] for v in values), where[~leave]
            if len(where) == 0:
                break
    return logits


def run_and_route(module: bx.ExitModule, spec: bx.ExitSpec, x: torch.Tensor):
    """The runner on ``x``, its result, the module's outputs and ``route``'s decisions on them, which the
    runner's must equal, as they must equal a per-sample loop's that applies the rule by hand."""
    runner = bx.ExitRunner(module)
    result = runner(x)
    with torch.no_grad():
        outputs = module(x)
    decisions = route(spec, outputs[:-1])
    assert torch.equal(result.exit_index, decisions)
    alone, alone_logits = by_hand(module, spec, x)
    assert torch.equal(result.exit_index, alone)
    scale = alone_logits.abs().amax(dim=1, keepdim=True).clamp_min(1.0)  # see the zoo test: compare at each scale
    torch.testing.assert_close(result.logits / scale, alone_logits / scale, rtol=0, atol=1e-4)
    return runner, result, outputs, decisions
