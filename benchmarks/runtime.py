"""How close the early-exit runtime comes to the ideal, per model and input size, and where the runner's time goes.

Models (``--model``, random weights unless said; ``--size`` overrides the input size):

- ``resnet50`` at 224 (the default; issue 4): exits after layer1, layer2 and layer3;
- ``resnet18`` at 32, 10 classes, exits after layer1, layer2 and layer3;
- ``demo``: the demo's model (``branchify.commands.demo``: ResNet-18, 10 classes, exits after layer1 and layer2)
  on the digits test images at 32x32. From the demo's checkpoint (``runs/demo/checkpoint.safetensors``, written
  by ``make demo``) when it exists, with its calibrated thresholds; otherwise untrained (seed 0, the demo's spec)
  with thresholds set so that 40% / 20% / 40% of the samples leave at layer1 / layer2 / final, which saves 36% of
  the MACs, as the demo's calibrated thresholds do (35-42%). The script says which it ran;
- ``mobilenet_v3_small`` at 64, 10 classes, exits after features.3, features.6 and features.9;
- ``bert4``: ``BertForSequenceClassification`` from a config with 4 layers (hidden 768, 12 heads, 2 labels) on
  random ids at sequence length 32 (``--size``), mask all ones, exits after layers 1, 2 and 3.

Thresholds are set at quantiles of each head's entropy on the benchmark batch so that 50% / 25% / 12.5% of the
samples leave at exits 0 / 1 / 2 and 12.5% go to the end (the demo: see above). Four ways to get the same
predictions, timed in one run, interleaved; the median of the repeats, and the best (on a shared machine the
load only ever adds time, so the best is the steadier figure):

- (a) the original model;
- (b) ``bx.ExitRunner``;
- (c) the ideal: each stage and head run directly on exactly the samples that reach it (the
  sub-batches are prepared beforehand), no criterion, no routing;
- (d) whole-batch routing: the batch runs on until every sample has left (same decisions).

``--clock cpu`` times this process's CPU time instead of wall time: with ``--threads 1`` on a shared, loaded
machine it leaves out the time other processes hold the core (not their contention for caches and memory).

The runner's overhead is (b - c) / b: the share of the runner's time that is not the stages and heads on the
samples that reach them. Batch 1 runs 32 of the samples (16 with --quick) one at a time, with the same mix.
Targets (issue 4, 2 CPU cores): efficiency c/b >= 0.95 at batch 64 and >= 0.90 at batch 1; at batch 64 the
runner is >= 1.5x faster than whole-batch routing (resnet50). Issue 25: overhead <= 5% at batch 1 and 64 on
every model.

Then (``--breakdown``, the default for every model but resnet50) where the runner's time goes, from
``torch.profiler``, per call at batch 64 and batch 1: the stages, the heads, the criterion, the compaction
and scatter (argsort, indexing the carried values, writing the leavers' logits), the host synchronisations
(counting the leavers), the other tensor operations of the call, and the Python between them (binding and
checking the inputs, the MAC lookup, routing bookkeeping). The profiler adds a few microseconds to each
operation, so read its shares, not its absolute times.

Then, for resnet50, an exit that is off (issue 12): exits after layer1 and layer3 with layer1's off (threshold
None) against a module with layer3's exit alone, same threshold, at batch 1 on the same samples; an exit that
is off must cost nothing (ratio off/absent about 1).

    python benchmarks/runtime.py            # resnet50 at 224, 7 repeats
    python benchmarks/runtime.py --quick    # 2 repeats, 16 samples at batch 1
    python benchmarks/runtime.py --model resnet18 --size 32 --threads 1 --repeats 5
    python benchmarks/runtime.py --model demo --threads 1
    python benchmarks/runtime.py --model bert4 --size 32 --threads 1
    python benchmarks/runtime.py --off-only --threads 1   # only the exit that is off, one thread

Before and after a change, in one process: ``benchmarks/runtime_ab.py --base REV`` (the same models, the runner
and ideal of revision REV's ``branchify`` against this tree's).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

import branchify as bx
from branchify.criteria import get_criterion
from branchify.routing import Judge, exit_rules
from branchify.runtime import benchmark
from branchify.runtime.benchmark import interleaved

LAYERS = ["layer1", "layer2", "layer3"]
SHARES = [0.5, 0.25, 0.125]  # of the whole batch, leaving at exits 0, 1, 2; the rest goes to the end
DEMO_SHARES = [0.4, 0.2]  # the untrained demo model: 40% / 20% / 40% leave at layer1 / layer2 / final
DEMO_CHECKPOINT = Path("runs/demo/checkpoint.safetensors")
SIZES = {"resnet50": 224, "resnet18": 32, "demo": 32, "mobilenet_v3_small": 64, "bert4": 32}


def load() -> str:
    """The machine's load, as ``uptime`` prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


@dataclass
class Setup:
    """One benchmark model: ``original(inputs)`` runs the model itself; ``inputs`` is the batch (a tensor, or a
    dict of named tensors); ``description`` says what it is."""

    model: torch.nn.Module
    original: Callable[[object], object]
    inputs: object
    module: bx.ExitModule
    runner: bx.ExitRunner
    description: str


def take(inputs, index) -> object:
    """Samples ``index`` (a slice or an index tensor) of a batch that is a tensor or a dict of tensors."""
    if isinstance(inputs, dict):
        return {name: v[index].clone() for name, v in inputs.items()}
    return inputs[index].clone()


def set_thresholds(module: bx.ExitModule, x, shares=SHARES) -> None:
    """Entropy thresholds halfway between neighbouring scores, so that ``shares`` of the batch ``x`` leave."""
    crit = get_criterion("entropy")
    with torch.inference_mode():
        outputs = module(x)
    running = torch.ones(len(outputs[0]), dtype=torch.bool)
    thresholds = []
    for i, share in enumerate(shares):
        scores = crit.score(outputs[i])
        ranked = scores[running].sort().values
        n = round(share * len(running))
        thresholds.append(float(ranked[n - 1] + ranked[n]) / 2 if n < len(ranked) else float(ranked[-1]) + 1)
        running &= ~crit.fires(scores, thresholds[-1])
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds, criterion=["entropy"] * len(shares))


def image_model(model: torch.nn.Module, x: torch.Tensor, layers, shares, description: str) -> Setup:
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers])
    module = bx.attach_exits(model, spec, x[:1]).eval()
    set_thresholds(module, x, shares)
    return Setup(model.eval(), model, x, module, bx.ExitRunner(module, example_inputs=x[:1]), description)


def resnet50_with_exits(batch: int) -> tuple[torch.nn.Module, torch.Tensor, bx.ExitModule, bx.ExitRunner]:
    """The benchmark's model: ResNet-50 at 224 (seed 0), exits at ``LAYERS`` with the 50/25/12.5% mix on a batch of
    ``batch`` random images, and its runner."""
    s = build("resnet50", 224, batch)
    return s.model, s.inputs, s.module, s.runner


def build(name: str, size: int, batch: int) -> Setup:
    """The model ``name`` at input size ``size`` (seed 0), its exits, thresholds and runner, on a batch of ``batch``."""
    torch.manual_seed(0)
    if name in ("resnet50", "resnet18", "mobilenet_v3_small"):
        classes = 1000 if name == "resnet50" else 10
        model = getattr(torchvision.models, name)(num_classes=classes)
        layers = LAYERS if name.startswith("resnet") else ["features.3", "features.6", "features.9"]
        x = torch.randn(batch, 3, size, size)
        return image_model(model, x, layers, SHARES,
                           f"{name} {size}x{size}, {classes} classes, random weights, exits after {', '.join(layers)}")
    if name == "demo":
        return demo_model(size, batch)
    if name == "bert4":
        return bert_model(size, batch)
    raise SystemExit(f"unknown model {name!r}; choose one of {sorted(SIZES)}")


def demo_model(size: int, batch: int) -> Setup:
    """The demo's model on the digits test images: its checkpoint if ``make demo`` wrote one, else untrained."""
    from branchify.commands.demo import EXIT_LAYERS
    from branchify.commands.demo import build as demo_build
    from branchify.distiller.data import make_loaders

    images = torch.cat([x for x, _ in make_loaders("digits", batch_size=64, seed=0).test])
    if size != 32:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    x = images[:batch] if batch <= len(images) else images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
    example = torch.zeros(1, 3, size, size)
    if DEMO_CHECKPOINT.exists() and size == 32:
        model = torchvision.models.resnet18(num_classes=10)
        module = bx.load(DEMO_CHECKPOINT, model, example).eval()
        what = f"the demo's trained checkpoint {DEMO_CHECKPOINT} with its calibrated thresholds"
    else:
        model, module, _ = demo_build(0)
        module.eval()
        set_thresholds(module, x, DEMO_SHARES)
        what = ("no demo checkpoint: the demo's model untrained (seed 0), thresholds for 40/20/40% leaving at "
                "layer1/layer2/final")
    return Setup(model.eval(), model, x, module, bx.ExitRunner(module, example_inputs=example),
                 f"demo: ResNet-18 {size}x{size} on digits test images, exits after {', '.join(EXIT_LAYERS)}; {what}")


def bert_model(seq: int, batch: int) -> Setup:
    """A 4-layer BertForSequenceClassification from a config, random ids of length ``seq``, exits after layers 1-3."""
    import transformers

    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                     intermediate_size=3072, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    layers = [f"bert.encoder.layer.{i}" for i in range(3)]
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers]),
                             take(inputs, slice(0, 1))).eval()
    with torch.inference_mode():  # random heads give near-uniform outputs: spread their logits to std 3
        outputs = module(inputs)
    with torch.no_grad():
        for head, logits in zip(module.exit_heads, outputs):
            head[-1].weight.mul_(3.0 / logits.std())
    set_thresholds(module, inputs)
    runner = bx.ExitRunner(module, example_inputs=take(inputs, slice(0, 1)))
    return Setup(model, lambda batch: model(**batch).logits, inputs, module, runner,
                 f"bert4: BertForSequenceClassification 4x768 from a config, seq {seq}, mask all ones, exits after "
                 "layers 1, 2, 3")


def single_picks(taken: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The positions in the batch of ``n`` samples to run one at a time, with the batch's mix of exits (``taken``:
    each sample's exit, ``k`` exits): with three exits 1/2, 1/4, 1/8, 1/8 of them at exits 0, 1, 2 and the final
    (the shares ``SHARES`` asks for), otherwise the batch's own shares."""
    counts = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    if k != 3:  # the demo's two exits: the batch's own mix
        mix = taken.bincount(minlength=k + 1).double()
        counts = [int(c) for c in (mix / mix.sum() * n).round().tolist()]
    return torch.cat([torch.nonzero(taken == e).flatten()[:c] for e, c in enumerate(counts)])


def stage_values(runner: bx.ExitRunner, inputs) -> tuple:
    """Stage 0's positional inputs for a batch (a tensor, or a dict of named tensors)."""
    return runner.core.bind((inputs,), {})[0]


def ideal(runner: bx.ExitRunner, x: torch.Tensor | tuple[torch.Tensor, ...],
          exit_index: torch.Tensor) -> Callable[[], None]:
    """(c): each stage and head on exactly the samples that reach it, with the sub-batches prepared beforehand.

    ``x``: stage 0's input, or its positional inputs (``benchmarks/bert.py`` uses this one too)."""
    k = len(runner.heads)
    head_inputs = runner.core.head_inputs
    stages, heads = runner._run_stages, runner._run_heads  # what the runner runs: compiled after runner.compile()
    work = []
    with torch.inference_mode():
        values, taken = (x,) if isinstance(x, torch.Tensor) else tuple(x), exit_index
        for i, stage in enumerate(stages):
            if len(taken) == 0:
                break
            head = (heads[i], head_inputs[i]) if i < k and runner.core.rules()[i] is not None else None
            work.append((stage, values, head))
            values = stage(*values)
            keep = taken > i
            values, taken = tuple(v[keep] if isinstance(v, torch.Tensor) else v for v in values), taken[keep]

    def run() -> None:
        for stage, inputs, head in work:
            out = stage(*inputs)
            if head is not None:
                head[0](*out[:head[1]])

    return run


def whole_batch(runner: bx.ExitRunner, module: bx.ExitModule) -> Callable[[object], torch.Tensor]:
    """(d): the batch leaves at the first exit where every sample has cleared some exit."""
    rules = exit_rules(module.exit_spec, deployed=True)
    head_inputs = runner.core.head_inputs

    def run(inputs) -> torch.Tensor:
        values = stage_values(runner, inputs)
        judge = Judge(rules)
        logits = None
        running = None
        for i, stage in enumerate(runner.stages[:-1]):
            values = stage(*values)
            if rules[i] is None:
                continue
            z = runner.heads[i](*values[:head_inputs[i]])
            fired = judge.fires(i, z)
            if running is None:
                running = torch.ones(len(z), dtype=torch.bool, device=z.device)
            fired &= running
            logits = z if logits is None else torch.where(fired[:, None], z, logits)
            running &= ~fired
            if not bool(running.any()):
                return logits
        final = runner.stages[-1](*values)[0]
        return final if logits is None else torch.where(running[:, None], final, logits)

    return run


def timed(units: list[dict[str, Callable[[], object]]], repeats: int,
          device: torch.device) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """Median and best over repeats of each variant's total seconds over ``units`` (one per sample at batch 1), and
    each repeat's totals.

    The variants run back to back on each unit, so that the load of a shared machine, which drifts, falls on all
    of them alike (``bx.benchmark``'s timing loop), in an order drawn at random for every unit and repeat: in a
    rotation the runner (b) always ran right after the original model (a), which leaves the runner's Python and
    small kernels cold in the caches (at batch 1, about 2 points of overhead that neither the ideal nor a runner
    serving a stream of samples sees).
    """
    totals = interleaved(units, repeats, device, shuffle=True)
    return ({name: statistics.median(t) for name, t in totals.items()},
            {name: min(t) for name, t in totals.items()}, totals)


def report(label: str, times: tuple, mac_ideal: float) -> None:
    """The median and best rows, then the paired row: the median over repeats of each repeat's ratios (the
    variants of a repeat ran back to back, under about the same load)."""
    for kind, t in zip(("median", "best"), times[:2]):
        a, b, c, d = t["a"], t["b"], t["c"], t["d"]
        print(f"{label:<10} {kind:<6} {a * 1e3:9.1f} {b * 1e3:9.1f} {c * 1e3:9.1f} {d * 1e3:9.1f}   "
              f"{a / b:6.2f}x {c / b:6.3f} {mac_ideal:6.2f}x {d / b:6.2f}x {100 * (b - c) / b:8.1f}%", flush=True)
    a, b, c, d = (times[2][name] for name in "abcd")
    paired = [statistics.median(f(*r) for r in zip(a, b, c, d)) for f in
              (lambda a, b, c, d: a / b, lambda a, b, c, d: c / b, lambda a, b, c, d: d / b,
               lambda a, b, c, d: (b - c) / b)]
    print(f"{label:<10} {'paired':<6} {'':>39}   {paired[0]:6.2f}x {paired[1]:6.3f} {mac_ideal:6.2f}x "
          f"{paired[2]:6.2f}x {100 * paired[3]:8.1f}%", flush=True)


# --- where the runner's time goes --------------------------------------------------------------------------

SCOPES = {"bx::stage": "stages", "bx::head": "heads", "bx::criterion": "criterion"}
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
COMPACTION_OPS = {"aten::argsort", "aten::sort", "aten::index", "aten::index_copy_", "aten::index_fill_",
                  "aten::index_select", "aten::slice", "aten::narrow", "aten::masked_select", "aten::nonzero",
                  "aten::index_put_", "aten::copy_", "aten::new_empty", "aten::empty", "aten::full", "aten::fill_",
                  "aten::where", "aten::masked_fill_"}
PARTS = ["stages", "heads", "criterion", "compaction/scatter", "sync", "other ops", "python"]


def _scoped(name: str, fn: Callable) -> Callable:
    def run(*args):
        with torch.profiler.record_function(name):
            return fn(*args)
    return run


class _ScopedJudge(Judge):
    def fires(self, i, logits):
        with torch.profiler.record_function("bx::criterion"):
            return super().fires(i, logits)

    def fires_one(self, i, logits):  # batch 1: the criterion's one read-back of the score counts as the criterion
        with torch.profiler.record_function("bx::criterion"):
            return super().fires_one(i, logits)


def breakdown(runner: bx.ExitRunner, batches: list, rounds: int = 3) -> dict[str, float]:
    """Microseconds per runner call spent in each of ``PARTS``, from ``torch.profiler`` over ``rounds`` passes over
    ``batches``: a twin of ``runner`` whose stages, heads and criterion run inside named profiler scopes; the
    tensor operations the call runs outside them are sorted by name (``SYNC_OPS``: the host synchronisations,
    the count of leavers among them; ``COMPACTION_OPS``: compaction and scatter), and "python" is the time of the
    call that no operation or scope accounts for."""
    twin = copy.copy(runner)
    twin._run_stages = [_scoped("bx::stage", s) for s in runner._run_stages]
    twin._run_heads = [_scoped("bx::head", h) for h in runner._run_heads]
    rules, _, ready = runner.core._rules_in_force()
    twin.core = copy.copy(runner.core)  # judging with a scoped judge (the core keeps one per spec)
    twin.core._routing = (rules, _ScopedJudge(rules), ready)
    totals = dict.fromkeys(PARTS, 0.0)
    with torch.inference_mode():
        for x in batches:  # warm-up
            twin(x)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(rounds):
                for x in batches:
                    with torch.profiler.record_function("bx::call"):
                        twin(x)
    calls = 0
    for event in prof.events():
        if event.name != "bx::call":
            continue
        calls += 1
        accounted = 0.0
        for child in event.cpu_children:
            spent = child.time_range.elapsed_us()
            accounted += spent
            if child.name in SCOPES:
                part = SCOPES[child.name]
            elif child.name in SYNC_OPS or (child.name == "aten::sum" and _feeds_item(child)):
                part = "sync"
            elif child.name in COMPACTION_OPS:
                part = "compaction/scatter"
            else:
                part = "other ops"
            totals[part] += spent
        totals["python"] += event.time_range.elapsed_us() - accounted
    return {part: value / max(calls, 1) for part, value in totals.items()}


def _feeds_item(event) -> bool:
    """A sum whose next sibling reads it on the host (the runner's ``int(fired.sum())``)."""
    siblings = event.cpu_parent.cpu_children if event.cpu_parent is not None else []
    j = siblings.index(event)
    return j + 1 < len(siblings) and siblings[j + 1].name in SYNC_OPS


def print_breakdown(label: str, parts: dict[str, float]) -> None:
    total = sum(parts.values())
    cells = "  ".join(f"{part} {value:8.0f} ({100 * value / total:4.1f}%)" for part, value in parts.items())
    print(f"  {label:<10} per call {total:8.0f} us:  {cells}", flush=True)


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
    median, best, _ = timed(units, repeats, device)
    print(f"\nexit after layer1 off vs absent (exit after layer3 at the median entropy), batch 1 x{len(singles)}: "
          f"same decisions {same}")
    for kind, t in (("median", median), ("best", best)):
        print(f"  {kind:<6} off {t['off'] * 1e3:8.1f} ms  absent {t['absent'] * 1e3:8.1f} ms  "
              f"off/absent {t['off'] / t['absent']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="resnet50")
    parser.add_argument("--size", type=int, default=None,
                        help="input size (images: height and width; bert4: sequence length); default per model")
    parser.add_argument("--quick", action="store_true", help="2 repeats and 16 samples at batch 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--off-only", action="store_true", help="only the exit-off-against-absent timing (resnet50)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                        help="the profiler's breakdown of the runner's time (default: on but for resnet50)")
    parser.add_argument("--compile", action="store_true",
                        help="time runner.compile() (torch.compile of each stage and head) as the runner, and the "
                             "ideal with the same compiled stages and heads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (with --threads 1 on a loaded machine, the time "
                             "other processes hold the core is left out)")
    args = parser.parse_args()
    if args.clock == "cpu":
        benchmark.clock = time.process_time
    repeats = args.repeats or (2 if args.quick else 7)
    size = args.size or SIZES[args.model]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    print(f"load at start: {load()}", flush=True)
    setup = build(args.model, size, args.batch)
    model, x, module, runner = setup.model, setup.inputs, setup.module, setup.runner
    if args.compile:
        runner.compile()
    example = take(x, slice(0, 1))
    costs = bx.exit_costs(module, example)
    routed = whole_batch(runner, module)
    k = len(module.exit_spec.exits)

    with torch.inference_mode():
        result = runner(x)
    taken = result.exit_index
    picks = single_picks(taken, k, 16 if args.quick else 32)
    singles = [take(x, slice(j, j + 1)) for j in picks.tolist()]
    if args.off_only:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet50 224x224")
        off_versus_absent(model, x, singles, repeats, device)
        return
    mix = taken.bincount(minlength=k + 1).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {setup.description}"
          f"{', runner compiled' if args.compile else ''}; samples leaving at exits "
          f"{'/'.join(map(str, range(k)))}/final: {mix} of {len(taken)}")
    print(f"{'batch':<10} {'time':<6} {'a orig ms':>9} {'b runner':>9} {'c ideal':>9} {'d whole':>9}   "
          f"{'a/b':>7} {'c/b':>6} {'MAC a/b':>7} {'d/b':>7} {'overhead':>9}")

    mac_ideal = costs.original / float(result.macs.mean())
    t = timed([{"a": lambda: setup.original(x), "b": lambda: runner(x),
                "c": ideal(runner, stage_values(runner, x), taken), "d": lambda: routed(x)}], repeats, device)
    report(f"{len(taken)}", t, mac_ideal)
    print(f"           load: {load()}", flush=True)

    # Batch 1: a subset of the same samples one at a time, with the same mix of exits.
    with torch.inference_mode():
        single_results = [runner(s) for s in singles]
    single_taken = [r.exit_index for r in single_results]
    single_macs = torch.cat([r.macs for r in single_results])
    flips = sum(int(e != taken[j]) for e, j in zip(single_taken, picks.tolist()))
    units = [{"a": functools.partial(setup.original, s), "b": functools.partial(runner, s),
              "c": ideal(runner, stage_values(runner, s), e), "d": functools.partial(routed, s)}
             for s, e in zip(singles, single_taken)]
    t = timed(units, repeats, device)
    report(f"1 (x{len(singles)})", t, costs.original / float(single_macs.mean()))
    print(f"           load: {load()}", flush=True)
    if flips:
        print(f"({flips} of {len(singles)} samples take another exit at batch 1 than at batch {len(taken)}: "
              "batch-size-dependent rounding near a threshold)")
    if args.breakdown if args.breakdown is not None else args.model != "resnet50":
        print("\nwhere the runner's time goes (torch.profiler; per call, its share):")
        print_breakdown(f"{len(taken)}", breakdown(runner, [x]))
        print_breakdown(f"1 (x{len(singles)})", breakdown(runner, singles, rounds=1))
        print(f"  load: {load()}", flush=True)
    if args.model == "resnet50":
        off_versus_absent(model, x, singles, repeats, device)


if __name__ == "__main__":
    main()
