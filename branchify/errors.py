"""The one exception type for user mistakes, and the one for our own broken invariants."""

from __future__ import annotations

__all__ = ["BranchifyError", "BranchifyInternalError", "ExitOrderError", "SpecError"]


class BranchifyError(ValueError):
    """A user error: the message names the offending value and the way out.

    It subclasses ``ValueError`` so that pydantic validators that raise it report it as a normal
    validation error.

    >>> import branchify as bx
    >>> try:
    ...     bx.ExitSpec(exits=[])
    ... except bx.BranchifyError as err:
    ...     print("rejected")
    rejected
    """


class SpecError(BranchifyError):
    """An invalid ``ExitSpec``, ``ExitPoint`` or ``HeadSpec``; ``errors`` keeps pydantic's per-field list.

    >>> import branchify as bx
    >>> try:
    ...     bx.ExitSpec(exits=[{"layer": "layer1", "weight": 1.5}])
    ... except bx.SpecError as err:
    ...     print(err.errors[0]["loc"])
    ()
    """

    def __init__(self, message: str, errors: list | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])


class ExitOrderError(BranchifyError):
    """A spec that lists its exits in another order than the model runs them; ``graph_order`` is the order
    that works (the spec's layer names, as the model reaches them)."""

    def __init__(self, message: str, graph_order: list[str]) -> None:
        super().__init__(message)
        self.graph_order = list(graph_order)


class BranchifyInternalError(RuntimeError):
    """A broken invariant inside branchify: a bug of ours, never the user's mistake.

    It is deliberately not a ``ValueError`` (nor a ``BranchifyError``), so that code catching user errors
    does not swallow it and no message blames the user's inputs for it. Raise it ``from`` the original
    error so that the cause is kept; please report it with the traceback.

    >>> from branchify.errors import BranchifyInternalError
    >>> issubclass(BranchifyInternalError, ValueError)
    False
    """
