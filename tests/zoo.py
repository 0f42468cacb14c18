"""The torchvision classification zoo at small input sizes (shared by tests and benchmarks).

Its breadth is the tier's: ``zoo_params()`` marks every builder slow except the fast tier's representatives
(``FAST``, or the names in ``BRANCHIFY_ZOO``: a comma-separated list, or ``all``), so ``make test`` checks
one model per test and ``make check`` the whole zoo.
"""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

FAST = ("resnet18",)  # the library's own example, and among the cheapest at 64x64

# Smallest convenient input per model family: every builder accepts these at random weights.
_SIZE_OVERRIDES = {
    "inception_v3": 96,
    "maxvit_t": 224,  # window partitioning needs 7 | H/32
}
_BUILD_KWARGS = {
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
}


def zoo_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def fast_names() -> set[str]:
    """The builders the fast tier checks: ``FAST`` unless ``BRANCHIFY_ZOO`` names others (or ``all``)."""
    chosen = os.environ.get("BRANCHIFY_ZOO", "").strip()
    if chosen == "all":
        return set(zoo_names())
    names = {name.strip() for name in chosen.split(",") if name.strip()} or set(FAST)
    unknown = names - set(zoo_names())
    if unknown:
        raise ValueError(f"BRANCHIFY_ZOO names {sorted(unknown)}, not torchvision builders; see zoo.zoo_names()")
    return names


def zoo_params() -> list:
    """Every builder as a pytest parameter, slow unless it is one of ``fast_names()``."""
    fast = fast_names()
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in zoo_names()]


def input_size(name: str) -> int:
    if name in _BUILD_KWARGS:
        return _BUILD_KWARGS[name]["image_size"]
    return _SIZE_OVERRIDES.get(name, 64)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **_BUILD_KWARGS.get(name, {}))
