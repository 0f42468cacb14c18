"""The rough edges a first day hits (issue 15): each says what is going on instead of leaving the user to guess."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torchvision

import branchify as bx

X = torch.randn(2, 3, 32, 32)


def test_a_checkpoint_loads_without_example_inputs(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    module = bx.attach_exits(model, ["layer1", "layer2"], torch.randn(1, 3, 48, 40)).eval()
    path = bx.save(module, tmp_path / "exits.safetensors")
    again = bx.load(path, model).eval()
    assert [p.shape for p in again.exit_points] == [p.shape for p in module.exit_points]  # rebuilt at 48x40
    x = torch.randn(3, 3, 48, 40)
    assert all(torch.equal(a, b) for a, b in zip(again(x), module(x)))
    bigger = bx.load(path, model, torch.zeros(1, 3, 64, 64))  # an explicit example still wins
    assert bigger.exit_points[0].shape == (64, 16, 16)


def test_named_inputs_are_recorded_too(tmp_path):
    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.body = torch.nn.Linear(16, 16)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, input_ids):
            return self.fc(self.body(self.embed(input_ids)).mean(1))

    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="body", head=bx.HeadSpec(layout="NLC"))])
    module = bx.attach_exits(Named(), spec, {"input_ids": torch.zeros(1, 7, dtype=torch.long)})
    assert module.example_record == {"args": [], "kwargs": {"input_ids": {"shape": [1, 7], "dtype": "int64"}}}
    path = bx.save(module, tmp_path / "named.safetensors")
    assert bx.load(path, Named()).exit_points[0].shape == (7, 16)


def test_a_runner_says_it_switched_a_training_module_to_eval():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)])
    module = bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, X).train()
    with pytest.warns(UserWarning, match="switched the module to eval mode"):
        bx.ExitRunner(module)
    assert not module.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bx.ExitRunner(module)  # already in eval mode: nothing to say


def test_an_input_without_its_batch_dim_is_named_as_such():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)])
    runner = bx.ExitRunner(bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, X).eval())
    with pytest.raises(bx.BranchifyError) as caught:
        runner(X[0])
    message = str(caught.value)
    assert "(3, 32, 32)" in message and "lacks the batch dimension" in message and "unsqueeze(0)" in message
    assert "example_inputs" not in message  # the user passed none: say what was wrong with their input
    assert runner(X[0].unsqueeze(0)).logits.shape == (1, 10)


def test_the_points_table_explains_its_columns_marks_and_other_names():
    points = bx.list_exit_points(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    text = repr(points)
    assert "MMACs: millions of multiply-accumulates" in text
    # The last block of each stage ends where the stage does: listed as the stage, with the block's name beside it.
    by_name = {p.name: p for p in points}
    assert by_name["layer1"].aliases == ("layer1.1",) and "layer1.1" in text.splitlines()[6]
    module = bx.attach_exits(torchvision.models.resnet18(), ["layer1.1"], torch.randn(1, 3, 64, 64))
    assert module.exit_points[0].node == by_name["layer1"].node

    class Open(torch.nn.Module):  # a point whose layout the operations leave open
        def __init__(self) -> None:
            super().__init__()
            self.act = torch.nn.ReLU()
            self.fc = torch.nn.Linear(40, 3)

        def forward(self, x):
            return self.fc(self.act(x).flatten(1))

    text = repr(bx.list_exit_points(Open(), torch.randn(1, 5, 8)))
    assert "?" in text and "HeadSpec(layout=...)" in text


def test_a_report_with_idle_exits_and_a_negative_saving_says_why():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=1e-9), bx.ExitPoint(layer="layer2",
                                                                                          threshold=1e-9)])
    module = bx.attach_exits(torchvision.models.resnet18(num_classes=10), spec, X).eval()
    stats = bx.ExitStats(module.exit_spec, costs=bx.exit_costs(module, X))
    with torch.no_grad():
        stats.update(module(X), torch.tensor([1, 2]))
    distiller = stats.summary().lines()
    lines = stats.report(file=io.StringIO()).splitlines()
    assert lines[:len(distiller)] == distiller and not any(line.startswith("Note:") for line in distiller)
    assert "Accuracy Stats for exit 0: top1 = 0.000, top5 = 0.000" in lines  # Distiller's line is kept
    assert any("no sample left at exits 0, 1" in line and "not a measured 0%" in line for line in lines)
    assert any("the saving is negative" in line for line in lines)
    totals = next(i for i, line in enumerate(lines) if line.startswith("Totals for entire network"))
    assert totals < next(i for i, line in enumerate(lines) if line.startswith("Note:"))


def test_the_sweep_explains_its_counts_and_columns_and_its_plot_labels_do_not_overlap(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    candidates = ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1", "layer2.0", "layer2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bx.sweep(model, loader, loader, candidates=candidates, epochs=1, max_exits=2, progress=False,
                          max_accuracy_drop=0.5)
    text = repr(result)
    assert f"{result.sets_searched} exit sets searched (every set of at most 2 of them)" in text
    assert result.sets_searched == 8 + 8 * 7 // 2
    assert "no other beats on both expected MACs and accuracy" in text
    assert "MACs to here: the backbone's MACs" in text and "exit cost: what a sample leaving there costs" in text

    fig = result.figure()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    names = sorted(n for t in ax.texts for n in t.get_text().split(", "))
    assert names == sorted(candidates)  # every candidate is labelled, once
    from matplotlib.transforms import Bbox

    chosen = ax.collections[-1]  # the chosen set's star, drawn last
    (cx, cy), = ax.transData.transform(chosen.get_offsets())
    half = chosen.get_sizes()[0] ** 0.5 / 2 * fig.dpi / 72  # marker size is an area in points squared
    star = Bbox.from_extents(cx - half, cy - half, cx + half, cy + half)
    for i, box in enumerate(boxes):
        assert not box.overlaps(star), ax.texts[i].get_text()
        for j in range(i):
            assert not box.overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    assert result.plot(tmp_path / "sweep.png").stat().st_size > 0


def test_copies_and_pickles_keep_what_the_example_inputs_looked_like(tmp_path):
    import copy
    import pickle

    module = bx.attach_exits(torchvision.models.resnet18(num_classes=10), ["layer1"], torch.zeros(1, 3, 40, 40))
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert other.example_record == module.example_record
        assert bx.load(bx.save(other, tmp_path / "copy.safetensors"), torchvision.models.resnet18(num_classes=10)
                       ).exit_points[0].shape == (64, 10, 10)
