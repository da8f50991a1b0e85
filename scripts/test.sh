#!/usr/bin/env bash
# README's test command: the Rust suite, then the Python package's tests (pytest).
#
# The Python tests run in a virtual environment outside the repository
# ($MASKATTN_VENV, default ~/.cache/maskattn/venv), made on first use (torch comes from PyPI
# as the package's dependency) and reused once complete; this checkout's package is built
# and installed into it on every run (maturin, cargo). `.ci/run` installs the system
# packages this needs and calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MASKATTN_VENV:-$HOME/.cache/maskattn/venv}"
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "./python[test]"
  touch "$VENV/.complete"
fi
"$VENV/bin/pip" install -q --force-reinstall --no-deps ./python

cargo test --release --workspace --locked

# Run from the repository root, so the installed package is tested (python/maskattn, the
# sources, is not on the path). Under `set -e` every non-zero status fails the run,
# pytest's 5 ("no tests collected") included.
"$VENV/bin/python" -m pytest -q python/tests
