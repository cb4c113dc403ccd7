"""prefect.yaml agrees with the flows.

Every deployment's entrypoint must import as a flow, and its parameters must bind to that flow's
signature and pass the parameter schema the server enforces; a parameter listed there overrides the
flow's default, which is the dmtp config class's own (STYLE.md: one source of truth for each
default; tests/test_config_agreement.py compares flow, CLI and config).
"""

from __future__ import annotations

import asyncio
import inspect
import os
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


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


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


def test_deployment_parameters_bind_pass_the_schema_and_override_a_default(loaded_flows):
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    for deployment in _deployments():
        flow = loaded_flows[deployment["entrypoint"]]
        parameters = deployment.get("parameters") or {}
        signature = inspect.signature(flow.fn)
        signature.bind_partial(**parameters)  # TypeError on a name the flow doesn't take
        schema = parameter_schema(flow).model_dump_for_openapi()
        # what the server checks a run's parameters against (train_data_dir comes with the run)
        required = {n: "x" for n in schema.get("required", []) if n not in parameters}
        validate({**parameters, **required}, schema, raise_on_error=True)
        for name, value in parameters.items():
            assert value != signature.parameters[name].default, (
                f"prefect.yaml {flow.name}/{deployment['name']}: {name}={value!r} restates the "
                "flow's default: drop it (the default is the dmtp config class's)"
            )


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
