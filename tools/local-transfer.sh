#!/usr/bin/env bash
# Builds `thru` (unless an up-to-date release binary exists) and runs one real transfer on
# this machine: `thru host` in the background, `thru join` with the code it printed, over
# loopback (LAN mode, no server), then checks that every received file is identical.
#
#   tools/local-transfer.sh SOURCE... DEST [-- extra `thru join` flags, e.g. --benchmark]
#
# Paths are relative to the directory you run it from.
set -euo pipefail
usage() { echo "usage: $0 SOURCE... DEST [-- join flags]" >&2; exit 2; }
[ $# -ge 2 ] || usage
paths=(); join_flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do paths+=("$1"); shift; done
if [ "${1:-}" = "--" ]; then shift; join_flags=("$@"); fi
[ ${#paths[@]} -ge 2 ] || usage
# Absolute paths, resolved against the caller's directory before anything changes it.
dest=$(realpath -m -- "${paths[-1]}")
if [ -e "$dest" ] && [ ! -d "$dest" ]; then
    echo "$0: $dest is a file; DEST must be a directory" >&2; exit 2
fi
srcs=()
for p in "${paths[@]:0:${#paths[@]}-1}"; do
    [ -e "$p" ] || { echo "$0: $p: no such file or directory" >&2; exit 2; }
    srcs+=("$(realpath -- "$p")")
done

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
thru=$target/release/thru
# Rebuild only when a source the binary depends on is newer than it.
if [ ! -x "$thru" ] || [ -n "$(find "$root/apps" "$root/engine" "$root/transports" \
        "$root/signaling" "$root/Cargo.toml" "$root/Cargo.lock" \
        \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) \
        -newer "$thru" -print -quit)" ]; then
    echo "building thru (release)…" >&2
    (cd "$root" && cargo build --release -p thru)
else
    echo "using $thru (up to date)" >&2
fi

mkdir -p "$dest"
out=$(mktemp); err=$(mktemp)
trap 'kill "${host_pid:-}" 2>/dev/null || true; rm -f "$out" "$err"' EXIT
"$thru" host --json --no-mdns --max-receivers 1 "${srcs[@]}" >"$out" 2>"$err" &
host_pid=$!
for _ in $(seq 100); do grep -q '"event":"code"' "$out" && break; sleep 0.1; done
code=$(grep -o '"code":"[^"]*"' "$out" | head -1 | cut -d'"' -f4 || true)
port=$(grep -o '"peer_hint":"[^"]*"' "$out" | head -1 | cut -d'"' -f4 | sed 's/.*://' || true)
if [ -z "$code" ]; then
    echo "$0: the host did not start:" >&2
    cat "$out" "$err" >&2
    exit 1
fi
status=0
THRU_CODE=$code "$thru" join --yes --out "$dest" --peer "127.0.0.1:$port" "${join_flags[@]}" \
    || status=$?
host_status=0
wait "$host_pid" || host_status=$?
if [ "$status" -ne 0 ] || [ "$host_status" -ne 0 ]; then
    echo "$0: the transfer failed (join exit $status, host exit $host_status); the host said:" >&2
    # Its error events, else whatever it printed.
    grep '"event":"\(error\|declined\)"' "$out" >&2 || cat "$out" >&2
    cat "$err" >&2
    exit 1
fi
bad=0
for s in "${srcs[@]}"; do
    copy=$dest/$(basename "$s")
    if diff -r "$s" "$copy" >/dev/null 2>&1; then
        echo "identical: $s -> $copy"
    else
        bad=1
        echo "MISMATCH: $copy differs from $s:" >&2
        diff -rq "$s" "$copy" >&2 || true
    fi
done
exit "$bad"
