"""prefect.yaml agrees with the flows, and the flows' defaults agree with the dmtp dataclasses.

Every deployment's entrypoint must import as a flow, its parameters must bind to that flow's
signature and validate against its types, and every default must be the dmtp config dataclass's
own (STYLE.md: one source of truth for each default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import typing
from pathlib import Path

import pytest
import yaml

from flows import collect_and_train as module

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
FLOWS = {
    "collect-and-train": module.collect_and_train,
    "collect": module.collect,
    "train": module.train,
}
# Parameters that exist only in the flows (where things go, how they run), not in any dataclass.
FLOW_ONLY = {
    "data_root",
    "train_data_dir",
    "train_options",
    "nproc_per_node",
    "evaluate",
    "export",
    "artifact_key",
    "refresh_cache",
    "max_parallel_shards",
    "stall_timeout_minutes",
}


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _field(config_class: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(config_class)}[name]


def _field_default(config_class: type, name: str):
    f = _field(config_class, name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.fixture(scope="module")
def loaded_flows() -> dict[str, object]:
    from prefect.flows import load_flow_from_entrypoint

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # entrypoints are relative to the checkout, as the pull step makes them
    try:
        return {d["entrypoint"]: load_flow_from_entrypoint(d["entrypoint"]) for d in _deployments()}
    finally:
        os.chdir(cwd)


def test_every_entrypoint_imports_as_the_named_flow(loaded_flows):
    names = set()
    for deployment in _deployments():
        flow = loaded_flows[deployment["entrypoint"]]
        assert flow.name in FLOWS, f"{deployment['entrypoint']} is flow {flow.name!r}"
        names.add(f"{flow.name}/{deployment['name']}")
    assert "collect-and-train/gpu" in names and "collect/gpu" in names and "train/gpu" in names


def test_deployment_parameters_bind_validate_and_equal_the_defaults(loaded_flows):
    for deployment in _deployments():
        flow = loaded_flows[deployment["entrypoint"]]
        parameters = deployment.get("parameters") or {}
        signature = inspect.signature(flow.fn)
        signature.bind_partial(**parameters)  # TypeError on a name the flow doesn't take
        required = {
            n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty
        }
        filled = {
            n: "x" for n in required - set(parameters)
        }  # supplied at run time (train_data_dir)
        flow.validate_parameters({**parameters, **filled})
        for name, value in parameters.items():
            assert value == signature.parameters[name].default, (
                f"prefect.yaml {flow.name}/{deployment['name']}: {name}={value!r} differs from the "
                f"flow's default {signature.parameters[name].default!r}; change the dataclass instead"
            )


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_flow_defaults_and_types_are_the_dataclasses(flow_name):
    flow = FLOWS[flow_name]
    hints = typing.get_type_hints(flow.fn)
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        if name in FLOW_ONLY:
            continue
        assert name in module.PARAMETER_SOURCES, (
            f"{flow_name}: parameter {name} has no dataclass source"
        )
        config_class, field_name = module.PARAMETER_SOURCES[name]
        if name == "device" and flow_name == "train":
            config_class, field_name = module.TrainConfig, "device"
        assert parameter.default == _field_default(config_class, field_name), f"{flow_name}.{name}"
        assert hints[name] == typing.get_type_hints(config_class)[field_name], f"{flow_name}.{name}"


def test_every_source_names_a_real_field():
    for name, (config_class, field_name) in module.PARAMETER_SOURCES.items():
        assert _field(config_class, field_name), name


def test_collect_and_train_runs_on_the_gpu_pool_with_the_job_environment():
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert "definitions" in config
    main = [d for d in config["deployments"] if d["entrypoint"].endswith(":collect_and_train")]
    for deployment in main:
        pool = deployment["work_pool"]
        assert pool["name"] == "gpu-pool"
        env = pool["job_variables"]["env"]
        assert {"CUDA_VISIBLE_DEVICES", "MLFLOW_TRACKING_URI", "DMTP_DATA_ROOT"} <= set(env)
    single = next(d for d in main if d["name"] == "single-gpu")
    assert single["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert single["work_pool"]["job_variables"]["env"]["DMTP_DATA_ROOT"] == "{{ $DMTP_DATA_ROOT }}"


def test_pull_step_points_at_the_checkout_it_was_deployed_from():
    """Run the build step as `prefect deploy` does, template the pull step with its output."""
    from prefect.deployments.steps.utility import run_shell_script
    from prefect.utilities.templating import apply_values

    config = yaml.safe_load(PREFECT_YAML.read_text())
    (build_step,) = config["build"]
    inputs = dict(build_step["prefect.deployments.steps.run_shell_script"])
    step_id = inputs.pop("id")
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        output = asyncio.run(run_shell_script(**inputs))
    finally:
        os.chdir(cwd)
    pull = apply_values(config["pull"], {step_id: output})
    directory = Path(pull[0]["prefect.deployments.steps.set_working_directory"]["directory"])
    assert directory.resolve() == REPO_ROOT
    for deployment in config["deployments"]:
        assert (directory / deployment["entrypoint"].split(":")[0]).is_file()


def test_prefect_version_is_one_the_project_pins():
    """`prefect-version` records the Prefect that `prefect deploy` ran with: pyproject must admit it,
    as must it admit the Prefect installed here."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (pin,) = [
        Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("prefect")
    ]
    recorded = str(yaml.safe_load(PREFECT_YAML.read_text())["prefect-version"])
    assert pin.specifier.contains(recorded), (
        f"prefect.yaml prefect-version {recorded} is outside pyproject.toml's {pin}"
    )
    assert pin.specifier.contains(version("prefect")), (version("prefect"), str(pin))
