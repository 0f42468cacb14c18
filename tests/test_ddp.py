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
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

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
        if kind in SHARDED:
            SHARDED[kind](rank, directory)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow  # spawns two processes; the DDP training test stays fast
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



# Calibration and the sweep under torch.distributed: each rank's loader holds a DistributedSampler
# shard; every rank must get the result of one process iterating the whole dataset in order.
CAL_SAMPLES = 61  # odd: DistributedSampler repeats one sample to give both ranks 31
CAL_SPEC = bx.ExitSpec(exits=[bx.ExitPoint(layer="stem"), bx.ExitPoint(layer="block")], criterion="confidence")


def cal_data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(CAL_SAMPLES, *X_SHAPE, generator=generator),
                                          torch.randint(0, CLASSES, (CAL_SAMPLES,), generator=generator))


def cal_module() -> bx.ExitModule:
    torch.manual_seed(3)
    return bx.attach_exits(ResidualNet(), CAL_SPEC, torch.zeros(1, *X_SHAPE)).eval()


def calibrations(module, loader) -> dict:
    """Every calibration figure that should not depend on how the data was spread over ranks."""
    out = {}
    for name, kwargs in {"guarantee": {"max_accuracy_drop": 0.2}, "plain": {"max_accuracy_drop": 0.05,
                                                                          "guarantee": False},
                         "budget": {"mac_budget": 0.7, "guarantee": False}}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few samples for a certificate is fine: the figures must agree
            cal = bx.calibrate(module, loader, progress=False, **kwargs)
        out[name] = {"thresholds": [p.threshold for p in cal.spec.exits], "accuracy": cal.accuracy,
                     "shares": cal.shares, "mac_fraction": cal.mac_fraction, "samples": cal.samples, "met": cal.met,
                     "drop_bound": cal.bounds.drop, "evaluated": cal.evaluate(module, loader, progress=False).accuracy}
    return out


def sharded_loader(data, rank: int, *, batch_size: int, shuffle: bool, drop_last: bool = False):
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=shuffle, seed=11, drop_last=drop_last)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)


def calibrate_worker(rank: int, directory: str) -> None:
    data, module = cal_data(), cal_module()
    result = calibrations(module, sharded_loader(data, rank, batch_size=8, shuffle=True))
    # Without a sampler, ranks holding different samples are refused on every rank (none waits forever).
    mine = torch.utils.data.Subset(data, range(rank, CAL_SAMPLES, WORLD))
    try:
        bx.calibrate(module, torch.utils.data.DataLoader(mine, batch_size=8), max_accuracy_drop=0.1, progress=False)
        result["refused"] = None
    except bx.BranchifyError as err:
        result["refused"] = str(err)
    # Some ranks with a sampler and others without: refused on every rank too.
    mixed = sharded_loader(data, rank, batch_size=8, shuffle=False) if rank == 0 else \
        torch.utils.data.DataLoader(data, batch_size=8)
    try:
        bx.calibrate(module, mixed, max_accuracy_drop=0.1, progress=False)
        result["mixed"] = None
    except bx.BranchifyError as err:
        result["mixed"] = str(err)
    # drop_last=True leaves a sample out: said, not hidden.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal = bx.calibrate(module, sharded_loader(data, rank, batch_size=8, shuffle=False, drop_last=True),
                           max_accuracy_drop=0.1, guarantee=False, progress=False)
    result["drop_last"] = [cal.samples, [str(w.message) for w in caught if "covers" in str(w.message)]]
    Path(directory, f"calibrate{rank}.json").write_text(json.dumps(result))


SWEEP_SAMPLES = 64
SWEEP_RANK_BATCH = 8


def sweep_data() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(SWEEP_SAMPLES + CAL_SAMPLES, *X_SHAPE, generator=generator)
    y = torch.randint(0, CLASSES, (SWEEP_SAMPLES + CAL_SAMPLES,), generator=generator)
    dataset = torch.utils.data.TensorDataset
    return dataset(x[:SWEEP_SAMPLES], y[:SWEEP_SAMPLES]), dataset(x[SWEEP_SAMPLES:], y[SWEEP_SAMPLES:])


def sweeps(train_loader, val_loader) -> dict:
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bx.sweep(ResidualNet(), train_loader, val_loader, candidates=["stem", "block"], epochs=2,
                          max_exits=2, max_accuracy_drop=0.1, progress=False)
    return {"table": [[r.layer, r.accuracy] for r in result.table], "samples": result.samples,
            "best": [[p.layer, p.threshold] for p in result.best.spec.exits], "mac_fraction": result.best.mac_fraction,
            "heads": {layer: {k: v.tolist() for k, v in state.items()}
                      for layer, state in result.head_state_dicts.items()}}


def sweep_worker(rank: int, directory: str) -> None:
    train_data, val_data = sweep_data()
    # shuffle=False: rank r holds samples r, r + 2, ..., so each step's two rank batches together are the
    # one-process loader's batch of 2 * SWEEP_RANK_BATCH consecutive samples.
    result = sweeps(sharded_loader(train_data, rank, batch_size=SWEEP_RANK_BATCH, shuffle=False),
                    sharded_loader(val_data, rank, batch_size=8, shuffle=True))
    Path(directory, f"sweep{rank}.json").write_text(json.dumps(result))


SHARDED = {"calibrate": calibrate_worker, "sweep": sweep_worker}


def assert_close_figures(got, want, what: str = "") -> None:
    """Counts and flags exactly; floats (thresholds, weights) within float32 rounding of summation order."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            assert_close_figures(got[key], want[key], f"{what}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close_figures(a, b, f"{what}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), what
    else:
        assert got == want, what


@pytest.mark.slow
def test_calibration_over_sharded_loaders_equals_one_process_over_the_whole_data(tmp_path):
    run_workers(tmp_path, "calibrate")
    data, module = cal_data(), cal_module()
    whole = json.loads(json.dumps(calibrations(module, torch.utils.data.DataLoader(data, batch_size=8))))
    ranks = [json.loads((tmp_path / f"calibrate{rank}.json").read_text()) for rank in range(WORLD)]
    assert ranks[0] == ranks[1]  # every rank the same result, exactly
    for name in whole:
        assert ranks[0][name]["samples"] == CAL_SAMPLES  # the sampler's repeated sample counted once
        assert_close_figures(ranks[0][name], whole[name], name)
    assert any(t is not None for t in whole["plain"]["thresholds"]), "no exit on: the comparison would be weak"
    samples, said = ranks[0]["drop_last"]
    assert samples == CAL_SAMPLES - 1 and len(said) == 1
    # The messages docs/errors.md lists under torch.distributed, each said on every rank.
    section = (ROOT / "docs" / "errors.md").read_text().split("## Under torch.distributed")[1]
    fragments = re.findall(r"^\*\*Message:\*\* `([^`]+)`$", section, re.M)
    assert len(fragments) == 3
    for rank in ranks:
        messages = [rank["refused"], rank["mixed"], *rank["drop_last"][1]]
        for fragment in fragments:
            assert any(m is not None and fragment in m for m in messages), fragment


@pytest.mark.slow
def test_sweep_over_sharded_loaders_equals_one_process_over_the_whole_data(tmp_path):
    run_workers(tmp_path, "sweep")
    train_data, val_data = sweep_data()
    whole = json.loads(json.dumps(sweeps(torch.utils.data.DataLoader(train_data, batch_size=WORLD * SWEEP_RANK_BATCH),
                                         torch.utils.data.DataLoader(val_data, batch_size=8))))
    ranks = [json.loads((tmp_path / f"sweep{rank}.json").read_text()) for rank in range(WORLD)]
    assert ranks[0] == ranks[1]  # DDP keeps the heads identical, and the search is the same on every rank
    assert ranks[0]["samples"] == CAL_SAMPLES
    assert_close_figures(ranks[0], whole)


@pytest.mark.slow
def test_the_torchrun_evaluation_example_gives_every_rank_the_one_process_figures(tmp_path):
    import torchvision

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "examples" / "ddp_evaluate.py"), "--samples", "101"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=2 * JOIN_TIMEOUT, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {}
    for line in result.stdout.splitlines():
        rank, said = re.match(r"rank (\d) (.*)", line).groups()
        lines.setdefault(said, set()).add(rank)
    assert len(lines) == 3 and all(ranks == {"0", "1"} for ranks in lines.values()), lines  # the same on both

    # One process over the whole data, built as the script builds it.
    torch.manual_seed(0)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])
    module = bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, torch.zeros(1, 3, 32, 32)).eval()
    generator = torch.Generator().manual_seed(1)
    val = torch.utils.data.TensorDataset(torch.randn(101, 3, 32, 32, generator=generator),
                                         torch.randint(0, 10, (101,), generator=generator))
    loader = torch.utils.data.DataLoader(val, batch_size=32)
    stats = bx.ExitStats(module.exit_spec, mode="forced")
    with torch.no_grad():
        for x, y in loader:
            stats.update(module(x), y)
    want = [f"{row.accuracy['top1']:.1f}" for row in stats.summary().exits]
    assert f"forced top-1 per exit {want} over 101 samples" in lines
    cal = bx.calibrate(module, loader, max_accuracy_drop=0.5, guarantee=False, progress=False)
    said = next(s for s in lines if s.startswith("calibrated"))
    got = [None if t == "None" else float(t) for t in re.search(r"\[(.*)\]", said)[1].split(", ")]
    want = [p.threshold for p in cal.spec.exits]
    assert [t is None for t in got] == [t is None for t in want]
    assert [t for t in got if t is not None] == pytest.approx([t for t in want if t is not None], rel=1e-4)
    assert f"on 101 samples, MACs {cal.mac_fraction:.4f}" in said
