"""Hugging Face transformers (5.x, no FX tracer of their own): captured with torch.export, exits by module path.

Models are built from small configs with random weights; nothing is downloaded.
"""

from __future__ import annotations

import functools

import pytest
import torch
from by_hand import by_hand, check_runner
from exits import check_exits, logits_of, with_mix
from torch.utils.data import DataLoader

import branchify as bx
from branchify.heads import GlobalPool

transformers = pytest.importorskip("transformers")

SEQ = 12
HIDDEN = 32


def bert_config(**extra):
    return dict(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
                intermediate_size=64, num_labels=3, **extra)


def token_batch(vocab: int, offset: int = 0):
    """``n -> the first n rows`` of one fixed batch of 8 sentences, each padded by one more position."""
    ids = torch.randint(offset, vocab, (8, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(8, SEQ, dtype=torch.long)
    for i in range(8):
        mask[i, SEQ - i:] = 0
    return lambda n: {"input_ids": ids[:n], "attention_mask": mask[:n]}


def pixel_batch():
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return lambda n: pixels[:n]


CASES = {
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**bert_config())),
             ["bert.encoder.layer.0", "bert.encoder.layer.2"], token_batch(100)),
    "distilbert": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=100, dim=HIDDEN, n_layers=4, n_heads=2, hidden_dim=64, num_labels=3)),
        ["distilbert.transformer.layer.0", "distilbert.transformer.layer.2"], token_batch(100)),
    "roberta": (lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **bert_config(max_position_embeddings=40))), ["roberta.encoder.layer.0", "roberta.encoder.layer.2"],
        token_batch(100, offset=3)),  # ids 0-2 are RoBERTa's special tokens
    "deberta-v2": (lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        **bert_config(max_position_embeddings=40))), ["deberta.encoder.layer.0", "deberta.encoder.layer.2"],
        token_batch(100)),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=5)), ["vit.layers.0", "vit.layers.2"], pixel_batch()),
}


def build(name: str):
    torch.manual_seed(0)
    return CASES[name][0]().eval()


@pytest.mark.parametrize("name", [n if n in ("bert", "vit") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])  # one encoder and one image model fast
def test_exits_are_exact_and_routed_per_sample(name):
    make, layers, inputs = CASES[name]
    module = check_exits(build(name), layers, inputs, channels=[HIDDEN, HIDDEN], path="export")
    assert all(p.layout is bx.Layout.NLC for p in module.exit_points)


def test_padding_does_not_change_a_sentence_s_exit_logits():
    model = build("bert")
    inputs = token_batch(100)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="bert.encoder.layer.0"),  # mean over the real tokens
                              bx.ExitPoint(layer="bert.encoder.layer.2", head=bx.HeadSpec(token="cls"))])
    module = bx.attach_exits(model, spec, inputs(2))
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    short = {"input_ids": ids, "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    pad = torch.zeros(1, 7, dtype=torch.long)
    long = {"input_ids": torch.cat([ids, pad], 1), "attention_mask": torch.cat([short["attention_mask"], pad], 1)}
    with torch.no_grad():
        a, b = module(short), module(long)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # without the mask the mean would change with the padding: the check above is not vacuous
    hidden = {}
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda m, a, out: hidden.setdefault(len(hidden), out))
    with torch.no_grad():
        model(**short), model(**long)
    handle.remove()
    assert not torch.allclose(hidden[0].mean(1), hidden[1].mean(1), atol=1e-3)


def test_the_module_and_the_runner_take_the_dict_or_its_keywords():
    model, (_, layers, inputs) = build("bert"), CASES["bert"]
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layers[0])]), inputs(1))
    batch = inputs(8)
    with torch.no_grad():
        positional, named = module(batch), module(**batch)
        assert all(torch.equal(a, b) for a, b in zip(positional, named))
        assert torch.equal(named[-1], model(**batch).logits)
    with_mix(module, batch)
    runner = bx.ExitRunner(module)
    assert torch.equal(runner(batch).exit_index, runner(**batch).exit_index)
    with pytest.raises(bx.BranchifyError, match=r"unknown input\(s\) \['labels'\].*captured with inputs"):
        module({**batch, "labels": torch.zeros(8, dtype=torch.long)})


def test_loaders_of_dicts_with_labels_feed_costs_statistics_and_calibration():
    model, (_, layers, inputs) = build("bert"), CASES["bert"]
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers]), inputs(1))
    batch = inputs(8)
    rows = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "labels": torch.tensor(i % 3)} for i in range(8)]
    loader = DataLoader(rows, batch_size=4)
    costs = bx.exit_costs(module, inputs(1))
    assert costs.exits[0] < costs.exits[1] < costs.full
    # guarantee=False: a handful of sentences cannot certify anything (the guarantee would switch every exit off)
    calibration = bx.calibrate(module, loader, max_accuracy_drop=0.5, guarantee=False, progress=False)
    assert len(calibration.spec.exits) == 2
    stats = bx.ExitStats(calibration.spec)
    with torch.no_grad():
        for row in loader:
            stats.update(module({k: v for k, v in row.items() if k != "labels"}), row["labels"])
    summary = stats.summary()
    assert summary.samples == 8 and sum(row.taken for row in summary.exits) == 8


def test_an_output_entry_other_than_logits_can_be_picked():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
            self.cls = torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.body(x)
            return {"features": h, "scores": self.cls(h)}

    model, x = Pair().eval(), torch.randn(5, 6)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="body.0")])
    with pytest.raises(bx.BranchifyError, match=r"returns a dict \(entries: 'features', 'scores'\) with no 'logits'.*"
                                                r"output="):
        bx.attach_exits(model, spec, x)
    module = bx.attach_exits(model, spec, x, output="scores")
    assert torch.equal(module(x)[-1], model(x)["scores"])
    with pytest.raises(bx.BranchifyError, match=r"output='nope'.*entries: 'features', 'scores'"):
        bx.attach_exits(model, spec, x, output="nope")


def test_exit_points_are_listed_by_module_path():
    model, inputs = build("bert"), CASES["bert"][2]
    names = [p.name for p in bx.list_exit_points(model, inputs(1))]
    assert {"bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"} <= set(names)


def test_the_final_output_is_the_model_s_logits_bit_for_bit_in_train_mode_too():
    model, (_, layers, inputs) = build("distilbert"), CASES["distilbert"]
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layers[0])]), inputs(1))
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(inputs(8))[-1], logits_of(model(**inputs(8))))
    module.train()
    torch.manual_seed(3)
    train_final = module(inputs(8))[-1]
    model.train()
    torch.manual_seed(3)
    assert torch.equal(train_final, model(**inputs(8)).logits), "dropout follows the train graph"


@pytest.mark.slow  # trains heads per candidate on BERT; tests/test_sweep covers the sweep fast
def test_a_sweep_takes_dict_batches_with_labels_and_lists_module_paths():
    model = build("bert")
    batch = token_batch(100)(8)
    pairs = [({"input_ids": batch["input_ids"][i:i + 4], "attention_mask": batch["attention_mask"][i:i + 4]},
              torch.arange(i, i + 4) % 3) for i in (0, 4)]
    result = bx.sweep(model, pairs, pairs, epochs=1, max_exits=1, progress=False)
    layers = [row.layer for row in result.table]
    assert {"bert.encoder.layer.0", "bert.encoder.layer.1"} <= set(layers)
    assert all(row.macs_fraction < 1 for row in result.table)


def test_vit_exit_points_are_listed_by_module_path():
    names = [p.name for p in bx.list_exit_points(build("vit"), pixel_batch()(1))]
    assert {"vit.layers.0", "vit.layers.1", "vit.layers.2"} <= set(names)


# --- the models people bring now: RoPE decoders, GPT-2, ALBERT, ModernBERT (issue 21) -------------------------
#
# Each family's classifier from a 3-layer config, exits after its first two layers (ALBERT: the first two calls
# of its one shared layer), checked against independent references: the model's own logits (bit for bit),
# tests/by_hand (each sentence run alone, the rule applied by hand) for the runner, its saved copy and its ONNX
# file, at batch 1 and 8, right and left padded, at the capture's length and others. torch.export of a decoder
# takes 5-30 s on two shared cores, so the grid is in the slow tier; tests/test_decoders.py keeps a RoPE model
# in miniature in the fast one.

def _decoder(**extra):
    return dict(vocab_size=100, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1, max_position_embeddings=64,
                use_cache=False, **extra)  # use_cache=False: with its key/value cache on, a decoder takes hooks


ALBERT_LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0"
FAMILIES = {
    "llama": (lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        **_decoder(num_key_value_heads=1))), ["model.layers.0", "model.layers.1"]),
    "qwen2": (lambda: transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(
        **_decoder(num_key_value_heads=1))), ["model.layers.0", "model.layers.1"]),
    "mistral": (lambda: transformers.MistralForSequenceClassification(transformers.MistralConfig(
        **_decoder(num_key_value_heads=1, sliding_window=None))), ["model.layers.0", "model.layers.1"]),
    "gpt2": (lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=3, n_head=2, n_positions=64, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, use_cache=False)), ["transformer.h.0", "transformer.h.1"]),
    "albert": (lambda: transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=37, num_labels=3)), [f"{ALBERT_LAYER}:0", f"{ALBERT_LAYER}:1"]),
}
if hasattr(transformers, "ModernBertForSequenceClassification"):  # transformers >= 4.48
    FAMILIES["modernbert"] = (lambda: transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1,
        max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8)),
        ["model.layers.0", "model.layers.1"])
CAUSAL = {"llama", "qwen2", "mistral", "gpt2"}
ROPE = {"llama", "qwen2", "mistral", "modernbert"}


def padded(side: str, n: int = 8, length: int = SEQ, seed: int = 1, positions: bool = False) -> dict:
    """``n`` sentences of ``length`` positions, sentence ``i`` padded by ``i % 4`` positions on ``side``;
    ``positions``: with the position ids that count the real tokens only (what a left-padded batch needs for
    a model with positions to see each sentence as it sees it alone)."""
    ids = torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        if i % 4:
            mask[i, length - i % 4:] = 0 if side == "right" else 1
            mask[i, :i % 4] = 0 if side == "left" else 1
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if positions:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


@functools.cache
def family(name: str, positions: bool = False) -> tuple[torch.nn.Module, bx.ExitModule, bx.ExitRunner]:
    """The family's model, its exit module (captured with or without position ids) and the runner, checked
    once against by_hand: right and left padded, batch 8 and one sentence."""
    torch.manual_seed(0)
    make, layers = FAMILIES[name]
    model = make().eval()
    module = bx.attach_exits(model, bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers]),
                             padded("right", 2, positions=positions)).eval()
    batches = [padded(side, positions=positions) for side in ("right", "left")]
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(module(batch)[-1], model(**batch).logits), "the final output must be the model's"
    runner = check_runner(module, batches)
    return model, module, runner


def _families(*, only=None):
    return [pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES if only is None or name in only]


@pytest.mark.parametrize("name", _families())
def test_the_runner_routes_each_sentence_as_alone_right_and_left_padded(name):
    model, module, _ = family(name)
    assert module.exit_path == "export"
    assert all(p.layout is bx.Layout.NLC for p in module.exit_points)
    # a causal decoder's default head reads the last real token (what its own classifier pools), an encoder's the
    # mean over the real tokens
    pools = [m for head in module.exit_heads for m in head.modules() if isinstance(m, GlobalPool)]
    assert [pool.token for pool in pools] == ["last" if name in CAUSAL else "mean"] * len(module.exit_heads)


@pytest.mark.parametrize("name", _families())
def test_a_sentence_s_exits_do_not_change_with_its_padding(name):
    """Captured with position ids (so a left-padded sentence keeps its positions): the runner is checked again
    (a RoPE model's cos/sin now come from per-sample positions, so they are carried and compacted with the
    batch), and each sentence's exit logits equal those of the sentence alone, unpadded, whichever side the
    padding is on."""
    model, module, runner = family(name, positions=True)
    for side in ("right", "left"):
        batch = padded(side, positions=True)
        with torch.no_grad():
            outputs = module(batch)
            result = runner(batch)
        for i in range(8):
            real = batch["attention_mask"][i].bool()
            alone = {k: v[i:i + 1, real] for k, v in batch.items()}
            with torch.no_grad():
                own = module(alone)
            for j in range(len(module.exit_heads)):
                torch.testing.assert_close(outputs[j][i], own[j][0], rtol=1e-4, atol=1e-5, msg=f"{side} {i} exit {j}")
            # the model's own classifier is padding-invariant too where it reads the last real token (a causal
            # decoder) or the first (an encoder's [CLS], right-padded); left-padded, an encoder's first is a pad
            final_invariant = name in CAUSAL or side == "right"
            if final_invariant:
                torch.testing.assert_close(outputs[-1][i], own[-1][0], rtol=1e-4, atol=1e-5, msg=f"{side} {i}")
            taken = int(result.exit_index[i])
            want = own[taken][0] if taken < len(module.exit_heads) or final_invariant else outputs[-1][i]
            torch.testing.assert_close(result.logits[i], want, rtol=1e-4, atol=1e-5)


def _against_by_hand(module: bx.ExitModule, run, lengths) -> set:
    """``run`` on right- and left-padded batches of each of ``lengths`` against by_hand; the exits taken."""
    seen = set()
    for side in ("right", "left"):
        for length in lengths:
            batch = padded(side, length=length, seed=1 if length == SEQ else length)
            exit_index, logits = run(batch)
            want_index, want_logits = by_hand(module, module.exit_spec, batch)
            assert torch.equal(torch.as_tensor(exit_index), want_index), f"{side} {length}"
            torch.testing.assert_close(torch.as_tensor(logits), want_logits, rtol=1e-4, atol=1e-5)
            seen |= set(want_index.tolist())
    return seen


@pytest.mark.parametrize("name", _families())
def test_the_saved_runner_routes_as_the_runner(name, tmp_path):
    _, module, runner = family(name)
    loaded = bx.ExitRunner.load(runner.save(tmp_path / name, example_inputs=padded("right", 2)))

    def run(batch):
        result = loaded(batch)
        return result.exit_index, result.logits

    assert _against_by_hand(module, run, [SEQ]) == {0, 1, 2}
    # the programs take any length, but the folder holds the MACs of the saved one only: refused, not guessed
    with pytest.raises(bx.BranchifyError, match=r"saved for inputs \(B, 12\), \(B, 12\).*save the runner again"):
        loaded(padded("right", length=7))


@pytest.mark.parametrize("name", _families())
def test_the_onnx_file_routes_as_the_runner_at_any_length(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, module, runner = family(name)
    path = runner.export_onnx(tmp_path / f"{name}.onnx", example_inputs=padded("right", 2))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert {i.name: i.shape for i in session.get_inputs()} == {"input_ids": ["batch", "length"],
                                                              "attention_mask": ["batch", "length"]}

    def run(batch):
        logits, exit_index = session.run(None, {k: v.numpy() for k, v in batch.items()})
        return exit_index, logits

    assert _against_by_hand(module, run, [SEQ, 7, 14]) == {0, 1, 2}
