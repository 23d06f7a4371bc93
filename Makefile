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

.venv/.synced: uv.lock pyproject.toml libs/common/pyproject.toml services/*/pyproject.toml clients/*/pyproject.toml
	@$(MAKE) --no-print-directory uv
	$(UV) sync --frozen --all-packages
	@touch $@

# The desktop page's noVNC (and, for its browser test, playwright-core), from npm.
web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	npm ci --prefix web --no-audit --no-fund

.PHONY: install
install: .venv/.synced web/node_modules/.package-lock.json ## Create the virtual environment and install every package

.env:
	cp .env.example .env

.PHONY: migrate
migrate: install .env ## Create the database if needed and migrate it to head
	$(UV) run --frozen python -m cloudbot_common.migrate upgrade head

# What LOCAL_DEV_MODE's desktops run on (Debian package names).
DESKTOP_PACKAGES := xvfb x11vnc xterm x11-xserver-utils bubblewrap

.PHONY: desktop-deps
desktop-deps: ## Install Xvfb, x11vnc, xterm and bubblewrap for local desktops (Debian; as root)
	@if command -v Xvfb >/dev/null && command -v x11vnc >/dev/null && command -v xterm >/dev/null \
		&& command -v xsetroot >/dev/null && command -v bwrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(DESKTOP_PACKAGES); \
	else \
		echo "Local desktops need: sudo apt-get install --no-install-recommends $(DESKTOP_PACKAGES)"; \
	fi

.PHONY: dev
dev: migrate desktop-deps ## Run the whole stack locally (api, worker, beat, gateway, Flower)
	@mkdir -p .local
	ENVIRONMENT=development LOG_JSON=false $(UV) run --frozen honcho --procfile Procfile.dev --env /dev/null start

.PHONY: bench-deps
bench-deps: ## Install wrk, the API benchmark's load generator (Debian; as root)
	@if command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; \
	else \
		echo "The API benchmark needs wrk: sudo apt-get install wrk"; \
	fi

.PHONY: test
test: install bench-deps ## Run the full test suite: the fast tier first, then the rest (creates its own databases)
	ENVIRONMENT=test $(UV) run --frozen pytest -m fast $(PYTEST_ARGS)
	ENVIRONMENT=test $(UV) run --frozen pytest -m "not fast" $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: install ## Run the fast tier alone: pure logic and the API in-process, under a minute
	ENVIRONMENT=test $(UV) run --frozen pytest -m fast $(PYTEST_ARGS)

.PHONY: lint
lint: install ## ruff and mypy
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy libs/common/src services/api/src services/provisioner/src services/proxy-gateway/src clients/cli/src tests bench

.PHONY: fmt
fmt: install ## Format and auto-fix
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

.PHONY: bench
bench: install bench-deps ## Run the benchmarks, each figure beside its anchor from the same run
	ENVIRONMENT=test $(UV) run --frozen python -m bench

# The full soak: 200 users through the whole flow, 20 at a time, on local desktops.
SOAK_USERS ?= 200
SOAK_CONCURRENCY ?= 20

.PHONY: soak
soak: install desktop-deps ## Soak the local stack: SOAK_USERS (200) run the whole flow, SOAK_CONCURRENCY (20) at a time
	SOAK_USERS=$(SOAK_USERS) SOAK_CONCURRENCY=$(SOAK_CONCURRENCY) \
		$(UV) run --frozen pytest tests/e2e/test_soak.py -s --timeout=3600 $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .test-logs .test-artifacts
