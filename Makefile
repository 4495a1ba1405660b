# Two commands on a fresh machine with Python 3.11 and make:  `make demo`  and  `make test`.
# Each installs what it needs first: uv (from PyPI, into .tools/), then the locked environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
UV := .tools/bin/uv
export UV_PYTHON_DOWNLOADS := never
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test test-fast lint protos requirements install clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	touch $@

install: .venv/.synced

demo: .venv/.synced
	.venv/bin/overnight demo

test: lint
	.venv/bin/python -m pytest

test-fast: .venv/.synced
	.venv/bin/python -m pytest -m "not e2e"

lint: .venv/.synced
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy device_runtime server emulator overnight protos/generate.py

protos: .venv/.synced
	.venv/bin/python -m protos.generate

requirements: .venv/.synced
	$(UV) export --frozen --no-dev --no-emit-project --format requirements-txt -o requirements/device.txt

clean:
	rm -rf .venv .tools
