"""A runner on disk: each stage and head a ``torch.export`` program, and a JSON routing table.

The table carries a SHA-256 digest of itself (every entry but the digest) and of every program file,
checked before anything is read, so an edited threshold or a changed program is refused; the programs
are read back with weights-only unpickling forced, so a tampered archive cannot run code either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import BranchifyError
from ..spec import ExitSpec
from .core import InputSpec, LoadedCore, carried_specs, dynamic_shapes

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


def _export(module, values: tuple, dynamic: tuple, what: str):
    try:
        return torch.export.export(module, values, dynamic_shapes=dynamic)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BranchifyError(f"torch.export could not save {what} of the runner ({type(err).__name__}: {first[:300]}); "
                             "the runner still runs it in torch. Move the exit to another layer, or save the module's "
                             "weights with bx.save instead") from err


def save_runner(runner, directory: str | os.PathLike, example_inputs) -> Path:
    """Write ``runner`` to ``directory`` (see ``ExitRunner.save``)."""
    core = runner.core
    if core.kind == "hooked":
        raise BranchifyError(
            "this module comes from the hook fallback (its model cannot be traced), so its forward is Python "
            "code that cannot be saved without its source; save the model's weights instead")
    core.rules()  # refuses criteria that read labels, and follows a new spec
    example = core.example(example_inputs, what="save")
    specs = core.inputs
    values = example
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    names = {"stages": [], "heads": []}
    with torch.inference_mode(False), torch.no_grad():
        for i, stage in enumerate(core.stages):
            program = _export(stage, values, dynamic_shapes(values, specs, batch), f"stage {i}")
            names["stages"].append(f"stage_{i}.pt2")
            torch.export.save(program, directory / names["stages"][-1])
            values = stage(*values)
            specs = carried_specs(core.stages[i + 1], values) if i + 1 < len(core.stages) else None
            if i < len(core.heads):
                taken = tuple(values[:core.head_inputs[i]])  # the head's input, then e.g. the attention mask
                head = _export(core.heads[i], taken, dynamic_shapes(taken, specs, batch), f"head {i}")
                names["heads"].append(f"head_{i}.pt2")
                torch.export.save(head, directory / names["heads"][-1])
    table = {
        "format": _FORMAT,
        "version": _VERSION,
        "num_classes": core.num_classes,
        "num_inputs": len(example),
        "inputs": None if core.inputs is None else [i.to_json() for i in core.inputs],
        "head_inputs": core.head_inputs,
        "dtype": str(core.dtype).removeprefix("torch."),
        "exits": [{"layer": p.layer, "criterion": core.spec.criterion_of(i), "threshold": p.threshold,
                   "temperature": p.temperature} for i, p in enumerate(core.spec.exits)],
        # Only the exported shape: the runner counts no other without the module.
        "macs": [{"input_shapes": [list(a.shape[1:]) for a in example if isinstance(a, torch.Tensor)],
                  "input_dtypes": [str(a.dtype).removeprefix("torch.") for a in example if isinstance(a, torch.Tensor)],
                  "per_exit": core.costs(example).tolist()}],
        **names,
    }
    table[_DIGEST] = _digest(table, directory)
    (directory / _TABLE).write_text(json.dumps(table, indent=2) + "\n")
    return directory


def load_runner(directory: str | os.PathLike):
    """The core of a runner read from ``directory`` (see ``ExitRunner.load``)."""
    directory = Path(directory)
    path = directory / _TABLE
    if not path.is_file():
        raise BranchifyError(f"no {_TABLE} in {str(directory)!r}; pass a directory written by runner.save(dir)")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BranchifyError(f"{str(path)!r} is not readable JSON ({err}); it was altered or damaged. Save the "
                             "runner again with runner.save(dir)") from err
    if not isinstance(table, dict) or table.get("format") != _FORMAT or table.get("version") not in (1, _VERSION):
        found = (table.get("format"), table.get("version")) if isinstance(table, dict) else (None, None)
        raise BranchifyError(
            f"{str(path)!r} is not a branchify runner table of version 1 or {_VERSION} (format {found[0]!r}, "
            f"version {found[1]!r}); save it again with this branchify")
    programs = _program_names(table, path)
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
    for name in programs:
        _check_weights_only(directory / name)
    stages = [torch.export.load(directory / name).module() for name in table["stages"]]
    heads = [torch.export.load(directory / name).module() for name in table["heads"]]
    inputs = table.get("inputs")
    if inputs is None:  # saved before the inputs were recorded: positional tensors
        inputs = [{"name": f"input_{j}", "dtype": None, "ndim": None, "dynamic": []}
                  for j in range(int(table["num_inputs"]))]
    core = LoadedCore(spec=spec, stages=stages, heads=heads, head_inputs=table.get("head_inputs", [1] * len(heads)),
                      num_classes=int(table["num_classes"]), dtype=getattr(torch, table["dtype"]),
                      device=torch.device("cpu"), inputs=tuple(InputSpec.from_json(i) for i in inputs))
    for entry in table["macs"]:
        shapes = tuple(torch.Size(s) for s in entry["input_shapes"])
        core.macs.remember(shapes, entry["per_exit"], core.device)
        if core.first_inputs is None:
            dtypes = entry.get("input_dtypes") or [table["dtype"]] * len(shapes)
            core.first_inputs = tuple((s, getattr(torch, d)) for s, d in zip(shapes, dtypes))
    return core


# Where torch.export.load unpickles: payloads marked use_pickle, custom and opaque objects, the legacy
# .pt weight and constant files, and the sample inputs (weights-only first, then a full unpickle).
_PAYLOAD_CONFIGS = ("/data/weights/", "/data/constants/")
_SAMPLE_INPUTS = "/data/sample_inputs/"


def _check_weights_only(program: Path) -> None:
    """Refuse a program archive that torch.export.load would read with a full unpickle (which can run code).

    torch.export.load falls back to ``weights_only=False`` where a weights-only read fails, and reads
    pickled payloads and objects with plain pickle; forcing weights-only through the environment would
    change it for every thread of the process, so the archive is checked instead: every payload must be
    a raw tensor, and the sample inputs must load weights-only."""
    refuse = BranchifyError(f"{str(program)!r} holds pickled objects, which could run code when loaded, where a "
                            "runner folder holds only tensors; it was altered. Save the runner again")
    try:
        with zipfile.ZipFile(program) as archive:
            for name in archive.namelist():
                if any(part in name for part in _PAYLOAD_CONFIGS):
                    tail = name.rsplit("/", 1)[-1]
                    if tail.endswith(".pt"):
                        raise refuse  # a legacy pickled weight or constant file
                    if tail.endswith("_config.json"):
                        config = json.loads(archive.read(name)).get("config", {})
                        if any(not isinstance(p, dict) or p.get("use_pickle") is not False
                               or not str(p.get("path_name", "")).startswith(("weight_", "tensor_"))
                               for p in config.values()):
                            raise refuse
                elif _SAMPLE_INPUTS in name:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                elif "/data/aotinductor/" in name:
                    raise refuse
    except BranchifyError:
        raise
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as err:
        raise BranchifyError(f"{str(program)!r} is not a readable program archive ({err}); the folder was "
                             "altered or damaged. Save the runner again") from err
    except pickle.UnpicklingError as err:
        raise refuse from err
