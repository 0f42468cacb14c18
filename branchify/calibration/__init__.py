"""Threshold calibration: exit thresholds chosen from data for an accuracy or a compute target.

``cache`` runs the network once; ``temperature`` fits per-head temperatures; ``grid`` evaluates every
threshold combination exactly; ``bounds`` holds the finite-sample bounds; ``search`` chooses
(plain or certified); ``result`` is what the user gets back.
"""

from .result import Calibration
from .search import calibrate

__all__ = ["Calibration", "calibrate"]
