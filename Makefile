# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The shared data folder next to the repo, when it exists (never copied into the repo).
ifneq ($(wildcard ../shared/data),)
export GOALRANK_DATA_DIR ?= $(abspath ../shared/data)
endif
export RAY_AUTH_MODE ?= disabled
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export TQDM_MININTERVAL ?= 5

.PHONY: install run test test-slow test-ui test-multinode ray-dashboard browser bench-quick bench-full stack stack-down clean

install: $(STAMP)

# torch 2.13.0 first, from pip (its CPU wheel lies on this machine's disk), so nothing
# pulls a CUDA build; then the exact lock with uv (fast), then the project itself.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 uv==0.13.9
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	$(PY) -c "import torch, ray, prefect, mlflow; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/goalrank run --dataset ml-100k

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=15

test-slow: $(STAMP) browser ray-dashboard
	$(PY) -m pytest -m slow -q

# The Prefect and MLflow UIs in headless Chromium (tests/test_ui_browser.py; screenshots to docs/img/).
test-ui: $(STAMP) browser
	$(PY) -m pytest -m browser -q tests/test_ui_browser.py

# The daily flow on a 2-node Ray cluster on loopback, placement read from Ray's State API
# (tests/test_multinode.py; also part of test-slow).
test-multinode: $(STAMP) ray-dashboard
	$(PY) -m pytest -m slow -q tests/test_multinode.py

# ray[default]'s dashboard packages, outside the venv's site-packages (infra/ray_node.py says why).
ray-dashboard: $(VENV)/ray-dashboard/.installed
$(VENV)/ray-dashboard/.installed: infra/ray-dashboard-requirements.txt $(STAMP)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --target $(VENV)/ray-dashboard -r $<
	touch $@

# Debian's chromium and chromium-driver for the browser tests (apt-get; about 25 s), unless present.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

bench-quick: $(STAMP)
	$(PY) -m bench.run_all --mode quick

bench-full: $(STAMP)
	$(PY) -m bench.run_all --mode full

stack: $(STAMP)
	infra/local-stack up

stack-down:
	infra/local-stack down

clean:
	rm -rf artifacts mlruns mlflow.db mlartifacts .goalrank
