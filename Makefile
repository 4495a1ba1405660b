# Two commands on a fresh machine with Python 3.11 and make:  `make demo`  and  `make test`.
# Each installs what it needs first: uv (from PyPI, into .tools/), then the locked environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
UV := .tools/bin/uv
export UV_PYTHON_DOWNLOADS := never
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test test-fast lint protos requirements check-edge-wheels install clean

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

# The whole suite three times in a row with two CPU-bound processes competing for the cores,
# as on a shared CI machine: no test may depend on wall-clock speed.
test-loaded: .venv/.synced
	@for run in 1 2 3; do \
	  timeout 3600 $(PYTHON) -c 'while True: pass' & hog1=$$!; \
	  timeout 3600 $(PYTHON) -c 'while True: pass' & hog2=$$!; \
	  echo "test-loaded: run $$run of 3, two busy loops competing"; \
	  $(MAKE) --no-print-directory test; status=$$?; \
	  kill $$hog1 $$hog2 2>/dev/null; wait $$hog1 $$hog2 2>/dev/null; \
	  [ $$status -eq 0 ] || { echo "test-loaded: run $$run failed"; exit $$status; }; \
	done; echo "test-loaded: 3 of 3 runs passed"

test-fast: .venv/.synced
	.venv/bin/python -m pytest -m "not e2e"

lint: .venv/.synced
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy device_runtime server emulator overnight protos/generate.py
	.venv/bin/mypy examples  # the scripts import their shared module as a top-level one
	# The base install (device runtime and the command) runs on Python 3.10 too.
	.venv/bin/mypy --python-version 3.10 device_runtime overnight/cli.py

protos: .venv/.synced
	.venv/bin/python -m protos.generate

requirements: .venv/.synced
	$(UV) export --frozen --no-dev --no-emit-project --format requirements-txt -o requirements/device.txt

# Every pinned device dependency (requirements/device.txt, from the lock) has a wheel for
# manylinux x86_64 and aarch64 on each Python the base install supports: pip downloads each
# one for that platform, binary only, checking the lock's hashes. Platforms up to glibc 2.31
# (Ubuntu 20.04 / JetPack 5, Debian 11 and every later edge OS); files are kept in .edge-wheels.
EDGE_PYTHONS := 3.10 3.11 3.12 3.13
EDGE_ARCHES := x86_64 aarch64
EDGE_GLIBC_MINORS := 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31

check-edge-wheels: .venv/.synced
	@for arch in $(EDGE_ARCHES); do \
	  platforms="--platform manylinux2014_$$arch"; \
	  for minor in $(EDGE_GLIBC_MINORS); do platforms="$$platforms --platform manylinux_2_$${minor}_$$arch"; done; \
	  for py in $(EDGE_PYTHONS); do \
	    mkdir -p .edge-wheels/$$py-$$arch; \
	    .venv/bin/python requirements/for_target.py requirements/device.txt $$py $$arch \
	      > .edge-wheels/$$py-$$arch.txt || exit 1; \
	    .tools/bin/pip download --quiet --disable-pip-version-check --no-deps \
	      --only-binary=:all: --implementation cp --python-version $$py $$platforms \
	      -d .edge-wheels/$$py-$$arch -r .edge-wheels/$$py-$$arch.txt \
	      || { echo "no wheel for Python $$py on $$arch (see above)"; exit 1; }; \
	    echo "Python $$py $$arch: a wheel for each of $$(wc -l < .edge-wheels/$$py-$$arch.txt) pins"; \
	  done; \
	done

clean:
	rm -rf .venv .tools .edge-wheels
