#!/usr/bin/env bash
# README's test command: the Rust suite, then the Python package's tests (pytest).
#
# The Python tests run in a virtual environment outside the repository
# ($MASKATTN_VENV, default ~/.cache/maskattn/venv), made on first use (torch, and transformers
# for the plug-in's tests, come from PyPI as the package's dependencies) and reused once
# complete, its dependencies installed again when python/pyproject.toml changes; this
# checkout's package is built and installed into it on every run (maturin, cargo).
# `.ci/run` installs the system packages this needs and calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MASKATTN_VENV:-$HOME/.cache/maskattn/venv}"
# The marker holds the hash of the pyproject.toml the dependencies were installed from: a
# venv made before a dependency list changed gets them installed again (pip keeps what is
# already satisfied). A venv without the marker was left half-made and starts over.
STAMP="$(sha256sum python/pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$VENV/.complete" 2>/dev/null)" != "$STAMP" ]; then
  "$VENV/bin/pip" install -q "./python[test]"
  echo "$STAMP" >"$VENV/.complete"
fi
"$VENV/bin/pip" install -q --force-reinstall --no-deps ./python

cargo test --release --workspace --locked

# Run from the repository root, so the installed package is tested (python/maskattn, the
# sources, is not on the path). Under `set -e` every non-zero status fails the run,
# pytest's 5 ("no tests collected") included.
"$VENV/bin/python" -m pytest -q python/tests
