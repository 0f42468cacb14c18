"""Exit modules share their model's submodules, so they share its train/eval modes too.

An exit module holds the model's own layers (as torchvision's feature extractors do): the weights are
shared on purpose, and so is each layer's ``training`` flag, which lives on the layer. ``.eval()`` on
one exit module therefore switches BatchNorm and Dropout in the model and in every other exit module
built on it. That is PyTorch's rule for shared submodules, kept exactly; what is not kept silent is
building a second exit module on a model that already backs a live one: it warns, with the way to
keep them apart (``copy.deepcopy(model)`` for each).
"""

from __future__ import annotations

import gc
import warnings
import weakref

from torch import nn

__all__ = ["note_built_on"]

_BUILT_ON: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def note_built_on(model: nn.Module, module: nn.Module) -> None:
    """Record that ``module`` was built on ``model``; warn when another live exit module already was."""
    others = _BUILT_ON.setdefault(model, weakref.WeakSet())
    if len(others):
        gc.collect()  # graph modules hold reference cycles: one that is no longer used may wait for the collector
    if len(others):
        warnings.warn(
            f"this {type(model).__name__} already backs another exit module that is still alive; they share the "
            "model's layers, so its parameters and its layers' train/eval modes (BatchNorm, Dropout): .eval() or "
            ".train() on one switches the other and the model too. Attach each to its own copy "
            "(bx.attach_exits(copy.deepcopy(model), ...)) to keep them apart", UserWarning, stacklevel=3)
    others.add(module)
