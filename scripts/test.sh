#!/usr/bin/env bash
# README's test command: the Rust suite, then the Python package's tests (pytest) with the
# interpreter in $MASKATTN_PYTHON (default python3), where `pip install ./python` put the
# package. `.ci/run` makes that environment and calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --release --workspace --locked

PY="${MASKATTN_PYTHON:-python3}"
if ! "$PY" -c "import maskattn, pytest" 2>/dev/null; then
  echo "scripts/test.sh: $PY cannot import maskattn and pytest;" \
    "run 'pip install \"./python[test]\"' into it, or set MASKATTN_PYTHON" >&2
  exit 1
fi
# Run from the repository root, so the installed package is tested (python/maskattn, the
# sources, is not on the path). Under `set -e` every non-zero status fails the run,
# pytest's 5 ("no tests collected") included.
"$PY" -m pytest -q python/tests
