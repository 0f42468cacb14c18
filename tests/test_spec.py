"""The pydantic exit spec: validation messages, JSON round trip, Distiller's flags."""

import math

import pytest

import branchify as bx
from branchify.distiller import spec_from_args


def test_issue_example_validates_and_normalises():
    spec = bx.ExitSpec(exits=[
        bx.ExitPoint(layer="layer1", threshold=1.2, weight=0.1),
        bx.ExitPoint(layer="layer2", threshold=0.9, weight=0.3,
                     head=bx.HeadSpec(kind="conv", channels=[12], kernel_size=7, stride=2, pool="max")),
    ])
    assert spec.criterion == "entropy"
    assert spec.layers == ["layer1", "layer2"]
    assert spec.thresholds == [1.2, 0.9]
    assert spec.weights == [0.1, 0.3]
    assert math.isclose(spec.final_weight, 0.6)
    assert spec.exits[0].head == bx.HeadSpec()


def test_json_round_trip_reproduces_an_equal_spec():
    spec = bx.ExitSpec(criterion="confidence", exits=[
        bx.ExitPoint(layer="features.3", threshold=0.8, weight=0.2, temperature=1.5,
                     head=bx.HeadSpec(kind="mlp", hidden=64, activation="gelu", layout="NHWC")),
        bx.ExitPoint(layer="features.5", threshold=0.9, weight=0.3, criterion="margin",
                     head=bx.HeadSpec(kind="pool", kernel_size=3)),
    ])
    again = bx.ExitSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.exits[0].head.layout is bx.Layout.NHWC


@pytest.mark.parametrize(
    ("exits", "fragment"),
    [
        ([], "at least one exit"),
        ([{"layer": "a"}, {"layer": "a"}], "exit 1 repeats layer 'a'"),
        ([{"layer": "a", "weight": 0.6}, {"layer": "b", "weight": 0.4}], "sum to 1"),
        ([{"layer": "a", "weight": 0.1}, {"layer": "b"}], "missing for exit 1 ('b')"),
        ([{"layer": "a", "weight": 0.1}, {"layer": "b"}], "weights must be given for all exits"),
        ([{"layer": "a", "weight": -1.0}], "greater than or equal to 0"),
        ([{"layer": "a", "threshold": 2.5, "criterion": "patience"}], "positive integer threshold"),
        ([{"layer": "a", "threshold": float("nan")}], "finite number"),
        ([{"layer": "a", "weight": float("inf")}], "finite number"),
        ([{"layer": "a", "criterion": "entropyy"}], "unknown criterion 'entropyy'"),
        ([{"layer": "a", "head": {"kind": "conv"}}], "needs channels"),
        ([{"layer": "a", "head": {"kind": "linear", "channels": [3]}}], "does not use ['channels']"),
        ([{"layer": "a", "head": {"kind": "conv", "channels": [0]}}], "greater than 0"),
        ([{"layer": "a", "surprise": 1}], "Extra inputs are not permitted"),
        ([{"layer": ""}], "at least 1 character"),
    ],
)
def test_invalid_specs_say_which_exit_and_value(exits, fragment):
    with pytest.raises(bx.SpecError) as info:
        bx.ExitSpec(exits=exits)
    assert fragment in str(info.value)


def test_unknown_spec_criterion_lists_registered_ones():
    with pytest.raises(bx.SpecError, match="registered: .*'entropy'"):
        bx.ExitSpec(exits=[{"layer": "a"}], criterion="nope")


def test_from_distiller_args_matches_distiller_semantics():
    spec = spec_from_args(["layer1", "layer2"], [1.2, 0.9], [0.1, 0.3])
    assert spec.thresholds == [1.2, 0.9] and spec.weights == [0.1, 0.3]
    assert math.isclose(spec.final_weight, 0.6)


@pytest.mark.parametrize(
    ("thresholds", "weights", "flag"),
    [([0.4, 0.5], [0.4], "--earlyexit_thresholds has 2 value"), ([0.4], [0.1, 0.2], "--earlyexit_lossweights has 2")],
)
def test_from_distiller_args_rejects_mismatched_counts_up_front(thresholds, weights, flag):
    # Distiller's issue #103: two values for a one-exit model crashed mid-epoch.
    with pytest.raises(bx.BranchifyError, match=flag) as info:
        spec_from_args(["layer1.2"], thresholds, weights)
    assert "1 exit layer" in str(info.value)


def test_with_exits_replaces_per_exit_fields_and_revalidates():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a"), bx.ExitPoint(layer="b")])
    updated = spec.with_exits(threshold=[0.5, 0.7])
    assert updated.thresholds == [0.5, 0.7] and spec.thresholds is None
    with pytest.raises(bx.BranchifyError, match="1 values for 'threshold'"):
        spec.with_exits(threshold=[0.5])
    with pytest.raises(bx.SpecError, match="sum to"):
        spec.with_exits(weight=[0.5, 0.5])


def test_spec_errors_are_branchify_errors_with_pydantic_details():
    with pytest.raises(bx.BranchifyError) as info:
        bx.ExitSpec.model_validate_json('{"exits": [{"layer": "a", "weight": -2}]}')
    assert isinstance(info.value, bx.SpecError)
    assert info.value.errors[0]["loc"] == ("exits", 0, "weight")
    assert str(info.value).startswith("invalid ExitSpec: exits.0.weight: Input should be greater than or equal to 0")
    assert "(got -2)" in str(info.value)


def test_a_spec_nested_in_a_user_model_reports_pydantic_errors():
    from pydantic import BaseModel, ValidationError

    class Config(BaseModel):
        spec: bx.ExitSpec

    with pytest.raises(ValidationError):
        Config(spec={"exits": []})


def test_head_kinds_are_checked_when_exits_are_attached_so_a_spec_can_name_a_kind_registered_later():
    import torch

    spec = bx.ExitSpec.model_validate_json('{"exits": [{"layer": "0", "head": {"kind": "later_kind"}}]}')
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    with pytest.raises(bx.BranchifyError, match="unknown head kind 'later_kind'; registered: .*bx.register_head"):
        bx.attach_exits(model, spec, torch.randn(1, 4))
    bx.register_head("later_kind", lambda shape, layout, num_classes, spec: torch.nn.Linear(shape[-1], num_classes))
    module = bx.attach_exits(model, spec, torch.randn(1, 4))
    assert module(torch.randn(2, 4))[0].shape == (2, 3)


def test_a_head_prints_only_the_fields_its_kind_reads():
    assert repr(bx.HeadSpec()) == "HeadSpec(kind='linear')"
    assert repr(bx.HeadSpec(kind="pool", kernel_size=4)) == "HeadSpec(kind='pool', kernel_size=4)"
    assert "kernel_size" not in repr(bx.HeadSpec(kind="mlp", hidden=8))
    assert repr(bx.HeadSpec(layout="NLC")) == "HeadSpec(kind='linear', layout=<Layout.NLC: 'NLC'>)"


def test_a_registered_kind_declares_the_fields_it_reads():
    import torch

    bx.register_head("hidden_reader", lambda shape, layout, num_classes, spec: torch.nn.Linear(shape[-1], num_classes),
                     fields=["hidden"])
    assert bx.HeadSpec(kind="hidden_reader", hidden=3).hidden == 3
    with pytest.raises(bx.SpecError, match=r"does not use \['kernel_size'\].*kernel_size: 'conv' or 'pool'"):
        bx.HeadSpec(kind="hidden_reader", kernel_size=5)


def test_an_exit_without_a_threshold_beside_others_is_off():
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="a", threshold=0.5), bx.ExitPoint(layer="b")])
    assert spec.thresholds == [0.5, None] and spec.judged == [True, False]
    assert bx.ExitSpec(exits=[bx.ExitPoint(layer="a")]).judged == [True], "without thresholds every exit is judged"
    assert bx.ExitPoint(layer="a", threshold=-1.5).threshold == -1.5, "a criterion's scores may be negative"
