#!/usr/bin/env bash
# The one command that runs every check and test. README.md names it; .ci/run calls it.
# Each step prints its duration, and the run ends with a table of them and the total.
set -euo pipefail
cd "$(dirname "$0")/.."

t_start=$(date +%s)
declare -a timings=()
current="" t_step=$t_start
finish_step() {
    if [ -n "$current" ]; then
        local now; now=$(date +%s)
        timings+=("$(printf '%6ss  %s' "$((now - t_step))" "$current")")
        printf '<== %s: %ss\n' "$current" "$((now - t_step))"
    fi
}
step() {
    finish_step
    current="$*" t_step=$(date +%s)
    printf '\n==> %s\n' "$current"
}
report() {
    local rc=$?
    finish_step
    current=""
    printf '\n==> step durations\n'
    printf '%s\n' "${timings[@]}"
    printf '%6ss  total (%s)\n' "$(($(date +%s) - t_start))" "$([ $rc -eq 0 ] && echo passed || echo "FAILED, exit $rc")"
}
trap report EXIT

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
# --no-fail-fast: one failure must not hide others. The `ci` profile writes JUnit XML, from
# which the slowest tests are listed whether the run passed or not.
rc=0
cargo nextest run --workspace --locked --no-fail-fast --profile ci || rc=$?
./ci/slowest.py target/nextest/ci/junit.xml 15 || true
[ "$rc" -eq 0 ] || exit "$rc"

step "bench smoke (ratios and loss, 256 MiB)"
./ci/bench-smoke.sh

step "fuzz smoke"
./ci/fuzz-smoke.sh

step "all checks passed"
