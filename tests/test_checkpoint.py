"""bx.save / bx.load: safetensors only, every mismatch reported, nothing half-loaded, atomic writes."""

import copy
import functools
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save as save_bytes

import branchify as bx
from branchify import checkpoint

X = torch.randn(1, 3, 32, 32)
SPEC = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5, weight=0.2),
                          bx.ExitPoint(layer="layer3", threshold=0.7, weight=0.3,
                                       head=bx.HeadSpec(kind="conv", channels=[8], stride=2))])


def trained_module(num_classes=4):
    """A resnet18 with exits after one SGD step, and its model; built once per size, a deep copy each call (the
    two copied together, so they share parameters as the originals do)."""
    return copy.deepcopy(_trained_module(num_classes))


@functools.cache
def _trained_module(num_classes):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    module = bx.attach_exits(model, SPEC, X)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    outputs = module(torch.randn(4, 3, 32, 32))
    sum(o.sum() for o in outputs).backward()
    opt.step()
    return model, module


def fresh(num_classes=4):
    torch.manual_seed(123)
    return torchvision.models.resnet18(num_classes=num_classes)


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "run" / "model.safetensors")
    loaded = bx.load(path, fresh(), X)
    assert loaded.exit_spec == module.exit_spec
    x = torch.randn(3, 3, 32, 32)
    module.eval(), loaded.eval()
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), module(x)))


def test_heads_only_checkpoint_takes_the_backbone_from_the_model(tmp_path):
    model, module = trained_module()
    path = bx.save(module, tmp_path / "heads.safetensors", include_backbone=False)
    assert all(k.startswith("exit_heads.") for k in checkpoint.read_checkpoint(path)[2])
    loaded = bx.load(path, model, X)
    x = torch.randn(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.eval()(x), module.eval()(x)))


def test_hook_fallback_round_trip(tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            if x.mean() > 10:
                x = -x
            return self.fc(x.mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = bx.attach_exits(Branchy(), bx.ExitSpec(exits=[{"layer": "stem"}]), X)
        path = bx.save(module, tmp_path / "hooks.safetensors")
        loaded = bx.load(path, Branchy(), X)
    assert loaded.exit_path == "hooks"
    assert all(torch.equal(a, b) for a, b in zip(loaded.eval()(X), module.eval()(X)))


def _assert_untouched(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weights_for_another_model_report_every_mismatch_and_load_nothing(tmp_path):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    other = torchvision.models.resnet34(num_classes=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(bx.BranchifyError, match=r"do not fit this model \(\d+ missing: layer1.2.* \(\d+\)"):
        bx.load(path, other, X)
    _assert_untouched(other, before)
    wrong_classes = fresh(num_classes=7)
    before = {k: v.clone() for k, v in wrong_classes.state_dict().items()}
    with pytest.raises(bx.BranchifyError, match=r"6 with another shape: .*fc.weight saved \(4, 512\), model has \(7"):
        bx.load(path, wrong_classes, X)
    _assert_untouched(wrong_classes, before)


def test_truncated_altered_and_foreign_files_are_refused(tmp_path):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(bx.BranchifyError, match="truncated or altered"):
        bx.load(truncated, fresh(), X)

    altered = tmp_path / "altered.safetensors"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # a byte of the last tensor's data: the header still parses
    altered.write_bytes(bytes(flipped))
    with pytest.raises(bx.BranchifyError, match="do not match the digest"):
        bx.load(altered, fresh(), X)

    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(save_bytes({"w": torch.zeros(2)}))
    with pytest.raises(bx.BranchifyError, match="not a branchify checkpoint"):
        bx.load(foreign, fresh(), X)

    with pytest.raises(bx.BranchifyError, match="no checkpoint at"):
        bx.load(tmp_path / "missing.safetensors", fresh(), X)


def _rewrite_header(path, dest, *, resign: bool = False, **changes):
    """A copy of ``path`` with header entries changed (and, with ``resign``, the digest made to match them)."""
    def edit(metadata):
        metadata = {**metadata, **changes}
        if resign:
            _, _, tensors = checkpoint.read_checkpoint(path)
            metadata["sha256"] = checkpoint._digest(tensors, metadata)
        return metadata
    dest.write_bytes(_with_header(path.read_bytes(), edit))
    return dest


def test_other_format_version_and_invalid_spec_are_refused(tmp_path):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    future = _rewrite_header(path, tmp_path / "future.safetensors", format_version="99")
    with pytest.raises(bx.BranchifyError, match="format version 99, but this branchify reads versions 1 and 2"):
        bx.load(future, fresh(), X)
    bad = json.loads(module.exit_spec.model_dump_json())
    bad["exits"][0]["weight"] = 0.9
    broken = _rewrite_header(path, tmp_path / "broken.safetensors", resign=True, spec=json.dumps(bad))
    with pytest.raises(bx.BranchifyError, match="the spec in its header is not valid"):
        bx.load(broken, fresh(), X)


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        bx.save(module, path, include_backbone=False)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_no_pickle_in_persistence_code():
    root = Path(bx.__file__).parent
    for source in root.glob("*.py"):
        text = source.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source.name}: {call}"
    assert not re.search(r"import pickle|from pickle|pickle\.load", (root / "checkpoint.py").read_text())


def test_saved_file_gets_the_usual_permissions(tmp_path):
    # Regression: mkstemp's private mode 0600 survived the rename, hiding checkpoints from the group.
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_same_weights_give_the_same_bytes(tmp_path):
    # Regression: safetensors writes its header metadata from a hash map, in an order that changed from one
    # save to the next, so a deterministic run (make demo) wrote a different file every time.
    _, module = trained_module()
    files = {bx.save(module, tmp_path / f"m{i}.safetensors").read_bytes() for i in range(6)}
    assert len(files) == 1
    data = files.pop()
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + n])["__metadata__"]
    assert list(metadata) == sorted(metadata)


def _with_header(data: bytes, edit) -> bytes:
    """``data`` with its header's metadata passed through ``edit`` (the tensors and offsets untouched)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + length])
    header["__metadata__"] = edit(dict(header["__metadata__"]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + length:]


def _spec_edit(change):
    def edit(metadata):
        spec = json.loads(metadata["spec"])
        change(spec)
        return {**metadata, "spec": json.dumps(spec)}
    return edit


HEADER_EDITS = {
    "threshold 0.5 -> 99": _spec_edit(lambda s: s["exits"][0].update(threshold=99.0)),
    "criterion entropy -> confidence": _spec_edit(lambda s: s.update(criterion="confidence")),
    "temperature -> 50": _spec_edit(lambda s: s["exits"][0].update(temperature=50.0)),
    # layer1.0 gives the same shape as layer1: its trained head would run on another layer
    "exit moved to another layer of the same shape": _spec_edit(lambda s: s["exits"][0].update(layer="layer1.0")),
    "another checkpoint's spec swapped in": lambda m: {**m, "spec": SPEC.with_exits(threshold=[0.1, 0.2])
                                                      .model_dump_json()},
    "exit path": lambda m: {**m, "exit_path": "hooks"},
    "a new entry": lambda m: {**m, "note": "harmless?"},
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_every_edit_of_the_header_is_refused(tmp_path, edit):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(_with_header(path.read_bytes(), HEADER_EDITS[edit]))
    bx.ExitSpec.model_validate_json(json.loads(edited.read_bytes()[8:8 + int.from_bytes(
        edited.read_bytes()[:8], "little")])["__metadata__"]["spec"])  # still a valid spec: only the digest can tell
    with pytest.raises(bx.BranchifyError, match="its header or its weights do not match the digest.*altered"):
        bx.load(edited, fresh(), X)


def test_a_format_1_checkpoint_still_loads_and_warns_that_its_header_is_not_covered(tmp_path):
    _, module = trained_module()
    path = bx.save(module, tmp_path / "m.safetensors")
    _, _, tensors = checkpoint.read_checkpoint(path)

    def as_format_1(metadata):  # what branchify wrote before format 2: the digest of the weights only
        return {**metadata, "format_version": "1", "sha256": checkpoint._digest(tensors)}

    old = tmp_path / "old.safetensors"
    old.write_bytes(_with_header(path.read_bytes(), as_format_1))
    with pytest.warns(UserWarning, match="format-1 checkpoint, whose digest covers the weights but not the header"):
        again = bx.load(old, fresh(), X)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again.eval()(X), module.eval()(X)))
