"""One runner serving many threads: every result equals the single-threaded one (issue 16, concurrent use)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision

import branchify as bx
from tests.exits import spread_heads, with_mix

THREADS, CALLS = 8, 25  # 200 calls: each thread's first calls meet the others' on a cost table still filling


def test_one_runner_called_from_eight_threads_gives_the_single_threaded_results():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(16, 3, 32, 32)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")]),
                             x[:1]).eval()
    spread_heads(module, x)
    with_mix(module, x)
    # Mixed batch sizes and two input shapes, so that threads fill the per-shape cost table concurrently.
    g = torch.Generator().manual_seed(1)
    calls = []
    for i in range(THREADS * CALLS):
        size = (24, 24) if i % 3 else (32, 32)
        calls.append(torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 3, *size, generator=g))
    reference = bx.ExitRunner(module)
    with torch.inference_mode():
        expected = [reference(c) for c in calls]
    shared = bx.ExitRunner(module)  # fresh: its cost table fills under contention
    with ThreadPoolExecutor(THREADS) as pool, torch.inference_mode():
        got = list(pool.map(shared, calls))
    for want, have in zip(expected, got):
        assert torch.equal(want.exit_index, have.exit_index)
        assert torch.equal(want.macs, have.macs)
        torch.testing.assert_close(want.logits, have.logits, rtol=1e-5, atol=1e-6)


def test_a_runner_under_inference_mode_takes_a_new_input_shape():
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)]), x[:1]).eval()
    runner = bx.ExitRunner(module, x[:1])
    with torch.inference_mode():
        result = runner(torch.randn(3, 3, 48, 48))  # a shape the runner has not counted yet
        costs = bx.exit_costs(module, torch.randn(1, 3, 48, 48))
    assert result.macs.tolist() == [costs.per_exit[e] for e in result.exit_index.tolist()]


def test_statistics_fed_from_eight_threads_one_per_thread_then_merged_equal_one_pass():
    """The pattern the docs recommend for concurrent updates: an ExitStats per thread, merged at the end."""
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.6)], criterion="confidence")
    g = torch.Generator().manual_seed(2)
    batches = [((torch.randn(6, 4, generator=g) * 3, torch.randn(6, 4, generator=g)), torch.randint(0, 4, (6,),
                                                                                                   generator=g))
               for _ in range(THREADS * CALLS)]
    whole = bx.ExitStats(spec)
    for outputs, target in batches:
        whole.update(outputs, target)

    def feed(part: int) -> bx.ExitStats:
        stats = bx.ExitStats(spec)
        for outputs, target in batches[part::THREADS]:
            stats.update(outputs, target)
        return stats

    with ThreadPoolExecutor(THREADS) as pool:
        parts = list(pool.map(feed, range(THREADS)))
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    assert merged.summary() == whole.summary()
