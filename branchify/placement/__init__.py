"""Exit placement sweeps: where do exits pay off? ``search`` (``bx.sweep``), ``heads`` (training every
candidate's head at once), ``tables`` (the exact search per set of exits), ``result`` (``SweepResult``)."""

from .result import FrontierPoint, SweepResult, SweepRow
from .search import sweep

__all__ = ["FrontierPoint", "SweepResult", "SweepRow", "sweep"]
