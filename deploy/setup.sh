#!/usr/bin/env bash
# One-time setup on a fresh machine: a virtual environment with the pinned Python packages (PyPI
# only; the spark extra brings pyspark and delta-spark, the dev extra pytest and moto[server], the S3
# server tests/test_s3.py runs on loopback), and the Delta and s3a jars in the local Maven repository
# (Maven Central only).
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON_BIN:-python3}
# an existing venv is kept up to date by the Python that made it (which has uv): under cron, PATH is
# /usr/bin:/bin, whose python3 may be another one
if [ -z "${PYTHON_BIN:-}" ] && [ -f "$VENV/pyvenv.cfg" ]; then
  base=$(sed -n 's/^home *= *//p' "$VENV/pyvenv.cfg")
  if [ -x "$base/python3" ]; then PYTHON="$base/python3"; fi
fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need java || ! need mvn; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "setup: installing Java 17 and Maven from Debian"
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  else
    echo "setup: Java 17 and Maven are required (apt-get install openjdk-17-jre-headless maven)" >&2; exit 1
  fi
fi
"$PYTHON" - <<'PY'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"setup: Python 3.10-3.12 is required, found {sys.version.split()[0]}")
PY

# uv installs the ~3 GB of wheels (torch pulls CUDA libraries from PyPI) several times faster than pip.
# Only when there is something to install: on an installed checkout setup needs no uv, so `make setup`
# is a no-op also where cron's PATH (/usr/bin:/bin) finds another python3 than the one that set up.
ensure_uv() {
  "$PYTHON" -m uv --version >/dev/null 2>&1 && return
  "$PYTHON" -m pip install -q --disable-pip-version-check "uv==0.13.9" || "$PYTHON" -m pip install -q --user "uv==0.13.9"
}
# --compile-bytecode: uv (unlike pip) installs no .pyc files, and where PYTHONDONTWRITEBYTECODE is
# set Python never caches them either, so every process (each Ray worker, each Spark Python worker)
# would compile torch/transformers from source again: importing sentence-transformers took 22 s
# instead of 9 s on the development machine.
stamp="$VENV/.clustermix-installed-pyc"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ! -x "$VENV/bin/python" ]; then
  ensure_uv
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m uv venv -q -p "$PYTHON" "$VENV"
  echo "setup: installing Python packages into $VENV"
  "$PYTHON" -m uv pip install -q --compile-bytecode -p "$VENV/bin/python" -r pyproject.toml --extra spark --extra dev
  # the project itself is copied, not hard-linked from uv's cache: its editable .pth and console
  # script name this checkout, and a cache entry shared by two checkouts would point both at the
  # one installed last
  "$PYTHON" -m uv pip install -q --no-deps --link-mode=copy -p "$VENV/bin/python" -e .
  touch "$stamp"
fi
PYTHON="$VENV/bin/python" bash deploy/fetch-jars.sh

# The tests also need a real browser (the report is checked in headless Chromium).
if [ "${1:-}" = "--with-test-deps" ] && ! need chromium; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "setup: installing Chromium from Debian (for the report's browser test)"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: the tests need Chromium (apt-get install chromium)" >&2; exit 1
  fi
fi
echo "setup: done"
