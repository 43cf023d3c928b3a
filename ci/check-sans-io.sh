#!/usr/bin/env bash
# The protocol crates must stay sans-IO: no runtime, socket or io_uring crate may enter their
# dependency graphs (normal dependencies only; tests may use anything).
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
for crate in flux-wire flux-transfer flux-quic flux-signal-proto flux-ice; do
    deps=$(cargo tree -p "$crate" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
    for banned in tokio mio io-uring hyper socket2 flux-engine flux-udp flux-peer flux-signal; do
        if grep -qx "$banned" <<<"$deps"; then
            echo "sans-IO violation: $crate depends on $banned" >&2
            fail=1
        fi
    done
done
# The codec and transfer crates need no libc at all.
for crate in flux-wire flux-transfer; do
    if cargo tree -p "$crate" -e normal --prefix none --format '{p}' | awk '{print $1}' | grep -qx libc; then
        echo "sans-IO violation: $crate depends on libc" >&2
        fail=1
    fi
done
exit $fail
