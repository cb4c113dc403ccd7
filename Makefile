# The two set-up commands of the README. Each creates/reuses .venv itself (deploy/bootstrap.sh).
#   make demo   run the main job on the embedded default (SmolLM2-135M-Instruct, shipped prompts)
#   make test   run the test suite (what CI runs: .ci/run calls `make test`)
.PHONY: demo head test lint bootstrap up down worker integration

VENV ?= .venv
PYTEST_ARGS ?=

bootstrap:
	@deploy/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/python -m flows.demo

# The recommended head for the embedded default, from its own answers to ShareGPT prompts
# (8 shards, ~46 min on 2 idle CPU cores; `make head HEAD_ARGS="--data_shards 16"` buys more data
# with more time, reusing the shards already collected).
head: bootstrap
	$(VENV)/bin/python -m flows.head $(HEAD_ARGS)

test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check dmtp tasks flows tests

# Local orchestration stack (deploy/README.md): Prefect server + MLflow server on 127.0.0.1, the
# gpu-pool work pool, the deployments of prefect.yaml and one worker. `make down` stops them.
up: bootstrap
	deploy/up.sh

down:
	deploy/down.sh

# A foreground worker for gpu-pool (on a GPU host: set PREFECT_API_URL and DMTP_DATA_ROOT first).
worker: bootstrap
	deploy/worker.sh

# Only the tests that start real servers (part of `make test` too).
integration: bootstrap
	$(VENV)/bin/python -m pytest -q -m integration $(PYTEST_ARGS)
