# CloudBot control plane. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else the one pip installs for python3 (reachable as `python3 -m uv`).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

.PHONY: uv
uv: ## Install uv if it is missing
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv

.venv/.synced: uv.lock pyproject.toml libs/common/pyproject.toml services/*/pyproject.toml
	@$(MAKE) --no-print-directory uv
	$(UV) sync --frozen --all-packages
	@touch $@

.PHONY: install
install: .venv/.synced ## Create the virtual environment and install every package

.env:
	cp .env.example .env

.PHONY: migrate
migrate: install .env ## Create the database if needed and migrate it to head
	$(UV) run --frozen python -m cloudbot_common.migrate upgrade head

.PHONY: dev
dev: migrate ## Run the whole stack locally (api, worker, beat, gateway, Flower)
	$(UV) run --frozen python -m cloudbot_devstack

.PHONY: test
test: install ## Run the full test suite (creates its own databases)
	$(UV) run --frozen pytest $(PYTEST_ARGS)

.PHONY: lint
lint: install ## ruff and mypy
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy libs/common/src services/api/src services/provisioner/src services/proxy-gateway/src tests

.PHONY: fmt
fmt: install ## Format and auto-fix
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

.PHONY: bench
bench: install ## Run the benchmarks, each figure beside its anchor from the same run
	$(UV) run --frozen python -m bench

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .test-logs
