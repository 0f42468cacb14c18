"""How close the early-exit runtime comes to the ideal on a BERT-base-shaped encoder, seq 128, random weights.

(Issue 11's ``benchmarks/transformers.py``, named ``bert.py`` so that running it does not shadow the
``transformers`` package: a script's own folder comes first on ``sys.path``.)

``BertForSequenceClassification`` (hidden 768, 12 layers, 12 heads, intermediate 3072, 2 labels), eval
mode, captured with torch.export (``module.exit_path == "export"``), exits after layers 3, 6 and 9 of the
12 (``bert.encoder.layer.2``, ``.5`` and ``.8``: indices start at 0), so the exits sit at 25%, 50% and
75% of the model's MACs (``bx.exit_costs``; the embeddings, pooler and the 2-way heads are negligible).
A batch of 32 sentences of 16 to 128 real tokens ([CLS] ... [SEP], random ids), padded to 128 with the
attention mask at 0 on the padding (``--mask ones``: 128 real tokens each, mask all ones). The heads, a
masked mean over the real tokens and a Linear, are random: their last Linear's weight is scaled so
that their scores spread, then entropy thresholds are set at quantiles of each head's scores on the
batch so that 50% / 25% / 12.5% of it leave at exits 0 / 1 / 2 and 12.5% go to the end. That mix costs
0.5 * 3/12 + 0.25 * 6/12 + 0.125 * 9/12 + 0.125 = 46.9% of the MACs: a MAC-ideal speedup of 2.13x.
``--layers 3 6 9`` puts the exits one layer later (after 4, 7 and 10 layers: 1.85x MAC-ideal).

Four ways to get the same predictions, timed in one run, interleaved, under torch.inference_mode; the
median of the repeats, and the best (on a shared machine the load only ever adds time, so the best is
the steadier figure); the ratios also paired, per repeat (the median of each repeat's ratio). Wall
time, and CPU time (this process's, all threads), which leaves out the time other processes hold the
cores but not their contention for caches and memory (nor a hypervisor's steal time), and with more
than one thread counts the threads' spinning at barriers:

- (a) the original model, ``model(**batch).logits``;
- (b) ``bx.ExitRunner(module)(batch)``;
- (c) a DeeBERT-style loop: the 32 samples one at a time through the runner (same decisions as (b));
- (d) the ideal: each stage and head run directly on exactly the samples that reach it (the
  sub-batches are prepared beforehand), no criterion, no routing.

Ratios of times: efficiency d/b (target >= 0.9), speedup a/b (target >= 1.8x on 2 CPU cores), what
batching buys over the batch-1 loop c/b, and the MAC-ideal speedup. Asserted, not timed: the runner's
exits are exactly the intended shares, its logits match the module's routed outputs within 1e-4, and
the batch-1 loop takes the same exits. A full run (5 repeats) took 4.5 to 6 minutes on 2 cores shared
with a test suite (--threads 1: 2 minutes while the machine was quiet); --quick, about 3.

    python benchmarks/bert.py                 # 5 repeats, 2 threads
    python benchmarks/bert.py --quick         # 2 repeats
    python benchmarks/bert.py --threads 1
    python benchmarks/bert.py --layers 3 6 9  # exits after 4, 7 and 10 layers: 1.85x MAC-ideal
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable

import torch
from runtime import ideal  # benchmarks/runtime.py: this script's folder comes first on sys.path

import branchify as bx
from branchify.criteria import get_criterion

LAYERS = (2, 5, 8)  # the exits follow bert.encoder.layer.{i}: after layers 3, 6 and 9
SHARES = [0.5, 0.25, 0.125]  # of the whole batch, leaving at exits 0, 1, 2; the rest goes to the end
BATCH = 32
SEQ = 128


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def sentences(vocab: int, padded: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """[CLS] random ids [SEP], then [PAD]s: ``BATCH`` sentences of 16 to ``SEQ`` tokens (all ``SEQ`` if not padded)."""
    lengths = torch.randint(16, SEQ + 1, (BATCH,), generator=generator) if padded else torch.full((BATCH,), SEQ)
    ids = torch.randint(1000, vocab, (BATCH, SEQ), generator=generator)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(BATCH), lengths - 1] = 102  # [SEP]
    ids[mask == 0] = 0  # [PAD]
    return {"input_ids": ids, "attention_mask": mask}


def spread_heads(module: bx.ExitModule, batch: dict[str, torch.Tensor]) -> None:
    """Random heads give near-uniform outputs: scale their last Linear's weight so that their logits have std 3."""
    with torch.inference_mode():
        outputs = module(batch)
    with torch.no_grad():
        for head, logits in zip(module.exit_heads, outputs):
            head[-1].weight.mul_(3.0 / logits.std())


def set_thresholds(module: bx.ExitModule, outputs: list[torch.Tensor]) -> float:
    """Entropy thresholds halfway between neighbouring scores of ``outputs`` (the module's), so that SHARES leave.

    Returns the smallest distance from a judged score to its threshold: the margin that rounding has.
    """
    crit = get_criterion("entropy")
    running = torch.ones(BATCH, dtype=torch.bool)
    thresholds, margin = [], float("inf")
    for i, share in enumerate(SHARES):
        scores = crit.score(outputs[i])
        ranked = scores[running].sort().values
        n = round(share * BATCH)
        thresholds.append(float(ranked[n - 1] + ranked[n]) / 2 if n < len(ranked) else float(ranked[-1]) + 1)
        margin = min(margin, float((ranked - thresholds[-1]).abs().min()))
        running &= ~crit.fires(scores, thresholds[-1])
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds, criterion=["entropy"] * len(SHARES))
    return margin


def stage_inputs(runner: bx.ExitRunner, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Stage 0's positional inputs: the model's named inputs in placeholder order."""
    return tuple(batch[str(n.target)] for n in runner.stages[0].graph.nodes if n.op == "placeholder")


def timed(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Each variant's wall and CPU seconds (this process, all threads), one per repeat: ``{"wall": {name: [...]}}``.

    The variants run back to back, in an order that rotates every repeat, so that the load of a shared
    machine, which drifts, falls on all of them alike.
    """
    names = list(variants)
    totals: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in ("wall", "cpu")}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                wall, cpu = time.perf_counter(), time.process_time()
                variants[name]()
                totals["cpu"][name].append(time.process_time() - cpu)
                totals["wall"][name].append(time.perf_counter() - wall)
    return totals


def report(label: str, totals: dict[str, list[float]], mac_ideal: float) -> None:
    """Median and best of each variant and their ratios; then the median over repeats of each repeat's ratios
    (paired: the variants of a repeat ran back to back, under about the same load)."""
    rows = {"median": {name: statistics.median(t) for name, t in totals.items()},
            "best": {name: min(t) for name, t in totals.items()}}
    for kind, t in rows.items():
        a, b, c, d = t["a"], t["b"], t["c"], t["d"]
        print(f"{label:<5} {kind:<6} {a * 1e3:9.0f} {b * 1e3:9.0f} {c * 1e3:9.0f} {d * 1e3:9.0f}   "
              f"{d / b:6.3f} {a / b:5.2f}x {c / b:5.2f}x {mac_ideal:6.2f}x")
    a, b, c, d = (totals[name] for name in "abcd")
    ratios = [statistics.median(x / y for x, y in zip(top, bottom)) for top, bottom in ((d, b), (a, b), (c, b))]
    print(f"{label:<5} {'paired':<6} {'':>39}   {ratios[0]:6.3f} {ratios[1]:5.2f}x {ratios[2]:5.2f}x {mac_ideal:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--mask", choices=["padded", "ones"], default="padded",
                        help="padded: 16 to 128 real tokens per sentence (default); ones: 128 each, no padding")
    parser.add_argument("--layers", type=int, nargs=len(LAYERS), default=LAYERS, metavar="I",
                        help="indices of the encoder layers the exits follow (default 2 5 8: after layers 3, 6, 9)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"load at start: {load()}", flush=True)
    import transformers
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = sentences(config.vocab_size, args.mask == "padded", torch.Generator().manual_seed(1))
    example = {name: v[:1] for name, v in batch.items()}
    layers = [f"bert.encoder.layer.{i}" for i in args.layers]
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers])
    module = bx.attach_exits(model, spec, example).eval()
    assert module.exit_path == "export", module.exit_path
    spread_heads(module, batch)
    with torch.inference_mode():
        outputs = module(batch)
    margin = set_thresholds(module, outputs)
    runner = bx.ExitRunner(module, example_inputs=example)
    costs = bx.exit_costs(module, example)

    # Asserted, not timed: the mix, the logits against the module's routed outputs, the batch-1 decisions.
    with torch.inference_mode():
        result = runner(batch)
        singles = [{name: v[j:j + 1].clone() for name, v in batch.items()} for j in range(BATCH)]
        single = [runner(s) for s in singles]
    taken = result.exit_index
    mix = taken.bincount(minlength=len(layers) + 1).tolist()
    assert mix == [round(s * BATCH) for s in SHARES] + [BATCH - sum(round(s * BATCH) for s in SHARES)], mix
    routed = torch.stack([outputs[e][j] for j, e in enumerate(taken.tolist())])
    error = float((result.logits - routed).abs().max())
    assert error <= 1e-4, error
    single_taken = torch.cat([r.exit_index for r in single])
    assert torch.equal(single_taken, taken), (single_taken.tolist(), taken.tolist())
    single_error = float((torch.cat([r.logits for r in single]) - result.logits).abs().max())

    fractions = ", ".join(f"{c / costs.original:.1%}" for c in costs.exits)
    mac_ideal = costs.original / float(result.macs.mean())
    lengths = batch["attention_mask"].sum(1)
    tokens = f"{int(lengths.min())}-{int(lengths.max())} real tokens (mean {float(lengths.float().mean()):.0f})"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"BERT-base 12x768, batch {BATCH} x seq {SEQ}, mask {args.mask}: {tokens}; exit_path {module.exit_path}")
    print(f"exits after {', '.join(layers)} at {fractions} of {costs.original / 1e9:.2f} GMACs per sample; "
          f"samples leaving at exits 0/1/2/final: {mix} of {BATCH}; MAC-ideal speedup {mac_ideal:.2f}x")
    print(f"checks: runner vs module's routed logits max |diff| {error:.1e}; batch-1 loop: same exits, logits "
          f"max |diff| {single_error:.1e}; smallest score-threshold margin {margin:.1e}", flush=True)

    variants = {"a": lambda: model(**batch).logits, "b": lambda: runner(batch),
                "c": lambda: [runner(s) for s in singles], "d": ideal(runner, stage_inputs(runner, batch), taken)}
    totals = timed(variants, repeats)
    print(f"{'clock':<5} {'time':<6} {'a orig ms':>9} {'b runner':>9} {'c loop':>9} {'d ideal':>9}   "
          f"{'d/b':>6} {'a/b':>6} {'c/b':>6} {'MAC a/b':>7}   ({repeats} repeats)")
    for clock, times in totals.items():
        report(clock, times, mac_ideal)
    print("targets: efficiency d/b >= 0.9, speedup a/b >= 1.8x (2 cores); c/b > 1 means batching beats the loop")
    print(f"load at end: {load()}")


if __name__ == "__main__":
    main()
