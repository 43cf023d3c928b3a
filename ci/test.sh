#!/usr/bin/env bash
# The one command that runs every check and test. README.md names it; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "install prerequisites"
./ci/install.sh

step "format"
cargo fmt --all -- --check

step "clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs (warnings are errors)"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked

step "sans-IO dependency check"
./ci/check-sans-io.sh

step "tests"
cargo nextest run --workspace --locked --no-fail-fast

step "fuzz smoke"
./ci/fuzz-smoke.sh

step "all checks passed"
