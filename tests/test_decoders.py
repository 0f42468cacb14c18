"""Sequence models in miniature: RoPE values computed from the sequence length crossing every cut, a value
computed across the batch (refused), and timm ViT exits inside a block.

Each case checks the runner against independent references (tests/by_hand.check_runner): the routed module
and each sample run alone with the rule applied by hand, at batch 1 and 8. These are the fast tier's
representatives; the Hugging Face models themselves (Llama, Qwen2, Mistral, ModernBERT, ALBERT, GPT-2: right
and left padding, padding invariance, save/load, ONNX) are tests/test_transformers.py's slow grid, since
torch.export of a decoder takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from by_hand import check_runner
from torch import nn

import branchify as bx

SEQ = 10
PAD = 0


# --- the analysis itself, on small models (fast) --------------------------------------------------------------

class Rotary(nn.Module):
    """A RoPE model in miniature: cos/sin computed once from the sequence length (shape (1, L, D), no batch
    dim), read by every layer, so every cut between layers crosses them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.fc = nn.Linear(16, 3)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(8, dtype=torch.float32) / 8), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(ids.shape[1], dtype=torch.float32)
        freqs = positions[None, :, None] * self.inv_freq
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        for layer in self.layers:
            x = x + torch.tanh(layer(x * cos + x.flip(-1) * sin))
        return self.fc(x.mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rotary_values_computed_from_the_sequence_length_cross_every_cut(capture):
    torch.manual_seed(0)
    model = Rotary().eval()
    ids = torch.randint(0, 50, (8, SEQ), generator=torch.Generator().manual_seed(1))
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layers.0"), bx.ExitPoint(layer="layers.2")])
    module = bx.attach_exits(model, spec, ids[:1], capture=capture).eval()
    assert module.exit_path == capture
    with torch.no_grad():
        assert torch.equal(module(ids)[-1], model(ids))
    check_runner(module, [ids])
    # a shorter sequence: the rotary values are rebuilt for its length in every stage, none kept from the last call
    check_runner(module, [ids[:, :6]])


class BatchMean(nn.Module):
    """A value computed across the samples of the batch (no batch dim) and read after the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x.mean(0, keepdim=True)
        return self.fc(self.b(self.a(x)) - centre)


def test_a_value_computed_across_the_batch_is_refused_not_carried():
    module = bx.attach_exits(BatchMean().eval(), bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5)]),
                             torch.randn(2, 6))
    with pytest.raises(bx.BranchifyError, match=r"value 'mean' crosses the cut after exit 0.*move the exit"):
        bx.ExitRunner(module)(torch.randn(4, 6))


# --- timm ViT: exits inside a block ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [["blocks.3.attn", "blocks.3.mlp"], ["blocks.1.norm1", "blocks.2.attn"]])
def test_timm_vit_exits_inside_a_block(layers):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2, num_classes=5).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers]), x[:1])
    with torch.no_grad():
        assert torch.equal(module(x)[-1], model(x))
    check_runner(module, [x])
