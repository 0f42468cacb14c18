"""branchify: automatic early exits for unmodified PyTorch classifiers.

>>> import torch, torchvision, branchify as bx
>>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer3")])
>>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 64, 64))
>>> len(module.eval()(torch.randn(2, 3, 64, 64)))
3
"""

from .cost import ExitCosts, exit_costs
from .criteria import register_criterion
from .errors import BranchifyError
from .heads import register_head
from .layout import Layout
from .points import ExitPointInfo, list_exit_points
from .spec import ExitPoint, ExitSpec, HeadSpec
from .surgery import ExitModule, attach_exits

__all__ = [
    "BranchifyError",
    "ExitCosts",
    "ExitModule",
    "ExitPoint",
    "ExitPointInfo",
    "ExitSpec",
    "HeadSpec",
    "Layout",
    "attach_exits",
    "exit_costs",
    "list_exit_points",
    "register_criterion",
    "register_head",
]
__version__ = "0.1.0"
