"""The declarative exit spec: where the exits go, what their heads look like, how they fire."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from .criteria import get_criterion
from .errors import BranchifyError, ExitOrderError, SpecError
from .heads import SHARED_FIELDS, head_kind, registered_heads
from .layout import Layout

__all__ = ["ExitPoint", "ExitSpec", "HeadSpec"]

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _spec_error(err: ValidationError) -> SpecError:
    lines = []
    for item in err.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or err.title
        message = item["msg"].removeprefix("Value error, ")
        shown = "" if item["type"] == "value_error" else f" (got {item.get('input')!r})"
        lines.append(f"{where}: {message}{shown}")
    head = f"invalid {err.title}" + (f" ({len(lines)} problems)" if len(lines) > 1 else "")
    return SpecError(f"{head}: " + "; ".join(lines), err.errors(include_url=False))


class _SpecModel(BaseModel):
    """Raises ``SpecError`` (a ``BranchifyError``) instead of pydantic's ``ValidationError``.

    Nested inside a user's own pydantic model, validation runs in pydantic's core and reports a
    ``ValidationError`` as usual.
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _spec_error(err) from None

    # Marked as pydantic's own __init__ (as RootModel does), so nested validation inside pydantic's
    # core keeps reporting plain per-field errors instead of calling this wrapper.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None


class HeadSpec(_SpecModel):
    """The shape of one exit head; sizes are inferred from the exit point, never typed.

    Kinds: ``"linear"`` (global average pool + linear, the default), ``"conv"`` (Distiller's
    ImageNet head: convs -> max/avg pool k3 s2 p1 -> flatten -> linear), ``"pool"`` (Distiller's
    CIFAR head: avg pool ``kernel_size`` -> flatten -> linear), ``"mlp"`` (pool -> linear ->
    activation -> linear), or any kind added with ``bx.register_head``. On a token sequence ``token`` says
    how tokens are pooled: ``"mean"`` (the real tokens, under the attention mask), ``"cls"`` (the first),
    ``"last"`` (the last real token; the last position without a mask); unset, ``"last"`` on a causal
    decoder (GPT-2, Llama, ...) and ``"mean"`` elsewhere.

    >>> import branchify as bx
    >>> bx.HeadSpec(kind="conv", channels=[12], kernel_size=7, stride=2, pool="max").kind
    'conv'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Annotated[str, Field(min_length=1)] = "linear"
    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    kernel_size: Annotated[int, Field(gt=0)] = 3
    stride: Annotated[int, Field(gt=0)] = 1
    pool: Literal["max", "avg"] = "max"
    hidden: Annotated[int, Field(gt=0)] | None = None
    activation: Literal["relu", "gelu", "none"] | None = None
    layout: Layout | None = None
    # None: "last" on a causal decoder, else "mean" (heads.default_token); "last" reads the last real token
    token: Literal["mean", "cls", "last"] | None = None
    options: dict[str, JsonValue] = Field(default_factory=dict)

    def set_fields(self) -> list[str]:
        """The fields (beyond ``kind``) set to something other than their defaults."""
        fields = type(self).model_fields
        return [f for f in fields
                if f != "kind" and getattr(self, f) != fields[f].get_default(call_default_factory=True)]

    def check_kind(self) -> HeadSpec:
        """This spec, if its kind is registered and reads every field it sets (checked again when exits are
        attached, so that a spec naming a kind registered later still loads)."""
        kind = head_kind(self.kind)
        stray = [f for f in self.set_fields() if f not in kind.fields | SHARED_FIELDS]
        if stray:
            readers = {f: [repr(k) for k in registered_heads() if f in head_kind(k).fields] for f in stray}
            hint = "; ".join(f"{f}: {' or '.join(kinds)}" for f, kinds in readers.items() if kinds)
            raise BranchifyError(f"head kind {self.kind!r} does not use {stray}; drop them, or pick a kind that "
                                 f"does ({hint or 'none does'})")
        problem = kind.check(self) if kind.check is not None else None
        if problem:
            raise BranchifyError(problem)
        return self

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> HeadSpec:
        return self.check_kind() if self.kind in registered_heads() else self

    def __repr_args__(self):
        # Only what this kind reads: a linear head does not print kernel_size=3, pool='max'.
        shown = set(self.set_fields())
        if self.kind in registered_heads():
            shown |= head_kind(self.kind).fields - {"options"} - SHARED_FIELDS
        yield "kind", self.kind
        for name in type(self).model_fields:
            if name in shown:
                yield name, getattr(self, name)


class ExitPoint(_SpecModel):
    """One early exit: where it attaches, its head, and how it fires and trains.

    ``layer`` is a dotted module path (``"layer1"``, ``"features.3"``: the exit reads the module's
    output) or a node name as ``torchvision.models.feature_extraction.get_graph_node_names``
    reports it (``"layer1.0.relu_1"``). ``criterion`` overrides the spec's criterion for this exit;
    ``temperature`` divides the logits before the criterion (set by ``bx.calibrate``).

    >>> import branchify as bx
    >>> bx.ExitPoint(layer="layer1", threshold=1.2, weight=0.1).head.kind
    'linear'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: Annotated[str, Field(min_length=1)]
    head: HeadSpec = Field(default_factory=HeadSpec)
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    weight: NonNegative | None = None
    criterion: str | None = None
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, name: str | None) -> str | None:
        if name is not None:
            get_criterion(name)
        return name


class ExitSpec(_SpecModel):
    """All exits of a model, and the exit criterion.

    Loss weights are for the early exits; the final exit gets ``1 - sum(weights)``, so the sum
    must stay below 1 (Distiller's convention); they are given for every exit or for none. An exit
    without a threshold while others have one is off: never judged, its head never run or charged.
    With no threshold at all, nothing routes (training, forced statistics).

    >>> import branchify as bx
    >>> spec = bx.ExitSpec(exits=[
    ...     bx.ExitPoint(layer="layer1", threshold=1.2, weight=0.1),
    ...     bx.ExitPoint(layer="layer2", threshold=0.9, weight=0.3,
    ...                  head=bx.HeadSpec(kind="conv", channels=[12], kernel_size=7, stride=2, pool="max")),
    ... ])
    >>> round(spec.final_weight, 3), spec.thresholds
    (0.6, [1.2, 0.9])
    >>> bx.ExitSpec.model_validate_json(spec.model_dump_json()) == spec
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    exits: list[ExitPoint]
    criterion: str = "entropy"

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, name: str) -> str:
        get_criterion(name)
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ExitSpec:
        if not self.exits:
            raise BranchifyError("an ExitSpec needs at least one exit, e.g. exits=[ExitPoint(layer='layer1')]")
        seen: dict[str, int] = {}
        for i, point in enumerate(self.exits):
            if point.layer in seen:
                raise BranchifyError(
                    f"exit {i} repeats layer {point.layer!r} (already exit {seen[point.layer]}); "
                    "each layer can carry one exit")
            seen[point.layer] = i
        given = [i for i, p in enumerate(self.exits) if p.weight is not None]
        if given and len(given) != len(self.exits):
            missing = [f"exit {i} ({p.layer!r})" for i, p in enumerate(self.exits) if p.weight is None]
            raise BranchifyError(f"weights must be given for all exits or for none; missing for {', '.join(missing)}")
        self.check_thresholds()
        weights = self.weights
        if weights is not None and not math.fsum(weights) < 1:
            parts = " + ".join(f"{w:g} (exit {i}, {p.layer!r})" for i, (w, p) in enumerate(zip(weights, self.exits)))
            raise BranchifyError(
                f"exit loss weights sum to {math.fsum(weights):g} = {parts}; the sum must be < 1 because "
                "the final exit gets 1 - sum. Lower the weights")
        return self

    @property
    def layers(self) -> list[str]:
        return [p.layer for p in self.exits]

    @property
    def thresholds(self) -> list[float | None] | None:
        """The exit thresholds (None for an exit that is off), or None when the spec has none."""
        values = [p.threshold for p in self.exits]
        return None if all(v is None for v in values) else [None if v is None else float(v) for v in values]

    @property
    def judged(self) -> list[bool]:
        """Which exits are judged: all of them without thresholds (nothing routes), else those with one."""
        values = [p.threshold is not None for p in self.exits]
        return values if any(values) else [True] * len(values)

    @property
    def weights(self) -> list[float] | None:
        """The early exits' loss weights, or None when the spec has none."""
        values = [p.weight for p in self.exits]
        return None if values[0] is None else [float(v) for v in values]  # type: ignore[arg-type]

    @property
    def final_weight(self) -> float:
        """The final exit's loss weight, ``1 - sum(weights)`` (1 when no weights are given)."""
        return 1.0 - math.fsum(self.weights or [])

    def criterion_of(self, index: int) -> str:
        """The criterion name exit ``index`` uses (its own override, else the spec's)."""
        return self.exits[index].criterion or self.criterion

    def with_exits(self, **changes: Sequence[Any]) -> ExitSpec:
        """A copy with per-exit fields replaced, e.g. ``spec.with_exits(threshold=[0.5, 0.7])``."""
        exits = [p.model_dump() for p in self.exits]
        for field, values in changes.items():
            if len(values) != len(exits):
                raise BranchifyError(f"{len(values)} values for {field!r}, but the spec has {len(exits)} exits")
            # plain dicts, validated once below: model_copy(update=...) would skip validation
            exits = [{**point, field: value} for point, value in zip(exits, values)]
        return type(self).model_validate({**self.model_dump(), "exits": exits})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec to ``path`` as JSON (readable and editable by hand); returns the path.

        >>> import tempfile, branchify as bx
        >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="layer1", threshold=0.5)])
        >>> bx.ExitSpec.load(spec.save(tempfile.mkdtemp() + "/spec.json")) == spec
        True
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.model_dump_json(indent=2, exclude_defaults=True) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitSpec:
        """Read a spec written by ``spec.save`` (or by hand: ``{"exits": [{"layer": "layer1"}]}``)."""
        file = Path(path)
        if not file.is_file():
            raise BranchifyError(f"no spec file at {str(file)!r}; write one with spec.save(path)")
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise BranchifyError(f"cannot read the spec file {str(file)!r} ({err})") from None
        try:
            return cls.model_validate_json(text)
        except SpecError as err:
            raise SpecError(f"{str(file)!r}: {err}", err.errors) from None

    def check_thresholds(self, classes: int | None = None) -> ExitSpec:
        """This spec, if every threshold lies in its criterion's score range (for ``classes`` classes when given:
        entropy's range ends at ``log C``); a threshold at which an exit never fires, or fires for every
        sample whatever it is, is refused with the range."""
        for i, point in enumerate(self.exits):
            if point.threshold is not None:
                get_criterion(self.criterion_of(i)).check_threshold(point.threshold, f"exit {i} ({point.layer!r}): ",
                                                                    classes)
        return self

    def check_order(self, ranks: Sequence[int], runs: str) -> None:
        """Refuse exits listed in another order than the model reaches them (``ranks``: each exit's place in
        ``runs``, e.g. "graph order"): the outputs come back in the spec's order, so none may be moved."""
        order = sorted(range(len(self.exits)), key=lambda i: ranks[i])
        if order != list(range(len(self.exits))):
            graph = [self.exits[i].layer for i in order]
            raise ExitOrderError(
                f"the spec lists its exits as {self.layers}, but the model reaches them in the order {graph} "
                f"({runs}); list the exits in that order, so that the outputs come back in the order you declared",
                graph)

    def check_replaces(self, built: ExitSpec) -> ExitSpec:
        """This spec, if it can stand in for ``built`` on an existing module (same layers and heads).

        Thresholds, weights, criteria and temperatures may change; where the exits are and what
        their heads look like are fixed when the module is built.
        """
        if not isinstance(self, ExitSpec):
            raise SpecError(f"exit_spec must be a bx.ExitSpec, got {type(self).__name__}")
        old = [(p.layer, p.head) for p in built.exits]
        new = [(p.layer, p.head) for p in self.exits]
        if new != old:
            raise SpecError(
                f"this module was built with exits at {built.layers}; a new spec may change thresholds, weights, "
                f"criteria and temperatures, but not the layers or heads (got {self.layers}). Call "
                "bx.attach_exits(model, spec, example_inputs) again for other exits")
        return self


def spec_attribute(order: str) -> property:
    """A module's ``exit_spec``: set once when the module is built, then only to a spec that
    ``check_replaces`` the built one. ``order`` says how its exits are ordered, for the docs."""

    def get(module) -> ExitSpec:
        return module.__dict__["_exit_spec"]

    def set_(module, spec: ExitSpec) -> None:
        built = module.__dict__.get("_exit_spec")
        spec = spec if built is None else ExitSpec.check_replaces(spec, built)
        classes = module.__dict__.get("num_classes")
        if isinstance(classes, int):  # unset while the module is built: its first routing checks then
            spec.check_thresholds(classes)
        module.__dict__["_exit_spec"] = spec

    return property(get, set_, doc=f"The spec, exits in {order}; assign a new one to change thresholds, "
                                   "weights or criteria.")
