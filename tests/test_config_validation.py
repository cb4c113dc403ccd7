"""Every config dataclass checks itself once, when it is built: one test per rule.

The rules: each field's choices (its `Literal[...]` type) and bounds (its `option(...)`), the device a process or
torchrun can use, and the rules between fields. The CLI, Python callers and the flows all build
these classes, so each gets the same one-line error (tests/test_flows.py has the flows' side).
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from dmtp.config import (
    BOUNDS,
    CollectConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ImportPtConfig,
    StoreLayout,
    TrainConfig,
    ValidateConfig,
    field_choices,
)
from dmtp.errors import DmtpError

CONFIGS = [
    StoreLayout,
    CollectConfig,
    EvalConfig,
    ValidateConfig,
    DataConfig,
    TrainConfig,
    ImportPtConfig,
    ExportConfig,
]
# What a class needs besides the field under test to be valid at all.
REQUIRED: dict[type, dict[str, typing.Any]] = {
    EvalConfig: {"head_path": "heads/final"},
    ImportPtConfig: {"input_dir": "pt_files"},
    ExportConfig: {"head_path": "heads/final", "output_dir": "exports"},
}
# Other fields a value at a bound needs to pass the cross-field rules.
COMPANIONS: dict[tuple[type, str], dict[str, typing.Any]] = {
    (StoreLayout, "rows_per_file"): {"chunk_rows": 1},
    (DataConfig, "max_sequence_rows"): {"block_length": 1},
}


def build(config_class: type, **values: typing.Any) -> typing.Any:
    return config_class(**{**REQUIRED.get(config_class, {}), **values})


def error_of(config_class: type, **values: typing.Any) -> str:
    """The message building `config_class` with `values` fails with; it must be one line."""
    with pytest.raises(DmtpError) as caught:
        build(config_class, **values)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def _fields_with(key: str) -> list[tuple[type, dataclasses.Field]]:
    return [(c, f) for c in CONFIGS for f in dataclasses.fields(c) if key in f.metadata]


CHOICE_FIELDS = [
    (c, f) for c in CONFIGS for f in dataclasses.fields(c) if f.name in field_choices(c)
]
BOUNDED = [(c, f, k) for k, _, _ in BOUNDS for c, f in _fields_with(k)]


def test_the_rules_cover_the_fields_that_need_them():
    choices = {(c.__name__, f.name) for c, f in CHOICE_FIELDS}
    assert {("TrainConfig", "scheduler_type"), ("TrainConfig", "mixed_precision")} <= choices
    assert {("StoreLayout", "compressor"), ("ExportConfig", "format")} <= choices
    bounded = {(c.__name__, f.name) for c, f, _ in BOUNDED}
    assert {("TrainConfig", "learning_rate"), ("DataConfig", "train_ratio")} <= bounded
    assert {("CollectConfig", "temperature"), ("EvalConfig", "block_length")} <= bounded


@pytest.mark.parametrize(
    ("config_class", "item"),
    CHOICE_FIELDS,
    ids=[f"{c.__name__}.{f.name}" for c, f in CHOICE_FIELDS],
)
def test_a_choice_outside_a_fields_choices_is_refused(config_class, item):
    choices = field_choices(config_class)[item.name]
    for choice in choices:
        assert getattr(build(config_class, **{item.name: choice}), item.name) == choice
    message = error_of(config_class, **{item.name: "bogus"})
    allowed = ", ".join(map(str, choices))
    assert message == f"{item.name} must be one of {allowed}; got 'bogus'"


def _step(config_class: type, item: dataclasses.Field) -> float:
    """The smallest step past a bound the field's type can take: 1 for an int, else 0.5."""
    hint = typing.get_type_hints(config_class)[item.name]
    return 1 if int in (hint, *typing.get_args(hint)) else 0.5


@pytest.mark.parametrize(
    ("config_class", "item", "kind"),
    BOUNDED,
    ids=[f"{c.__name__}.{f.name}-{k}" for c, f, k in BOUNDED],
)
def test_a_value_past_a_fields_bound_is_refused(config_class, item, kind):
    bound = item.metadata[kind]
    companions = COMPANIONS.get((config_class, item.name), {})
    symbol = {k: s for k, s, _ in BOUNDS}[kind]
    past = bound - _step(config_class, item) if kind == "ge" else bound + _step(config_class, item)
    if kind in ("gt", "lt"):
        past = bound  # the bound itself is outside an open interval
    else:  # and inside a closed one
        assert getattr(build(config_class, **{item.name: bound}, **companions), item.name) == bound
    message = error_of(config_class, **{item.name: past}, **companions)
    assert message.startswith(f"{item.name} must be ") and f"{symbol} {bound}" in message, message
    assert message.endswith(f"got {past}"), message


def test_a_bounded_field_refuses_a_value_that_is_not_a_number():
    assert (
        error_of(TrainConfig, learning_rate="1e-4") == "learning_rate must be a number, got '1e-4'"
    )
    assert error_of(CollectConfig, batch_size=True) == "batch_size must be a number, got True"


@pytest.mark.parametrize("config_class", [CollectConfig, EvalConfig])
def test_a_stage_runs_on_auto_cpu_cuda_or_one_numbered_gpu(config_class):
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:7"):
        assert build(config_class, device=device).device == device
    for device in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:0,1"):
        message = error_of(config_class, device=device)
        assert (
            message == f"device must be auto, cpu, cuda or cuda:N (N a GPU index); got {device!r}"
        )


def test_training_refuses_a_numbered_gpu_because_torchrun_places_the_ranks():
    message = error_of(TrainConfig, device="cuda:1")
    assert message.startswith("device 'cuda:1': training runs one torchrun rank per GPU")
    assert "CUDA_VISIBLE_DEVICES=1 and device cuda" in message
    assert error_of(TrainConfig, device="gpu").startswith("device must be one of auto, cpu, cuda")


def test_rows_per_file_is_a_multiple_of_chunk_rows():
    assert build(StoreLayout, chunk_rows=16, rows_per_file=48).rows_per_file == 48
    message = error_of(StoreLayout, chunk_rows=16, rows_per_file=40)
    assert message == "rows_per_file (40) must be a multiple of chunk_rows (16)"
    assert "must be a multiple" in error_of(StoreLayout, chunk_rows=64, rows_per_file=32)


def test_shard_index_is_one_of_the_shards():
    assert build(CollectConfig, num_shards=3, shard_index=2).shard_index == 2
    assert error_of(CollectConfig, num_shards=3, shard_index=3) == (
        "shard_index must be in [0, 3), got 3"
    )


def test_resume_and_overwrite_are_not_both_asked():
    assert "contradict each other" in error_of(CollectConfig, resume=True, overwrite=True)


def test_collected_feature_layers_are_auto_none_or_a_list_of_indices():
    assert build(CollectConfig, feature_layers="2, 15,28").feature_layers == "2,15,28"
    message = error_of(CollectConfig, feature_layers="2;15")
    assert (
        message.startswith("feature_layers must be auto, none or a comma list")
        and "'2;15'" in message
    )


def test_trained_feature_layers_are_auto_last_or_a_list_of_indices():
    for spec in ("auto", "last", "2,15,28", "-1"):
        assert build(TrainConfig, feature_layers=spec).feature_layers == spec
    assert error_of(TrainConfig, feature_layers="2,x") == (
        "--feature_layers '2,x': use auto, last, or layer indices like 2,15,28"
    )


def test_a_sequence_segment_is_longer_than_a_block():
    assert "max_sequence_rows must exceed block_length" in error_of(
        DataConfig, block_length=8, max_sequence_rows=8
    )


def test_an_evaluation_has_something_to_evaluate():
    message = error_of(EvalConfig, head_path=None, prompt_lookup=False, block_length=4)
    assert message.startswith("nothing to evaluate")


def test_prompt_lookup_alone_needs_a_block_length():
    assert build(EvalConfig, head_path=None, block_length=4).block_length == 4
    assert "pass --block_length" in error_of(EvalConfig, head_path=None)


def test_import_pt_needs_its_input_folder():
    assert "pass the folder of .pt files" in error_of(ImportPtConfig, input_dir=None)


def test_an_export_needs_a_head_and_a_destination():
    assert "pass the head to export" in error_of(ExportConfig, head_path=None)
    assert "pass where to write the export" in error_of(ExportConfig, output_dir=None)


def test_nested_settings_given_as_dicts_are_checked_too():
    assert error_of(TrainConfig, data={"loss_on": "answers"}).startswith("loss_on must be one of")
    assert error_of(CollectConfig, layout={"chunk_rows": 0}) == "chunk_rows must be >= 1, got 0"


def test_the_cli_prints_the_configs_own_error_and_still_lists_the_choices(capsys):
    from dmtp.cli import build_parser, run_command

    assert "{linear,kappa,cosine}" in build_parser("train").format_help()
    expected = error_of(TrainConfig, scheduler_type="cosin")
    code = run_command("train", ["--train_data_dir", "nowhere", "--scheduler-type", "cosin"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dmtp train: error: {expected}"]
