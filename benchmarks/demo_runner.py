"""Wall time of ExitRunner against the original model on the demo's trained checkpoint.

Run ``make demo`` first (it writes ``runs/demo/checkpoint.safetensors``), then:

    python benchmarks/demo_runner.py [--threads 1] [--repeats 5]

All three are timed in the same run over the same test batches, medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import branchify as bx
from branchify.distiller.data import make_loaders
from branchify.runtime.benchmark import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint.safetensors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = torchvision.models.resnet18(num_classes=10)
    example = torch.zeros(1, 3, 32, 32)
    module = bx.load(args.checkpoint, model, example).eval()
    model.eval()
    runner = bx.ExitRunner(module, example)
    batches = [x for x, _ in make_loaders("digits", batch_size=64, seed=0).test]

    def original():
        with torch.inference_mode():
            return [model(x) for x in batches]

    def multi_output():
        with torch.inference_mode():
            return [module(x) for x in batches]

    def routed():
        return [runner(x) for x in batches]

    runs = {"original": original, "multi-output module": multi_output, "ExitRunner": routed}
    times = interleaved([runs], args.repeats)  # after a warm-up, in an order that rotates every repeat
    med = {name: statistics.median(values) for name, values in times.items()}
    results = routed()
    taken = torch.cat([r.exit_index for r in results]).bincount(minlength=3)
    macs = torch.cat([r.macs for r in results]).mean().item()
    original_macs = bx.exit_costs(module, example).original
    for name, value in med.items():
        print(f"{name:<20} {1e3 * value:8.1f} ms")
    print(f"exits taken {taken.tolist()}, MACs saved {100 * (1 - macs / original_macs):.1f}%, "
          f"speedup {med['original'] / med['ExitRunner']:.2f}x (MAC ideal {original_macs / macs:.2f}x)")


if __name__ == "__main__":
    main()
