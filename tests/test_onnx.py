"""``ExitRunner.export_onnx``: one ONNX file that routes each sample itself, checked against the runner.

The runner is the reference: for each model the file is exported once, then its thresholds are re-tuned in
the file (as a deployment would) and onnxruntime's ``exit_index`` must equal the runner's with the same
thresholds, and its logits be within 1e-4, at batch 1, 8 and 64, for thresholds where every sample leaves at
the first exit, where none leaves, and in between (picked from the scores of the batch, with the runner's
split checked so that "in between" really splits).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import branchify as bx
from branchify.criteria import get_criterion

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
BATCHES = [1, 8, 64]
MIXES = ["first", "none", "between"]


@dataclass(frozen=True)
class Case:
    build: object  # () -> nn.Module, random weights
    size: int
    layers: tuple[str, ...]


def _timm_deit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)


CASES = {
    # layer2.0.bn2 is inside a residual block (the block input crosses the cut too), layer3 a block boundary
    "resnet18": Case(lambda: torchvision.models.resnet18(num_classes=10), 32, ("layer2.0.bn2", "layer3")),
    "convnext_tiny": Case(lambda: torchvision.models.convnext_tiny(num_classes=10), 32, ("features.1", "features.3")),
    "vit_b_16": Case(lambda: torchvision.models.vit_b_16(num_classes=10, image_size=32), 32,
                     ("encoder.layers.encoder_layer_3", "encoder.layers.encoder_layer_7")),
    "swin_t": Case(lambda: torchvision.models.swin_t(num_classes=10), 32, ("features.1", "features.3")),
    "deit_tiny (timm)": Case(_timm_deit, 32, ("blocks.3", "blocks.7")),
}
# 30-40 s of export and 20-30 s of checks each on 2 shared cores (vit, swin); resnet18 is the fast tier's case
SLOW = {"vit_b_16", "swin_t", "convnext_tiny", "deit_tiny (timm)"}


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def retuned(model: onnx.ModelProto, thresholds: list[float | None]) -> onnx.ModelProto:
    """A copy of ``model`` whose threshold initializers hold ``thresholds`` (None: an exit that is off)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    found = {init.name: init for init in model.graph.initializer}
    for i, t in enumerate(thresholds):
        if t is not None:
            found[f"exit_{i}_threshold"].CopyFrom(onnx.numpy_helper.from_array(np.float32(t), f"exit_{i}_threshold"))
    return model


def weight_names(graph: onnx.GraphProto) -> set[str]:
    """The initializers of ``graph`` and of its subgraphs (the If branches hold each stage's weights)."""
    names = {i.name for i in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= weight_names(attr.g)
    return names


def run(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    logits, exit_index = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return logits, exit_index


def thresholds_for(module: bx.ExitModule, x: torch.Tensor, shares: list[float]) -> list[float | None]:
    """Thresholds under which about ``shares[i]`` of the samples still going leave at exit ``i`` (exits that are
    off stay off), placed in the widest gap between neighbouring scores near that share, so that onnxruntime's
    rounding cannot move a sample across."""
    spec = module.exit_spec
    with torch.no_grad():
        outputs = module.eval()(x)
    running = torch.ones(len(x), dtype=torch.bool)
    thresholds: list[float | None] = []
    for i, point in enumerate(spec.exits):
        if point.threshold is None:
            thresholds.append(None)
            continue
        crit = get_criterion(spec.criterion_of(i))
        scores = crit.score(outputs[i], None, point.temperature).double()
        sign = 1.0 if crit.exits_when == "below" else -1.0
        ranked = (sign * scores[running]).sort().values  # the most eager to leave first
        n = round(shares[i] * len(ranked))
        if n == 0 or len(ranked) == 0:
            t = (ranked[0] - 1) if len(ranked) else torch.tensor(0.0)
        elif n >= len(ranked):
            t = ranked[-1] + 1
        else:
            near = [m for m in range(max(1, n - 2), min(len(ranked) - 1, n + 2) + 1)]
            n = max(near, key=lambda m: float(ranked[m] - ranked[m - 1]))
            t = (ranked[n - 1] + ranked[n]) / 2
        # no further than the criterion's range on the side where nobody leaves (a threshold past it is refused)
        low, high = crit.score_range(outputs[i].shape[-1])
        thresholds.append(max(float(sign * t), low) if sign > 0 else min(float(sign * t), high))
        running &= ~crit.fires(scores.float(), thresholds[-1])
    return thresholds


def shares_of(mix: str, batch: int, k: int) -> list[float]:
    if mix == "first":
        return [1.0] * k
    if mix == "none":
        return [0.0] * k
    # half of those still going at each exit; a single sample leaves at the last early exit
    return [0.5] * (k - 1) + [1.0 if batch == 1 else 0.5]


def compare(runner: bx.ExitRunner, model: onnx.ModelProto | ort.InferenceSession, x: torch.Tensor) -> np.ndarray:
    logits, exit_index = run(model, x)
    expected = runner(x)
    assert exit_index.dtype == np.int64 and exit_index.shape == (len(x),)
    assert logits.shape == (len(x), runner.num_classes)
    np.testing.assert_array_equal(exit_index, expected.exit_index.numpy())
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=ATOL)
    return exit_index


# --- one file per model, re-tuned per case -----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> dict:
    """Per model: the module, its runner and the exported file (exported once, with in-between thresholds)."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            case = CASES[name]
            torch.manual_seed(0)
            x = torch.randn(64, 3, case.size, case.size)
            spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=layer, threshold=1.0) for layer in case.layers])
            module = bx.attach_exits(case.build(), spec, x[:1]).eval()
            module.exit_spec = spec.with_exits(threshold=thresholds_for(module, x, shares_of("between", 64, 2)))
            runner = bx.ExitRunner(module)
            path = runner.export_onnx(tmp_path_factory.mktemp("onnx") / "model.onnx", example_inputs=x[:1])
            done[name] = (module, runner, onnx.load(str(path)), path, x)
        return done[name]

    return get


def _model_params():
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in CASES]


@pytest.mark.parametrize("batch", [b if b == 8 else pytest.param(b, marks=pytest.mark.slow) for b in BATCHES])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("name", _model_params())
def test_onnxruntime_routes_as_the_runner(exported, name, mix, batch):
    module, runner, model, _, x = exported(name)
    x = x[:batch]
    k = len(module.exit_spec.exits)
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, shares_of(mix, batch, k)))
    exit_index = compare(runner, retuned(model, module.exit_spec.thresholds), x)
    counts = np.bincount(exit_index, minlength=k + 1)
    if mix == "first":
        assert counts[0] == batch
    elif mix == "none":
        assert counts[k] == batch
    else:  # really in between: at batch 1 the sample leaves at the last early exit, else every exit takes some
        assert counts[k - 1] == 1 if batch == 1 else (counts > 0).all(), counts


def test_the_cut_inside_a_block_carries_the_block_input(exported):
    """The resnet18 case is not vacuous: its first cut falls inside a residual block, so two tensors cross it."""
    _, runner, model, _, _ = exported("resnet18")
    assert len([n for n in runner.stages[1].graph.nodes if n.op == "placeholder"]) == 2
    onnx.checker.check_model(model, full_check=True)


def test_an_empty_batch_gives_empty_outputs(exported):
    _, runner, model, _, x = exported("resnet18")
    logits, exit_index = run(model, x[:0])
    assert logits.shape == (0, 10) and logits.dtype == np.float32
    assert exit_index.shape == (0,) and exit_index.dtype == np.int64


def test_the_inputs_and_outputs_are_named_and_the_batch_is_dynamic(exported):
    _, _, model, _, _ = exported("resnet18")
    sess = session(model)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("x", ["batch", 3, 32, 32])]
    assert [(o.name, o.shape, o.type) for o in sess.get_outputs()] == [
        ("logits", ["batch", 10], "tensor(float)"), ("exit_index", ["batch"], "tensor(int64)")]


def test_thresholds_are_top_level_float32_scalars_and_the_weights_sit_in_the_branches(exported):
    module, _, model, _, _ = exported("resnet18")
    top = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for i in range(2):
        assert top[f"exit_{i}_threshold"].dtype == np.float32 and top[f"exit_{i}_threshold"].shape == ()
        assert top[f"exit_{i}_temperature"] == np.float32(1.0)
    assert not any(name.startswith("p") for name in top)  # each stage's weights are in the If branch that runs it
    assert any(name.startswith("p2/") for name in weight_names(model.graph))


def _nodes_run(model: onnx.ModelProto, x: torch.Tensor, tmp_path: Path) -> set[str]:
    """The pieces (``p{i}``: stage i and its head) of which onnxruntime's profiler saw at least one node run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x.numpy()})
    events = json.loads(Path(sess.end_profiling()).read_text())
    return {e["name"].split("/")[0] for e in events if e.get("cat") == "Node" and e["name"].startswith("p")}


def test_a_stage_nobody_reaches_does_no_work(exported, tmp_path):
    module, runner, model, _, x = exported("resnet18")
    x = x[:8]
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, [1.0, 1.0]))
    everyone_leaves = retuned(model, module.exit_spec.thresholds)
    assert _nodes_run(everyone_leaves, x, tmp_path) == {"p0"}
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, [0.0, 0.0]))
    assert _nodes_run(retuned(model, module.exit_spec.thresholds), x, tmp_path) == {"p0", "p1", "p2"}


def test_retuning_a_threshold_in_the_file_routes_as_the_runner_with_it(exported, tmp_path):
    """The documented recipe: load, replace the initializer, save; the file then routes by the new threshold."""
    module, runner, _, path, x = exported("resnet18")
    x = x[:64]
    before = thresholds_for(module, x, [0.5, 0.5])  # those the file was exported with
    module.exit_spec = module.exit_spec.with_exits(threshold=before)
    first = compare(runner, session(path), x)

    after = thresholds_for(module, x, [0.25, 0.5])
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "exit_0_threshold")
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(after[0], dtype=np.float32), "exit_0_threshold"))
    init = next(i for i in model.graph.initializer if i.name == "exit_1_threshold")
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(after[1], dtype=np.float32), "exit_1_threshold"))
    onnx.save(model, tmp_path / "retuned.onnx")

    module.exit_spec = module.exit_spec.with_exits(threshold=after)
    second = compare(runner, session(tmp_path / "retuned.onnx"), x)
    assert (first == 0).sum() > (second == 0).sum() > 0  # the re-tuned exit 0 lets fewer out


def test_the_file_runs_where_torch_cannot_be_imported(exported, tmp_path):
    module, runner, _, path, x = exported("resnet18")
    x = x[:16]
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, [0.5, 0.5]))
    model = retuned(onnx.load(str(path)), module.exit_spec.thresholds)
    onnx.save(model, tmp_path / "model.onnx")
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch could be imported")
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
        logits, exit_index = sess.run(None, {"x": np.load(sys.argv[2])})
        np.savez(sys.argv[3], logits=logits, exit_index=exit_index)
        print(sorted(name for name in sys.modules if name.split(".")[0] == "torch" and sys.modules[name] is not None))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.onnx"), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    out = np.load(tmp_path / "out.npz")
    expected = runner(x)
    np.testing.assert_array_equal(out["exit_index"], expected.exit_index.numpy())
    np.testing.assert_allclose(out["logits"], expected.logits.numpy(), rtol=0, atol=ATOL)
    assert len(set(out["exit_index"].tolist())) == 3


# --- every criterion, exits that are off, a loaded runner ---------------------------------------------


def tiny() -> nn.Module:
    layers: list[nn.Module] = []
    for cin in (3, 8, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _top_logit(z: torch.Tensor) -> torch.Tensor:
    return z.amax(dim=-1)


@pytest.fixture
def own_criteria(monkeypatch):
    """This file's criteria, registered for one test: the registry is global, and other files list it."""
    from branchify import criteria

    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    bx.register_criterion("test_onnx_top_logit", _top_logit, exits_when="above")
    bx.register_criterion("test_onnx_numpy", _not_exportable, exits_when="above")


def _tiny_runner(exits: list[bx.ExitPoint]) -> tuple[bx.ExitModule, bx.ExitRunner, torch.Tensor]:
    x = torch.randn(64, 3, 8, 8)
    module = bx.attach_exits(tiny(), bx.ExitSpec(exits=exits), x[:1]).eval()
    return module, bx.ExitRunner(module), x


def test_every_label_free_criterion_with_temperatures_and_an_exit_that_is_off(tmp_path, own_criteria):
    exits = [bx.ExitPoint(layer="1", threshold=0.5, criterion="confidence", temperature=2.0),
             bx.ExitPoint(layer="3"),  # off
             bx.ExitPoint(layer="5", threshold=0.5, criterion="margin", temperature=0.5),
             bx.ExitPoint(layer="7", threshold=0.0, criterion="test_onnx_top_logit")]
    module, runner, x = _tiny_runner(exits)
    path = runner.export_onnx(tmp_path / "tiny.onnx", example_inputs=x[:1])
    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer}
    assert {"exit_0_threshold", "exit_0_temperature", "exit_2_threshold", "exit_3_threshold"} <= names
    assert not any(n.startswith("exit_1_") for n in names)
    weights = weight_names(model.graph)
    assert any(n.startswith("p0/head") for n in weights)
    assert not any(n.startswith("p1/head") for n in weights)  # the off exit's head is not in the file
    temperature = next(i for i in model.graph.initializer if i.name == "exit_2_temperature")
    assert onnx.numpy_helper.to_array(temperature) == np.float32(0.5)
    seen = set()
    for shares in ([0.5, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.0, 0.25, 0.75]):
        module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, shares))
        seen |= set(compare(runner, retuned(model, module.exit_spec.thresholds), x).tolist())
    assert seen == {0, 2, 3, 4}  # every exit that is on took samples; the off one none


def _varied_heads(module: bx.ExitModule, runner: bx.ExitRunner, x: torch.Tensor) -> None:
    """Heads whose predictions vary from sample to sample and agree in part from exit to exit.

    Random heads on pooled ReLU features predict one class for every sample, so patience would route the
    whole batch alike; here each head scores three classes on its features' standardised deviations, with
    the same weights at every exit."""
    w = torch.randn(3, 8) * 3
    values = (x,)
    with torch.no_grad():
        for stage, head in zip(runner.stages, module.exit_heads):
            values = stage(*values)
            pooled = values[0].mean(dim=(2, 3))
            linear = head[1]
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[:3] = w / pooled.std(0)
            linear.bias[:3] = -(w / pooled.std(0)) @ pooled.mean(0)


@pytest.mark.slow  # ONNX patience: about 10 s; the runner's patience is fast in test_exits_off_and_patience
def test_patience_carries_each_samples_prediction_and_run_across_exits(tmp_path):
    """Patience at exits 0 and 2, entropy (with a temperature) between them: exit 1 counts in the runs too."""
    exits = [bx.ExitPoint(layer="1", threshold=2, criterion="patience"),
             bx.ExitPoint(layer="3", threshold=0.0, criterion="entropy", temperature=1.5),
             bx.ExitPoint(layer="5", threshold=2, criterion="patience")]
    module, runner, x = _tiny_runner(exits)
    _varied_heads(module, runner, x)
    model = onnx.load(str(runner.export_onnx(tmp_path / "patience.onnx", example_inputs=x[:1])))
    names = {i.name for i in model.graph.initializer}
    assert "exit_1_temperature" in names and not {"exit_0_temperature", "exit_2_temperature"} & names
    with torch.no_grad():
        entropy = get_criterion("entropy").score(module(x)[1], None, 1.5).sort().values
    middle = float(entropy[31] + entropy[32]) / 2
    mixes = []
    for thresholds in ([2, 0.0, 2], [2, 0.0, 3], [3, middle, 3], [1, 0.0, 2], [2, 9.0, 2]):
        module.exit_spec = module.exit_spec.with_exits(threshold=thresholds)
        for batch in BATCHES:
            exit_index = compare(runner, retuned(model, thresholds), x[:batch])
        mixes.append(np.bincount(exit_index, minlength=4).tolist())
    # a run of 2 and of 3 (through the entropy exit, and after it let half the batch out) split at exit 2
    assert all(mix[2] > 0 and mix[3] > 0 for mix in mixes[:3]), mixes
    assert mixes[3][0] == 64 and mixes[4][1] == 64, mixes


@pytest.mark.slow  # saves, loads and exports; save/load is fast in test_runtime
def test_a_loaded_runner_exports_from_its_programs(tmp_path):
    exits = [bx.ExitPoint(layer="3", threshold=1.0), bx.ExitPoint(layer="5", threshold=1.0)]
    module, runner, x = _tiny_runner(exits)
    module.exit_spec = module.exit_spec.with_exits(threshold=thresholds_for(module, x, [0.5, 0.5]))
    loaded = bx.ExitRunner.load(runner.save(tmp_path / "runner", example_inputs=x[:1]))
    path = loaded.export_onnx(tmp_path / "loaded.onnx")  # the shape it was saved for
    exit_index = compare(loaded, onnx.load(str(path)), x)
    np.testing.assert_array_equal(exit_index, runner(x).exit_index.numpy())
    assert len(set(exit_index.tolist())) == 3


# --- refusals ---------------------------------------------------------------------------------------


@pytest.fixture()
def small() -> tuple[bx.ExitModule, bx.ExitRunner, torch.Tensor]:
    return _tiny_runner([bx.ExitPoint(layer="3", threshold=1.0)])


def test_refuses_a_criterion_that_reads_labels(small, tmp_path):
    module, runner, x = small
    module.exit_spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="3", threshold=1.0)], criterion="distiller")
    with pytest.raises(bx.BranchifyError, match="reads the labels"):
        runner.export_onnx(tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_a_module_on_the_hook_path(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="3", threshold=1.0)])
    module = bx.attach_exits(tiny(), spec, x, capture="hooks").eval()
    assert module.exit_path == "hooks"
    with pytest.raises(bx.BranchifyError, match="hook fallback.*no graph to export"):
        bx.ExitRunner(module).export_onnx(tmp_path / "m.onnx", x)


@pytest.mark.parametrize("opset", [17, 7, "20", 18.0])
def test_refuses_an_opset_too_old_or_not_an_int(small, tmp_path, opset):
    _, runner, x = small
    with pytest.raises(bx.BranchifyError, match="opset"):
        runner.export_onnx(tmp_path / "m.onnx", x[:1], opset=opset)


@pytest.mark.slow  # a second export; the opset refusals above stay fast
def test_an_explicit_opset_is_the_files(small, tmp_path):
    _, runner, x = small
    model = onnx.load(str(runner.export_onnx(tmp_path / "m.onnx", x[:1], opset=18)))
    assert {(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")} == {("", 18)}
    compare(runner, model, x)


@pytest.mark.parametrize("package", ["onnx", "onnxscript"])
def test_refuses_without_the_onnx_extra(small, tmp_path, monkeypatch, package):
    _, runner, x = small
    monkeypatch.setitem(sys.modules, package, None)  # import now fails, as when it is not installed
    with pytest.raises(bx.BranchifyError, match=r"pip install 'branchify\[onnx\]'"):
        runner.export_onnx(tmp_path / "m.onnx", x[:1])


def test_refuses_without_an_input_shape(small, tmp_path):
    _, runner, _ = small
    with pytest.raises(bx.BranchifyError, match="has not seen an input yet"):
        runner.export_onnx(tmp_path / "m.onnx")


def _not_exportable(z: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(z.detach()).max(axis=-1))  # leaves torch: torch.export cannot follow it


def test_an_exporter_failure_names_the_stage_and_keeps_the_cause(tmp_path, own_criteria):
    module, runner, x = _tiny_runner([bx.ExitPoint(layer="3", threshold=0.0, criterion="test_onnx_numpy")])
    assert runner(x[:4]).exit_index.shape == (4,)  # the runner runs it
    with pytest.raises(bx.BranchifyError, match=r"could not capture stage 0 .*'3'.*'test_onnx_numpy'") as info:
        runner.export_onnx(tmp_path / "m.onnx", x[:1])
    assert info.value.__cause__ is not None


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.slow  # `branchify export --onnx`: exports resnet20 twice; the exporter itself has fast tests above
def test_branchify_export_writes_the_file_the_runner_would(tmp_path, capsys):
    from branchify.commands.cli import main
    from branchify.distiller.models import get_model

    x = torch.randn(32, 3, 32, 32)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1"), bx.ExitPoint(layer="layer2")])  # no thresholds
    module = bx.attach_exits(get_model("resnet20_cifar"), spec, x[:1]).eval()
    checkpoint = bx.save(module, tmp_path / "checkpoint.safetensors")

    assert main(["export", str(checkpoint), "--arch", "resnet20_cifar", "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert "pass --thresholds" in capsys.readouterr().err  # the saved exits have no thresholds

    module.exit_spec = spec.with_exits(threshold=[1.0, 1.0])
    thresholds = thresholds_for(module, x, [0.5, 0.5])
    assert main(["export", str(checkpoint), "--arch", "resnet20_cifar", "--onnx", str(tmp_path / "m.onnx"),
                 "--thresholds", *map(str, thresholds)]) == 0
    printed = capsys.readouterr().out
    assert "logits (batch, 10), exit_index (batch,)" in printed and "exit_1_threshold=" in printed
    module.exit_spec = spec.with_exits(threshold=thresholds)
    exit_index = compare(bx.ExitRunner(module), onnx.load(str(tmp_path / "m.onnx")), x)
    assert len(set(exit_index.tolist())) == 3

    assert main(["export", str(checkpoint), "--arch", "resnet20_cifar", "--onnx", str(tmp_path / "o.onnx"),
                 "--thresholds", "1", "1", "--opset", "17"]) == 2
    assert "opset 17 is too old" in capsys.readouterr().err
