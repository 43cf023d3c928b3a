#!/usr/bin/env bash
# Builds `thru` and runs one real transfer on this machine: `thru host` in the background,
# `thru join` with the code it printed, over loopback (LAN mode, no server), then checks
# that every received file is identical.
#
#   tools/local-transfer.sh SOURCE... DEST [-- extra `thru join` flags, e.g. --benchmark]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: $0 SOURCE... DEST [-- join flags]" >&2
    exit 2
fi
paths=(); join_flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do paths+=("$1"); shift; done
if [ "${1:-}" = "--" ]; then shift; join_flags=("$@"); fi
if [ ${#paths[@]} -lt 2 ]; then
    echo "usage: $0 SOURCE... DEST [-- join flags]" >&2
    exit 2
fi
dest=${paths[-1]}
srcs=("${paths[@]:0:${#paths[@]}-1}")
cargo build --release -q -p thru
thru=target/release/thru
mkdir -p "$dest"
out=$(mktemp); trap 'kill "${host_pid:-}" 2>/dev/null || true; rm -f "$out"' EXIT
"$thru" host --json --no-mdns --max-receivers 1 "${srcs[@]}" >"$out" &
host_pid=$!
for _ in $(seq 100); do grep -q '"event":"code"' "$out" && break; sleep 0.1; done
code=$(grep -o '"code":"[^"]*"' "$out" | head -1 | cut -d'"' -f4)
port=$(grep -o '"peer_hint":"[^"]*"' "$out" | head -1 | cut -d'"' -f4 | sed 's/.*://')
[ -n "$code" ] || { echo "the host did not start:" >&2; cat "$out" >&2; exit 1; }
THRU_CODE=$code "$thru" join --yes --out "$dest" --peer "127.0.0.1:$port" "${join_flags[@]}"
wait "$host_pid"
for s in "${srcs[@]}"; do
    diff -r "$s" "$dest/$(basename "$s")" >/dev/null && echo "identical: $s -> $dest/$(basename "$s")"
done
