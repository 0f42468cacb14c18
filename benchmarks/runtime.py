"""How close the early-exit runtime comes to the ideal, on resnet50 at 224 with random weights.

Exits after layer1, layer2 and layer3; thresholds are set at quantiles of each head's entropy on the
benchmark batch so that 50% / 25% / 12.5% of the samples leave at exits 0 / 1 / 2 and 12.5% go to the
end. Four ways to get the same predictions, timed in one run, interleaved; the median of the repeats,
and the best (on a shared machine the load only ever adds time, so the best is the steadier figure):

- (a) the original model;
- (b) ``bx.ExitRunner``;
- (c) the ideal: each stage and head run directly on exactly the samples that reach it (the
  sub-batches are prepared beforehand), no criterion, no routing;
- (d) whole-batch routing: the batch runs on until every sample has left (same decisions).

Batch 1 runs 32 of the samples (16 with --quick) one at a time, with the same mix. Targets (issue 4,
2 CPU cores): efficiency c/b >= 0.95 at batch 64 and >= 0.90 at batch 1; at batch 64 the runner is
>= 1.5x faster than whole-batch routing.

Then an exit that is off (issue 12): exits after layer1 and layer3 with layer1's off (threshold None)
against a module with layer3's exit alone, same threshold, at batch 1 on the same samples; an exit
that is off must cost nothing (ratio off/absent about 1).

    python benchmarks/runtime.py            # 7 repeats
    python benchmarks/runtime.py --quick    # 2 repeats, 16 samples at batch 1
    python benchmarks/runtime.py --off-only --threads 1   # only the exit that is off, one thread
"""

from __future__ import annotations

import argparse
import functools
import statistics
import warnings
from collections.abc import Callable

import torch
import torchvision

import branchify as bx
from branchify.criteria import get_criterion
from branchify.runtime.benchmark import interleaved

LAYERS = ["layer1", "layer2", "layer3"]
SHARES = [0.5, 0.25, 0.125]  # of the whole batch, leaving at exits 0, 1, 2; the rest goes to the end


def resnet50_with_exits(batch: int) -> tuple[torch.nn.Module, torch.Tensor, bx.ExitModule, bx.ExitRunner]:
    """The benchmark's model: ResNet-50 at 224 (seed 0), exits at ``LAYERS`` with the 50/25/12.5% mix on a batch of
    ``batch`` random images, and its runner."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in LAYERS])
    module = bx.attach_exits(model, spec, x[:1]).eval()
    set_thresholds(module, x)
    return model, x, module, bx.ExitRunner(module, example_inputs=x[:1])


def set_thresholds(module: bx.ExitModule, x: torch.Tensor) -> None:
    """Entropy thresholds halfway between neighbouring scores, so that SHARES of ``x`` leave."""
    crit = get_criterion("entropy")
    with torch.inference_mode():
        outputs = module(x)
    running = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for i, share in enumerate(SHARES):
        scores = crit.score(outputs[i])
        ranked = scores[running].sort().values
        n = round(share * len(x))
        thresholds.append(float(ranked[n - 1] + ranked[n]) / 2 if n < len(ranked) else float(ranked[-1]) + 1)
        running &= ~crit.fires(scores, thresholds[-1])
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds)


def ideal(runner: bx.ExitRunner, x: torch.Tensor | tuple[torch.Tensor, ...],
          exit_index: torch.Tensor) -> Callable[[], None]:
    """(c): each stage and head on exactly the samples that reach it, with the sub-batches prepared beforehand.

    ``x``: stage 0's input, or its positional inputs (``benchmarks/bert.py`` uses this one too)."""
    k = len(runner.heads)
    work = []
    with torch.inference_mode():
        values, taken = (x,) if isinstance(x, torch.Tensor) else tuple(x), exit_index
        for i, stage in enumerate(runner.stages):
            if len(taken) == 0:
                break
            head = (runner.heads[i], runner._head_inputs[i]) if i < k else None
            work.append((stage, values, head))
            values = stage(*values)
            keep = taken > i
            values, taken = tuple(v[keep] for v in values), taken[keep]

    def run() -> None:
        for stage, inputs, head in work:
            out = stage(*inputs)
            if head is not None:
                head[0](*out[:head[1]])

    return run


def whole_batch(runner: bx.ExitRunner, module: bx.ExitModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """(d): the batch leaves at the first exit where every sample has cleared some exit."""
    spec = module.exit_spec
    rules = [(get_criterion(spec.criterion_of(i)), t) for i, t in enumerate(spec.thresholds)]

    def run(x: torch.Tensor) -> torch.Tensor:
        values = (x,)
        logits = None
        running = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for i, stage in enumerate(runner.stages[:-1]):
            values = stage(*values)
            z = runner.heads[i](values[0])
            crit, threshold = rules[i]
            fired = crit.fires(crit.score(z), threshold) & running
            logits = z if logits is None else torch.where(fired[:, None], z, logits)
            running &= ~fired
            if not bool(running.any()):
                return logits
        final = runner.stages[-1](*values)[0]
        return torch.where(running[:, None], final, logits)

    return run


def timed(units: list[dict[str, Callable[[], object]]], repeats: int,
          device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Median and best over repeats of each variant's total seconds over ``units`` (one per sample at batch 1).

    The variants run back to back on each unit, in an order that rotates every repeat, so that the
    load of a shared machine, which drifts, falls on all of them alike (``bx.benchmark``'s timing loop).
    """
    totals = interleaved(units, repeats, device)
    return ({name: statistics.median(t) for name, t in totals.items()},
            {name: min(t) for name, t in totals.items()})


def report(label: str, times: tuple[dict[str, float], dict[str, float]], mac_ideal: float) -> None:
    for kind, t in zip(("median", "best"), times):
        a, b, c, d = t["a"], t["b"], t["c"], t["d"]
        print(f"{label:<10} {kind:<6} {a * 1e3:9.1f} {b * 1e3:9.1f} {c * 1e3:9.1f} {d * 1e3:9.1f}   "
              f"{a / b:6.2f}x {c / b:6.3f} {mac_ideal:6.2f}x {d / b:6.2f}x", flush=True)


def off_versus_absent(model: torch.nn.Module, x: torch.Tensor, singles: list[torch.Tensor], repeats: int,
                      device: torch.device) -> None:
    """Time, at batch 1, a runner whose first exit is off against one without that exit."""
    both = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
    with_off = bx.attach_exits(model, both, x[:1]).eval()
    absent = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="layer3")]), x[:1]).eval()
    absent.exit_heads[0].load_state_dict(with_off.exit_heads[1].state_dict())
    with torch.inference_mode():
        scores = get_criterion("entropy").score(absent(x)[0])
    threshold = float(scores.median())
    absent.exit_spec = absent.exit_spec.with_exits(threshold=[threshold])
    with_off.exit_spec = with_off.exit_spec.with_exits(threshold=[None, threshold])
    runners = {"off": bx.ExitRunner(with_off, example_inputs=x[:1]),
               "absent": bx.ExitRunner(absent, example_inputs=x[:1])}
    with torch.inference_mode():
        same = all(int(runners["off"](s).exit_index) - 1 == int(runners["absent"](s).exit_index) for s in singles)
    units = [{name: functools.partial(r, s) for name, r in runners.items()} for s in singles]
    median, best = timed(units, repeats, device)
    print(f"\nexit after layer1 off vs absent (exit after layer3 at the median entropy), batch 1 x{len(singles)}: "
          f"same decisions {same}")
    for kind, t in (("median", median), ("best", best)):
        print(f"  {kind:<6} off {t['off'] * 1e3:8.1f} ms  absent {t['absent'] * 1e3:8.1f} ms  "
              f"off/absent {t['off'] / t['absent']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and 16 samples at batch 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--off-only", action="store_true", help="only the exit-off-against-absent timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    model, x, module, runner = resnet50_with_exits(args.batch)
    costs = bx.exit_costs(module, x[:1])
    routed = whole_batch(runner, module)

    with torch.inference_mode():
        result = runner(x)
    taken = result.exit_index
    if args.off_only:
        counts = [8, 4, 2, 2] if args.quick else [16, 8, 4, 4]
        picks = torch.cat([torch.nonzero(taken == e).flatten()[:n] for e, n in enumerate(counts)])
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet50 224x224")
        off_versus_absent(model, x, [x[j:j + 1].clone() for j in picks.tolist()], repeats, device)
        return
    mix = taken.bincount(minlength=len(LAYERS) + 1).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet50 224x224, exits after "
          f"{', '.join(LAYERS)}; samples leaving at exits 0/1/2/final: {mix} of {len(x)}")
    print(f"{'batch':<10} {'time':<6} {'a orig ms':>9} {'b runner':>9} {'c ideal':>9} {'d whole':>9}   "
          f"{'a/b':>7} {'c/b':>6} {'MAC a/b':>7} {'d/b':>7}")

    mac_ideal = costs.original / float(result.macs.mean())
    t = timed([{"a": lambda: model(x), "b": lambda: runner(x), "c": ideal(runner, x, taken),
                "d": lambda: routed(x)}], repeats, device)
    report(f"{len(x)}", t, mac_ideal)

    # Batch 1: a subset of the same samples one at a time, with the same mix of exits.
    counts = [8, 4, 2, 2] if args.quick else [16, 8, 4, 4]
    picks = torch.cat([torch.nonzero(taken == e).flatten()[:n] for e, n in enumerate(counts)])
    singles = [x[j:j + 1].clone() for j in picks.tolist()]
    with torch.inference_mode():
        single_taken = [runner(s).exit_index for s in singles]
    single_macs = torch.cat([runner(s).macs for s in singles])
    flips = sum(int(e != taken[j]) for e, j in zip(single_taken, picks.tolist()))
    units = [{"a": functools.partial(model, s), "b": functools.partial(runner, s), "c": ideal(runner, s, e),
              "d": functools.partial(routed, s)} for s, e in zip(singles, single_taken)]
    t = timed(units, repeats, device)
    report(f"1 (x{len(singles)})", t, costs.original / float(single_macs.mean()))
    if flips:
        print(f"({flips} of {len(singles)} samples take another exit at batch 1 than at batch {len(x)}: "
              "batch-size-dependent rounding near a threshold)")
    off_versus_absent(model, x, singles, repeats, device)


if __name__ == "__main__":
    main()
