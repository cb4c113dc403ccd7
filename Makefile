# The two set-up commands of the README. Each creates/reuses .venv itself (deploy/bootstrap.sh).
#   make demo   run the main job on the embedded default (SmolLM2-135M-Instruct, shipped prompts)
#   make test   run the test suite (what CI runs: .ci/run calls `make test`)
.PHONY: demo test lint bootstrap

VENV ?= .venv
PYTEST_ARGS ?=

bootstrap:
	@deploy/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/dmtp collect --output_dir runs/demo --max_new_tokens 64 --batch_size 8

test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check dmtp tasks flows tests
