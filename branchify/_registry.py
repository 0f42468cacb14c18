"""The rule every registry of names follows (criteria, head kinds): a name is registered once.

A second registration under a taken name would silently change what every spec naming it means, so it
is refused unless the caller says ``replace=True``; built-in names are never replaced.
"""

from __future__ import annotations

from collections.abc import Container, MutableMapping
from typing import TypeVar

from .errors import BranchifyError

T = TypeVar("T")


def add(registry: MutableMapping[str, T], name: str, value: T, *, what: str, builtin: Container[str],
        replace: bool) -> T:
    """Put ``value`` under ``name``; a built-in name is refused, a taken one unless ``replace``."""
    if not isinstance(replace, bool):
        raise BranchifyError(f"replace must be True or False, got {replace!r}")
    if name in builtin:
        raise BranchifyError(f"{what} {name!r} is built in and cannot be replaced; register yours under another name")
    if name in registry and not replace:
        raise BranchifyError(
            f"{what} {name!r} is already registered; pass replace=True to replace it (specs naming it then use the "
            "new one), or register yours under another name")
    registry[name] = value
    return value
