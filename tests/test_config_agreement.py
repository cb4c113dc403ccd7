"""Each setting's default is declared once, in its dmtp config class (STYLE.md 4 and 11).

The flows' parameters are generated from the config fields, the CLI's flags too, prefect.yaml lists
no default, and the tasks hand child processes the resolved config as a file. Here: the deployment's
parameter schema (what `prefect deploy` registers and the UI's run form shows) carries each choice
as an enum, each bound as a minimum or maximum and each default as the config class's; the CLI's
defaults are the same values; and no flow or deployment restates one.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from pathlib import Path

import pytest
import yaml

from dmtp.cli import COMMANDS, build_parser
from dmtp.config import (
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
from flows import collect_and_train as module

REPO_ROOT = Path(__file__).resolve().parents[1]
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
TABLES = {
    "collect-and-train": module.COLLECT_AND_TRAIN,
    "collect": module.COLLECT,
    "train": module.TRAIN,
}
COMMAND_CONFIGS = {
    "collect": CollectConfig,
    "validate": ValidateConfig,
    "import-pt": ImportPtConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "export": ExportConfig,
}


def _default(item: dataclasses.Field) -> typing.Any:
    return item.default if item.default is not dataclasses.MISSING else item.default_factory()  # type: ignore[misc]


def _flat_fields(config_class: type) -> list[tuple[type, dataclasses.Field]]:
    """Every leaf field, nested configs flattened as the CLI flattens them."""
    hints = typing.get_type_hints(config_class)
    leaves = []
    for item in dataclasses.fields(config_class):
        if dataclasses.is_dataclass(hints[item.name]):
            leaves += _flat_fields(hints[item.name])
        else:
            leaves.append((config_class, item))
    return leaves


@pytest.fixture(scope="module")
def deployment_schemas() -> dict[str, dict]:
    """Each prefect.yaml deployment's parameter schema, made as `prefect deploy` makes it: the
    flow loaded from its entrypoint, then `parameter_schema(flow)`."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        schemas = {}
        for deployment in deployments:
            flow = load_flow_from_entrypoint(deployment["entrypoint"])
            schemas[flow.name] = parameter_schema(flow).model_dump_for_openapi()
    finally:
        os.chdir(cwd)
    assert set(schemas) == set(TABLES)
    return schemas


def _enum(prop: dict) -> list | None:
    """The enum of a property, also inside an `anyOf` (a choice that may be null)."""
    if "enum" in prop:
        return prop["enum"]
    return next((p["enum"] for p in prop.get("anyOf", []) if "enum" in p), None)


SCHEMA_BOUNDS = {
    "minimum": "ge",
    "exclusiveMinimum": "gt",
    "maximum": "le",
    "exclusiveMaximum": "lt",
}


def _bounds(prop: dict) -> dict:
    """A property's bounds as option() names them, also inside an `anyOf`."""
    found = {}
    for part in [prop, *prop.get("anyOf", [])]:
        found |= {SCHEMA_BOUNDS[k]: v for k, v in part.items() if k in SCHEMA_BOUNDS}
    return found


@pytest.mark.parametrize("flow_name", sorted(TABLES))
def test_the_deployment_schema_offers_each_choice_and_the_config_default(
    deployment_schemas, flow_name
):
    properties = deployment_schemas[flow_name]["properties"]
    for setting in TABLES[flow_name]:
        prop = properties[setting.name]
        item = next(f for f in dataclasses.fields(setting.config_class) if f.name == setting.field)
        assert prop["default"] == _default(item), setting
        assert prop["description"] == item.metadata["help"], setting
        choices = field_choices(setting.config_class).get(setting.field)
        assert _enum(prop) == (list(choices) if choices else None), setting
        rules = {k: item.metadata[k] for k in SCHEMA_BOUNDS.values() if k in item.metadata}
        assert _bounds(prop) == rules, setting


def test_the_run_form_shows_the_training_choices_as_dropdowns(deployment_schemas):
    properties = deployment_schemas["collect-and-train"]["properties"]
    assert properties["scheduler_type"]["enum"] == ["linear", "kappa", "cosine"]
    assert properties["loss_weight_type"]["enum"] == ["scheduler", "ones"]
    assert properties["loss_on"]["default"] == "response"
    assert properties["learning_rate"]["default"] == 5e-5
    assert deployment_schemas["train"]["properties"]["device"]["enum"] == ["auto", "cpu", "cuda"]


def test_the_server_refuses_a_choice_outside_the_schema(deployment_schemas):
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = deployment_schemas["collect-and-train"]
    validate({"scheduler_type": "kappa"}, schema, raise_on_error=True)
    with pytest.raises(ValidationError, match="cosin"):
        validate({"scheduler_type": "cosin"}, schema, raise_on_error=True)


@pytest.mark.parametrize("flow_name", sorted(TABLES))
def test_a_flow_declares_no_setting_of_its_own(flow_name):
    """Besides the generated settings, a flow's parameters are where and how it runs: none is a
    config field with a default of its own (train_data_dir has no default: the run names it)."""
    flow = {"collect-and-train": module.collect_and_train}.get(flow_name) or getattr(
        module, flow_name
    )
    generated = {s.name for s in TABLES[flow_name]}
    fields = {f.name for c in CONFIGS for _, f in _flat_fields(c)}
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        if name in generated:
            continue
        if parameter.default is not inspect.Parameter.empty:
            assert name not in fields, f"{flow_name}.{name} restates a config field's default"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_cli_defaults_and_choices_are_the_config_classes(command):
    parser = build_parser(command)
    actions = {action.dest: action for action in parser._actions}
    for config_class, item in _flat_fields(COMMAND_CONFIGS[command]):
        action = actions[item.name]
        assert action.default == _default(item), f"dmtp {command} --{item.name}"
        choices = field_choices(config_class).get(item.name)
        if choices:
            assert action.metavar == "{" + ",".join(choices) + "}", f"dmtp {command}"


def test_every_setting_default_is_in_exactly_one_place():
    """The same setting seen three ways, flow, CLI and config, has one default: the config's."""
    parsers = {command: build_parser(command) for command in ("collect", "train", "evaluate")}
    stage_command = {CollectConfig: "collect", StoreLayout: "collect", DataConfig: "train"}
    stage_command |= {TrainConfig: "train", EvalConfig: "evaluate"}
    signature = inspect.signature(module.collect_and_train.fn)
    for setting in module.COLLECT_AND_TRAIN:
        item = next(f for f in dataclasses.fields(setting.config_class) if f.name == setting.field)
        cli = parsers[stage_command[setting.config_class]].get_default(setting.field)
        flow = signature.parameters[setting.name].default
        assert flow == cli == _default(item), setting
