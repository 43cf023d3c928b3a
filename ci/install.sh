#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine; quick no-op when already present.
set -euo pipefail

need_apt=()
# iproute2 / nftables: network-namespace tests; coturn: TURN relay for NAT-lab tests;
# ethtool: offloads off on lab links (tools/natlab); openssl: the lab's TURN TLS certificate;
# redis-server, haproxy: thruserv fleet tests (apps/thruserv/tests/fleet.rs, apps/thru/tests/fleet.rs).
# curl, tar, chromium, chromium-driver: the web relay tests (apps/thru/tests/web.rs).
for pkg_cmd in "iproute2:ip" "nftables:nft" "coturn:turnserver" "ethtool:ethtool" "openssl:openssl" \
    "redis-server:redis-server" "haproxy:haproxy" "curl:curl" "tar:tar" "chromium:chromium" \
    "chromium-driver:chromedriver"; do
    pkg=${pkg_cmd%%:*}; cmd=${pkg_cmd##*:}
    command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install: apt packages ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
        # The coturn package starts nothing by default, but make sure no relay lingers.
        systemctl disable --now coturn >/dev/null 2>&1 || true
        # Nor a system Redis or HAProxy: the tests start their own on free loopback ports.
        systemctl disable --now redis-server haproxy >/dev/null 2>&1 || true
    else
        echo "install: missing ${need_apt[*]} and cannot apt-get (not root?); tests that need them will skip" >&2
    fi
fi

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked
