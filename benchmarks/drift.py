"""Serving under drift: static thresholds against the online calibrator, on digits, two models.

Each model (a small CNN, and an MLP on the flattened image) is trained with ``bx.fit`` on digits (offline,
sklearn's copy), and its thresholds are certified on clean validation data by ``bx.calibrate``, with the
model's own final predictions as labels (so the accuracy drop it bounds is the disagreement with the
original model). The stream: the test images, shuffled and repeated, with Gaussian noise and a brightness
shift that rise over the first two thirds of the stream and then stop (the drift ends). Figures over sliding
windows of 500 served samples (step 250): the share of windows whose disagreement with the original model is
within the target, for the static thresholds and for the online calibrator; the MAC saving of each, against
the saving of thresholds re-chosen per window with hindsight (the cheapest level of the calibrator's path
whose disagreement in that window is within the target); the audit's cost; throughput on one thread.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/drift.py            # about three minutes
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import branchify as bx
from branchify.distiller.data import make_loaders

WINDOW, STEP = 500, 250
SEVERITY = {"cnn": 0.2, "mlp": 0.8}  # the CNN breaks at a weaker drift: at 0.4 no thresholds keep 2% with hindsight


def cnn() -> tuple[nn.Module, bx.ExitSpec]:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    return model, bx.ExitSpec(exits=[bx.ExitPoint(layer="2", criterion="confidence", weight=0.3),
                                     bx.ExitPoint(layer="5", criterion="confidence", weight=0.3)])


def mlp() -> tuple[nn.Module, bx.ExitSpec]:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, bx.ExitSpec(exits=[bx.ExitPoint(layer="2", criterion="confidence", weight=0.3),
                                     bx.ExitPoint(layer="4", criterion="confidence", weight=0.3)])


def stream(images: torch.Tensor, length: int, severity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(images), (length,), generator=g)
    x = images[order].clone()
    level = (torch.arange(length, dtype=torch.float32) / (2 * length / 3)).clamp(max=1.0) * severity
    x += level[:, None, None, None] * torch.randn(x.shape, generator=g)
    x += 0.5 * level[:, None, None, None]  # brightness
    return x


def windows(values: torch.Tensor) -> torch.Tensor:
    return torch.stack([values[s:s + WINDOW].double().mean() for s in range(0, len(values) - WINDOW + 1, STEP)])


def run(name: str, build, loaders, args) -> dict:
    torch.manual_seed(0)
    model, spec = build()
    example = torch.zeros(1, 3, 16, 16)
    module = bx.attach_exits(model, spec, example)
    bx.fit(module, loaders.train, epochs=args.epochs, lr=2e-3, progress=False)
    module.eval()
    val_x = torch.cat([x for x, _ in loaders.val])
    with torch.no_grad():
        own = module(val_x)[-1].argmax(-1)  # the original model's answers are the labels: drop = disagreement
    pseudo = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(val_x, own), batch_size=128)
    cal = bx.calibrate(module, pseudo, max_accuracy_drop=args.target, progress=False)
    module.exit_spec = cal.spec
    runner = bx.ExitRunner(module, example)
    test_x = torch.cat([x for x, _ in loaders.test])
    severity = args.severity if args.severity is not None else SEVERITY[name]
    xs = stream(test_x, args.length, severity, seed=1)
    with torch.no_grad():
        outputs = [torch.cat(z) for z in zip(*(module(xs[s:s + 500]) for s in range(0, len(xs), 500)))]
    final = outputs[-1].argmax(-1)
    costs = bx.exit_costs(module, example)

    start = time.perf_counter()
    static = [runner(xs[s:s + args.batch]) for s in range(0, len(xs), args.batch)]
    static_time = time.perf_counter() - start
    static_pred = torch.cat([r.logits.argmax(-1) for r in static])
    static_macs = torch.cat([r.macs for r in static])

    online = bx.OnlineCalibrator(runner, max_disagreement=args.target, audit_rate=args.audit_rate,
                                 delta=args.delta, window=args.window)
    start = time.perf_counter()
    served = [online(xs[s:s + args.batch]) for s in range(0, len(xs), args.batch)]
    online_time = time.perf_counter() - start
    online_pred = torch.cat([r.logits.argmax(-1) for r in served])
    online_macs = torch.cat([r.macs for r in served])

    # hindsight: per window, the cheapest level of the calibrator's path within the target in that window
    stacked = torch.stack(outputs)
    level_pred, level_macs = [], []
    for thresholds in online.path:
        level_spec = cal.spec.with_exits(threshold=list(thresholds))
        taken = (bx.routing.route(level_spec, outputs[:-1]) if any(t is not None for t in thresholds)
                 else torch.full((len(xs),), len(thresholds)))
        level_pred.append(stacked[taken, torch.arange(len(xs))].argmax(-1))
        per_exit = torch.tensor(costs.judging([t is not None for t in thresholds]).per_exit, dtype=torch.float64)
        level_macs.append(per_exit[taken])
    level_dis = torch.stack([windows(p != final) for p in level_pred])  # (levels, windows)
    level_cost = torch.stack([windows(m) for m in level_macs])
    ok = level_dis <= args.target
    hindsight = torch.where(ok, level_cost, torch.inf).min(0).values
    original = costs.original
    static_dis, online_dis = windows(static_pred != final), windows(online_pred != final)
    saving = {
        "static": 1 - float(windows(static_macs).mean()) / original,
        "online": 1 - float(windows(online_macs).mean()) / original,
        "hindsight": 1 - float(hindsight.mean()) / original,
    }
    report = online.report()
    return {
        "model": name, "severity": severity, "windows": len(static_dis), "calibrated": cal.spec.thresholds,
        "clean_val_disagreement_bound": cal.bounds.accuracy_drop if hasattr(cal.bounds, "accuracy_drop") else None,
        "static_within": float((static_dis <= args.target).double().mean()),
        "static_worst": float(static_dis.max()),
        "online_within": float((online_dis <= args.target).double().mean()),
        "online_worst": float(online_dis.max()),
        "saving": saving, "kept_of_hindsight": saving["online"] / saving["hindsight"],
        "audited": report["audited"], "audit_share_of_macs": report["audit_macs_per_sample"] * len(xs)
        / float(online_macs.sum()),
        "changes": report["changes"],
        "throughput_static": len(xs) / static_time, "throughput_online": len(xs) / online_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=12000)
    parser.add_argument("--severity", type=float, default=None, help=f"noise std at the peak (default {SEVERITY})")
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--audit-rate", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaders = make_loaders("digits", batch_size=64, seed=0, size=(16, 16), augment=False)
    print(f"target {args.target}, delta {args.delta}, audit rate {args.audit_rate}, window {args.window} audited, "
          f"stream {args.length}; windows of {WINDOW} served samples, step {STEP}")
    for name, build in (("cnn", cnn), ("mlp", mlp)):
        r = run(name, build, loaders, args)
        s = r["saving"]
        print(f"{name} (severity {r['severity']}): calibrated {r['calibrated']}; windows within target: "
              f"static {r['static_within']:.0%} "
              f"(worst {r['static_worst']:.3f}), online {r['online_within']:.0%} (worst {r['online_worst']:.3f}); "
              f"MAC saving: static {s['static']:.1%}, online {s['online']:.1%} (audit included), hindsight "
              f"{s['hindsight']:.1%} -> online keeps {r['kept_of_hindsight']:.0%}; audited {r['audited']} "
              f"({r['audit_share_of_macs']:.1%} of the online MACs), {r['changes']} changes; throughput "
              f"static {r['throughput_static']:.0f}/s, online {r['throughput_online']:.0f}/s")


if __name__ == "__main__":
    main()
