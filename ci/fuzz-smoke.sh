#!/usr/bin/env bash
# Builds every fuzz target and runs each briefly from the committed corpus.
# cargo-fuzz needs nightly-only compiler flags; the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1, scoped to this build only.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-20}"
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
    mkdir -p "corpus/$t"
    # Run on a scratch copy so the smoke run does not grow the committed corpus.
    work=$(mktemp -d)
    cp -r "corpus/$t/." "$work/" 2>/dev/null || true
    echo "fuzz: $t for ${secs}s"
    cargo fuzz run "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12
    rm -rf "$work"
done
