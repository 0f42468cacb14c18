"""Token heads on every capture path: padding skipped under the attention mask (mean and last real token),
sequence-first activations, and the layout of GPT-2's blocks. Tiny models from configs, nothing downloaded."""

from __future__ import annotations

import warnings

import pytest
import torch
from by_hand import check_runner
from torch import nn

import branchify as bx

transformers = pytest.importorskip("transformers")

HIDDEN = 32


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3)).eval()


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1)).eval()


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        max_position_embeddings=64)).eval()


IDS = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(4))


def padded(length: int, side: str, positions: bool = False) -> dict:
    """The sentence ``IDS`` padded with zeros to ``length`` on ``side``; ``positions``: with the position ids
    a left-padded GPT-2 needs (counted over the real tokens)."""
    pad = torch.zeros(1, length - IDS.shape[1], dtype=torch.long)
    ids = torch.cat([IDS, pad], 1) if side == "right" else torch.cat([pad, IDS], 1)
    mask = (ids != 0).long() if side == "left" else torch.cat([torch.ones_like(IDS), pad], 1)
    batch = {"input_ids": ids, "attention_mask": mask}
    if positions:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


def hidden_at(model, layer: str, batch: dict) -> torch.Tensor:
    """The layer's output for ``batch``, from a forward hook on the model itself (the reference)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0]


def exits_of(module, batch: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(module(batch)[:-1])


@pytest.mark.parametrize("token", ["mean", pytest.param("last", marks=pytest.mark.slow)])  # "last": test_token_last_*
def test_the_hook_path_skips_padding_as_the_graph_path_does(token):
    model = bert()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="bert.encoder.layer.0", head=bx.HeadSpec(token=token))])
    example = padded(12, "right")
    hooks = _quiet(lambda: bx.attach_exits(model, spec, example, capture="hooks"))
    graph = bx.attach_exits(model, spec, example, capture="export")
    graph.exit_heads.load_state_dict(hooks.exit_heads.state_dict())
    short, long = exits_of(hooks, padded(8, "right"))[0], exits_of(hooks, padded(12, "right"))[0]
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long, exits_of(graph, padded(12, "right"))[0], rtol=1e-5, atol=1e-6)
    # the reference: the head's pooling done by hand on the unpadded sentence
    hidden = hidden_at(model, "bert.encoder.layer.0", {"input_ids": IDS})[0]
    pooled = hidden.mean(0) if token == "mean" else hidden[-1]
    torch.testing.assert_close(short[0], hooks.exit_heads[0][-1](pooled), rtol=1e-5, atol=1e-5)


def test_a_hook_path_call_without_the_mask_its_heads_read_is_refused():
    model = bert()
    module = _quiet(lambda: bx.attach_exits(model, ["bert.encoder.layer.0"], padded(12, "right"), capture="hooks"))
    with pytest.raises(bx.BranchifyError, match="pool the real tokens under the attention mask.*'attention_mask'"):
        module({"input_ids": IDS})


DECODERS = {"gpt2": (gpt2, "transformer.h.0", True), "llama": (llama, "model.layers.0", False)}


@pytest.mark.parametrize("capture", ["export", "hooks"])
@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])  # one decoder fast
def test_token_last_reads_the_last_real_token_left_and_right_padded(name, capture):
    make, layer, positions = DECODERS[name]
    model = make()
    if capture == "export":
        model.config.use_cache = False  # with its cache on, a decoder is captured with hooks only
    example = padded(10, "right", positions)
    module = _quiet(lambda: bx.attach_exits(model, [layer], example, capture=capture))
    hidden = hidden_at(model, layer, {"input_ids": IDS, **({"position_ids": torch.arange(6)[None]} if positions
                                                           else {})})
    # the default head of a causal decoder reads the last real token: gathered here by hand
    expected = module.exit_heads[0][-1](hidden[0, -1])
    for length in (8, 12):
        for side in ("right", "left"):
            got = exits_of(module, padded(length, side, positions))[0][0]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{side} {length}")
    assert module.exit_path == capture
    assert module.exit_points[0].layout is bx.Layout.NLC  # inferred, not declared


def test_without_a_mask_token_last_is_the_last_position():
    model = gpt2()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(token="last"))])
    module = _quiet(lambda: bx.attach_exits(model, spec, {"input_ids": IDS}, capture="hooks"))
    hidden = hidden_at(model, "transformer.h.0", {"input_ids": IDS})
    torch.testing.assert_close(exits_of(module, {"input_ids": IDS})[0], module.exit_heads[0][-1](hidden[:, -1]))


class _Block(nn.Module):
    """A block returning ``(hidden_states, attention weights)``, as many transformer blocks do."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: only the hook path takes it
            x = x + 0
        out, weights = self.attn(x, x, x)
        return self.norm(x + out), weights


class _TupleBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, HIDDEN)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.fc = nn.Linear(HIDDEN, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x, _ = block(x)
        return self.fc(x.mean(1))


def test_a_block_returning_a_tuple_is_read_at_its_first_entry_with_its_layout_inferred():
    torch.manual_seed(0)
    model, ids = _TupleBlocks().eval(), torch.randint(0, 50, (3, 7))
    module = _quiet(lambda: bx.attach_exits(model, ["blocks.0"], ids))
    assert module.exit_path == "hooks" and module.exit_points[0].layout is bx.Layout.NLC
    hidden = hidden_at(model, "blocks.0", {"ids": ids})
    torch.testing.assert_close(exits_of(module, ids)[0], module.exit_heads[0][-1](hidden.mean(1)))


class _SequenceFirst(nn.Module):
    """Input (B, L, C), transposed to (L, B, C) for torch's sequence-first encoders."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=False)
        self.first = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.second = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        h = self.second(self.first(self.embed(x).transpose(0, 1)))
        return self.fc(h.mean(0))


# torch.fx keeps torch's own modules whole, so there the exit is after the first encoder
@pytest.mark.parametrize(("capture", "layer"), [("fx", "first"), ("export", "first.layers.0"),
                                                ("hooks", "first.layers.0")])
@pytest.mark.parametrize("token", ["mean", pytest.param("cls", marks=pytest.mark.slow)])  # the batch dim is the point
def test_sequence_first_exits_pool_each_sample_s_tokens(capture, layer, token):
    torch.manual_seed(0)
    model = _SequenceFirst().eval()
    x = torch.randn(4, 6, 5)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, head=bx.HeadSpec(token=token))])
    module = _quiet(lambda: bx.attach_exits(model, spec, x[:2], capture=capture))
    with torch.no_grad():
        batched = module(x)
        alone = [module(x[i:i + 1]) for i in range(4)]
    assert batched[0].shape == (4, 3)
    for i in range(4):
        torch.testing.assert_close(batched[0][i:i + 1], alone[i][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[-1][i:i + 1], model(x[i:i + 1]), rtol=1e-5, atol=1e-6)
    assert module.exit_path == capture
    assert module.exit_points[0].layout is bx.Layout.LNC and module.exit_points[0].shape == (6, 16)


@pytest.mark.parametrize(("capture", "layer"), [("hooks", "first.layers.0"), ("fx", "first"),
                                              pytest.param("export", "first.layers.0", marks=pytest.mark.slow)])
def test_the_runner_of_a_sequence_first_model_is_exact_on_the_hook_path_and_refused_on_the_graph_paths(capture, layer):
    torch.manual_seed(0)
    model, x = _SequenceFirst().eval(), torch.randn(8, 6, 5)
    module = _quiet(lambda: bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, threshold=0.5)]),
                                            x[:2], capture=capture)).eval()
    if capture == "hooks":
        check_runner(module, [x])  # the hook runner drops no sample from any tensor: exact, as each sample alone
        return
    with pytest.raises(bx.BranchifyError, match=r"crosses the cut after exit 0 with the batch at dim 1.*"
                                                r"batch_first=True.*capture='hooks'"):
        bx.ExitRunner(module)(x)


def test_a_declared_layout_that_puts_the_batch_elsewhere_is_refused():
    torch.manual_seed(0)
    model, x = _SequenceFirst().eval(), torch.randn(2, 6, 5)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="first.layers.0", head=bx.HeadSpec(layout="NLC"))])
    with pytest.raises(bx.BranchifyError, match=r"declared layout NLC has the batch at dim 0.*is dim 1.*'LNC'"):
        bx.attach_exits(model, spec, x, capture="export")
