#!/usr/bin/env bash
# Checks the AMX instructions the kernel crate's asm! emits against an independent
# assembler: every distinct tile instruction in a release test binary (objdump) is
# reassembled with llvm-mc and the bytes compared. Needs binutils >= 2.36 and llvm-mc >= 12
# (AMX support); runs on any x86-64 machine, AMX or not (nothing is executed).
# Usage: bash scripts/amx_encodings.sh [llvm-mc binary, default llvm-mc-14 or llvm-mc]
set -euo pipefail
cd "$(dirname "$0")/.."
MC=${1:-$(command -v llvm-mc-14 || command -v llvm-mc)}
bin=$(cargo test --release -p maskattn --test amx_tiles --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*amx_tiles[^"]*\)".*/\1/p' | tail -1)
re='tdpbf16ps|tileloadd|tilestored|tilezero|ldtilecfg|tilerelease'
objdump -d "$bin" | grep -E "$re" | awk -F'\t' '{gsub(/ +$/, "", $2); print $2 "\t" $3}' | sort -u >/tmp/amx_insns.$$
cut -f2 /tmp/amx_insns.$$ | "$MC" -triple=x86_64 -mattr=+amx-tile,+amx-bf16 -show-encoding |
  sed -n 's/.*encoding: \[\(.*\)\]/\1/p' | sed 's/0x//g; s/,/ /g' >/tmp/amx_mc.$$
n=$(wc -l </tmp/amx_insns.$$)
[ "$n" -gt 0 ] || { echo "no tile instructions found in $bin"; exit 1; }
bad=$(paste <(cut -f1 /tmp/amx_insns.$$) /tmp/amx_mc.$$ <(cut -f2 /tmp/amx_insns.$$) | awk -F'\t' '$1 != $2' | tee /dev/stderr | wc -l)
rm -f /tmp/amx_insns.$$ /tmp/amx_mc.$$
echo "$n distinct tile instructions in $(basename "$bin"); $bad differ from $(basename "$MC")"
[ "$bad" -eq 0 ]
