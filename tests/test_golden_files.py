"""Files written by earlier branchify versions keep loading, and give what they gave when saved.

``tests/data/format1`` was written by the release before checkpoint format 2 (commit 214500d), and
``tests/data/format2`` by this one, each with ``expected.pt`` (the inputs and the module's and the
runner's outputs at save time) and ``weights.json`` (each saved tensor's dtype, shape and the SHA-256 of
its bytes, read from the file with safetensors itself). A change that breaks reading old files fails here.

What a file promises, and so what is pinned: its weights, its spec and its routing decisions (which exit
each sample takes, and the MACs that costs) exactly; float outputs to ``RTOL``/``ATOL``, because float
kernels differ in the last bits between CPUs and thread counts (the files were saved on another machine).
The decisions can be pinned exactly because no saved score lies within ``MARGIN`` of a threshold, which
the data is checked for, far beyond float32 rounding. ``test_a_perturbed_golden_file_fails`` shows that
the checks catch a change of the weights, the spec or the routing table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import branchify as bx
from branchify.criteria import get_criterion
from branchify.routing import route

DATA = Path(__file__).parent / "data"
VERSIONS = ["format1", "format2"]
RTOL, ATOL = 1e-5, 1e-6  # about a hundred float32 ulps: rounding, never a changed computation
MARGIN = 1e-5  # a score this close to a threshold could be routed differently by another CPU's rounding

# The spec both golden files were saved with, as the format-1 header spelled it.
# The files were written when a head's token pooling had the default "mean" and saved it; they read back
# with it spelled out (an unset token now means "the model's default", which is "mean" for this model too).
_MEAN = bx.HeadSpec(token="mean")
SPEC = bx.ExitSpec(criterion="entropy", exits=[bx.ExitPoint(layer="1", threshold=1.05, head=_MEAN),
                                              bx.ExitPoint(layer="3", threshold=1.08, head=_MEAN)])


def model() -> nn.Module:
    """The architecture the golden files were saved from (any weights: the checkpoint holds them)."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def expected_of(version: str) -> dict:
    return torch.load(DATA / version / "expected.pt", weights_only=True)


def digest(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "sha256": hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()}


def check_checkpoint(path: Path, version: str) -> None:
    """Everything a checkpoint promises, against the pinned weights and what it gave when saved; raises
    AssertionError on the first difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # which warning each format gives is checked below
        module = bx.load(path, model(), torch.zeros(1, 8)).eval()
    expected, pinned = expected_of(version), json.loads((DATA / version / "weights.json").read_text())
    state = module.state_dict()
    assert sorted(state) == sorted(pinned), "the checkpoint's tensors load under other names"
    for key, tensor in state.items():
        assert digest(tensor) == pinned[key], f"weight {key} is not the one saved"
    assert module.exit_spec == SPEC, f"the spec read is {module.exit_spec!r}"

    x = expected["inputs"]
    with torch.no_grad():
        outputs = module(x)
        backbone = model()
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("exit_heads.")})
        assert torch.equal(outputs[-1], backbone.eval()(x)), "the final output is not the backbone's own"
    assert torch.equal(route(module.exit_spec, outputs[:-1]), expected["exit_index"]), "routed differently"
    for got, want in zip(outputs, expected["outputs"], strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def check_runner(folder: Path, version: str) -> None:
    expected = expected_of(version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = bx.ExitRunner.load(folder)
    result = runner(expected["inputs"])
    assert torch.equal(result.exit_index, expected["exit_index"]), "routed differently"
    assert torch.equal(result.macs, expected["macs"]), "charged other MACs"
    torch.testing.assert_close(result.logits, expected["logits"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_saved_scores_keep_clear_of_the_thresholds(version):
    """What lets the tests below pin the routing exactly: rounding on another CPU cannot move a score across."""
    expected = expected_of(version)
    entropy = get_criterion("entropy")
    for point, logits in zip(SPEC.exits, expected["outputs"][:-1]):
        scores = entropy.score(logits.double())
        assert (scores - point.threshold).abs().min() > MARGIN


@pytest.mark.parametrize("version", VERSIONS)
def test_a_saved_checkpoint_gives_the_weights_spec_and_outputs_it_had_when_saved(version):
    with pytest.warns(UserWarning, match="format-1 checkpoint") if version == "format1" else _no_warning():
        bx.load(DATA / version / "checkpoint.safetensors", model(), torch.zeros(1, 8))
    check_checkpoint(DATA / version / "checkpoint.safetensors", version)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_saved_runner_folder_gives_the_results_it_gave_when_saved(version):
    with pytest.warns(UserWarning, match="version-1 runner folder") if version == "format1" else _no_warning():
        bx.ExitRunner.load(DATA / version / "runner")
    check_runner(DATA / version / "runner", version)


def _nudge_a_weight(path: Path) -> None:
    """One float32 of the first tensor's data one ulp up, in place (digest and all left as they were)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    (value,) = struct.unpack_from("<f", raw, start)
    struct.pack_into("<f", raw, start, torch.nextafter(torch.tensor(value), torch.tensor(float("inf"))).item())
    path.write_bytes(bytes(raw))


def _save_again_with_a_weight_changed(path: Path) -> None:
    """A valid file, digest and all, whose weights are not the pinned ones: only the weight check can see it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = bx.load(path, model(), torch.zeros(1, 8))
    with torch.no_grad():
        module.exit_heads[0][-1].bias[0] += 1e-3
    bx.save(module, path)


def _edit_header(path: Path, key: str, edit) -> None:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["__metadata__"][key] = edit(header["__metadata__"][key])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def _edit_routing(folder: Path) -> None:
    table = json.loads((folder / "routing.json").read_text())
    table["exits"][1]["threshold"] = 0.9
    (folder / "routing.json").write_text(json.dumps(table))


PERTURBATIONS = {
    "a weight one ulp off": ("checkpoint", lambda d: _nudge_a_weight(d / "checkpoint.safetensors")),
    "a weight changed, the file saved again": ("checkpoint", lambda d: _save_again_with_a_weight_changed(
        d / "checkpoint.safetensors")),
    "a threshold in the header": ("checkpoint", lambda d: _edit_header(
        d / "checkpoint.safetensors", "spec", lambda s: s.replace("1.08", "1.07"))),
    "a threshold in the routing table": ("runner", lambda d: _edit_routing(d / "runner")),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_a_perturbed_golden_file_fails(tmp_path, version, perturbation):
    """The checks above are not vacuous: a changed copy of a golden file is refused by the loader or fails them."""
    kind, perturb = PERTURBATIONS[perturbation]
    copy = tmp_path / version
    shutil.copytree(DATA / version, copy)
    check = check_checkpoint if kind == "checkpoint" else check_runner
    target = copy / "checkpoint.safetensors" if kind == "checkpoint" else copy / "runner"
    check(target, version)  # the copy itself passes
    perturb(copy)
    with pytest.raises((AssertionError, bx.BranchifyError)):
        check(target, version)


class _no_warning:
    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
