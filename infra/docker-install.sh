#!/bin/sh
# How the service is installed into a virtualenv: the one source of truth shared by the Dockerfile's builder stage
# and tests/test_container.py. Usage: docker-install.sh VENV_DIR SOURCE_DIR
# The interpreter is $PYTHON (default: python3). pip options (cache, index) come from the caller's environment.
set -eu

venv="${1:?usage: docker-install.sh VENV_DIR SOURCE_DIR}"
src="${2:?usage: docker-install.sh VENV_DIR SOURCE_DIR}"

"${PYTHON:-python3}" -m venv "$venv"
# A regular (non-editable) install: pip builds the project's wheel in an isolated build env, then installs it.
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input "$src"
# Fail the build, not the deployment, when the entry point cannot even import.
"$venv/bin/python" -m pipeline --help >/dev/null
