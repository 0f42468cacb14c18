"""LM exits, distillation, and self-speculative decoding (bx.generate) against HF's own greedy generate."""

from __future__ import annotations

import pytest
import torch
import transformers

import branchify as bx
from branchify.lm import LMExitModule

VOCAB = 61
PAD = 0


def _model(family: str, dtype=torch.float64, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128,
                                         bos_token_id=1, eos_token_id=2)
        model, prefix = transformers.GPT2LMHeadModel(config), "transformer.h"
    else:
        cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
        config = cfg(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                     eos_token_id=2)
        model, prefix = cls(config), "model.layers"
    return model.to(dtype).eval(), prefix


def _module(family: str, dtype=torch.float64, depth: int = 1, **head):
    model, prefix = _model(family, dtype)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=f"{prefix}.{depth - 1}", head=bx.HeadSpec(kind="lm", **head))])
    return model, bx.attach_exits(model, spec)


def _prompts(batch: int, seed: int = 1):
    """Left-padded prompts of different lengths (row b has b pads)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 8), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :row * 2] = 0
        ids[row, :row * 2] = PAD
    return ids, mask


def _greedy(model, ids, mask, new, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_lm_exit_final_is_the_models_logits_and_exit_reads_its_layer(family):
    model, module = _module(family, depth=2)
    ids, mask = _prompts(3)
    exit_logits, final = module(ids, mask)
    reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(final, reference.logits)
    # the adapter starts at zero: the exit is the model's own norm and lm_head on layer 2's output
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    torch.testing.assert_close(exit_logits, model.lm_head(norm(reference.hidden_states[2])), rtol=0, atol=1e-12)


def test_attach_exits_builds_lm_exits_from_a_spec_of_lm_heads():
    # the normal entry point: a spec (here as a dict, as from JSON) of kind="lm" exits on a causal LM, no example
    # inputs; the result's exits read the layers the spec names, and bx.generate drafts from the second one
    model, _ = _model("llama")
    spec = {"exits": [{"layer": "model.layers.0", "head": {"kind": "lm"}},
                      {"layer": "model.layers.2", "head": {"kind": "lm", "hidden": 4}}]}
    module = bx.attach_exits(model, spec)
    assert isinstance(module, LMExitModule) and module.exit_spec.layers == ["model.layers.0", "model.layers.2"]
    ids, mask = _prompts(2)
    *exits, final = module(ids, mask)
    reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(final, reference.logits)
    for logits, depth in zip(exits, (1, 3)):
        expected = model.lm_head(model.model.norm(reference.hidden_states[depth]))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in module.exit_heads[1].parameters()) == 2 * 32 * 4  # the low-rank adapter
    result = bx.generate(module, ids, mask, max_new_tokens=8, draft_exit=1)
    assert torch.equal(result.sequences, _greedy(model, ids, mask, 8))


def test_attach_exits_refuses_graph_options_for_lm_exits_and_a_classifier_without_example_inputs():
    model, _ = _model("gpt2")
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(kind="lm"))])
    with pytest.raises(bx.BranchifyError, match="capture='fx'.*do not apply"):
        bx.attach_exits(model, spec, capture="fx")
    with pytest.raises(bx.BranchifyError, match="output='logits'.*do not apply"):
        bx.attach_exits(model, spec, output="logits")
    with pytest.raises(bx.BranchifyError, match="needs example_inputs"):
        bx.attach_exits(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), ["0"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_generate_equals_hf_greedy_in_float64(family, batch):
    model, module = _module(family)
    ids, mask = _prompts(batch)
    expected = _greedy(model, ids, mask, 14)
    result = bx.generate(module, ids, mask, max_new_tokens=14, draft_tokens=3)
    assert torch.equal(result.sequences, expected)
    assert result.steps < 14 or result.accepted == 0  # fewer verification steps than tokens when drafts land


def test_generate_rolls_back_rejected_drafts_per_row_and_stays_exact():
    # a Llama whose early exit is a poor draft: rows reject at different places, the output is still the model's
    model, module = _module("llama")
    ids, mask = _prompts(4, seed=3)
    result = bx.generate(module, ids, mask, max_new_tokens=16, draft_tokens=4)
    assert 0 < result.accepted < 1
    assert torch.equal(result.sequences, _greedy(model, ids, mask, 16))


def test_rows_of_a_batch_advance_by_their_own_acceptance():
    # each row of a batch must take exactly the verification steps it takes alone (no row waits for another's
    # rejection, as a lock-step batch advancing by the smallest acceptance would), and output what it outputs alone
    model, module = _module("llama")
    ids, mask = _prompts(4, seed=3)
    batched = bx.generate(module, ids, mask, max_new_tokens=16, draft_tokens=4)
    alone = [bx.generate(module, ids[r:r + 1, mask[r].bool()], max_new_tokens=16, draft_tokens=4)
             for r in range(4)]
    assert len({r.steps for r in alone}) > 1  # the rows accept different numbers of drafts: the test can tell
    assert batched.steps == max(r.steps for r in alone)
    added = sum(r.tokens_per_step * r.steps for r in alone)
    assert batched.tokens_per_step == pytest.approx(added / sum(r.steps for r in alone))
    for r, single in enumerate(alone):
        pads = int((mask[r] == 0).sum())
        assert torch.equal(batched.sequences[r, pads:], single.sequences[0])
    assert torch.equal(batched.sequences, _greedy(model, ids, mask, 16))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_hf_greedy_in_float32(family):
    # float32 is exact here; in general ties within rounding may differ (the docs say so), as in HF's assisted mode
    model, module = _module(family, torch.float32)
    ids, mask = _prompts(4)
    assert torch.equal(bx.generate(module, ids, mask, max_new_tokens=12).sequences, _greedy(model, ids, mask, 12))


def test_generate_without_drafts_is_plain_greedy():
    model, module = _module("llama")
    ids, mask = _prompts(2)
    result = bx.generate(module, ids, mask, max_new_tokens=6, draft_tokens=0)
    assert torch.equal(result.sequences, _greedy(model, ids, mask, 6))
    assert result.tokens_per_step == 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_stops_rows_at_eos_like_hf(family):
    model, module = _module(family)
    ids, mask = _prompts(4)
    free = _greedy(model, ids, mask, 12)
    eos = int(free[1, ids.shape[1] + 2])  # a token row 1 emits third: it stops there, the others maybe later
    expected = _greedy(model, ids, mask, 12, eos_token_id=eos)
    assert expected.shape[1] < free.shape[1] or bool((expected[:, ids.shape[1]:] == PAD).any())
    result = bx.generate(module, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(result.sequences, expected)


def test_eos_inside_an_accepted_draft_block_ends_the_row_there():
    # every draft is accepted, so a row's eos arrives in the middle of a drafted block: the tokens drafted after it
    # must be dropped and the row padded, as HF's greedy generate does
    model, module = _perfect_draft()
    ids, mask = _prompts(4)
    free = _greedy(model, ids, mask, 12)
    eos = int(free[1, ids.shape[1] + 2])  # row 1's third new token: inside the first drafted block of 4
    expected = _greedy(model, ids, mask, 12, eos_token_id=eos)
    assert bool((expected[1, ids.shape[1] + 3:] == PAD).all()) and expected.shape[1] > ids.shape[1] + 3
    result = bx.generate(module, ids, mask, max_new_tokens=12, draft_tokens=4, eos_token_id=eos, pad_token_id=PAD)
    assert result.accepted == 1.0
    assert torch.equal(result.sequences, expected)


def _count_tokens(layers):
    seen = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(
        i, seen[i] + (out[0] if isinstance(out, tuple) else out).shape[1])) for i, layer in enumerate(layers)]
    return seen, handles


def _perfect_draft():
    """GPT-2 whose layers above the first add nothing (their output projections are zero), with an exit after the
    first layer and no adapter: the exit is the model itself, so every draft is accepted."""
    model, prefix = _model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h[1:]:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=f"{prefix}.0", head=bx.HeadSpec(kind="lm",
                                                                                 options={"adapter": "none"}))])
    return model, bx.attach_exits(model, spec)


def test_shared_layers_see_each_token_once_when_every_draft_is_accepted():
    # with a perfect draft each layer must see each token once, exactly as in HF's greedy generate; a
    # draft-then-recompute scheme would run the first layers twice on every drafted token
    model, module = _perfect_draft()
    ids, mask = _prompts(1)
    layers = model.transformer.h
    seen, handles = _count_tokens(layers)
    try:
        expected = _greedy(model, ids, mask, 13)
        hf_seen = list(seen)
        seen[:] = [0] * len(layers)
        result = bx.generate(module, ids, mask, max_new_tokens=13, draft_tokens=4)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(result.sequences, expected)
    assert result.accepted == 1.0 and result.steps < 13
    assert seen == hf_seen == [ids.shape[1] + 12] * len(layers)


def test_a_finished_row_leaves_the_batch():
    # row 0 ends at its first token (eos); from then on the layers must compute row 1 only: after the prefill,
    # every layer sees exactly the (row x token) work row 1 costs when decoded alone
    model, module = _module("llama")
    ids, mask = _prompts(2)
    eos = int(_greedy(model, ids, mask, 1)[0, -1])
    expected = _greedy(model, ids, mask, 12, eos_token_id=eos)
    assert int((expected[1, ids.shape[1]:] != PAD).sum()) > 6  # row 1 goes on: the test can tell
    layers = model.model.layers
    work = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: work.__setitem__(
        i, work[i] + (out[0] if isinstance(out, tuple) else out).shape[:2].numel())) for i, layer in enumerate(layers)]
    try:
        batched = bx.generate(module, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
        in_batch = list(work)
        work[:] = [0] * len(layers)
        row = ids[1:, mask[1].bool()]
        alone = bx.generate(module, row, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(batched.sequences, expected)
    assert torch.equal(batched.sequences[1, 2:2 + alone.sequences.shape[1]], alone.sequences[0])
    assert in_batch == [ids.numel() + w - row.numel() for w in work]


def test_verification_reuses_the_drafts_states_for_the_shared_layers():
    # with rejections: each shared layer ran once per position the upper layers verified, never again for them
    model, module = _module("llama", depth=2)
    ids, mask = _prompts(2)
    seen, handles = _count_tokens(model.model.layers)
    try:
        result = bx.generate(module, ids, mask, max_new_tokens=12, draft_tokens=3)
    finally:
        for handle in handles:
            handle.remove()
    assert result.accepted < 1
    assert seen[0] == seen[1] == seen[2] == seen[3]


def test_distill_trains_only_the_adapters_and_leaves_the_backbone_bit_identical():
    model, module = _module("gpt2", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = module.exit_heads[0].adapter.weight.clone()
    ids = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ids, batch_size=4)
    history = bx.fit(module, loader, epochs=3, mode="distill", lr=1e-2, val_loader=loader, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(module.exit_heads[0].adapter.weight, adapter)
    assert history.loss[-1] < history.loss[0]
    assert history.epochs[-1].val_accuracy[-1] == 1.0 and 0 <= history.epochs[-1].val_accuracy[0] <= 1
    assert all(p.requires_grad for p in model.parameters())  # the freeze was undone


def test_distill_loss_is_zero_when_the_exit_is_the_model():
    # an independent check of the KL: an exit that equals the final output has nothing to learn
    from branchify.lm import distill_loss

    logits = torch.randn(2, 5, VOCAB)
    assert float(distill_loss(1)((logits, logits), torch.ones(2, 5))) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(1)((torch.zeros_like(logits), logits), torch.ones(2, 5))) > 0


def test_refusals():
    model, module = _module("gpt2")
    ids, mask = _prompts(2)
    with pytest.raises(bx.BranchifyError, match="left"):
        bx.generate(module, ids, mask.flip(1), max_new_tokens=3)
    with pytest.raises(bx.BranchifyError, match="kind='lm'"):
        bx.generate(model, ids, mask, max_new_tokens=3)
    with pytest.raises(bx.BranchifyError, match="draft_exit=1"):
        bx.generate(module, ids, mask, max_new_tokens=3, draft_exit=1)
    with pytest.raises(bx.BranchifyError, match="last decoder layer"):
        bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.3",
                                                               head=bx.HeadSpec(kind="lm"))]))
    with pytest.raises(bx.BranchifyError, match="exit 1 .*got kind='linear'"):
        bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(kind="lm")),
                                                  bx.ExitPoint(layer="transformer.h.1")]))
    with pytest.raises(bx.BranchifyError, match="adapter"):
        bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.1", head=bx.HeadSpec(
            kind="lm", options={"adapter": "mlp"}))]))


def test_generation_config_that_changes_greedy_choices_is_refused():
    # HF's greedy generate applies a repetition penalty from the config; bx.generate would silently differ
    model, module = _module("gpt2")
    ids, mask = _prompts(1)
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(bx.BranchifyError, match="repetition_penalty=1.3"):
        bx.generate(module, ids, mask, max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_distilled_draft_agrees_more_and_the_output_stays_the_models(family):
    # end to end on a deeper config: distilling the exit raises its held-out agreement with the model, and with the
    # trained adapter, long continuations of ragged left-padded prompts at several draft lengths are HF's greedy ones
    from branchify.lm import distill_agreement

    model, prefix = _model(family, layers=6, seed=3)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=f"{prefix}.1", head=bx.HeadSpec(kind="lm"))])
    module = bx.attach_exits(model, spec)
    gen = torch.Generator().manual_seed(7)
    train = torch.utils.data.DataLoader(torch.randint(3, VOCAB, (64, 24), generator=gen), batch_size=8)
    held = torch.utils.data.DataLoader(torch.randint(3, VOCAB, (16, 24), generator=gen), batch_size=8)
    before = distill_agreement(module, held, torch.device("cpu"))[0]
    bx.fit(module, train, epochs=10, mode="distill", lr=1e-2, progress=False)
    assert distill_agreement(module, held, torch.device("cpu"))[0] > before
    ids, mask = _prompts(4, seed=5)
    expected = _greedy(model, ids, mask, 40)
    rates = []
    for draft_tokens in (1, 3, 6):
        result = bx.generate(module, ids, mask, max_new_tokens=40, draft_tokens=draft_tokens, pad_token_id=PAD)
        assert torch.equal(result.sequences, expected), draft_tokens
        rates.append(result.accepted)
    assert any(0 < rate < 1 for rate in rates)  # drafts were both kept and rolled back
