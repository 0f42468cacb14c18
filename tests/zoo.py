"""The torchvision classification zoo at small input sizes (shared by tests and benchmarks)."""

from __future__ import annotations

import torch
import torchvision

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


def input_size(name: str) -> int:
    if name in _BUILD_KWARGS:
        return _BUILD_KWARGS[name]["image_size"]
    return _SIZE_OVERRIDES.get(name, 64)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **_BUILD_KWARGS.get(name, {}))
