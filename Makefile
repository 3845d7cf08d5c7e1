# One developer loop for humans and CI. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast test-slow lint lint-infra format typecheck bench clean

$(STAMP): pyproject.toml pipeline/_csvscan.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/aqua-pipeline demo

# The Dockerfile and the CloudFormation template: zero findings (.hadolint.yaml; inline cfn-lint ignores only).
lint-infra: install
	$(VENV)/bin/hadolint --config .hadolint.yaml Dockerfile
	$(VENV)/bin/cfn-lint infra/*.yaml

lint: install lint-infra
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench

typecheck: install
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format pipeline tests bench
	$(VENV)/bin/ruff check --fix pipeline tests bench

# pytest exits 5 when no test was collected; that is not a failure of the tree.
# Two pytest workers (pytest-xdist): most tests wait on subprocesses and sockets, so two run side by side in
# little more than one's time even on 2 cores. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test: lint typecheck test-fast

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: install
	$(PY) -m bench.transfer --sizes 64MiB --repeat 3
	$(PY) -m bench.callbacks --rates 100,500 --duration 5
	$(PY) -m bench.e2e --repeat 3 --burst 20 --wait-times 1
	$(PY) -m bench.sdkcall --calls 500 --repeat 3
	$(PY) -m bench.verifier --size 16MiB --repeat 3

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
