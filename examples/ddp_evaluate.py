"""Evaluate, calibrate and sweep exits on many processes: each rank reads its shard, every rank gets the whole answer.

Launch one process per device with ``torchrun``::

    torchrun --standalone --nproc-per-node=2 examples/ddp_evaluate.py
    torchrun --standalone --nproc-per-node=2 examples/ddp_evaluate.py --checkpoint exits.safetensors

``--checkpoint`` takes the file ``examples/ddp_train.py`` writes; without it the exits are untrained. The
data are random tensors so that the script runs anywhere: put your validation set in ``dataset()``. Each
rank's loader holds a ``DistributedSampler`` shard; ``stats.all_reduce()``, ``bx.calibrate`` and
``bx.sweep`` combine the shards, so every rank prints the figures one process over all the data gives.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import branchify as bx

NUM_CLASSES = 10
EXAMPLE = torch.zeros(1, 3, 32, 32)


def dataset(size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a file written by examples/ddp_train.py")
    parser.add_argument("--samples", type=int, default=301, help="validation samples (any count: no rank is short)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--sweep-epochs", type=int, default=1)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # the same untrained exits on every rank when no checkpoint is given
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        if args.checkpoint:
            module = bx.load(args.checkpoint, model, EXAMPLE)
        else:
            spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])
            module = bx.attach_exits(model, spec, EXAMPLE)
        module = module.to(device).eval()

        val = dataset(args.samples, seed=1)
        # bx.calibrate and bx.sweep place each sample by its index in the sampler and drop the repeats.
        loader = DataLoader(val, batch_size=args.batch_size,
                            sampler=DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False))

        # DistributedSampler repeats a few samples so that every rank gets as many; ExitStats cannot tell a repeat
        # from a sample, so for exact statistics each rank takes every world-th sample instead.
        shard = DataLoader(Subset(val, range(rank, len(val), world)), batch_size=args.batch_size)
        stats = bx.ExitStats(module.exit_spec, mode="forced")
        with torch.no_grad():
            for x, y in shard:
                stats.update(module(x.to(device)), y)
        summary = stats.all_reduce().summary()  # every rank: the whole validation set
        accuracies = [f"{row.accuracy['top1']:.1f}" for row in summary.exits]
        print(f"rank {rank} forced top-1 per exit {accuracies} over {summary.samples} samples", flush=True)

        cal = bx.calibrate(module, loader, max_accuracy_drop=0.5, guarantee=False, progress=False)
        thresholds = [None if p.threshold is None else round(p.threshold, 6) for p in cal.spec.exits]
        print(f"rank {rank} calibrated thresholds {thresholds} on {cal.samples} samples, "
              f"MACs {cal.mac_fraction:.4f}", flush=True)

        train = dataset(256, seed=2)
        train_loader = DataLoader(train, batch_size=args.batch_size,
                                  sampler=DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True))
        # The heads train under DistributedDataParallel; every rank ends with the same heads and proposal.
        result = bx.sweep(torchvision.models.resnet18(num_classes=NUM_CLASSES).to(device), train_loader, loader,
                          candidates=["layer1", "layer2", "layer3"], epochs=args.sweep_epochs, max_exits=2,
                          max_accuracy_drop=0.5, progress=False)
        print(f"rank {rank} sweep proposes {[p.layer for p in result.best.spec.exits]} on {result.samples} samples",
              flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
