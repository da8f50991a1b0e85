#!/usr/bin/env bash
# The vision task's comparison (docs/domains.md): the default run under each mask — full
# attention, NATTEN, Swin — at the same steps and seed, as a Markdown table of held-out
# accuracy, tiles skipped and time. Extra arguments go to every run (e.g. --steps 300).
#
#   scripts/vision_table.sh [--steps N ...]
#
# Uses target/release/maskattn (build it first: cargo build --release -p maskattn-cli);
# RAYON_NUM_THREADS (default 2) sets the threads. Runs go to a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/maskattn
[ -x "$BIN" ] || { echo "build $BIN first: cargo build --release -p maskattn-cli" >&2; exit 1; }
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "| mask | held-out accuracy | tiles skipped | steps | time (s) |"
echo "|------|------------------:|--------------:|------:|---------:|"
for mask in full natten swin; do
  start=$(date +%s.%N)
  "$BIN" train --task vision --mask "$mask" --out "$TMP/$mask" --quiet "$@" \
    >"$TMP/$mask.out" 2>"$TMP/$mask.err" || { cat "$TMP/$mask.err" >&2; exit 1; }
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  # held-out accuracy after N steps: X% (chance: C%; Y% of tiles skipped)
  last=$(tail -1 "$TMP/$mask.out")
  steps=$(echo "$last" | sed -E 's/.*after ([0-9]+) steps.*/\1/')
  acc=$(echo "$last" | sed -E 's/.*steps: ([0-9.]+%).*/\1/')
  skip=$(echo "$last" | sed -E 's/.*; ([0-9.]+%) of tiles skipped.*/\1/')
  what=$(grep -o 'mask: [^;]*' "$TMP/$mask.out" | head -1 | sed 's/^mask: //')
  printf '| %s | %s | %s | %s | %.1f |\n' "$what" "$acc" "$skip" "$steps" "$secs"
done
