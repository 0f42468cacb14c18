"""Capture: export's shape guards kept, modules called more than once, one-token examples, clear refusals,
and capture from several threads at once. Each checks against the original model or torch's own behaviour."""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings

import pytest
import torch
import torchvision
import transformers
from torch import nn

import branchify as bx
from branchify._inputs import Inputs
from branchify.capture import NoGraph, capture


class LengthBranch(nn.Module):
    """Branches on the sequence length: export keeps one branch, valid only for the lengths that take it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.long = nn.Linear(16, 16)
        self.short = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.long(h) if ids.shape[1] > 8 else self.short(h)
        return self.out(h.mean(1))


class SizeBranch(nn.Module):
    """Branches on the image size (pools large images once more); adaptive pooling hides the difference."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if x.shape[-1] > 24:
            h = nn.functional.max_pool2d(h, 2)
        h = torch.relu(self.body(h))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def nlc_exit(layer: str, threshold: float | None = 0.5) -> bx.ExitSpec:
    return bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, head=bx.HeadSpec(layout="NLC"), threshold=threshold)])


def test_a_length_the_graph_was_not_captured_for_is_refused_by_the_module_and_the_runner():
    torch.manual_seed(0)
    model = LengthBranch().eval()
    module = bx.attach_exits(model, nlc_exit("emb"), torch.randint(0, 50, (1, 12))).eval()
    assert module.exit_path == "export"
    runner = bx.ExitRunner(module)
    for length in (9, 12, 20):  # the branch the capture took: exact
        ids = torch.randint(0, 50, (3, length))
        assert torch.equal(module(ids)[-1], model(ids))
        runner(ids)
    short = torch.randint(0, 50, (3, 5))
    assert not torch.allclose(model(short), model.out(model.long(model.emb(short)).mean(1)))  # the branch matters
    for run in (module, runner):
        with pytest.raises(bx.BranchifyError, match=r"ids\.size\(\)\[1\] >= 9 .*capture='hooks'"):
            run(short)


@pytest.mark.parametrize("size", [16, 24, 32, 40])
def test_an_image_size_is_exact_or_refused_never_silently_wrong(size):
    torch.manual_seed(0)
    model = SizeBranch().eval()
    module = bx.attach_exits(model, ["stem"], torch.randn(1, 3, 32, 32), capture="export").eval()
    x = torch.randn(2, 3, size, size)
    if size == 32:
        assert torch.equal(module(x)[-1], model(x))
    else:  # export fixed the image size; before the guards were kept, 40 gave a logit, 16 and 24 wrong ones
        with pytest.raises(bx.BranchifyError, match="outside the shapes the graph was captured for"):
            module(x)


def test_the_guard_refuses_exactly_what_torch_exports_own_module_refuses():
    model = LengthBranch().eval()
    traced = capture(model, Inputs.of(torch.randint(0, 50, (2, 12))), path="export")
    program = torch.export.export(model, (torch.randint(0, 50, (2, 12)),), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    guard = traced.roots[False]._branchify_input_guard
    for length in range(2, 14):
        ids = torch.randint(0, 50, (2, length))
        try:
            program.module()(ids)
            torch_ok = True
        except AssertionError:
            torch_ok = False
        try:
            guard(ids)
            ours = True
        except bx.BranchifyError:
            ours = False
        assert ours == torch_ok, length


def tiny_albert(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
                                       num_attention_heads=2, intermediate_size=37, num_labels=3)
    return transformers.AlbertForSequenceClassification(config).eval()


SHARED = "albert.encoder.albert_layer_groups.0.albert_layers.0"


def outputs_of_each_call(module: nn.Module, run) -> list[torch.Tensor]:
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_resnet_lists_and_attaches_each_call_of_a_twice_called_relu_at_that_call():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    rows = {p.name: p for p in bx.list_exit_points(model, x[:1], all_nodes=True)}
    assert "layer1.0.relu" not in rows  # which call it would be cannot be told
    relu = model.layer1[0].relu
    calls = outputs_of_each_call(relu, lambda: model(x))
    assert len(calls) == 2
    with pytest.raises(bx.BranchifyError, match="'layer1.0.relu:0', 'layer1.0.relu:1'"):
        bx.attach_exits(model, ["layer1.0.relu"], x[:1])
    for call in (0, 1):
        module = bx.attach_exits(model, [f"layer1.0.relu:{call}"], x[:1]).eval()
        assert module.exit_points[0].macs == rows[f"layer1.0.relu:{call}"].macs  # listed where it attaches
        assert torch.allclose(module(x)[0], module.exit_heads[0](calls[call]), atol=1e-6)
    assert rows["layer1.0.relu:0"].macs < rows["layer1.0.relu:1"].macs


class DataDependent(nn.Module):
    """No graph capture takes it (``if`` on a value); its block runs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.block(self.block(self.stem(x)))
        if h.mean() > -1e9:
            h = h * 1.0
        return self.fc(h.mean((2, 3)))


def test_the_hook_path_lists_each_call_and_its_rows_match_where_the_exit_attaches():
    model = DataDependent().eval()
    x = torch.randn(1, 3, 16, 16)
    rows = {p.name: p for p in bx.list_exit_points(model, x, capture="hooks")}
    assert {"block:0", "block:1"} <= set(rows) and "block" not in rows
    for call in (0, 1):
        module = bx.attach_exits(model, [f"block:{call}"], x, capture="hooks")
        assert module.exit_points[0].macs == rows[f"block:{call}"].macs


class Shared(nn.Module):
    """One block applied three times, ALBERT's way, on the export path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.encoder = nn.ModuleDict({"shared": nn.Sequential(nn.Linear(16, 16), nn.Tanh())})
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        for _ in range(3):
            h = self.encoder["shared"](h)
        return self.fc(h)


def test_a_block_applied_three_times_is_listed_and_attached_at_each_call_on_the_export_path():
    model = Shared().eval()
    x = torch.randn(4, 8)
    rows = {n: p for p in bx.list_exit_points(model, x[:1], capture="export") for n in (p.name, *p.aliases)}
    assert {"encoder.shared:0", "encoder.shared:1", "encoder.shared:2"} <= set(rows) and "encoder.shared" not in rows
    with pytest.raises(bx.BranchifyError, match="called 3 times"):
        bx.attach_exits(model, ["encoder.shared"], x[:1], capture="export")
    calls = outputs_of_each_call(model.encoder["shared"], lambda: model(x))
    for call in (1, 2):
        module = bx.attach_exits(model, [f"encoder.shared:{call}"], x[:1], capture="export").eval()
        assert module.exit_points[0].macs == rows[f"encoder.shared:{call}"].macs
        assert torch.allclose(module(x)[0], module.exit_heads[0](calls[call]), atol=1e-6)


class Stages(nn.Module):
    """Stages kept in module lists that the forward loops over (timm's twins and CoaT): no stage is called itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList([nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]),
                                     nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1)])])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("path", ["fx", "export", "hooks"])
def test_a_module_list_the_forward_never_calls_is_refused_with_its_last_block_and_that_block_attaches(path):
    model = Stages().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(bx.BranchifyError, match=r"never calls 'stages.0' itself .* name the last of them that "
                                                r"runs: 'stages.0.1'"):
        bx.attach_exits(model, ["stages.0"], x, capture=path)
    module = bx.attach_exits(model, ["stages.0.1"], x, capture=path).eval()
    after = torch.relu(model.stages[0][0](model.stem(x)))
    assert torch.equal(module(x)[0], module.exit_heads[0](after))


@pytest.mark.slow
def test_albert_attaches_at_any_call_of_its_one_shared_layer():
    model = tiny_albert()
    batch = {"input_ids": torch.randint(0, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    rows = {n: p for p in bx.list_exit_points(model, batch) for n in (p.name, *p.aliases)}
    names = [f"{SHARED}:{k}" for k in range(3)]
    assert set(names) <= set(rows) and SHARED not in rows
    macs = [rows[n].macs for n in names]
    assert macs == sorted(macs) and macs[0] < 0.5 * macs[-1]
    with pytest.raises(bx.BranchifyError, match="called 3 times"):
        bx.attach_exits(model, [SHARED], batch)
    calls = outputs_of_each_call(model.get_submodule(SHARED), lambda: model(**batch))
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=names[1], head=bx.HeadSpec(token="cls"), threshold=0.5)])
    module = bx.attach_exits(model, spec, batch).eval()
    assert module.exit_points[0].macs == rows[names[1]].macs
    with torch.no_grad():
        out = module(batch)
        assert torch.allclose(out[0], module.exit_heads[0](calls[1]), atol=1e-5)
        assert torch.equal(out[-1], model(**batch).logits)
        runner = bx.ExitRunner(module)
        for i in range(4):  # per sample, against the module's own routing
            one = {k: v[i:i + 1] for k, v in batch.items()}
            result = runner(one)
            expected = bx.routing.route(module.exit_spec, list(module(one)[:-1]))
            assert torch.equal(result.exit_index, expected)


class Positions(nn.Module):
    """Adds a position embedding sliced to the sequence length, as BERT does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Embedding(32, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.emb(ids) + self.pos.weight[: ids.shape[1]]
        return self.out(torch.tanh(h).mean(1))


def test_a_one_token_example_does_not_fix_the_sequence_length_at_one():
    # Regression: captured at length 1, the positions were sliced to 1 and broadcast over any length: wrong logits
    torch.manual_seed(0)
    model = Positions().eval()
    module = bx.attach_exits(model, nlc_exit("emb", None), torch.randint(0, 50, (1, 1)), capture="export").eval()
    for length in (1, 2, 7):
        ids = torch.randint(0, 50, (3, length))
        assert torch.equal(module(ids)[-1], model(ids))


def test_a_one_token_float_sequence_is_refused_at_another_length_with_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.Flatten(1), nn.LazyLinear(3))
    model(torch.randn(1, 1, 8))
    module = bx.attach_exits(model, nlc_exit("0"), torch.randn(1, 1, 8), capture="export").eval()
    with pytest.raises(bx.BranchifyError, match="example of the shape you will use"):
        module(torch.randn(2, 4, 8))


class Masked(nn.Module):
    """Takes token ids and a mask, as a tokenizer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.out(h.sum(1))


def test_a_module_called_without_an_input_it_was_captured_with_names_it():
    batch = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    module = bx.attach_exits(Masked(), nlc_exit("emb", None), batch, capture="export").eval()
    for call in (lambda: module({"input_ids": batch["input_ids"]}), lambda: module(batch["input_ids"])):
        with pytest.raises(bx.BranchifyError, match=r"\['attention_mask'\] missing"):
            call()


@pytest.mark.slow
def test_a_decoder_with_its_cache_on_says_that_use_cache_false_keeps_the_graph_path():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(1, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    expected = model(**batch).logits
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(token="cls", layout="NLC"))])
    with pytest.warns(UserWarning, match=r"model.config.use_cache = False"):
        hooked = bx.attach_exits(model, spec, batch)
    assert hooked.exit_path == "hooks"
    model.config.use_cache = False
    module = bx.attach_exits(model, spec, batch).eval()
    assert module.exit_path == "export"
    with torch.no_grad():  # nothing lost: the same logits, on a path the runner can cut
        assert torch.equal(module(batch)[-1], expected)


def test_a_compiled_model_attaches_by_its_own_layer_names():
    torch.manual_seed(0)
    model = SizeBranch().eval()
    model.forward = lambda x: model.fc(torch.relu(model.body(torch.relu(model.stem(x)))).mean((2, 3)))
    compiled = torch.compile(model)
    x = torch.randn(1, 3, 16, 16)
    assert [p.name for p in bx.list_exit_points(compiled, x)] == ["stem", "body"]
    module = bx.attach_exits(compiled, ["stem"], x).eval()
    assert torch.equal(module(x)[-1], model(x))
    with pytest.raises(bx.BranchifyError, match="use 'stem'"):
        bx.attach_exits(compiled, ["_orig_mod.stem"], x)


def test_capture_returns_a_graph_or_raises_no_graph_with_the_reasons():
    inputs = Inputs.of(torch.randn(1, 3, 16, 16))
    with pytest.raises(NoGraph) as caught:
        capture(DataDependent(), inputs)
    assert [r.split(":")[0] for r in caught.value.reasons] == ["torch.fx", "torch.export"]
    with pytest.raises(NoGraph):
        capture(DataDependent(), inputs, path="hooks")
    with pytest.raises(bx.BranchifyError) as forced:
        capture(DataDependent(), inputs, path="fx")
    assert forced.value.__cause__ is not None  # the tracer's own error is kept


def test_two_threads_capture_at_once_and_a_third_loses_no_output(capsys):
    torch.manual_seed(0)
    models = [LengthBranch().eval(), DataDependent().eval()]
    examples = [torch.randint(0, 50, (1, 12)), torch.randn(1, 3, 16, 16)]
    done = threading.Event()
    results: dict[int, object] = {}
    logger = logging.getLogger("torch.export.bystander")  # under a logger the old code silenced
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    keep = Keep()
    logger.addHandler(keep)
    levels = {name: logging.getLogger(name).level for name in ("torch.export", "torch.fx", "torch._dynamo")}
    written = []

    def bystander():
        i = 0
        while not done.is_set() or i < 5:
            line = f"bystander line {i}"
            sys.stderr.write(line + "\n")
            logger.warning(line)
            written.append(line)
            i += 1
            time.sleep(0.005)

    def attach(k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = nlc_exit("emb") if k == 0 else bx.ExitSpec(exits=[bx.ExitPoint(layer="stem")])
            try:
                results[k] = bx.attach_exits(models[k], spec, examples[k])
            except Exception as error:  # a thread's exception would be lost; the main thread re-raises it
                results[k] = error

    other = threading.Thread(target=bystander)
    workers = [threading.Thread(target=attach, args=(k,)) for k in range(2)]
    other.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    other.join()
    logger.removeHandler(keep)
    err = capsys.readouterr().err
    for outcome in results.values():
        if isinstance(outcome, Exception):
            raise outcome
    assert all(line in err for line in written)
    assert [r.getMessage() for r in seen] == written
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert "def forward" not in err  # the failing export's partial graph stayed held
    assert results[0].exit_path == "export" and results[1].exit_path == "hooks"
    ids = torch.randint(0, 50, (2, 12))
    assert torch.equal(results[0].eval()(ids)[-1], models[0](ids))


def test_a_model_run_in_another_thread_while_fx_traces_runs_as_itself():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces: a module another thread runs
    meanwhile must run as itself, not be recorded or refused ("module is not installed as a submodule")."""
    tracing, release = threading.Event(), threading.Event()

    class Pausing(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.stem(x)
            tracing.set()
            release.wait(timeout=30)  # the other thread runs its model while this trace is in progress
            return self.fc(h)

    outcome: dict[str, object] = {}

    def trace():
        try:
            outcome["traced"] = capture(Pausing().eval(), Inputs.of(torch.randn(2, 4)), path="fx")
        except Exception as error:
            outcome["traced"] = error

    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(3, 4)
    expected = other[2](other[1](other[0](x)))  # no tracer is patched in yet
    worker = threading.Thread(target=trace)
    worker.start()
    assert tracing.wait(timeout=30)
    try:
        got = other(x)
    finally:
        release.set()
        worker.join()
    assert torch.equal(got, expected)
    assert not isinstance(outcome["traced"], Exception), outcome["traced"]
    assert outcome["traced"].path == "fx"
