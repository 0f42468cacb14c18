"""A runner on disk: each stage and head a ``torch.export`` program, and a JSON routing table.

The table carries a SHA-256 digest of itself (every entry but the digest) and of every program file,
checked before anything is read, so an edited threshold or a changed program is refused; the programs
are read back with weights-only unpickling forced, so a tampered archive cannot run code either.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import BranchifyError
from ..spec import ExitSpec

__all__ = ["load_runner", "save_runner"]

_FORMAT = "branchify-runner"
_VERSION = 2
_TABLE = "routing.json"
_DIGEST = "sha256"


def _digest(table: dict, directory: Path) -> str:
    """SHA-256 of the table's entries (but the digest) and of each program file, by name, in the table's order."""
    sha = hashlib.sha256()
    sha.update(json.dumps({k: v for k, v in table.items() if k != _DIGEST}, sort_keys=True).encode() + b"\0")
    for name in [*table.get("stages", []), *table.get("heads", [])]:
        sha.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return sha.hexdigest()


def _program_names(table: dict, path: Path) -> list[str]:
    names = [*table.get("stages", []), *table.get("heads", [])]
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n.endswith(".pt2")]
    if bad:
        raise BranchifyError(f"{str(path)!r} names programs {bad} outside its folder or of another kind; the table "
                             "was altered. Save the runner again with runner.save(dir)")
    missing = [n for n in names if not (path.parent / n).is_file()]
    if missing:
        raise BranchifyError(f"{str(path)!r} names programs {missing} that the folder lacks; copy the whole folder, "
                             "or save the runner again")
    return names


def save_runner(runner, directory: str | os.PathLike, example_inputs) -> Path:
    """Write ``runner`` to ``directory`` (see ``ExitRunner.save``)."""
    if runner._hooks:
        raise BranchifyError(
            "this module comes from the hook fallback (its model cannot be traced), so its forward is Python "
            "code that cannot be saved without its source; save the model's weights instead")
    if example_inputs is None:
        if not runner._macs.shapes:
            raise BranchifyError(
                "the runner has not seen an input yet, so it does not know the input shape to export; "
                "pass example_inputs=torch.randn(1, 3, 224, 224) (your input's shape) or call the runner once")
        example_inputs = tuple(torch.zeros((2, *s), dtype=runner._dtype, device=runner._device)
                               for s in runner._macs.shapes[0])
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    runner._check(inputs)
    # Batch 2 so that export does not specialise the batch dim to 1.
    example = tuple(torch.cat([a[:1], a[:1]]) for a in inputs)
    runner._follow_spec()
    values = example
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    names = {"stages": [], "heads": []}
    with torch.inference_mode(False), torch.no_grad():
        for i, stage in enumerate(runner.stages):
            program = torch.export.export(stage, values, dynamic_shapes=tuple({0: batch} for _ in values))
            names["stages"].append(f"stage_{i}.pt2")
            torch.export.save(program, directory / names["stages"][-1])
            values = stage(*values)
            if i < len(runner.heads):
                head = torch.export.export(runner.heads[i], (values[0],), dynamic_shapes=({0: batch},))
                names["heads"].append(f"head_{i}.pt2")
                torch.export.save(head, directory / names["heads"][-1])
    table = {
        "format": _FORMAT,
        "version": _VERSION,
        "num_classes": runner.num_classes,
        "num_inputs": len(inputs),
        "dtype": str(runner._dtype).removeprefix("torch."),
        "exits": [{"layer": p.layer, "criterion": runner._spec.criterion_of(i), "threshold": p.threshold,
                   "temperature": p.temperature} for i, p in enumerate(runner._spec.exits)],
        # Only the exported shape: the programs take no other.
        "macs": [{"input_shapes": [list(a.shape[1:]) for a in example],
                  "per_exit": runner._costs(example).tolist()}],
        **names,
    }
    table[_DIGEST] = _digest(table, directory)
    (directory / _TABLE).write_text(json.dumps(table, indent=2) + "\n")
    return directory


def load_runner(cls, directory: str | os.PathLike):
    """A runner of class ``cls`` read from ``directory`` (see ``ExitRunner.load``)."""
    directory = Path(directory)
    path = directory / _TABLE
    if not path.is_file():
        raise BranchifyError(f"no {_TABLE} in {str(directory)!r}; pass a directory written by runner.save(dir)")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BranchifyError(f"{str(path)!r} is not readable JSON ({err}); it was altered or damaged. Save the "
                             "runner again with runner.save(dir)") from None
    if not isinstance(table, dict) or table.get("format") != _FORMAT or table.get("version") not in (1, _VERSION):
        found = (table.get("format"), table.get("version")) if isinstance(table, dict) else (None, None)
        raise BranchifyError(
            f"{str(path)!r} is not a branchify runner table of version 1 or {_VERSION} (format {found[0]!r}, "
            f"version {found[1]!r}); save it again with this branchify")
    _program_names(table, path)
    if table["version"] == 1:
        warnings.warn(f"{str(path)!r} is a version-1 runner folder, which has no digest: an edit to its table or "
                      "programs cannot be detected. Save the runner again (version 2 covers every file)",
                      UserWarning, stacklevel=3)
    elif table.get(_DIGEST) != _digest(table, directory):
        raise BranchifyError(f"{str(path)!r}: the routing table or a program does not match the digest in the table: "
                             "the folder was altered or damaged after saving. Save the runner again with "
                             "runner.save(dir)")
    spec = ExitSpec(exits=[{"layer": e["layer"], "threshold": e["threshold"], "criterion": e["criterion"],
                            "temperature": e["temperature"]} for e in table["exits"]])
    with _weights_only_loads():
        stages = [torch.export.load(directory / name).module() for name in table["stages"]]
        heads = [torch.export.load(directory / name).module() for name in table["heads"]]
    runner = cls.__new__(cls)
    runner._setup(module=None, spec=spec, stages=stages, heads=heads, num_classes=int(table["num_classes"]),
                  num_inputs=int(table["num_inputs"]), dtype=getattr(torch, table["dtype"]),
                  device=torch.device("cpu"))
    for entry in table["macs"]:
        runner._macs.remember(tuple(torch.Size(s) for s in entry["input_shapes"]), entry["per_exit"], runner._device)
    return runner


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch.export.load retries with weights_only=False when a weights-only read fails; forbid that."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before
