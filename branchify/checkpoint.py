"""Saving and loading modules with exits: a spec and weights, never pickled code.

A checkpoint is one safetensors file. Its header carries the spec (JSON), a format version, the
other facts the module is rebuilt from, and a SHA-256 digest of all of them and of the weights, so
an edit to any byte that changes behaviour (a threshold, a criterion, a temperature, an exit moved,
another spec swapped in) is refused; its tensors are the exit heads and, optionally, the backbone. Loading
rebuilds the module from the unmodified model and the spec with ``attach_exits``, checks every
saved name and shape against it and the digest against the data, and only then loads: a mismatch
leaves the module untouched. Saving writes a temporary file beside the target and renames it, so a
crash mid-save never leaves a corrupt file at the target path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from ._inputs import Inputs
from .errors import BranchifyError
from .exits import HEADS, exit_module
from .spec import ExitSpec
from .surgery import attach_exits

__all__ = ["FORMAT_VERSION", "load", "save"]

FORMAT_VERSION = 2
_KIND = "branchify-checkpoint"
_DIGEST = "sha256"


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of every header entry but the digest itself (format 2; format 1 covered the tensors only),
    then of every tensor's name, dtype, shape and bytes."""
    sha = hashlib.sha256()
    if metadata is not None:
        covered = {k: v for k, v in metadata.items() if k != _DIGEST}
        sha.update(json.dumps(covered, sort_keys=True, ensure_ascii=False).encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def save(module: nn.Module, path: str | os.PathLike, *, include_backbone: bool = True,
         arch: str | None = None) -> Path:
    """Write ``module``'s spec and weights to a safetensors file at ``path``, atomically.

    ``include_backbone=False`` keeps only the exit heads (for a backbone you load elsewhere).
    The file also records the shape and dtype of the example inputs the module was built on (one
    sample), so ``bx.load`` needs no example, and ``arch``, the architecture's name when you give it
    (``branchify report`` and ``branchify export`` then need no ``--arch``).

    >>> import tempfile, torch, torchvision, branchify as bx
    >>> model, x = torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)
    >>> module = bx.attach_exits(model, bx.ExitSpec(exits=[{"layer": "layer2"}]), x)
    >>> path = bx.save(module, tempfile.mkdtemp() + "/exits.safetensors")
    >>> again = bx.load(path, model)  # the example's shape is in the file
    >>> all(torch.equal(a, b) for a, b in zip(again.eval()(x), module.eval()(x)))
    True
    """
    spec = exit_module(module, "save").exit_spec
    state = module.state_dict()
    sharded = sorted(k for k, v in state.items() if type(v) is not torch.Tensor)
    if sharded:
        raise BranchifyError(
            f"{len(sharded)} weights ({sharded[0]}, ...) are sharded tensor subclasses (FSDP/DTensor); gather a "
            "full state dict first: torch.distributed.checkpoint.state_dict.get_model_state_dict(module, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)), load it into an unsharded "
            "module on rank 0 and save that")
    if not include_backbone:
        state = {k: v for k, v in state.items() if k.startswith(f"{HEADS}.")}
    # clones: safetensors refuses tensors that share storage (tied or shared backbone weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    metadata = {
        "format": _KIND,
        "format_version": str(FORMAT_VERSION),
        "spec": spec.model_dump_json(),
        "exit_path": str(getattr(module, "exit_path", "fx")),
        "num_classes": str(getattr(module, "num_classes", "")),
        "include_backbone": json.dumps(include_backbone),
    }
    record = getattr(module, "example_record", None)
    if record is not None:
        metadata["example_inputs"] = json.dumps(record)
    if arch is not None:
        if not isinstance(arch, str) or not arch:
            raise BranchifyError(f"arch must be the architecture's name (a non-empty str), got {arch!r}")
        metadata["arch"] = arch
    metadata[_DIGEST] = _digest(tensors, metadata)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _canonical(save_bytes(tensors, metadata=metadata))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's private 0600 would survive the rename
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _canonical(data: bytes) -> bytes:
    """``data`` with its header's metadata in sorted key order.

    safetensors writes the metadata from a hash map whose order changes from one save to the next;
    sorting it makes equal weights and specs give byte-identical files (reproducible runs, content hashes).
    The tensor entries and the data after the header are kept as they are (offsets are relative to them).
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header with spaces to an 8-byte boundary
    return len(raw).to_bytes(8, "little") + raw + data[8 + length:]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _summarise(kind: str, names: list[str]) -> str:
    """``kind`` names grouped by their first two dotted parts, so a wrong architecture reads in one line."""
    groups: dict[str, int] = {}
    for name in names:
        prefix = ".".join(name.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    shown = ", ".join(f"{prefix}.* ({count})" if count > 1 else prefix for prefix, count in list(groups.items())[:6])
    more = f" and {len(groups) - 6} more groups" if len(groups) > 6 else ""
    return f"{len(names)} {kind}: {shown}{more}"


def read_checkpoint(path: str | os.PathLike) -> tuple[ExitSpec, dict[str, str], dict[str, torch.Tensor]]:
    """The spec, header and tensors of a checkpoint, after every integrity check."""
    file = Path(path)
    if not file.is_file():
        raise BranchifyError(f"no checkpoint at {str(file)!r}; pass the path that bx.save returned")
    data = file.read_bytes()
    try:
        tensors = load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8: 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise BranchifyError(
            f"{str(file)!r} is not a readable safetensors file ({err}); it may be truncated or altered. "
            "Save it again with bx.save") from None
    if metadata.get("format") != _KIND:
        raise BranchifyError(f"{str(file)!r} is a safetensors file but not a branchify checkpoint (no "
                             f"'format: {_KIND}' in its header); write one with bx.save(module, path)")
    version = metadata.get("format_version")
    if version == "1":
        # Format 1's digest covered the weights only: its header can have been edited unnoticed.
        if metadata.get(_DIGEST) != _digest(tensors):
            raise BranchifyError(f"{str(file)!r}: the weights do not match the digest in its header: the file "
                                 "was altered or damaged after saving. Save it again with bx.save")
        warnings.warn(
            f"{str(file)!r} is a format-1 checkpoint, whose digest covers the weights but not the header (the "
            "spec, thresholds, criteria): an edit to those cannot be detected. Load it where you trust it and "
            "save it again with bx.save (format 2 covers every byte)", UserWarning, stacklevel=3)
    elif version != str(FORMAT_VERSION):
        raise BranchifyError(
            f"{str(file)!r} has checkpoint format version {version}, but this branchify reads versions 1 and "
            f"{FORMAT_VERSION}; load it with the branchify version that wrote it and save it again")
    elif metadata.get(_DIGEST) != _digest(tensors, metadata):
        raise BranchifyError(f"{str(file)!r}: its header or its weights do not match the digest in its header: "
                             "the file was altered or damaged after saving. Save it again with bx.save")
    try:
        spec = ExitSpec.model_validate_json(metadata["spec"])
    except Exception as err:
        raise BranchifyError(f"{str(file)!r}: the spec in its header is not valid ({err})") from None
    return spec, metadata, tensors


def recorded_inputs(path: str | os.PathLike, metadata: dict[str, str]) -> Inputs:
    """Zeros shaped like the example inputs a checkpoint was saved from."""
    if "example_inputs" not in metadata:
        raise BranchifyError(
            f"{str(path)!r} does not record the example inputs it was built on (it was saved before checkpoints "
            "recorded them, or from inputs that cannot be described); pass example_inputs, e.g. "
            "torch.zeros(1, 3, 224, 224)")
    try:
        record = json.loads(metadata["example_inputs"])
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise BranchifyError(f"{str(path)!r}: its recorded example inputs are not readable; pass example_inputs")
    return Inputs.from_record(record)


def load(path: str | os.PathLike, model: nn.Module, example_inputs=None, **attach_kwargs) -> nn.Module:
    """Rebuild a module from the unmodified ``model`` and the checkpoint at ``path``.

    ``example_inputs`` default to zeros shaped like the inputs the module was saved from (recorded in
    the file); pass them for another input size, or for files saved before checkpoints recorded them.
    Every saved tensor's name and shape is checked against the rebuilt module, and every mismatch
    is reported at once; nothing is loaded unless all of them fit. See ``bx.save`` for an example.
    """
    spec, metadata, tensors = read_checkpoint(path)
    if example_inputs is None:
        example_inputs = recorded_inputs(path, metadata)
    module = attach_exits(model, spec, example_inputs, **attach_kwargs)
    if getattr(module, "exit_path", "fx") != metadata.get("exit_path", "fx"):
        raise BranchifyError(
            f"the checkpoint was saved from a module built with {metadata.get('exit_path')!r} but this model "
            f"gives {module.exit_path!r}; load it with the same model class it was saved from")
    expected = module.state_dict()
    with_backbone = json.loads(metadata.get("include_backbone", "true"))
    wanted = expected if with_backbone else {k: v for k, v in expected.items() if k.startswith(f"{HEADS}.")}
    missing = [k for k in wanted if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    reshaped = [f"{k} saved {tuple(tensors[k].shape)}, model has {tuple(expected[k].shape)}"
                for k in sorted(tensors) if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        parts = [_summarise(kind, names) for kind, names in (("missing", missing), ("unexpected", unexpected))
                 if names]
        if reshaped:
            parts.append(f"{len(reshaped)} with another shape: " + "; ".join(reshaped[:8])
                         + (f"; and {len(reshaped) - 8} more" if len(reshaped) > 8 else ""))
        raise BranchifyError(
            f"the weights in {str(path)!r} do not fit this model ({'; '.join(parts)}). "
            "Pass the same architecture (and num_classes) the checkpoint was saved from")
    module.load_state_dict(tensors, strict=with_backbone)
    return module
