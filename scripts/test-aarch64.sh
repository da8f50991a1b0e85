#!/usr/bin/env bash
# Runs the kernel crate's tests for aarch64 (the NEON and portable instruction sets) on an
# x86-64 machine, under qemu-user. Correctness only: timings under emulation mean nothing.
# Needs the aarch64 Rust standard library (rustup) and Debian's cross gcc and qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx aarch64-unknown-linux-gnu ||
    rustup target add aarch64-unknown-linux-gnu
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    sudo_if_needed=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo_if_needed apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --release -p maskattn --all-targets --target aarch64-unknown-linux-gnu -- -D warnings
cargo test --release -p maskattn --target aarch64-unknown-linux-gnu "$@"
