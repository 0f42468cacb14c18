"""How long ExitStats.update takes, as a multiple of one torch.softmax over logits of the same size.

100k samples, 1000 classes, 3 early exits plus the final one: four (100000, 1000) float32 logit
tensors. The reference is one ``torch.softmax`` over one of them (also shown: one softmax over all four at
once, the data ``update`` reads); all are timed in the same run, interleaved, and the medians of
the repeats are compared, so the ratio holds on a noisy shared box.
Routed mode uses the default entropy criterion with thresholds at quantiles of each exit's entropy,
so that 50% / 25% / 12.5% of the samples leave at exits 0 / 1 / 2. Target (issue 3): routed
update <= 10 softmaxes.

    python benchmarks/stats.py              # 100k samples, 5 repeats
    python benchmarks/stats.py --quick      # 10k samples, 3 repeats
    python benchmarks/stats.py --threads 1  # one torch thread
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import branchify as bx
from branchify.criteria import get_criterion

CLASSES = 1000
SHARES = [0.5, 0.25, 0.125]  # of all samples, leaving at exits 0, 1, 2; the rest goes to the end


def make_outputs(samples: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    # Per-sample sharpness from 0.3 to 5 (logit std), as trained classifiers give, so that entropies vary.
    sharpness = torch.logspace(-0.5, 0.7, samples)[torch.randperm(samples)][:, None]
    outputs = tuple(torch.randn(samples, CLASSES) * sharpness for _ in range(len(SHARES) + 1))
    return outputs, torch.randint(0, CLASSES, (samples,))


def spec_for(outputs: tuple[torch.Tensor, ...]) -> bx.ExitSpec:
    """Entropy thresholds at the quantiles that send SHARES of the samples out of each exit."""
    crit = get_criterion("entropy")
    remaining = torch.ones(len(outputs[0]), dtype=torch.bool)
    thresholds = []
    for i, share in enumerate(SHARES):
        scores = crit.score(outputs[i])
        wanted = share * len(scores) / int(remaining.sum())
        threshold = float(torch.quantile(scores[remaining].double(), wanted))
        thresholds.append(threshold)
        remaining &= ~crit.fires(scores, threshold)
    return bx.ExitSpec(exits=[bx.ExitPoint(layer=f"exit{i}", threshold=t) for i, t in enumerate(thresholds)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k samples, 3 repeats")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    samples, repeats = (10_000, 3) if args.quick else (args.samples, args.repeats)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    outputs, target = make_outputs(samples)
    spec = spec_for(outputs)
    routed, forced = bx.ExitStats(spec), bx.ExitStats(spec, mode="forced")

    def update(stats: bx.ExitStats) -> Callable[[], None]:
        def run() -> None:
            stats.reset()
            stats.update(outputs, target)
            stats.summary()  # the one host sync, so that the work is finished inside the timing
        return run

    stacked = torch.stack(outputs)
    timed = {"torch.softmax": lambda: torch.softmax(outputs[0], dim=-1),
             "torch.softmax, all": lambda: torch.softmax(stacked, dim=-1),
             "routed update": update(routed), "forced update": update(forced)}
    times: dict[str, list[float]] = {name: [] for name in timed}
    for fn in timed.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    taken = [row.percent for row in routed.summary().exits]
    print(f"ExitStats.update on {samples} samples x {CLASSES} classes, {len(SHARES)} exits + final, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"routed shares (%): {', '.join(f'{p:.1f}' for p in taken)}")
    softmax, softmax_all = medians["torch.softmax"], medians["torch.softmax, all"]
    print(f"torch.softmax over one exit's logits ({samples}x{CLASSES}): {softmax * 1e3:8.1f} ms")
    print(f"torch.softmax over all {len(outputs)} outputs at once:      {softmax_all * 1e3:8.1f} ms")
    for name in ("routed update", "forced update"):
        print(f"{name}: {medians[name] * 1e3:8.1f} ms = {medians[name] / softmax:5.2f} one-exit softmaxes "
              f"= {medians[name] / softmax_all:5.2f} all-output softmaxes")
    ratio = medians["routed update"] / softmax
    print(f"routed update / softmax = {ratio:.2f} (target <= 10: {'met' if ratio <= 10 else 'NOT met'})")

if __name__ == "__main__":
    main()
