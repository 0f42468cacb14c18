"""Per-sample reductions over large CPU batches, computed a block of rows at a time.

Scoring a sample (softmax entropy, cross-entropy, ...) takes several passes over its logits. Over a
whole batch of 100k x 1000 logits every pass goes to main memory; over a block of rows that fits in
the cache only the first one does, which makes the criteria several times faster on the CPU. On
accelerators the whole batch goes in one call, as blocks would only add kernel launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["by_rows"]

# Elements per block: 1 MiB of float32, which with a formula's temporaries stays within a core's L2.
BLOCK_ELEMENTS = 1 << 18


def by_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` for a per-row ``fn`` (row ``i`` of the result depends on row ``i`` of each input only).

    Every tensor is split along dim 0 alike; on the CPU, batches larger than one block go through
    ``fn`` in blocks and the results are concatenated.

    >>> import torch
    >>> z = torch.randn(3000, 1000)
    >>> torch.allclose(by_rows(lambda a: a.logsumexp(-1), z), z.logsumexp(-1))
    True
    """
    first = tensors[0]
    if first.numel() <= BLOCK_ELEMENTS or not first.is_cpu or first.dim() < 2:
        return fn(*tensors)
    rows = max(1, BLOCK_ELEMENTS // (first.numel() // first.shape[0]))
    return torch.cat([fn(*block) for block in zip(*(t.split(rows) for t in tensors))])
