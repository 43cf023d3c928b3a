#!/usr/bin/env bash
# Thruflux NAT lab: network namespaces that make a small internet on one Linux host.
#
#   natlab.sh up      [--prefix P] [--dir D]   build the lab, start coturn in "wan"
#   natlab.sh down    [--prefix P] [--dir D]   remove every namespace, kill what `up` started
#   natlab.sh exec    [--prefix P] NAME -- CMD...   run CMD inside namespace NAME
#   natlab.sh loss    [--prefix P] ROUTER PERCENT   random drop on a router (both directions)
#   natlab.sh rate    [--prefix P] ROUTER RATE      tbf rate limit on a router's links (e.g. 50mbit)
#   natlab.sh check                              exit 0 if root and ip/nft/turnserver exist
#   natlab.sh env     [--prefix P] [--dir D]     print the lab's addresses as shell variables
#
# See tools/natlab/README.md for the topology. Needs root, iproute2, nftables, coturn, openssl,
# ethtool (ci/install.sh installs them).
set -euo pipefail

PREFIX=${NATLAB_PREFIX:-nl}
DIR=${NATLAB_DIR:-}

# --- topology -----------------------------------------------------------------------------
WAN_NET=198.51.100          # "public" addresses (TEST-NET-2)
WAN_SERVER=$WAN_NET.2       # coturn listens here
# A second server address for TCP services on 443 next to coturn's TLS port, e.g. thruserv
# in the thru lab tests: the fw network reaches nothing but TCP 443.
WAN_SIGNAL=$WAN_NET.3
TURN_USER=flux
TURN_PASS=fluxpass
TURN_REALM=natlab
# router name : NAT kind : wan host octet : lan subnet octet
ROUTERS=(
    "rlan:cone:10:9"
    "rcone1:cone:11:1"
    "rcone2:cone:12:2"
    "rsym1:sym:13:3"
    "rsym2:sym:14:4"
    "rfw:tcp443:15:5"
)
# peer name : router : host octet on the router's LAN
PEERS=(
    "lan1:rlan:2"
    "lan2:rlan:3"
    "cone1:rcone1:2"
    "cone2:rcone2:2"
    "sym1:rsym1:2"
    "sym2:rsym2:2"
    "fw:rfw:2"
)

die() { echo "natlab: $*" >&2; exit 1; }
ns() { echo "$PREFIX-$1"; }
nsx() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
lab_dir() { echo "${DIR:-/tmp/natlab-$PREFIX}"; }

# Turn segmentation offloads off so a loss rule drops single datagrams, not whole GSO
# batches, and the links behave like 1500-MTU NICs (shared/notes/platform-facts.md).
offloads_off() {
    local n=$1 dev=$2
    command -v ethtool >/dev/null 2>&1 || return 0
    nsx "$n" ethtool -K "$dev" tso off gso off gro off >/dev/null 2>&1 || true
}

# A veth pair between namespace A (interface IA) and namespace B (interface IB).
link() {
    local a=$1 ia=$2 b=$3 ib=$4
    local tmp_a="${PREFIX}x$RANDOM" tmp_b="${PREFIX}y$RANDOM"
    ip link add "$tmp_a" type veth peer name "$tmp_b"
    ip link set "$tmp_a" netns "$(ns "$a")"
    ip link set "$tmp_b" netns "$(ns "$b")"
    nsx "$a" ip link set "$tmp_a" name "$ia"
    nsx "$b" ip link set "$tmp_b" name "$ib"
    nsx "$a" ip link set "$ia" up
    nsx "$b" ip link set "$ib" up
    offloads_off "$a" "$ia"
    offloads_off "$b" "$ib"
}

new_ns() {
    ip netns add "$(ns "$1")"
    nsx "$1" ip link set lo up
}

router_rules() {
    local r=$1 kind=$2
    local masq="masquerade" fwd='iifname "lan0" accept'
    case $kind in
        cone) ;;
        sym) masq="masquerade random" ;;
        tcp443) fwd='iifname "lan0" tcp dport 443 accept' ;;
        *) die "unknown NAT kind $kind" ;;
    esac
    # Unsolicited inbound is dropped (policy drop, only conntrack replies pass), as home routers
    # do: otherwise the first punch packet takes the conntrack tuple the other side needs. That
    # includes the input hook: a punch packet addressed to the router's public address before
    # the outbound mapping exists is local traffic, and accepting it there would confirm a
    # conntrack entry on exactly the tuple the NAT mapping needs.
    nsx "$r" nft -f - <<EOF
table inet natlab {
    chain loss {
    }
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iifname { "lo", "lan0" } accept
    }
    chain forward {
        type filter hook forward priority 0; policy drop;
        jump loss
        ct state established,related accept
        $fwd
    }
    chain postrouting {
        type nat hook postrouting priority 100;
        oifname "wan0" $masq
    }
}
EOF
}

cmd_up() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    ip netns list | grep -q "^$(ns wan)\b" && die "lab $PREFIX already up (natlab.sh down --prefix $PREFIX)"
    local d; d=$(lab_dir)
    mkdir -p "$d"
    # If anything below fails (a command under `set -e`, or `die`), leave nothing half-built.
    trap 'rc=$?; [ $rc -eq 0 ] || cmd_down >/dev/null 2>&1 || true' EXIT

    new_ns wan
    nsx wan ip link add br0 type bridge
    nsx wan ip addr add "$WAN_SERVER/24" dev br0
    nsx wan ip addr add "$WAN_SIGNAL/24" dev br0
    nsx wan ip link set br0 up
    # coturn needs a default route, or a send error to an unroutable peer address tears the
    # whole allocation down (platform-facts).
    nsx wan ip route add default dev br0

    local spec r kind wo lo
    for spec in "${ROUTERS[@]}"; do
        IFS=: read -r r kind wo lo <<<"$spec"
        new_ns "$r"
        link "$r" wan0 wan "w$r"
        nsx wan ip link set "w$r" master br0
        nsx "$r" ip addr add "$WAN_NET.$wo/24" dev wan0
        nsx "$r" ip route add default via "$WAN_SERVER"
        nsx "$r" sysctl -qw net.ipv4.ip_forward=1
        router_rules "$r" "$kind"
    done
    # LAN side of each router: a bridge, so the "rlan" router can hold two peers.
    for spec in "${ROUTERS[@]}"; do
        IFS=: read -r r kind wo lo <<<"$spec"
        nsx "$r" ip link add lan0 type bridge
        nsx "$r" ip addr add "10.0.$lo.1/24" dev lan0
        nsx "$r" ip link set lan0 up
    done
    local p host
    for spec in "${PEERS[@]}"; do
        IFS=: read -r p r host <<<"$spec"
        lo=$(router_lan "$r")
        new_ns "$p"
        link "$p" eth0 "$r" "l$p"
        nsx "$r" ip link set "l$p" master lan0
        nsx "$p" ip addr add "10.0.$lo.$host/24" dev eth0
        nsx "$p" ip route add default via "10.0.$lo.1"
    done

    # TLS for TURN on 443: a throwaway self-signed certificate for the server address.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=natlab-turn" -addext "subjectAltName=IP:$WAN_SERVER" \
        -keyout "$d/turn.key" -out "$d/turn.crt" >/dev/null 2>&1 \
        || die "openssl failed to make the TURN certificate"
    openssl x509 -in "$d/turn.crt" -outform der -out "$d/turn.der"

    nsx wan turnserver -n --no-cli --fingerprint --lt-cred-mech \
        --user "$TURN_USER:$TURN_PASS" --realm "$TURN_REALM" \
        --listening-ip "$WAN_SERVER" --relay-ip "$WAN_SERVER" \
        --listening-port 3478 --tls-listening-port 443 \
        --cert "$d/turn.crt" --pkey "$d/turn.key" \
        --min-port 49152 --max-port 65535 --no-dtls \
        --userdb "$d/turndb" --log-file "$d/turnserver.log" --simple-log \
        --pidfile "$d/turnserver.pid" >/dev/null 2>&1 &
    echo $! >"$d/turnserver.launcher.pid"
    # Wait until it answers on UDP, TCP and TLS (at most ~5 s).
    local i
    for i in $(seq 50); do
        if nsx wan ss -Hlnu "sport = :3478" | grep -q . && nsx wan ss -Hlnt "sport = :443" | grep -q .; then
            break
        fi
        sleep 0.1
    done
    nsx wan ss -Hlnt "sport = :443" | grep -q . || die "coturn did not start (see $d/turnserver.log)"
    trap - EXIT
    cmd_env >"$d/env"
    echo "natlab: up (prefix $PREFIX, dir $d)"
}

router_lan() {
    local spec r kind wo lo
    for spec in "${ROUTERS[@]}"; do
        IFS=: read -r r kind wo lo <<<"$spec"
        [ "$r" = "$1" ] && { echo "$lo"; return; }
    done
    die "no router $1"
}

kill_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

cmd_down() {
    local d; d=$(lab_dir)
    kill_pidfile "$d/turnserver.pid"
    kill_pidfile "$d/turnserver.launcher.pid"
    local n
    for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        ip netns del "$n" 2>/dev/null || true
    done
    [ -z "$DIR" ] && rm -rf "$d"
    echo "natlab: down (prefix $PREFIX)"
}

cmd_exec() {
    local n=$1; shift
    [ "${1:-}" = "--" ] && shift
    exec ip netns exec "$(ns "$n")" "$@"
}

router_of() {
    local spec r kind wo lo
    for spec in "${ROUTERS[@]}"; do
        IFS=: read -r r kind wo lo <<<"$spec"
        [ "$r" = "$1" ] && return 0
    done
    die "no router $1 (routers: rlan rcone1 rcone2 rsym1 rsym2 rfw)"
}

cmd_loss() {
    local r=$1 pct=$2
    router_of "$r"
    # Per mille, so fractional percentages work.
    local permille; permille=$(awk -v p="$pct" 'BEGIN { printf "%d", p * 10 }')
    nsx "$r" nft flush chain inet natlab loss
    [ "$permille" -gt 0 ] && nsx "$r" nft add rule inet natlab loss numgen random mod 1000 "<" "$permille" drop
    return 0
}

cmd_rate() {
    local r=$1 rate=$2 dev
    router_of "$r"
    for dev in wan0 lan0; do
        nsx "$r" tc qdisc replace dev "$dev" root tbf rate "$rate" burst 64kb latency 50ms
    done
}

cmd_env() {
    local d; d=$(lab_dir)
    cat <<EOF
NATLAB_PREFIX=$PREFIX
NATLAB_DIR=$d
NATLAB_WAN_SERVER=$WAN_SERVER
NATLAB_WAN_SIGNAL=$WAN_SIGNAL
NATLAB_STUN=$WAN_SERVER:3478
NATLAB_TURN_UDP=$WAN_SERVER:3478
NATLAB_TURN_TCP=$WAN_SERVER:3478
NATLAB_TURN_TLS=$WAN_SERVER:443
NATLAB_TURN_USER=$TURN_USER
NATLAB_TURN_PASS=$TURN_PASS
NATLAB_TURN_CERT_DER=$d/turn.der
EOF
    local spec p r host
    for spec in "${PEERS[@]}"; do
        IFS=: read -r p r host <<<"$spec"
        echo "NATLAB_IP_$p=10.0.$(router_lan "$r").$host"
    done
}

cmd_check() {
    [ "$(id -u)" -eq 0 ] || { echo "not root"; exit 1; }
    local c
    for c in ip nft turnserver openssl; do
        command -v "$c" >/dev/null 2>&1 || { echo "$c not installed"; exit 1; }
    done
    exit 0
}

sub=${1:-}
[ -n "$sub" ] || die "usage: natlab.sh up|down|exec|loss|rate|env|check [--prefix P] [--dir D] ..."
shift
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        *) break ;;
    esac
done
# Interface names are built from the prefix: keep it short.
[ ${#PREFIX} -le 6 ] || die "prefix '$PREFIX' is longer than 6 characters"
case $sub in
    up) cmd_up ;;
    down) cmd_down ;;
    exec) [ $# -ge 2 ] || die "usage: natlab.sh exec NAME -- CMD..."; cmd_exec "$@" ;;
    loss) [ $# -eq 2 ] || die "usage: natlab.sh loss ROUTER PERCENT"; cmd_loss "$@" ;;
    rate) [ $# -eq 2 ] || die "usage: natlab.sh rate ROUTER RATE"; cmd_rate "$@" ;;
    env) cmd_env ;;
    check) cmd_check ;;
    *) die "unknown command $sub" ;;
esac
