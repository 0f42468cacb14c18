"""How long attach_exits takes, as a multiple of one batch-1 forward of the same model.

Both are measured in the same run on the same machine, so the ratio holds on a noisy shared box.
Targets (issue 2): resnet50 <= 5 forwards; surgery over the whole torchvision zoo <= 60 s on 2 cores.

    python benchmarks/surgery.py            # the five models and the whole zoo
    python benchmarks/surgery.py --quick    # the five models only
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision

import branchify as bx

MODELS = ["resnet50", "vit_b_16", "convnext_tiny", "swin_t", "maxvit_t"]


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spec_for(model: torch.nn.Module, x: torch.Tensor) -> bx.ExitSpec:
    points = [p for p in bx.list_exit_points(model, x) if 0.15 < p.macs_fraction < 0.9]
    return bx.ExitSpec(exits=[bx.ExitPoint(layer=points[len(points) // 3].name),
                              bx.ExitPoint(layer=points[2 * len(points) // 3].name)])


def attach_and_forward(name: str, repeats: int) -> tuple[float, float]:
    """Median seconds of attach_exits and of one batch-1 forward of the same model."""
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, input_size(name), input_size(name))
    spec = spec_for(model, x)
    with torch.inference_mode():
        model(x)  # warm-up
        forward = median_time(lambda: model(x), repeats)
    return median_time(lambda: bx.attach_exits(model, spec, x), repeats), forward


def attach_once(name: str) -> float:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, input_size(name), input_size(name))
    spec = spec_for(model, x)
    start = time.perf_counter()
    bx.attach_exits(model, spec, x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the whole-zoo pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")

    print(f"{'model':<16} {'attach s':>9} {'forward s':>10} {'ratio':>7}")
    for name in MODELS:
        attach, forward = attach_and_forward(name, args.repeats)
        print(f"{name:<16} {attach:9.3f} {forward:10.3f} {attach / forward:7.2f}", flush=True)

    if args.quick:
        return
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    total, slowest = 0.0, ("", 0.0)
    for name in names:
        elapsed = attach_once(name)
        total += elapsed
        slowest = max(slowest, (name, elapsed), key=lambda item: item[1])
    print(f"whole zoo: {len(names)} models, attach_exits total {total:.1f} s "
          f"(slowest {slowest[0]} {slowest[1]:.2f} s)")


if __name__ == "__main__":
    main()
