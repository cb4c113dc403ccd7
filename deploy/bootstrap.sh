#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install dmtp into it.
#   deploy/bootstrap.sh            -> .venv with dmtp[dev,server], plus [gpu] where nvidia-smi runs
# torch goes in first and pinned: an unpinned torch (asked for by transformers/accelerate) pulls a
# multi-GB CUDA build on CPU-only hosts. Set DMTP_TORCH_SPEC to pick another build on GPU hosts.
# Extras (pyproject.toml): dev = the test tools; server = MLflow's basic-auth app (deploy/up.sh
# with credentials, and its test); gpu = NVML bindings, so MLflow's system metrics show the GPUs.
# DMTP_EXTRAS overrides the choice (e.g. DMTP_EXTRAS=dev,gpu where the driver is not on PATH yet).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DMTP_VENV:-.venv}"
torch_spec="${DMTP_TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"
default_extras="dev,server"
if command -v nvidia-smi >/dev/null 2>&1; then default_extras="$default_extras,gpu"; fi
extras="${DMTP_EXTRAS:-$default_extras}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# Reinstall only when what decides the install changed, so the second call costs a second.
want="$(cat pyproject.toml deploy/bootstrap.sh | sha256sum | cut -d' ' -f1) $torch_spec [$extras]"
stamp="$venv/.dmtp-install-stamp"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing into $venv (torch first: $torch_spec; extras: $extras)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
  echo "$want" > "$stamp"
fi
