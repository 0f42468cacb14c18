"""branchify: automatic early exits for unmodified PyTorch classifiers.

>>> import torch, torchvision, branchify as bx
>>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
>>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 64, 64))
>>> len(module.eval()(torch.randn(2, 3, 64, 64)))
3
"""

from .calibration import Calibration, calibrate
from .checkpoint import load, save
from .cost import ExitCosts, exit_costs
from .criteria import register_criterion
from .errors import BranchifyError, SpecError
from .freeze import freeze_backbone, unfreeze_backbone
from .generation import GenerateResult, generate
from .heads import register_head
from .layout import Layout
from .loss import EarlyExitLoss
from .online import OnlineCalibrator
from .placement import SweepResult, sweep
from .points import ExitPointInfo, list_exit_points
from .runtime import ExitResult, ExitRunner
from .runtime.benchmark import BenchmarkResult, BenchmarkRow, benchmark
from .spec import ExitPoint, ExitSpec, HeadSpec
from .stats import ExitStats, ExitStatsSummary
from .surgery import ExitModule, attach_exits
from .training import FitEpoch, FitHistory, FitStep, fit

__all__ = [
    "BenchmarkResult",
    "BenchmarkRow",
    "BranchifyError",
    "Calibration",
    "EarlyExitLoss",
    "ExitCosts",
    "ExitModule",
    "ExitPoint",
    "ExitPointInfo",
    "ExitResult",
    "ExitRunner",
    "ExitSpec",
    "ExitStats",
    "ExitStatsSummary",
    "FitEpoch",
    "FitHistory",
    "FitStep",
    "GenerateResult",
    "HeadSpec",
    "OnlineCalibrator",
    "Layout",
    "SpecError",
    "SweepResult",
    "attach_exits",
    "benchmark",
    "calibrate",
    "exit_costs",
    "fit",
    "freeze_backbone",
    "generate",
    "list_exit_points",
    "load",
    "register_criterion",
    "register_head",
    "save",
    "sweep",
    "unfreeze_backbone",
]
__version__ = "0.1.0"
