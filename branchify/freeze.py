"""Freezing the backbone for two-stage training: train the model as usual, then only its exit heads."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .exits import exit_module

__all__ = ["freeze_backbone", "unfreeze_backbone"]

# Freezing state lives on each backbone module, beside what it describes, so that it survives
# copy.deepcopy and pickling of the whole model with the modules it belongs to.
_REQUIRES = "_branchify_requires_grad"  # {parameter name: requires_grad before freezing}
_WANTED = "_branchify_wanted_training"  # the mode a frozen norm was last asked for


def _frozen_train(norm: nn.Module, mode: bool = True) -> nn.Module:
    # Stands in for ``norm.train`` while frozen: the mode asked for is remembered, so that
    # unfreezing lands where the norm would be had it never been frozen, and the norm stays in eval.
    setattr(norm, _WANTED, bool(mode))
    return norm


def freeze_backbone(module: nn.Module) -> nn.Module:
    """Freeze everything but the exit heads: parameters, and normalization statistics in train mode too.

    Every parameter outside ``module.exit_heads`` stops requiring gradients, and every
    normalization layer with running statistics (BatchNorm, InstanceNorm) outside the heads stays
    in eval mode whatever ``.train()`` says, so it normalizes with its stored statistics and never
    updates them. The backbone is shared with the model ``attach_exits`` was given, so that model is
    frozen too. Freezing twice is a no-op; ``bx.unfreeze_backbone`` undoes it exactly. Returns
    ``module``.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 32, 32))
    >>> module = bx.freeze_backbone(module).train()
    >>> trainable = [p for p in module.parameters() if p.requires_grad]
    >>> len(trainable) == len(list(module.exit_heads.parameters())), module.bn1.training
    (True, False)
    >>> bx.unfreeze_backbone(module).bn1.training
    True
    """
    seen = set()
    for owner in _backbone_modules(module):
        # A parameter shared by several modules is recorded once, by the first, before it is frozen.
        flags = {name: p.requires_grad for name, p in owner._parameters.items()
                 if p is not None and id(p) not in seen}
        seen.update(id(p) for p in owner._parameters.values() if p is not None)
        if flags and _REQUIRES not in vars(owner):
            setattr(owner, _REQUIRES, flags)
            for name in flags:
                owner._parameters[name].requires_grad_(False)
        if isinstance(owner, _NormBase) and _WANTED not in vars(owner):
            setattr(owner, _WANTED, owner.training)
            # An instance attribute shadows nn.Module.train, and nn.Module.train reaches children
            # through ``child.train(mode)``, so any later .train()/.eval() on a parent ends up here.
            owner.train = functools.partial(_frozen_train, owner)
            owner.training = False
    return module


def unfreeze_backbone(module: nn.Module) -> nn.Module:
    """Undo ``bx.freeze_backbone``: ``requires_grad`` flags and norm modes back to what they would be.

    Each parameter gets back the ``requires_grad`` it had before freezing; each norm layer gets the
    mode it was last asked for (by ``.train()``/``.eval()`` while frozen, else the one it had), and
    follows ``.train()`` again. A module that is not frozen is returned unchanged.

    >>> import torch, torchvision, branchify as bx
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1")])
    >>> module = bx.attach_exits(torchvision.models.resnet18(), spec, torch.randn(1, 3, 32, 32))
    >>> module = bx.unfreeze_backbone(bx.freeze_backbone(module))
    >>> all(p.requires_grad for p in module.parameters())
    True
    """
    for owner in _backbone_modules(module):
        _unfreeze(owner)
    return module


@contextlib.contextmanager
def frozen_backbone(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with the backbone frozen as ``freeze_backbone`` freezes it, then leave it as it was.

    Only what the block froze is unfrozen: a backbone the caller had frozen stays frozen.
    """
    already = {id(m) for m in _backbone_modules(module) if _REQUIRES in vars(m) or _WANTED in vars(m)}
    freeze_backbone(module)
    try:
        yield module
    finally:
        for owner in _backbone_modules(module):
            if id(owner) not in already:
                _unfreeze(owner)


def _unfreeze(owner: nn.Module) -> None:
    for name, requires_grad in vars(owner).pop(_REQUIRES, {}).items():
        owner._parameters[name].requires_grad_(requires_grad)
    if _WANTED in vars(owner):
        del owner.train
        owner.training = vars(owner).pop(_WANTED)


def _backbone_modules(module: nn.Module) -> list[nn.Module]:
    heads = exit_module(module, "freezing").exit_heads
    inside = {id(m) for m in heads.modules()}
    return [m for m in module.modules() if id(m) not in inside]
