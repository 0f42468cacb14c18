"""The multi-output module trains under DistributedDataParallel and FSDP2 exactly as in one process.

Two processes (gloo, CPU) train the same small model with two exits for a few steps on halves of
each global batch. Under DDP their parameters must be bit-identical to each other; under FSDP the
gathered full state dict is saved with ``bx.save``. Both must match a single-process run over the
whole global batch.

The model has no BatchNorm on purpose. Under DDP a plain BatchNorm normalises each rank's half
batch with that half's mean and variance, so its forward (and hence every gradient) differs from a
single process that normalises the whole global batch; its running statistics would also be
overwritten by rank 0's at every forward (``broadcast_buffers``). SyncBatchNorm would fix the
forward but needs an accelerator device. Without BatchNorm the only difference is floating-point
summation order, which is what the tolerance below allows for.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import branchify as bx

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
CLASSES = 5
X_SHAPE = (3, 16, 16)
JOIN_TIMEOUT = 60.0  # seconds; each worker spends a few importing torch, then trains for well under one
RTOL, ATOL = 1e-5, 1e-6
ROOT = Path(__file__).resolve().parents[1]


class ResidualNet(nn.Module):
    """A conv stem, a residual block and a classifier: every parameter feeds the final output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


SPEC = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem", weight=0.3), bx.ExitPoint(layer="block", weight=0.2)])


def build(**attach_kwargs) -> bx.ExitModule:
    return bx.attach_exits(ResidualNet(), SPEC, torch.zeros(1, *X_SHAPE), **attach_kwargs).train()


# FSDP needs wrap units that the graph calls; tracing the residual block as a leaf keeps it one
# (docs/distributed.md).
FSDP_ATTACH = {"leaf_modules": [nn.Sequential]}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, *X_SHAPE, generator=generator)
    y = torch.randint(0, CLASSES, (STEPS, GLOBAL_BATCH), generator=generator)
    return x, y


def train(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """SGD with momentum on the batches ``x[step]``; the loss is a mean over the batch given."""
    loss_fn = bx.EarlyExitLoss(SPEC)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for step in range(x.shape[0]):
        optimizer.zero_grad()
        loss_fn(module(x[step]), y[step]).backward()
        optimizer.step()


def worker(rank: int, port: int, directory: str, kind: str) -> None:
    torch.set_num_threads(1)  # two workers on two shared cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        if kind.startswith("stats"):
            stats_worker(rank, directory, kind)
            return
        x, y = data()
        half = GLOBAL_BATCH // WORLD
        x, y = x[:, rank * half:(rank + 1) * half], y[:, rank * half:(rank + 1) * half]
        initial = load_file(os.path.join(directory, "initial.safetensors"))
        (ddp_worker if kind == "ddp" else fsdp_worker)(rank, initial, x, y, directory)
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, initial: dict, x: torch.Tensor, y: torch.Tensor, directory: str) -> None:
    module = build()
    module.load_state_dict(initial)
    # find_unused_parameters stays False: every parameter reaches the loss through some exit, and
    # DDP would raise at the second step if one did not.
    train(DistributedDataParallel(module), x, y)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              os.path.join(directory, f"rank{rank}.safetensors"))


def fsdp_worker(rank: int, initial: dict, x: torch.Tensor, y: torch.Tensor, directory: str) -> None:
    """FSDP2 as docs/distributed.md shows it: block, heads and root as units, then a full state dict saved by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    module = build(**FSDP_ATTACH)
    module.load_state_dict(initial)
    fully_shard(module.block)
    for head in module.exit_heads:
        fully_shard(head)
    fully_shard(module)
    train(module, x, y)
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = build(**FSDP_ATTACH)
        plain.load_state_dict(full)
        bx.save(plain, os.path.join(directory, "fsdp.safetensors"))
    dist.barrier()


STATS_SPEC = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.6), bx.ExitPoint(layer="b", threshold=0.6)],
                         criterion="confidence")


def stats_batches() -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Six batches of three exits' logits and labels, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return [(tuple(torch.randn(5, CLASSES, generator=g) * 3 for _ in range(3)),
             torch.randint(0, CLASSES, (5,), generator=g)) for _ in range(6)]


def stats_of(batches, mode: str) -> bx.ExitStats:
    stats = bx.ExitStats(STATS_SPEC, mode=mode)
    for outputs, target in batches:
        stats.update(outputs, target)
    return stats


def stats_worker(rank: int, directory: str, kind: str) -> None:
    """Each rank updates on its shard (rank 1 on nothing with "stats_empty"), then all_reduce."""
    batches = stats_batches()
    shard = batches[rank::WORLD] if kind == "stats" else (batches if rank == 0 else [])
    for mode in ("routed", "forced"):
        stats = stats_of(shard, mode).all_reduce()
        Path(directory, f"{mode}{rank}.json").write_text(json.dumps(stats.summary().to_dict()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(directory: Path, kind: str) -> None:
    context = mp.start_processes(worker, args=(free_port(), str(directory), kind), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {kind.upper()} workers did not finish within {JOIN_TIMEOUT:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_ddp_training_matches_a_single_process_over_the_global_batch(tmp_path):
    torch.manual_seed(0)
    initial = build()
    assert isinstance(initial, torch.fx.GraphModule)
    start = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    save_file(start, str(tmp_path / "initial.safetensors"))

    run_workers(tmp_path, "ddp")

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert ranks[0].keys() == start.keys()
    for name in start:
        # The gradient all-reduce hands every rank the same bits, and the optimiser step is deterministic.
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    x, y = data()
    train(initial, x, y)
    single = initial.state_dict()
    for name in start:
        moved = (single[name] - start[name]).abs().max()
        assert moved > 100 * ATOL, f"{name} barely trained, so the comparison would prove nothing"
        # DDP averages two half-batch means; one process takes one mean over the whole batch. The two
        # sum in different orders, so float32 rounding differs (measured: at most 1.5e-8 absolute after
        # 3 steps, while every tensor moves by more than 2e-3); the tolerance sits well between the two.
        torch.testing.assert_close(ranks[0][name], single[name], rtol=RTOL, atol=ATOL, msg=name)


def test_fsdp_training_matches_a_single_process_and_saves_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    initial = build(**FSDP_ATTACH)
    assert "block" in dict(initial.named_children())  # traced as a leaf, so FSDP can wrap it
    start = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    save_file(start, str(tmp_path / "initial.safetensors"))

    run_workers(tmp_path, "fsdp")

    # Loaded as any checkpoint is: from the unmodified model, with no process group.
    loaded = bx.load(tmp_path / "fsdp.safetensors", ResidualNet(), torch.zeros(1, *X_SHAPE), **FSDP_ATTACH)
    sharded = loaded.state_dict()
    x, y = data()
    train(initial, x, y)
    single = initial.state_dict()
    assert sharded.keys() == start.keys()
    for name in start:
        moved = (single[name] - start[name]).abs().max()
        assert moved > 100 * ATOL, f"{name} barely trained, so the comparison would prove nothing"
        # FSDP reduce-scatters the mean of the two half-batch gradients, as DDP all-reduces it.
        torch.testing.assert_close(sharded[name], single[name], rtol=RTOL, atol=ATOL, msg=name)


def test_the_torchrun_example_trains_and_saves_a_loadable_checkpoint(tmp_path):
    # The command docs/distributed.md gives (torchrun is torch.distributed.run); --standalone finds a free port.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "examples" / "ddp_train.py"), "--steps", "3", "--out", str(tmp_path / "exits.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOIN_TIMEOUT, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0" in result.stdout and "step 3" in result.stdout

    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    module = bx.load(tmp_path / "exits.safetensors", model, torch.zeros(1, 3, 32, 32))
    assert module.exit_spec.layers == ["layer1", "layer2"]
    assert len(module.eval()(torch.zeros(2, 3, 32, 32))) == 3


def test_saving_a_sharded_module_asks_for_a_full_state_dict(tmp_path):
    from torch.distributed.fsdp import fully_shard

    # A one-process group is enough for fully_shard to turn the parameters into DTensor shards.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        module = build()
        fully_shard(module)
        with pytest.raises(bx.BranchifyError, match="full state dict"):
            bx.save(module, tmp_path / "exits.safetensors")
        assert not (tmp_path / "exits.safetensors").exists()
    finally:
        dist.destroy_process_group()


def assert_same(got, want) -> None:
    """Equal summaries: counts exactly, float sums (losses) up to their summation order."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    else:
        assert got == want


@pytest.mark.parametrize("kind", ["stats", "stats_empty"])
def test_statistics_all_reduced_over_ranks_equal_one_process_over_all_the_data(tmp_path, kind):
    run_workers(tmp_path, kind)
    for mode in ("routed", "forced"):
        whole = stats_of(stats_batches(), mode).summary().to_dict()
        for rank in range(WORLD):
            assert_same(json.loads((tmp_path / f"{mode}{rank}.json").read_text()), json.loads(json.dumps(whole)))


def test_merged_statistics_equal_one_pass_over_all_the_data():
    batches = stats_batches()
    for mode in ("routed", "forced"):
        merged = stats_of(batches[:2], mode).merge(stats_of(batches[2:], mode))
        merged.merge(bx.ExitStats(STATS_SPEC, mode=mode))  # one that saw nothing
        assert_same(merged.summary().to_dict(), stats_of(batches, mode).summary().to_dict())
    with pytest.raises(bx.BranchifyError, match="differ in spec, mode or topk"):
        stats_of(batches, "routed").merge(stats_of(batches, "forced"))
    with pytest.raises(bx.BranchifyError, match="needs torch.distributed initialised"):
        stats_of(batches, "routed").all_reduce()

