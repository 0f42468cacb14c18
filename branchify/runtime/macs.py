"""The runner's table of per-sample MACs, one row per input shape (without the batch dim) and device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MacTable"]


class MacTable:
    """Per-sample MACs of leaving at each exit, kept on the inputs' device, per input shape.

    ``shapes`` lists the input shapes seen, in order (for messages, and for saving a runner).
    ``forget`` drops the figures (a new spec may switch exits off) but keeps the shapes seen.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple, torch.Tensor] = {}
        self.shapes: list[tuple[torch.Size, ...]] = []

    def get(self, device: torch.device, shapes: tuple) -> torch.Tensor | None:
        return self._rows.get((device, *shapes))

    def remember(self, shapes: tuple, per_exit: Sequence[float], device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        row = torch.tensor(list(per_exit), dtype=dtype, device=device)
        self._rows[(device, *shapes)] = row
        if shapes not in self.shapes:
            self.shapes.append(shapes)
        return row

    def forget(self) -> None:
        self._rows.clear()

    def seen(self) -> str:
        """The shapes seen, as ``(B, 3, 224, 224)``; several inputs separated by commas, shapes by semicolons."""
        return "; ".join(", ".join(f"(B, {', '.join(map(str, s))})" for s in shapes) for shapes in self.shapes)

    def since(self) -> str:
        """`` (it has run on ...)`` once it has, else nothing: the tail of an input error."""
        return f" (it has run on {self.seen()})" if self.shapes else ""
