"""Temperature scaling (Guo et al. 2017): one temperature per exit head, fitted by minimising the NLL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TEMPERATURE_RANGE = (1e-2, 1e2)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature ``T`` minimising the NLL of ``logits / T`` (Guo et al.), kept in [0.01, 100].

    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> fit_temperature(logits, torch.tensor([0, 1, 1, 0])) > 1  # half wrong: soften
    True
    """
    z = logits.detach().double()
    y = targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    low, high = (math.log(v) for v in _TEMPERATURE_RANGE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped inside the loss so that separable data (optimum T -> 0) cannot run off to infinity.
        loss = F.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    return value if math.isfinite(value) else 1.0


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``logits / temperature``."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))
