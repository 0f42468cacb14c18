"""The main job on data that ships offline: train, report, calibrate, run with real exits, save.

``make demo`` runs this on scikit-learn's bundled digits (real 8x8 scans of handwritten digits,
resized to 32x32 with three channels) with an unmodified torchvision ResNet-18:

1. train the backbone and two exits jointly with ``bx.fit`` (Distiller's loss, weights from the
   spec; SGD with a one-cycle schedule), with each exit's validation top-1 after every epoch;
2. print Distiller's validation report with hand-picked thresholds, and the MAC cost lines;
3. calibrate the thresholds on the validation split for at most TARGET_DROP of accuracy drop, with
   the default guarantee (it holds on new data with probability 90%), and check on the test split:
   the final exit's own test accuracy, the drop measured there, and the target;
4. run ``ExitRunner`` on the held-out test split, print the share leaving at each exit and the
   MAC saving, and time it against the original model with ``bx.benchmark`` (batch 1 and 64);
5. write the spec, a checkpoint and two plots to ``runs/demo/``: accuracy against MACs on the test
   split, each point calibrated on the validation split for a MAC budget (never on test).

    python -m branchify.commands.demo [--epochs 8] [--out runs/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

import branchify as bx
from branchify.calibration.cache import collect_logits
from branchify.calibration.result import figures
from branchify.calibration.search import calibrate_cached
from branchify.distiller.data import make_loaders

EXIT_LAYERS = ("layer1", "layer2")
LOSS_WEIGHTS = (0.3, 0.3)
HAND_THRESHOLDS = (0.5, 0.5)  # what a Distiller user would type before calibrating
# The guarantee needs enough validation samples for the target: 2 * ceil(ln(0.05) / ln(1 - target)) at
# delta 0.1, i.e. 598 for 1 point, 298 for 2 points; digits has 359.
TARGET_DROP = 0.02
BUDGETS = (0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BATCH_SIZES = (1, 64)  # timed: one sample at a time, and the training batch
TIMED_SAMPLES = 192  # three batches of 64


def build(seed: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    example = torch.zeros(1, 3, 32, 32)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, weight=w, threshold=t)
                              for layer, w, t in zip(EXIT_LAYERS, LOSS_WEIGHTS, HAND_THRESHOLDS)])
    return model, bx.attach_exits(model, spec, example), example


def train(module: torch.nn.Module, loaders, epochs: int, lr: float, progress: bool) -> bx.FitHistory:
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loaders.train))
    return bx.fit(module, loaders.train, epochs=epochs, val_loader=loaders.val, optimizer=optimizer,
                  on_step=lambda step: scheduler.step(), progress=progress)


def routed_report(module: torch.nn.Module, loader, costs: bx.ExitCosts) -> bx.ExitStatsSummary:
    stats = bx.ExitStats(module.exit_spec, mode="routed", costs=costs)
    module.eval()
    with torch.no_grad():
        for images, labels in loader:
            stats.update(module(images), labels)
    stats.report()
    return stats.summary()


def plot(path: Path, frontier: list[tuple[float, float]], chosen: bx.Calibration, final_accuracy: float,
         shares: list[float]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*sorted(frontier))
    ax.plot([100 * x for x in xs], [100 * y for y in ys], "o-", color="tab:blue",
            label="MAC budgets: calibrated on val, measured on test")
    ax.axhline(100 * final_accuracy, color="grey", ls="--", label="full network (test)")
    ax.plot([100 * chosen.mac_fraction], [100 * chosen.accuracy], "*", ms=16, color="tab:red",
            label=f"chosen on val for <= {100 * TARGET_DROP:g} points: test drop "
                  f"{100 * chosen.accuracy_drop:.1f}, {100 * chosen.saving:.0f}% MACs saved")
    ax.set_xlabel("expected MACs (% of the original ResNet-18)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against compute, digits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    first = path / "accuracy_vs_macs.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [*EXIT_LAYERS, "final"]
    ax.bar(names, [100 * s for s in shares], color=["tab:green", "tab:olive", "tab:grey"])
    for i, share in enumerate(shares):
        ax.text(i, 100 * share + 1, f"{100 * share:.1f}%", ha="center")
    ax.set_ylabel("share of test samples (%)")
    ax.set_title("Where samples leave (ExitRunner)")
    ax.set_ylim(0, 110)
    fig.tight_layout()
    second = path / "share_per_exit.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


class Clock:
    """Elapsed time per phase and in all, printed as each phase ends (the demo should take under 2 minutes)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        print(f"   [{what}: {now - self.last:.1f} s; {now - self.start:.1f} s in all]", flush=True)
        self.last = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="branchify end to end on scikit-learn's digits (offline)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (medians are reported)")
    parser.add_argument("--timed-samples", type=int, default=TIMED_SAMPLES,
                        help=f"test images timed at each batch size (default: {TIMED_SAMPLES}, at least 64)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True, warn_only=True)
    progress = not args.no_progress and sys.stderr.isatty()

    clock = Clock()
    loaders = make_loaders("digits", batch_size=args.batch_size, seed=args.seed)
    _, module, example = build(args.seed)
    print(f"ResNet-18 on digits (32x32): {len(loaders.train.dataset)} train / {len(loaders.val.dataset)} val / "
          f"{len(loaders.test.dataset)} test images; exits after {', '.join(EXIT_LAYERS)}")
    for point in module.exit_points:
        print(f"  {point}")

    print("\n1. Training backbone and exits jointly (Distiller's loss, weights "
          f"{list(LOSS_WEIGHTS)} + final {module.exit_spec.final_weight:.1f})")
    print(train(module, loaders, args.epochs, args.lr, progress))
    print("   (val top-1: every validation sample forced out at that exit)")
    clock.lap("training")

    costs = bx.exit_costs(module, example)
    print(f"\n2. Distiller's validation report on the test split, hand-picked entropy thresholds "
          f"{list(HAND_THRESHOLDS)}")
    routed_report(module, loaders.test, costs)
    clock.lap("report")

    print(f"\n3. Calibrating thresholds on the validation split for at most {100 * TARGET_DROP:g} points of accuracy "
          "drop, guaranteed on new data with probability 90%")
    calibration = bx.calibrate(module, loaders.val, max_accuracy_drop=TARGET_DROP, example_inputs=example,
                               progress=progress)
    print(calibration)
    checked = calibration.evaluate(module, loaders.test, example_inputs=example, progress=False)
    print(f"   On the held-out test split: final exit alone {100 * checked.final_accuracy:.2f}%, with the exits "
          f"{100 * checked.accuracy:.2f}%: a drop of {100 * checked.accuracy_drop:.2f} points against the target "
          f"of {100 * TARGET_DROP:g} ({'within' if checked.accuracy_drop <= TARGET_DROP else 'OVER'} it), "
          f"{100 * checked.saving:.1f}% of the MACs saved")
    if calibration.spec.thresholds is None:
        print("   Every exit is off (nothing could be certified), so the rest of the demo runs the hand-picked "
              "thresholds")
    else:
        module.exit_spec = calibration.spec
    print("\n   The same report on the test split with the calibrated thresholds:")
    summary = routed_report(module, loaders.test, costs)
    clock.lap("calibration")

    print("\n4. Real early exit: ExitRunner on the held-out test split")
    runner = bx.ExitRunner(module, example)
    batches, labels = zip(*loaders.test)
    results = [runner(x) for x in batches]
    taken = torch.cat([r.exit_index for r in results])
    correct = torch.cat([r.logits.argmax(1) for r in results]) == torch.cat(labels)
    shares = (taken.bincount(minlength=len(EXIT_LAYERS) + 1).double() / len(taken)).tolist()
    mean_macs = torch.cat([r.macs for r in results]).mean().item()
    print(f"   accuracy {100 * correct.double().mean():.2f}% (routed statistics said {summary.totals['top1']:.2f}%)")
    print("   share leaving at each exit: " + ", ".join(
        f"{name} {100 * s:.1f}%" for name, s in zip([*EXIT_LAYERS, "final"], shares)))
    print(f"   MACs per sample {mean_macs / 1e6:.2f} M vs {costs.original / 1e6:.2f} M for the original: "
          f"{100 * (1 - mean_macs / costs.original):.1f}% saved")
    timed = torch.cat(batches)[:args.timed_samples]  # batch 1 runs them one by one: a few hundred are plenty
    print(f"   timed against the original model on {len(timed)} test images, {args.repeats} interleaved repeats:")
    print(bx.benchmark(runner, timed, batch_sizes=BATCH_SIZES, repeats=args.repeats))
    clock.lap("runner and timing")

    spec_path = module.exit_spec.save(args.out / "spec.json")
    # The architecture's name goes into the file: branchify report and branchify export then need no --arch.
    checkpoint = bx.save(module, args.out / "checkpoint.safetensors", arch="resnet18")
    val_cached = collect_logits(module, loaders.val, progress=False)
    test_cached = collect_logits(module, loaders.test, progress=False)
    frontier = [(1.0, checked.final_accuracy)]
    for budget in BUDGETS:  # calibrated on val, measured on test
        point = calibrate_cached(module.exit_spec, val_cached, costs, target="mac_budget", value=budget, warn=False)
        if point.met:
            on_test = figures(point.spec, test_cached, costs, target="mac_budget", value=budget, grid=point.grid,
                              delta=point.delta, bound_on=None, held_out=True, guarantee=True)
            frontier.append((on_test.mac_fraction, on_test.accuracy))
    plots = plot(args.out, frontier, checked, checked.final_accuracy, shares)
    print(f"\n5. Wrote {spec_path}, {checkpoint} and {', '.join(str(p) for p in plots)}")
    clock.lap("accuracy-against-compute curve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
