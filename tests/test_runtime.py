"""ExitRunner: per-sample routing through staged graphs, against the multi-output module."""

import contextlib
import functools
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from by_hand import by_hand, oracle, run_and_route
from exits import expected, spread_heads, with_mix
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

import branchify as bx
from branchify.routing import route


class Tiny(nn.Module):
    """A small traceable CNN (defined here, so a subprocess cannot import its source)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


class Untraceable(Tiny):
    """Data-dependent control flow: torch.fx cannot trace it, so its exits come from hooks."""

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(self.c(self.b(x)).mean((2, 3)))


# Small configurations of the zoo's architectures keep the tests fast; the code paths are the zoo's.
def small_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def small_convnext():
    blocks = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)]
    return ConvNeXt(blocks, stochastic_depth_prob=0.1, num_classes=10)


def small_swin():
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4],
                           window_size=[4, 4], num_classes=10)


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), ["layer1", "layer2", "layer3"], 32),
    # Cuts inside residual blocks: the block input crosses as well.
    "resnet18_in_block": (lambda: torchvision.models.resnet18(num_classes=10), ["layer1.0.conv2", "layer2.1.bn1"], 32),
    "convnext": (small_convnext, ["features.1", "features.3"], 32),
    "vit": (small_vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"], 32),  # tokens
    "swin": (small_swin, ["features.1", "features.3"], 64),  # channels last (NHWC)
    "tiny": (Tiny, ["a", "b"], 16),
}


@functools.cache
def built(name: str) -> bx.ExitModule:
    make, layers, size = CASES[name]
    torch.manual_seed(0)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer) for layer in layers])
    module = bx.attach_exits(make().eval(), spec, torch.randn(1, 3, size, size)).eval()
    spread_heads(module, torch.randn(16, 3, size, size))
    with_mix(module, batch(name))  # tests that need other thresholds set their own
    return module


def batch(name: str, n: int = 16) -> torch.Tensor:
    size = CASES[name][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


class OpLog(TorchDispatchMode):
    """The aten ops a call runs, with the number of dims of each op's first argument."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket.__name__, args[0].ndim if args and hasattr(args[0], "ndim") else 0))
        return func(*args, **(kwargs or {}))

    def copies(self) -> int:
        """Gathers and scatters of activations or logits (not of per-sample index vectors)."""
        names = ("index", "index_select", "index_copy", "index_copy_", "index_put", "index_put_", "where")
        return sum(name in names and ndim >= 2 for name, ndim in self.ops)

    def syncs(self) -> int:
        # Under inference_mode the dispatcher sees item() itself rather than _local_scalar_dense.
        return sum(name in ("item", "_local_scalar_dense") for name, _ in self.ops)


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_routing_matches_the_multi_output_module(name):
    module = built(name)
    x = batch(name)
    spec = with_mix(module, x)
    runner, result, outputs, decisions = run_and_route(module, spec, x)
    assert set(result.exit_index.tolist()) == set(range(len(spec.exits) + 1)), "every exit should take samples"
    torch.testing.assert_close(result.logits, expected(outputs, decisions), rtol=1e-4, atol=1e-5)
    assert torch.equal(result.logits, oracle(runner, x, result.exit_index))
    costs = bx.exit_costs(module, x[:1]).per_exit
    assert result.macs.tolist() == [costs[e] for e in result.exit_index.tolist()]
    assert result.logits.shape == (len(x), 10) and result.exit_index.dtype == torch.int64


def test_a_cut_inside_a_residual_block_carries_the_block_input():
    runner = bx.ExitRunner(built("resnet18_in_block"))
    outputs = [next(n for n in s.graph.nodes if n.op == "output").args[0] for s in runner.stages]
    assert [len(o) for o in outputs] == [2, 2, 1]
    assert outputs[0][1].name == "maxpool"  # layer1.0's input, added back after conv2's branch


@pytest.mark.parametrize("name, layout, shape", [("swin", bx.Layout.NHWC, (2, 8, 8, 32)),
                                                 ("vit", bx.Layout.NLC, (2, 17, 32))])
def test_stages_carry_channels_last_and_token_activations(name, layout, shape):
    module = built(name)
    runner = bx.ExitRunner(module)
    with torch.no_grad():
        carried = runner.stages[1](*runner.stages[0](batch(name, 2)))
    assert module.exit_points[1].layout is layout and tuple(carried[0].shape) == shape


def test_parameters_stay_inside_their_stage():
    runner = bx.ExitRunner(built("vit"))
    first = runner.stages[0]
    assert [n.name for n in first.graph.nodes if n.op == "placeholder"] == ["x"]
    assert {"class_token", "encoder.pos_embedding"} <= {n.target for n in first.graph.nodes if n.op == "get_attr"}
    for stage in runner.stages[1:]:
        inputs = [n for n in stage.graph.nodes if n.op == "placeholder"]
        assert all(n.name.startswith(("add", "encoder")) for n in inputs)
        assert len(inputs) == 1


def test_batch_of_one_takes_each_exit_without_copies_and_one_sync_per_exit():
    module = built("resnet18")
    x = batch("resnet18")
    spec = with_mix(module, x)
    runner = bx.ExitRunner(module, example_inputs=x[:1])
    with torch.no_grad():
        taken = route(spec, module(x)[:-1])
    picks = [int(torch.nonzero(taken == e)[0]) for e in range(len(spec.exits) + 1)]  # a sample for each exit
    for j in picks:
        one = x[j:j + 1]
        with OpLog() as log:
            result = runner(one)
        with torch.no_grad():
            outputs = module(one)
        exit_index = int(route(spec, outputs[:-1]))
        assert result.exit_index.tolist() == [exit_index] == by_hand(module, spec, one)[0].tolist()
        assert torch.equal(result.logits, outputs[exit_index])  # same ops on the same batch: exact
        assert log.copies() == 0
        assert log.syncs() == min(exit_index + 1, len(spec.exits))


def test_at_most_one_host_sync_per_exit_in_a_mixed_batch():
    module = built("resnet18")
    x = batch("resnet18")
    with_mix(module, x)
    runner = bx.ExitRunner(module, example_inputs=x[:1])
    with OpLog() as log:
        runner(x)
    assert log.syncs() == len(module.exit_heads)  # every exit lets some samples out
    assert log.copies() > 0


@pytest.mark.parametrize("threshold, exit_index", [(1e6, 0), (0.0, 3)])
def test_all_leave_at_the_first_exit_or_none_leaves_without_copies(threshold, exit_index):
    module = built("resnet18")
    module.exit_spec = module.exit_spec.with_exits(threshold=[threshold] * 3, criterion=["entropy"] * 3)
    x = batch("resnet18", 6)
    runner = bx.ExitRunner(module, example_inputs=x[:1])
    with OpLog() as log:
        result = runner(x)
    with torch.no_grad():
        outputs = module(x)
    assert result.exit_index.tolist() == [exit_index] * 6
    assert torch.equal(result.logits, outputs[exit_index])
    assert log.copies() == 0


def test_empty_batch_gives_empty_results():
    module = built("resnet18")
    with_mix(module, batch("resnet18"))
    result = bx.ExitRunner(module)(torch.randn(0, 3, 32, 32))
    assert result.logits.shape == (0, 10) and result.exit_index.shape == (0,) and result.macs.shape == (0,)
    assert result.exit_index.dtype == torch.int64


def test_runs_under_inference_mode():
    module = built("tiny")
    with_mix(module, batch("tiny"))
    runner = bx.ExitRunner(module)
    # Outside any mode, under no_grad, and inside inference mode (which the runner does not enter again), at
    # batch 1 and in a batch: every returned tensor is an inference tensor, and the caller's mode is left as it was.
    for context in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        for x in (batch("tiny"), batch("tiny")[:1]):
            with context():
                result = runner(x)
                inside = torch.is_inference_mode_enabled()
            assert inside is (context is torch.inference_mode) and not torch.is_inference_mode_enabled()
            assert all(t.is_inference() and not t.requires_grad for t in (result.logits, result.exit_index,
                                                                            result.macs))


@pytest.mark.slow  # bf16 kernels on the CPU are slow; the float32 runner tests stay fast
def test_bfloat16():
    module = built("resnet18")
    x = batch("resnet18").bfloat16()
    module.bfloat16()
    try:
        spec = with_mix(module, x)
        runner = bx.ExitRunner(module)
        result = runner(x)
        with torch.no_grad():
            outputs = module(x)
        assert result.logits.dtype == torch.bfloat16
        assert torch.equal(result.exit_index, route(spec, outputs[:-1]))
        assert torch.equal(result.exit_index, by_hand(module, spec, x)[0])
        assert len(set(result.exit_index.tolist())) >= 3
        assert torch.equal(result.logits, oracle(runner, x, result.exit_index))
        torch.testing.assert_close(result.logits, expected(outputs, result.exit_index), rtol=2e-2, atol=2e-2)
    finally:
        module.float()


def test_channels_last_inputs_keep_their_layout():
    module = built("resnet18")
    x = batch("resnet18")
    spec = with_mix(module, x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    runner = bx.ExitRunner(module, example_inputs=x_cl[:1])
    layouts = []
    handle = runner.stages[1].register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        result = runner(x_cl)
    finally:
        handle.remove()
    with torch.no_grad():
        outputs = module(x)
    assert torch.equal(result.exit_index, route(spec, outputs[:-1]))
    assert torch.equal(result.exit_index, by_hand(module, spec, x)[0])
    torch.testing.assert_close(result.logits, expected(outputs, result.exit_index), rtol=1e-4, atol=1e-5)
    assert layouts == [True]  # the compacted sub-batch is still channels last


def test_follows_a_new_spec_on_the_module():
    module = built("tiny")
    x = batch("tiny")
    module.exit_spec = module.exit_spec.with_exits(threshold=[0.0, 0.0], criterion=["entropy"] * 2)
    runner = bx.ExitRunner(module)
    assert runner(x).exit_index.unique().tolist() == [2]
    module.exit_spec = module.exit_spec.with_exits(threshold=[1e6, 1e6])
    assert runner(x).exit_index.unique().tolist() == [0]


@pytest.mark.slow  # scripts, exports and translates every stage; tests/test_onnx and test_surgery's scripting stay fast
def test_stages_script_export_and_onnx():
    onnxruntime = pytest.importorskip("onnxruntime")
    module = built("resnet18_in_block")
    runner = bx.ExitRunner(module)
    values = (batch("resnet18_in_block", 3),)
    batch_dim = torch.export.Dim("batch", min=1)
    for i, stage in enumerate(runner.stages):
        with torch.no_grad():
            reference = stage(*values)
            with warnings.catch_warnings():
                # torch.jit.script is deprecated (still supported), and it notes fx.GraphModule's own annotations
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(stage)
            for got, want in zip(scripted(*values), reference):
                assert torch.equal(got, want)
            dynamic = tuple({0: batch_dim} for _ in values)
            program = torch.export.export(stage, values, dynamic_shapes=dynamic)
            for got, want in zip(program.module()(*(v[:1] for v in values)), stage(*(v[:1] for v in values))):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # notes on renaming the dynamic axis
                onnx = torch.onnx.export(stage, values, dynamo=True, dynamic_shapes=dynamic, verbose=False)
            session = onnxruntime.InferenceSession(onnx.model_proto.SerializeToString())
            names = [a.name for a in session.get_inputs()]
            two = tuple(v[:2] for v in values)
            got = session.run(None, {n: v.numpy() for n, v in zip(names, two)})
            for g, want in zip(got, stage(*two)):
                torch.testing.assert_close(torch.from_numpy(g), want, rtol=1e-4, atol=1e-4)
        values = reference
        if i < len(runner.heads):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = torch.jit.script(runner.heads[i])
            assert torch.equal(head(values[0]), runner.heads[i](values[0]))


@pytest.mark.slow  # torch.compile of each stage (test_surgery compiles the module fast)
def test_compile_stage_by_stage_without_recompiling_for_new_sub_batches():
    module = built("tiny")
    x = batch("tiny", 12)
    with_mix(module, x)
    eager = bx.ExitRunner(module)
    compiled = bx.ExitRunner(module).compile(backend="aot_eager")
    torch._dynamo.reset()
    first = compiled(x)
    assert torch.equal(first.exit_index, eager(x).exit_index)
    torch.testing.assert_close(first.logits, eager(x).logits, rtol=1e-4, atol=1e-5)
    other = batch("tiny", 9) * 1.5  # other sub-batch sizes
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(other)
    assert torch.equal(again.exit_index, eager(other).exit_index)
    torch.testing.assert_close(again.logits, eager(other).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a subprocess; the saved-runner refusals below stay fast
def test_save_and_load_run_without_the_model_source(tmp_path):
    module = built("tiny")
    x = batch("tiny")
    with_mix(module, x)
    runner = bx.ExitRunner(module)
    want = runner(x)
    runner.save(tmp_path)
    table = json.loads((tmp_path / "routing.json").read_text())
    assert [e["threshold"] for e in table["exits"]] == module.exit_spec.thresholds
    assert table["num_classes"] == 10 and table["macs"][0]["per_exit"] == bx.exit_costs(module, x[:1]).per_exit
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, branchify as bx\n"
        "d = sys.argv[1]\n"
        "r = bx.ExitRunner.load(d)(torch.load(d + '/x.pt', weights_only=True))\n"
        "torch.save({'logits': r.logits.clone(), 'exit_index': r.exit_index.clone(), 'macs': r.macs.clone()},"
        " d + '/out.pt')\n"
        "assert 'test_runtime' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got["exit_index"], want.exit_index)
    torch.testing.assert_close(got["logits"], want.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got["macs"], want.macs)
    with pytest.raises(bx.BranchifyError, match=r"saved for inputs \(B, 3, 16, 16\)"):
        bx.ExitRunner.load(tmp_path)(torch.randn(5, 3, 24, 24))  # exported programs fix the non-batch dims


@pytest.mark.slow  # torch.export of each stage: 10-60 s a model on two shared cores
@pytest.mark.parametrize("name", ["resnet18", "resnet18_in_block", "convnext", "vit", "swin"])
def test_a_saved_torchvision_runner_routes_each_image_as_alone(name, tmp_path):
    module = built(name)
    x = batch(name, 8)
    want_index, want_logits = by_hand(module, module.exit_spec, x)
    assert len(set(want_index.tolist())) > 1, "a mix of exits, or the check is vacuous"
    loaded = bx.ExitRunner.load(bx.ExitRunner(module).save(tmp_path / name, example_inputs=x[:1]))(x)
    assert torch.equal(loaded.exit_index, want_index)
    torch.testing.assert_close(loaded.logits, want_logits, rtol=1e-4, atol=1e-5)


def test_load_refuses_a_directory_without_a_routing_table(tmp_path):
    with pytest.raises(bx.BranchifyError, match="runner.save"):
        bx.ExitRunner.load(tmp_path)


def test_hook_fallback_stops_the_forward_once_every_sample_has_left():
    torch.manual_seed(0)
    model = Untraceable().eval()
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=1e6), bx.ExitPoint(layer="b", threshold=1e6)])
    with pytest.warns(UserWarning, match="hooks"):
        module = bx.attach_exits(model, spec, torch.randn(1, 3, 16, 16))
    runner = bx.ExitRunner(module, example_inputs=torch.randn(1, 3, 16, 16))  # counting MACs runs the model
    calls = []
    handle = model.b.register_forward_hook(lambda *_: calls.append(1))
    try:
        x = batch("tiny", 8)
        result = runner(x)
        assert calls == [] and result.exit_index.tolist() == [0] * 8  # layer b never ran
        with torch.no_grad():
            outputs = module(x)
        assert torch.equal(result.logits, outputs[0])
        assert runner.stages == []

        spec = with_mix(module, x)
        with torch.no_grad():
            outputs = module(x)
        calls.clear()
        result = runner(x)
        assert calls == [1]
        decisions = route(spec, outputs[:-1])
        assert torch.equal(result.exit_index, decisions) and len(set(decisions.tolist())) == 3
        assert torch.equal(result.exit_index, by_hand(module, spec, x)[0])
        assert torch.equal(result.logits, expected(outputs, decisions))  # nothing compacted: exact
    finally:
        handle.remove()
    with pytest.raises(bx.BranchifyError, match="hook fallback"):
        runner.compile()
    with pytest.raises(bx.BranchifyError, match="hook fallback"):
        runner.save("unused")


def test_distiller_criterion_is_refused_because_it_reads_labels():
    module = built("tiny")
    module.exit_spec = module.exit_spec.with_exits(threshold=[0.5, 0.5], criterion=["distiller", "entropy"])
    with pytest.raises(bx.BranchifyError, match="reads the labels"):
        bx.ExitRunner(module)


def test_spec_without_thresholds_is_refused():
    module = built("tiny")
    module.exit_spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=p) for p in module.exit_spec.layers])
    with pytest.raises(bx.BranchifyError, match="calibrate"):
        bx.ExitRunner(module)


@pytest.mark.parametrize("inputs, pattern", [
    (lambda x: (x.double(),), "torch.float32"),
    (lambda x: (x, x), r"got 2 positional inputs .* but the model takes 1 \(x\)"),
    (lambda x: (torch.tensor(1.0),), "batch dim"),
    (lambda x: (x[:, :2],), r"inputs Tensor\(16, 2, 16, 16\)"),
])
def test_bad_inputs_say_what_was_expected(inputs, pattern):
    module = built("tiny")
    x = batch("tiny")
    with_mix(module, x)
    runner = bx.ExitRunner(module, example_inputs=x[:1])
    with pytest.raises(bx.BranchifyError, match=pattern):
        runner(*inputs(x))


def test_training_mode_and_foreign_modules_are_refused():
    module = built("tiny")
    with_mix(module, batch("tiny"))
    runner = bx.ExitRunner(module)
    module.train()
    try:
        with pytest.raises(bx.BranchifyError, match="module.eval()"):
            runner(batch("tiny"))
    finally:
        module.eval()
    with pytest.raises(bx.BranchifyError, match="attach_exits"):
        bx.ExitRunner(Tiny())


def test_a_failure_inside_a_stage_is_not_reported_as_the_user_s_input():
    # a foreign error (out of memory here) used to come back as "pass inputs shaped like the ones the
    # module was built for"
    module = built("tiny")
    runner = bx.ExitRunner(module)
    x = batch("tiny")

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner._run_stages = [out_of_memory, *runner._run_stages[1:]]
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        runner(x)


def _saved_runner(tmp_path):
    module = built("tiny")
    x = batch("tiny")
    with_mix(module, x)
    bx.ExitRunner(module).save(tmp_path, example_inputs=x[:1])
    return tmp_path / "routing.json"


TABLE_EDITS = {
    "a threshold": lambda t: t["exits"][0].update(threshold=99.0),
    "a criterion": lambda t: t["exits"][0].update(criterion="confidence"),
    "a temperature": lambda t: t["exits"][0].update(temperature=50.0),
    "the MAC figures": lambda t: t["macs"][0]["per_exit"].__setitem__(0, 1.0),
    "the programs' order": lambda t: t.update(stages=t["stages"][::-1]),
}


@pytest.mark.parametrize("edit", list(TABLE_EDITS))
def test_a_saved_runner_whose_table_was_edited_is_refused(tmp_path, edit):
    path = _saved_runner(tmp_path)
    table = json.loads(path.read_text())
    TABLE_EDITS[edit](table)
    path.write_text(json.dumps(table))
    with pytest.raises(bx.BranchifyError, match="does not match the digest in the table: the folder was altered"):
        bx.ExitRunner.load(tmp_path)


def test_a_saved_runner_whose_program_was_changed_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = _saved_runner(tmp_path)
    program = tmp_path / json.loads(path.read_text())["heads"][0]
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    read = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: read.append(a))
    with pytest.raises(bx.BranchifyError, match="does not match the digest"):
        bx.ExitRunner.load(tmp_path)
    assert not read, "nothing may be unpickled from an altered folder"


def test_a_saved_runner_naming_files_outside_its_folder_is_refused(tmp_path):
    path = _saved_runner(tmp_path)
    table = json.loads(path.read_text())
    table["heads"][0] = "../elsewhere.pt2"
    path.write_text(json.dumps(table))
    with pytest.raises(bx.BranchifyError, match="outside its folder"):
        bx.ExitRunner.load(tmp_path)


def test_a_version_1_runner_folder_still_loads_and_warns_that_nothing_covers_it(tmp_path):
    path = _saved_runner(tmp_path)
    table = json.loads(path.read_text())
    table["version"] = 1  # what branchify wrote before version 2: no digest
    del table["sha256"]
    path.write_text(json.dumps(table))
    with pytest.warns(UserWarning, match="version-1 runner folder, which has no digest"):
        runner = bx.ExitRunner.load(tmp_path)
    x = batch("tiny")
    assert runner(x).logits.shape == (len(x), 10)
