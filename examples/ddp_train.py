"""Train a ResNet-18 with two early exits under DistributedDataParallel, then save it with ``bx.save``.

Launch one process per device with ``torchrun``::

    torchrun --standalone --nproc-per-node=2 examples/ddp_train.py --steps 20

On CPUs the processes talk over gloo; with one GPU per process over NCCL (chosen automatically).
The data are random tensors so that the script runs anywhere: put your own dataset in ``dataset()``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import branchify as bx

NUM_CLASSES = 10


def dataset(size: int = 512) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default="exits.safetensors")
    args = parser.parse_args()

    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process.
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", weight=0.3), bx.ExitPoint(layer="layer2", weight=0.3)])
        # attach_exits traces on a fake tensor, so the example input costs nothing; build on every rank
        # (DDP then copies rank 0's parameters and buffers to the others).
        module = bx.attach_exits(torchvision.models.resnet18(num_classes=NUM_CLASSES), spec,
                                 torch.zeros(1, 3, 32, 32))
        module = module.to(device).train()
        # Every parameter feeds the loss (each exit and the final output carry a weight), so DDP's default
        # find_unused_parameters=False holds. BatchNorm normalises each process's own batch, as usual under DDP.
        ddp = DistributedDataParallel(module, device_ids=[local_rank] if use_cuda else None)
        loss_fn = bx.EarlyExitLoss(module.exit_spec)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

        data = dataset()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
        step, epoch = 0, 0
        while step < args.steps:
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = loss_fn(ddp(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                mean = loss.detach().clone()
                dist.all_reduce(mean)  # gloo has no AVG: sum, then divide
                if rank == 0:
                    print(f"rank 0 step {step} loss {mean.item() / world:.4f}", flush=True)
                if step == args.steps:
                    break
            epoch += 1

        if rank == 0:
            # Save the unwrapped module: bx.save reads its spec and its plain state dict.
            path = bx.save(module, args.out)
            print(f"rank 0 saved {path}", flush=True)
        dist.barrier()  # nobody tears down the group while rank 0 is still writing
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
