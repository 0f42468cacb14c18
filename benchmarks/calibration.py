"""Does the default calibration keep its promise on new data? Failure rate over random calibration/test splits.

The default ``bx.calibrate`` (``guarantee=True``, Learn-then-Test) promises that, with probability at
least ``1 - delta`` over the draw of the calibration data, the chosen thresholds keep the accuracy drop
on new data within the target. This measures it on real images (scikit-learn's bundled digits, 1797
grey 8x8 images upscaled to 3x32x32): a ``torchvision.models.resnet18(num_classes=10)`` is trained on
a fixed 40% of the data, linear exit heads (after ``layer1`` and ``layer2`` by default, ``--layers``)
are trained on the same part with the backbone frozen, and the network runs ONCE over the remaining
60% (the pool; its logits are cached). Then, for each of ``--splits`` random splits of the pool into
a calibration half and a test half, both modes calibrate on the calibration half for the same target
and are evaluated on the test half:

- default: ``guarantee=True, delta=0.1`` (the promise above);
- plain: ``guarantee=False`` (fits the calibration data only, no promise).

Printed side by side, per mode: the share of splits whose TEST accuracy drop exceeds the target with
its 95% Clopper-Pearson interval (one-sided bounds at 0.025 each), the mean test drop, the mean test
MAC saving, and the ratio of the MAC savings (default / plain). Target (acceptance point): the default
mode's share <= delta. Caveats: the splits share one pool and one trained network, so they are not
independent draws, and the test drop is measured on a finite test half while the guarantee is on the
expected drop, so the interval is indicative.

The target ``max_accuracy_drop`` is, unless given, the smallest of 0.01, 0.02, 0.03, 0.05 that the
calibration half can certify at all (Learn-then-Test needs ``2 * ceil(ln(delta / 2) / ln(1 - target))``
calibration samples even for thresholds that change no prediction).

    .venv/bin/python benchmarks/calibration.py                 # 50 splits, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/calibration.py --layers layer1 layer2 layer3
    .venv/bin/python benchmarks/calibration.py --splits 200 --max-accuracy-drop 0.03
    .venv/bin/python benchmarks/calibration.py --epochs 3 --splits 10   # quick
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx
from branchify.calibration.bounds import clopper_pearson_lower, clopper_pearson_upper, samples_to_certify
from branchify.calibration.cache import Cached, collect_logits
from branchify.calibration.result import figures
from branchify.calibration.search import calibrate_cached

TARGET = "max_accuracy_drop"
CANDIDATE_TARGETS = (0.01, 0.02, 0.03, 0.05)
LAYERS = ("layer1", "layer2")  # default exit points
MODES = (("default", True), ("plain", False))  # (name, guarantee)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All of digits as normalised 3x32x32 float tensors, and the labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    return images, torch.tensor(digits.target, dtype=torch.long)


def train(parameters, forward_loss, loader: DataLoader, *, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            forward_loss(x, y).backward()
            optimizer.step()


def build(images: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor, *, layers: list[str], epochs: int,
          head_epochs: int, head_lr: float, seed: int) -> torch.nn.Module:
    """The ResNet-18 trained on ``train_idx``, then its exit heads trained there on the frozen backbone."""
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    train(model.parameters(), lambda x, y: F.cross_entropy(model(x), y), loader, epochs=epochs, lr=1e-3)
    model.eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, weight=0.3) for layer in layers])
    module = bx.attach_exits(model, spec, images[:1])
    bx.freeze_backbone(module).train()  # norms outside the heads stay in eval
    loss_fn = bx.EarlyExitLoss(module.exit_spec)
    train(module.exit_heads.parameters(), lambda x, y: loss_fn(module(x), y), loader, epochs=head_epochs,
          lr=head_lr)
    return module.eval()


def subset(cached: Cached, idx: torch.Tensor) -> Cached:
    return Cached([z[idx] for z in cached.exit_logits], cached.final[idx], cached.targets[idx], cached.example_inputs)


def choose_target(calibration_samples: int, delta: float) -> float:
    for value in CANDIDATE_TARGETS:
        if 2 * samples_to_certify(value, delta) <= calibration_samples:
            return value
    raise SystemExit(f"{calibration_samples} calibration samples cannot certify any of {CANDIDATE_TARGETS} with "
                     f"delta={delta:g}; lower --train-fraction")


def interval(x: int, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval: one-sided bounds at 0.025 each."""
    return clopper_pearson_lower(x, n, 0.025), clopper_pearson_upper(x, n, 0.025)


def library_version() -> str:
    """The git commit of the branchify being measured, and its uncommitted changes (the figures depend on both)."""
    root = Path(bx.__file__).resolve().parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=True).stdout.rstrip()

    try:
        changed = git("status", "--porcelain", "--", ".").splitlines()
        head = git("rev-parse", "--short", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{root} (not a git checkout)"
    dirty = f", uncommitted: {', '.join(line[3:] for line in changed)}" if changed else ""
    return f"{root} at {head}{dirty}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=50, help="random calibration/test splits of the pool")
    parser.add_argument("--max-accuracy-drop", type=float, default=None,
                        help=f"the target (default: the smallest of {CANDIDATE_TARGETS} the data can certify)")
    parser.add_argument("--delta", type=float, default=0.1, help="failure probability of the default mode")
    parser.add_argument("--train-fraction", type=float, default=0.4, help="share of digits to train on")
    parser.add_argument("--epochs", type=int, default=6, help="epochs to train the ResNet-18")
    parser.add_argument("--head-epochs", type=int, default=5, help="epochs to train the exit heads")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="Adam learning rate of the exit heads")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), help="exit points (default: layer1 layer2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training split and the training")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("branchify:", library_version())

    images, labels = digits_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    cut = int(args.train_fraction * len(order))
    train_idx, pool_idx = order[:cut], order[cut:]
    module = build(images, labels, train_idx, layers=args.layers, epochs=args.epochs, head_epochs=args.head_epochs,
                   head_lr=args.head_lr, seed=args.seed)
    trained = time.perf_counter()
    pool = collect_logits(module, DataLoader(TensorDataset(images[pool_idx], labels[pool_idx]), batch_size=256),
                          progress=False)
    costs = bx.exit_costs(module, images[:1])
    spec = module.exit_spec
    cached_at = time.perf_counter()

    n_cal = pool.samples // 2
    n_test = pool.samples - n_cal
    delta = args.delta
    value = args.max_accuracy_drop if args.max_accuracy_drop is not None else choose_target(n_cal, delta)
    need = samples_to_certify(value, delta)
    candidates = ", ".join(f"{v:g}" for v in CANDIDATE_TARGETS)
    chosen_by = ("given" if args.max_accuracy_drop is not None
                 else f"chosen: the smallest of {candidates} the calibration half can certify")
    correct = pool.correct().double().mean(dim=1)
    print(f"data: digits, {len(labels)} samples; train {len(train_idx)} (backbone {args.epochs} epochs, heads "
          f"{args.head_epochs} epochs, exits after {', '.join(args.layers)}); pool {pool.samples}, split "
          f"{args.splits} times into calibration {n_cal} / test {n_test}")
    print("pool accuracy per exit: " + ", ".join(f"{name} {acc:.2%}" for name, acc in
                                                 zip([*args.layers, "final"], correct.tolist())))
    print("MACs per exit (fraction of the original model's, own head included): " + ", ".join(
        f"{name} {m / costs.original:.1%}" for name, m in zip([*args.layers, "final"], costs.per_exit)))
    print(f"target: {TARGET}={value:g} ({chosen_by}); delta={delta:g}; the guarantee needs >= {2 * need} "
          f"calibration samples ({need} held out) to certify anything, there are {n_cal} ({n_cal // 2} held out)")

    rows: dict[str, list[dict]] = {name: [] for name, _ in MODES}
    for split in range(args.splits):
        perm = torch.randperm(pool.samples, generator=torch.Generator().manual_seed(10_000 + split))
        cal, test = subset(pool, perm[:n_cal]), subset(pool, perm[n_cal:])
        for name, guarantee in MODES:
            fit = calibrate_cached(spec, cal, costs, target=TARGET, value=value, guarantee=guarantee,
                                   delta=delta, seed=split, warn=False)
            held = figures(fit.spec, test, costs, target=TARGET, value=value, grid=fit.grid, delta=delta,
                           bound_on=None, held_out=True, guarantee=guarantee)
            rows[name].append({"cal_drop": fit.accuracy_drop, "bound": fit.bounds.drop, "met": fit.met,
                               "off": fit.spec.thresholds is None, "drop": held.accuracy_drop,
                               "saving": held.saving, "exceeds": held.accuracy_drop > value + 1e-12,
                               "note": fit.note})
    searched = time.perf_counter()

    # One split again through the public API (network included), to check the cached path gives the same.
    perm = torch.randperm(pool.samples, generator=torch.Generator().manual_seed(10_000))
    loaders = [DataLoader(TensorDataset(images[pool_idx][idx], labels[pool_idx][idx]), batch_size=256)
               for idx in (perm[:n_cal], perm[n_cal:])]
    api = bx.calibrate(module, loaders[0], max_accuracy_drop=value, delta=delta, progress=False, seed=0)
    api_test = api.evaluate(module, loaders[1], progress=False)
    same = (abs(api_test.accuracy_drop - rows["default"][0]["drop"]) < 1e-9
            and abs(api_test.saving - rows["default"][0]["saving"]) < 1e-9)

    n = args.splits
    header = ["mode", "test drop > target", "95% CI (Clopper-Pearson)", "mean test drop", "max test drop",
              "mean test MAC saving", "met on cal", "all exits off"]
    table = []
    for name, guarantee in MODES:
        r = rows[name]
        x = sum(row["exceeds"] for row in r)
        low, high = interval(x, n)
        table.append([
            f"{name} (guarantee=True, delta={delta:g})" if guarantee else f"{name} (guarantee=False)",
            f"{x}/{n} = {x / n:.1%}", f"[{low:.1%}, {high:.1%}]",
            f"{100 * statistics.fmean(row['drop'] for row in r):.2f} pts",
            f"{100 * max(row['drop'] for row in r):.2f} pts",
            f"{statistics.fmean(row['saving'] for row in r):.1%}",
            f"{sum(row['met'] for row in r)}/{n}", f"{sum(row['off'] for row in r)}/{n}"])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()

    default, plain = rows["default"], rows["plain"]
    saving_d = statistics.fmean(row["saving"] for row in default)
    saving_p = statistics.fmean(row["saving"] for row in plain)
    ratio = saving_d / saving_p if saving_p > 0 else math.nan
    x = sum(row["exceeds"] for row in default)
    print(f"MAC saving on test, default / plain: {saving_d:.1%} / {saving_p:.1%} = {ratio:.2f}")
    print(f"default mode, on calibration: mean drop {100 * statistics.fmean(r['cal_drop'] for r in default):.2f} "
          f"pts, mean certified drop bound {100 * statistics.fmean(r['bound'] for r in default):.2f} pts "
          f"(target {100 * value:g})")
    notes = {r["note"] for r in default if r["note"]}
    for note in notes:
        print("note from calibrate:", note)
    print(f"acceptance (default mode's share of splits with test drop > target <= delta={delta:g}): "
          f"{x}/{n} = {x / n:.1%} -> {'PASS' if x / n <= delta else 'FAIL'}")
    print(f"public API check (bx.calibrate + evaluate on split 0 vs the cached path): "
          f"{'same figures' if same else 'DIFFERENT'} (test drop {100 * api_test.accuracy_drop:.2f} pts, "
          f"saving {api_test.saving:.1%})")
    print(f"wall time {time.perf_counter() - started:.1f} s (training {trained - started:.1f} s, caching "
          f"{cached_at - trained:.1f} s, {2 * n} calibrations + evaluations {searched - cached_at:.1f} s, "
          f"API check {time.perf_counter() - searched:.1f} s); torch threads {args.threads}")


if __name__ == "__main__":
    main()
