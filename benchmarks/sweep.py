"""Time of a placement sweep against training one head, on a ResNet-18 at 32x32 inputs.

The sweep trains a head at every default exit point of the model (11 for a ResNet-18 at 32x32)
together, with one frozen-backbone forward per batch, then caches the val logits and searches every
set of at most 3 exits. The reference is what a user would otherwise do for ONE candidate: attach
a single head and train it on the frozen backbone for the same epochs over the same batches. The
naive way to compare candidates repeats that once per candidate; the target for the ratio is <= 1.5.

    .venv/bin/python benchmarks/sweep.py [--train 1024 --val 256 --epochs 2 --batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx


def single_head(model: torch.nn.Module, loader: DataLoader, *, layer: str, epochs: int, lr: float) -> float:
    """Seconds to train one linear head at ``layer`` on the frozen backbone (the reference)."""
    example = next(iter(loader))[0][:1]
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer)]), example)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(module.exit_heads.parameters(), lr=lr)
    module.eval()
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(module(x)[0], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1024, help="training samples")
    parser.add_argument("--val", type=int, default=256, help="validation samples")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layer", default="layer2", help="exit point of the single-head reference")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    train, val = (TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
                  for n in (args.train, args.val))
    train_loader = DataLoader(train, batch_size=args.batch_size)
    val_loader = DataLoader(val, batch_size=args.batch_size)
    with torch.no_grad():
        model(train[: args.batch_size][0])  # warm up the kernels before either timing

    reference = single_head(model, train_loader, layer=args.layer, epochs=args.epochs, lr=3e-3)
    started = time.perf_counter()
    result = bx.sweep(model, train_loader, val_loader, epochs=args.epochs, progress=False)
    swept = time.perf_counter() - started

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 at 32x32, "
          f"{args.train} train / {args.val} val samples, batch {args.batch_size}, {args.epochs} epochs")
    print(f"one head at {args.layer}:                 {reference:7.2f} s")
    print(f"sweep over {len(result.table)} candidates "
          f"({result.sets_searched} sets searched): {swept:7.2f} s")
    print(f"ratio sweep / one head: {swept / reference:.2f}x (target <= 1.5x; "
          f"one training per candidate would be ~{len(result.table)}x)")


if __name__ == "__main__":
    main()
