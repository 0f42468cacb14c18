"""Early exits for a ResNet-18 on scikit-learn's digits: train, sweep, calibrate, check on held-out data.

The only real images available offline are scikit-learn's bundled digits (1797 grey 8x8 images,
10 classes). They are upscaled to 32x32 and replicated to 3 channels, then split 60/20/20 into
train / val / test (fixed seed). The steps:

1. train an unmodified ``torchvision.models.resnet18(num_classes=10)`` on train;
2. ``bx.sweep``: a head at every default exit point, trained together on the frozen backbone (train),
   the best set of at most 3 exits for a 3-point accuracy drop chosen on val;
3. ``bx.calibrate`` on val: the thresholds for at most a 3-point drop on new data, guaranteed with
   probability 90% (the default; 359 val samples are too few for a 1-point guarantee, which needs 598),
   with temperature scaling;
4. the same thresholds evaluated on test, which neither the heads nor the thresholds have seen.

Run it with ``python examples/digits_calibration.py`` (about 3 minutes on 2 quiet CPU cores, most of it
training the ResNet-18). Measured (seed 0): exits after maxpool, layer3.0 and layer3; on val (the
calibration data) no drop at 73.3% of the original MACs, the drop bound 2.61 points; on test 98.33%
-> 98.33%, no drop, at 73.5% of the original MACs (a 26.5% saving).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import branchify as bx

TARGET = 0.03  # accuracy drop against the final exit, on new data


def digits_splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as 3x32x32 tensors (normalised), split 60/20/20 into train / val / test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    parts = order[:cut1], order[cut1:cut2], order[cut2:]
    return tuple(TensorDataset(images[idx], labels[idx]) for idx in parts)  # type: ignore[return-value]


def train_model(model: torch.nn.Module, loader: DataLoader, *, epochs: int, lr: float) -> None:
    """The plain model, trained as any PyTorch classifier is: it has no exits yet (``bx.fit`` trains modules with
    exits; the sweep below trains its candidate heads as ``bx.fit(module, ..., mode="heads")`` does)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def run(*, epochs: int = 6, head_epochs: int = 5, seed: int = 0, progress: bool = True,
        plot: str | None = None) -> dict:
    """Run the whole pipeline and return the figures (val: calibration data, test: held out)."""
    torch.manual_seed(seed)
    train, val, test = digits_splits(seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=generator)
    val_loader = DataLoader(val, batch_size=256)
    test_loader = DataLoader(test, batch_size=256)

    started = time.perf_counter()
    model = torchvision.models.resnet18(num_classes=10)
    train_model(model, train_loader, epochs=epochs, lr=1e-3)
    trained = time.perf_counter()

    result = bx.sweep(model, train_loader, val_loader, epochs=head_epochs, max_accuracy_drop=TARGET, seed=seed,
                      progress=progress)
    swept = time.perf_counter()
    if plot:
        result.plot(plot)

    example = val[:1][0]
    module = result.attach(model, example)
    calibration = bx.calibrate(module, val_loader, max_accuracy_drop=TARGET, temperature=True, progress=progress)
    held_out = calibration.evaluate(module, test_loader, progress=progress)
    return {
        "sweep": result,
        "calibration": calibration,
        "test": held_out,
        "layers": calibration.spec.layers,
        "val_drop": calibration.accuracy_drop,
        "val_saving": calibration.saving,
        "test_drop": held_out.accuracy_drop,
        "test_saving": held_out.saving,
        "test_final_accuracy": held_out.final_accuracy,
        "seconds": {"train": trained - started, "sweep": swept - trained,
                    "calibrate": time.perf_counter() - swept},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs to train the ResNet-18")
    parser.add_argument("--head-epochs", type=int, default=5, help="epochs to train the sweep's heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the sweep's plot to this PNG file")
    args = parser.parse_args()
    figures = run(epochs=args.epochs, head_epochs=args.head_epochs, seed=args.seed, plot=args.plot)
    print(figures["sweep"], end="\n\n")
    print("calibrated on val:", figures["calibration"], sep="\n", end="\n\n")
    print("held-out test:", figures["test"], sep="\n", end="\n\n")
    print(f"test: accuracy drop {100 * figures['test_drop']:.2f} points, MAC saving {figures['test_saving']:.1%} "
          f"(final exit {figures['test_final_accuracy']:.2%}); seconds: "
          + ", ".join(f"{k} {v:.1f}" for k, v in figures["seconds"].items()))


if __name__ == "__main__":
    main()
