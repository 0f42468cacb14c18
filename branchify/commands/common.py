"""Small pieces the two commands (``branchify`` and ``branchify-train``) share: errors on one line,
argument types, devices, batch limits."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

import pydantic
import torch

from ..errors import BranchifyError

__all__ = ["error_line", "limit_batches", "one_line_warnings", "resolve_device", "run_command", "usable_cores"]


def error_line(err: Exception) -> str:
    """A user error as one line: a ``BranchifyError``'s message, or pydantic's errors joined.

    >>> import branchify as bx
    >>> from branchify.commands.common import error_line
    >>> error_line(bx.BranchifyError("bad value 3;\\n use 2"))
    'bad value 3; use 2'
    """
    if isinstance(err, pydantic.ValidationError):
        parts = []
        for item in err.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            where = ".".join(str(part) for part in item["loc"])
            value = item.get("input")
            got = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
            parts.append(f"{err.title} {where}: {message}{got}" if where else f"{err.title}: {message}")
        text = "; ".join(parts)
    else:
        text = str(err)
    return " ".join(text.split())


class _Limited:
    """At most ``limit`` batches of ``loader`` per pass (each ``iter`` starts a fresh pass)."""

    def __init__(self, loader: Iterable, limit: int) -> None:
        self.loader = loader
        self.limit = limit

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.limit)

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)  # type: ignore[arg-type]


def limit_batches(loader: Iterable, limit: int | None) -> Iterable:
    """``loader`` cut to its first ``limit`` batches per pass (``None``: unchanged), for quick runs.

    >>> from branchify.commands.common import limit_batches
    >>> len(limit_batches([1, 2, 3], 2)), list(limit_batches([1, 2, 3], 2)), list(limit_batches([1, 2], None))
    (2, [1, 2], [1, 2])
    """
    return loader if limit is None else _Limited(loader, limit)


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names; ``"auto"`` is CUDA when available, else the CPU.

    >>> from branchify.commands.common import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BranchifyError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BranchifyError(f"--device {name!r} asks for CUDA, which this machine lacks; use --device cpu")
    return device


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _argument_type(name: str, convert: type, accepts: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require ``accepts(value)``, else say ``rule``."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{value} {rule}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse type: {kind}, which {rule}."
    return parse


positive_int = _argument_type("positive_int", int, lambda v: v >= 1, "must be at least 1")
non_negative_int = _argument_type("non_negative_int", int, lambda v: v >= 0, "must be 0 or more")
positive_float = _argument_type("positive_float", float, lambda v: math.isfinite(v) and v > 0,
                                "must be a positive number")
fraction = _argument_type("fraction", float, lambda v: 0 <= v < 1, "must be >= 0 and < 1")


def one_line_warnings(prog: str, stream: TextIO | None = None) -> None:
    """Show warnings as ``prog: warning: message`` (call inside ``warnings.catch_warnings()``)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=stream or sys.stderr)

    warnings.showwarning = show




def run_command(prog: str, where: str, command: Callable[[], object]) -> int:
    """Run ``command()`` for program ``prog`` with one-line warnings; return its exit status.

    A user error (``BranchifyError``, pydantic's ``ValidationError``) prints ``where: error: ...``
    on one line of stderr and gives 2, as argparse does for bad flags; success gives 0. A reader
    that stops early (``branchify points resnet18 | head -3``) ends the command quietly with 1.
    """
    with warnings.catch_warnings():
        one_line_warnings(prog)
        try:
            command()
            sys.stdout.flush()
        except (BranchifyError, pydantic.ValidationError) as err:
            print(f"{where}: error: {error_line(err)}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            # Python's own advice: point stdout at devnull, or the flush at exit raises again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
    return 0


class _InputSize(argparse.Action):
    """``--input-size H [W]``: one side for square inputs, or a height and a width; stored as ``(H, W)``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if len(values) > 2:
            parser.error(f"{option_string} takes a side, or a height and a width, got {len(values)} values "
                         f"{' '.join(map(str, values))}")
        setattr(namespace, self.dest, (values[0], values[-1]))


def add_input_size(parser: argparse.ArgumentParser, default: str) -> None:
    """The one form of ``--input-size`` every command takes; ``default`` says what it is when not given."""
    parser.add_argument("--input-size", type=positive_int, nargs="+", action=_InputSize, default=None,
                        metavar="SIDE", help=f"input height [and width] in pixels (default: {default})")
