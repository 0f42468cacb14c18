"""The runner's core (issue 23) and HF models in the runtime (issue 21, items 10, 11, 14).

One core per mode behind a public surface; the hook path serving many threads; loading a runner folder
without touching process-global state; a tiny BERT saving, loading and exporting like a vision model;
clear refusals of inputs of the wrong kind.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import branchify as bx
from branchify.runtime import archive

RUNTIME = Path(bx.__file__).parent / "runtime"


def tiny(channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


def median_threshold(module, x: torch.Tensor, layer: int = 0) -> float:
    """An entropy threshold that splits ``x`` at exit ``layer`` (the median score)."""
    with torch.no_grad():
        z = module(x)[layer]
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return float(entropy.median())


# --- the core -----------------------------------------------------------------------------------------


def test_each_mode_has_its_core_with_one_public_surface(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)])
    staged = bx.ExitRunner(bx.attach_exits(tiny(), spec, x[:1]).eval())
    hooked = bx.ExitRunner(bx.attach_exits(tiny(), spec, x[:1], capture="hooks").eval())
    staged(x)
    loaded = bx.ExitRunner.load(staged.save(tmp_path / "r"))
    assert [r.core.kind for r in (staged, hooked, loaded)] == ["staged", "hooked", "loaded"]
    assert loaded.core.module is None and staged.core.module is not None
    assert [i.name for i in loaded.core.inputs] == [i.name for i in staged.core.inputs]
    assert torch.equal(loaded(x).exit_index, staged(x).exit_index)


def test_archive_onnx_and_benchmark_read_nothing_private_of_the_runner():
    """They use the core's public surface: no ``runner._x`` or ``core._x`` in their source."""
    files = [RUNTIME / "archive.py", RUNTIME / "benchmark.py", *sorted((RUNTIME / "onnx_export").glob("*.py"))]
    private = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("runner", "core"):
                private.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert files and not private


# --- the hook path and threads ---------------------------------------------------------------------


def test_the_hook_runner_from_eight_threads_gives_each_thread_its_single_threaded_results():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1"), bx.ExitPoint(layer="3")])
    module = bx.attach_exits(tiny(16), spec, x[:1], capture="hooks").eval()
    assert module.exit_path == "hooks"
    module.exit_spec = spec.with_exits(threshold=[median_threshold(module, x, 0), median_threshold(module, x, 1)])
    g = torch.Generator().manual_seed(1)
    calls = [[torch.randn(int(torch.randint(2, 9, (1,), generator=g)), 3, 8, 8, generator=g) * (1 + t)
              for _ in range(12)] for t in range(8)]  # each thread its own inputs
    runner = bx.ExitRunner(module)
    expected = [[runner(c) for c in thread] for thread in calls]
    assert len({int(e) for thread in expected for r in thread for e in r.exit_index}) == 3  # a real mix
    start = threading.Barrier(8)

    def work(thread: list[torch.Tensor]):
        start.wait()
        return [runner(c) for c in thread]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, calls))
    for want_thread, got_thread in zip(expected, got):
        for want, have in zip(want_thread, got_thread):
            assert torch.equal(want.exit_index, have.exit_index)
            torch.testing.assert_close(want.logits, have.logits, rtol=1e-5, atol=1e-6)
    assert all(len(m._forward_hooks) == 0 for m in module.model.modules())  # no hook left between calls


# --- the runner folder and process-global state -----------------------------------------------------


class _Watched(dict):
    """os.environ's stand-in: remembers every key written."""

    def __init__(self, *args):
        super().__init__(*args)
        self.written: list[str] = []

    def __setitem__(self, key, value):
        self.written.append(key)
        super().__setitem__(key, value)


def _saved(tmp_path) -> tuple[bx.ExitRunner, torch.Tensor, Path]:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    runner = bx.ExitRunner(bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]),
                                           x[:1]).eval())
    return runner, x, runner.save(tmp_path / "runner", example_inputs=x[:1])


def test_loading_a_runner_writes_no_environment_variable(tmp_path, monkeypatch):
    runner, x, folder = _saved(tmp_path)
    watched = _Watched(os.environ)
    monkeypatch.setattr(os, "environ", watched)
    loaded = bx.ExitRunner.load(folder)
    assert watched.written == []
    assert torch.equal(loaded(x).exit_index, runner(x).exit_index)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    _Payload.ran = True
    return {}


def test_a_program_holding_a_pickled_object_is_refused_unread(tmp_path):
    _, _, folder = _saved(tmp_path)
    program = folder / "stage_0.pt2"
    with zipfile.ZipFile(program) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    sample = next(name for name in entries if "/data/sample_inputs/" in name)
    entries[sample] = pickle.dumps(_Payload())
    with zipfile.ZipFile(program, "w") as target:
        for name, data in entries.items():
            target.writestr(name, data)
    table = json.loads((folder / "routing.json").read_text())
    table["sha256"] = archive._digest(table, folder)  # an attacker can recompute the digest
    (folder / "routing.json").write_text(json.dumps(table))
    with pytest.raises(bx.BranchifyError, match="pickled objects"):
        bx.ExitRunner.load(folder)
    assert not _Payload.ran


# --- inputs of the wrong kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("capture", ["auto", "hooks"])
def test_an_integer_image_is_refused_with_its_dtype_and_the_fix(capture):
    x = torch.randn(4, 3, 8, 8)
    module = bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]), x[:1],
                             capture=capture).eval()
    runner = bx.ExitRunner(module)
    runner(x)  # the shape is counted: the check must not rely on counting it again
    with pytest.raises(bx.BranchifyError, match=r"torch\.uint8.*float32.*x\.float\(\) / 255"):
        runner((x * 50).clamp(0, 255).to(torch.uint8))


def test_inputs_that_passed_the_checks_do_not_let_others_through():
    # The runner skips the checks for inputs alike to inputs already accepted (issue 25): each kind of wrong
    # input must still be refused after good ones ran, and good ones of other batch sizes must still run.
    x = torch.randn(4, 3, 8, 8)
    module = bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]), x[:1]).eval()
    runner = bx.ExitRunner(module)
    runner(x)
    assert runner(x[:1]).logits.shape == (1, 5)
    with pytest.raises(bx.BranchifyError, match="lacks the batch dimension"):
        runner(x[0])
    with pytest.raises(bx.BranchifyError, match="float64"):
        runner(x.double())
    with pytest.raises(bx.BranchifyError, match="the model takes 1"):
        runner(x, x)
    assert torch.equal(runner(x).exit_index, bx.ExitRunner(module)(x).exit_index)


def test_a_new_spec_has_its_thresholds_checked_against_the_classes_again():
    # The runner keeps the thresholds Judge has checked with its rules (issue 25); a new spec's must be checked anew
    # (the module refuses it when it is set, or the runner when it routes with it).
    name = "scaled_confidence_runtime_core_test"
    bx.register_criterion(name, lambda z: z.softmax(-1).amax(-1) * z.shape[-1], exits_when="above", low=0.0,
                          high_of_classes=float, replace=True)
    x = torch.randn(4, 3, 8, 8)
    module = bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=4.0)], criterion=name),
                             x[:1]).eval()
    runner = bx.ExitRunner(module)
    runner(x)
    with pytest.raises(bx.BranchifyError, match="never fires"):
        module.exit_spec = module.exit_spec.with_exits(threshold=[6.0])  # above 5 classes' top score
        runner(x)


def test_a_spec_set_during_a_call_does_not_mix_with_the_one_the_call_began_with(monkeypatch):
    # A call reads the spec in force once: a spec set between its input checks and its routing (another thread,
    # bx.OnlineCalibrator) takes effect at the next call, and this one's decisions and MACs both follow the first.
    x = torch.randn(16, 3, 8, 8)
    module = bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1"), bx.ExitPoint(layer="3")]),
                             x[:1]).eval()
    first = module.exit_spec.with_exits(threshold=[median_threshold(module, x, 0), median_threshold(module, x, 1)])
    everyone_out = module.exit_spec.with_exits(threshold=[10.0, None])  # above log 5: all leave at exit 0
    module.exit_spec = first
    runner = bx.ExitRunner(module)
    for batch in (x, x[:1]):
        want = runner(batch)  # (and its MACs counted: the spec is set after the counting, not during it)
        assert set(want.exit_index.tolist()) != {0} or len(batch) == 1
        core = runner.core
        real = core.batch_tensor

        def set_meanwhile(values, real=real):
            module.exit_spec = everyone_out
            return real(values)

        monkeypatch.setattr(core, "batch_tensor", set_meanwhile)
        got = runner(batch)
        monkeypatch.undo()
        assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
        assert runner(batch).exit_index.tolist() == [0] * len(batch)  # the next call follows the new spec
        module.exit_spec = first


def test_a_shape_the_model_rejects_keeps_the_cause():
    x = torch.randn(2, 3, 8, 8)
    runner = bx.ExitRunner(bx.attach_exits(tiny(), bx.ExitSpec(exits=[bx.ExitPoint(layer="1", threshold=1.0)]),
                                           x[:1]).eval())
    with pytest.raises(bx.BranchifyError, match="cannot take inputs") as info:
        runner(torch.randn(2, 1, 8, 8))
    assert info.value.__cause__ is not None


# --- Hugging Face: save, load and export like a vision model --------------------------------------------

transformers = pytest.importorskip("transformers")


def sentences(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` sentences of ``length`` token positions, sentence ``i`` padded by ``2 i`` positions (right)."""
    ids = torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, max(1, length - 2 * i):] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


# torch.export of BERT and of its stages takes tens of seconds on two shared cores
BERT = pytest.mark.slow


@pytest.fixture(scope="module")
def bert() -> tuple[bx.ExitModule, bx.ExitRunner]:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="bert.encoder.layer.0")])  # token="mean": the head takes the mask
    module = bx.attach_exits(model, spec, sentences(2, 10, 0)).eval()
    probe = sentences(8, 10, 1)
    module.exit_spec = spec.with_exits(threshold=[median_threshold(module, probe)])
    return module, bx.ExitRunner(module)


def _per_sample(runner: bx.ExitRunner, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The runner on each sentence alone: the independent reference."""
    results = [runner({k: v[i:i + 1] for k, v in batch.items()}) for i in range(len(batch["input_ids"]))]
    return torch.cat([r.logits for r in results]), torch.cat([r.exit_index for r in results])


@BERT
def test_a_bert_runner_saves_and_loads_from_its_dict_of_inputs(bert, tmp_path):
    module, runner = bert
    batch = sentences(4, 10, 2)
    loaded = bx.ExitRunner.load(runner.save(tmp_path / "bert", example_inputs=batch))
    want = runner(batch)
    assert len(set(want.exit_index.tolist())) == 2  # both ways out are taken
    for got in (loaded(batch), loaded(**batch)):
        assert torch.equal(got.exit_index, want.exit_index)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.macs, want.macs)
    logits, exit_index = _per_sample(runner, batch)
    assert torch.equal(loaded(batch).exit_index, exit_index)
    torch.testing.assert_close(loaded(batch).logits, logits, rtol=1e-4, atol=1e-5)
    head = torch.export.load(tmp_path / "bert" / "head_0.pt2")
    assert len(head.graph_signature.user_inputs) == 2  # the hidden states and the attention mask


@BERT
def test_a_bert_runner_saves_from_the_integer_inputs_it_has_seen(bert, tmp_path):
    module, runner = bert
    batch = sentences(3, 10, 3)
    runner(batch)
    loaded = bx.ExitRunner.load(runner.save(tmp_path / "default"))  # default example: int64 zeros, not floats
    assert torch.equal(loaded(batch).exit_index, runner(batch).exit_index)


@BERT
def test_a_bert_onnx_file_routes_as_the_runner_at_two_lengths_with_padding(bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module, runner = bert
    runner(sentences(2, 10, 0))
    path = runner.export_onnx(tmp_path / "bert.onnx")  # default example: the inputs seen, int64
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]}
    seen = set()
    for length in (10, 7, 14):
        batch = sentences(4, length, length)
        logits, exit_index = session.run(None, {k: v.numpy() for k, v in batch.items()})
        want_logits, want_index = _per_sample(runner, batch)
        np.testing.assert_array_equal(exit_index, want_index.numpy())
        np.testing.assert_allclose(logits, want_logits.numpy(), rtol=1e-4, atol=1e-5)
        seen |= set(exit_index.tolist())
    assert seen == {0, 1}


@BERT
def test_token_ids_given_as_floats_are_refused_with_the_fix(bert):
    _, runner = bert
    batch = sentences(2, 10, 4)
    with pytest.raises(bx.BranchifyError, match=r"'input_ids' is a torch\.float32 tensor.*torch\.int64"):
        runner({**batch, "input_ids": batch["input_ids"].float()})


@BERT
def test_the_loaded_bert_runner_refuses_an_unknown_input_by_name(bert, tmp_path):
    _, runner = bert
    batch = sentences(2, 10, 5)
    loaded = bx.ExitRunner.load(runner.save(tmp_path / "bert", example_inputs=batch))
    with pytest.raises(bx.BranchifyError, match=r"unknown input\(s\) \['labels'\]"):
        loaded(**batch, labels=torch.zeros(2, dtype=torch.long))
