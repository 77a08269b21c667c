#!/usr/bin/env bash
# Bulk TCP and UDP throughput and proxy CPU: direct veth path vs uringproxy with offload
# vs uringproxy --no-offload, interleaved in one run so machine noise hits all three.
# UDP runs offer 1400-byte datagrams as fast as iperf3 can send them; the table gives
# what arrived (Gbit/s and thousands of datagrams/s) and the share lost.
#
# Run as root from the repository: bash bench/throughput.sh
# Env: SECONDS_PER_RUN (default 5), ROUNDS (default 2; the median is reported),
#      PROXY_ARGS (extra flags for both proxies, e.g. "--flow-buffer 262144").
# It creates two namespaces (client, server) joined by veth, runs both proxies in the
# client namespace on separate TUNs, routes one server address into each TUN and a
# third one directly, and removes everything on exit (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "bench/throughput.sh: needs root (network namespaces)" >&2; exit 1; }
command -v iperf3 >/dev/null || { apt-get update -qq && apt-get install -y -qq iperf3 >/dev/null; }
command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; }

T=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-2}
PROXY_ARGS=${PROXY_ARGS:-}
C=upxb-c-$$
S=upxb-s-$$
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    ip netns del "$C" 2>/dev/null || true
    ip netns del "$S" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cargo build --release --quiet
BIN=target/release/uringproxy

ip netns add "$C"
ip netns add "$S"
ip -n "$C" link add vb0 type veth peer name vb1 netns "$S"
ip -n "$C" addr add 10.77.0.1/24 dev vb0
ip -n "$C" addr add fd00:77::1/64 dev vb0 nodad
for a in 2 3 4; do
    ip -n "$S" addr add 10.77.0.$a/24 dev vb1
    ip -n "$S" addr add fd00:77::$a/64 dev vb1 nodad
done
for ns in "$C" "$S"; do ip -n "$ns" link set lo up; done
ip -n "$C" link set vb0 up
ip -n "$S" link set vb1 up
# Replies from the server arrive on the veth while the route points at a TUN.
ip netns exec "$C" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

# shellcheck disable=SC2086
ip netns exec "$C" "$BIN" -i vb0 --tun upxA $PROXY_ARGS 2>/dev/null &
PIDS+=($!)
# shellcheck disable=SC2086
ip netns exec "$C" "$BIN" -i vb0 --tun upxB --no-offload $PROXY_ARGS \
    --tun-addr 198.18.1.1/30 --tun-addr fd7a:7072:7879:1::1/64 2>/dev/null &
PIDS+=($!)
PID_OFFLOAD=${PIDS[0]}
PID_PLAIN=${PIDS[1]}
for _ in $(seq 50); do
    ip -n "$C" link show upxA >/dev/null 2>&1 && ip -n "$C" link show upxB >/dev/null 2>&1 && break
    sleep 0.1
done
sleep 0.5
# .2 -> offload proxy, .4 -> --no-offload proxy, .3 -> direct.
ip -n "$C" rule add to 10.77.0.2 table 200
ip -n "$C" route add default dev upxA table 200
ip -n "$C" -6 rule add to fd00:77::2 table 200
ip -n "$C" -6 route add default dev upxA table 200
ip -n "$C" rule add to 10.77.0.4 table 201
ip -n "$C" route add default dev upxB table 201
ip -n "$C" -6 rule add to fd00:77::4 table 201
ip -n "$C" -6 route add default dev upxB table 201
sleep 1

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Starts a one-shot iperf3 server on address $1 once the previous one has let go of its
# port. Bound to the address, so UDP replies come from the address the client targets.
start_server() {
    for _ in $(seq 40); do
        ip netns exec "$S" ss -Hltn 'sport = :5201' | grep -q . || break
        sleep 0.05
    done
    ip netns exec "$S" iperf3 -s -1 -D -B "$1" >/dev/null 2>&1
    sleep 0.3
}

# run ADDR "IPERF ARGS" [PID] -> "Gbit/s cpu%"
run() {
    start_server "$1"
    local t0=0 t1=0 gbps
    [ -n "${3:-}" ] && t0=$(cpu_ticks "$3")
    # shellcheck disable=SC2086
    gbps=$(timeout $((T + 20)) ip netns exec "$C" iperf3 -f g -c "$1" $2 -t "$T" 2>/dev/null |
        awk '/receiver/ { v = $(NF - 2) } END { print v + 0 }')
    [ -n "${3:-}" ] && t1=$(cpu_ticks "$3")
    local hz
    hz=$(getconf CLK_TCK)
    echo "$gbps $(( (t1 - t0) * 100 / hz / T ))"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# udp ADDR "IPERF ARGS" [PID] -> "Gbit/s loss% cpu%"
udp() {
    start_server "$1"
    local t0=0 t1=0 line
    [ -n "${3:-}" ] && t0=$(cpu_ticks "$3")
    # shellcheck disable=SC2086
    line=$(timeout $((T + 20)) ip netns exec "$C" iperf3 -f g -u -b 0 -l 1400 -c "$1" $2 -t "$T" 2>/dev/null |
        awk '/receiver/ { r = $0 } END { print r }')
    [ -n "${3:-}" ] && t1=$(cpu_ticks "$3")
    local hz
    hz=$(getconf CLK_TCK)
    echo "$line" | awk -v cpu=$(( (t1 - t0) * 100 / hz / T )) '{
        g = 0; loss = 100
        for (i = 2; i <= NF; i++) if ($i == "Gbits/sec") g = $(i - 1)
        if (match($0, /\(([0-9.e+-]+)%\)/)) loss = substr($0, RSTART + 1, RLENGTH - 3)
        print g + 0, loss + 0, cpu }'
}

echo "| scenario | direct Gbit/s | offload Gbit/s | ratio | CPU % | --no-offload Gbit/s | ratio | CPU % |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
while IFS='|' read -r name family args; do
    if [ "$family" = 4 ]; then direct=10.77.0.3; viaA=10.77.0.2; viaB=10.77.0.4
    else direct=fd00:77::3; viaA=fd00:77::2; viaB=fd00:77::4; fi
    d=(); a=(); ac=(); b=(); bc=()
    for round in $(seq "$ROUNDS"); do
        echo "$name: round $round" >&2
        read -r g _ < <(run "$direct" "$args"); d+=("$g")
        read -r g c < <(run "$viaA" "$args" "$PID_OFFLOAD"); a+=("$g"); ac+=("$c")
        read -r g c < <(run "$viaB" "$args" "$PID_PLAIN"); b+=("$g"); bc+=("$c")
    done
    dm=$(printf '%s\n' "${d[@]}" | median)
    am=$(printf '%s\n' "${a[@]}" | median)
    bm=$(printf '%s\n' "${b[@]}" | median)
    acm=$(printf '%s\n' "${ac[@]}" | median)
    bcm=$(printf '%s\n' "${bc[@]}" | median)
    awk -v n="$name" -v d="$dm" -v a="$am" -v ac="$acm" -v b="$bm" -v bc="$bcm" 'BEGIN {
        printf "| %s | %.2f | %.2f | %.2f | %d | %.2f | %.2f | %d |\n", n, d, a, (d > 0 ? a / d : 0), ac, b, (d > 0 ? b / d : 0), bc }'
done <<'EOF'
IPv4 upload, 1 stream|4|
IPv4 download, 1 stream|4|-R
IPv4 upload, 4 streams|4|-P 4
IPv4 download, 4 streams|4|-R -P 4
IPv6 upload, 1 stream|6|
IPv6 download, 1 stream|6|-R
EOF

echo
echo "| UDP, 1400-byte datagrams | direct Gbit/s (kpps, loss %) | offload Gbit/s (kpps, loss %, CPU %) | --no-offload Gbit/s (kpps, loss %, CPU %) |"
echo "| --- | --- | --- | --- |"
while IFS='|' read -r name family args; do
    if [ "$family" = 4 ]; then direct=10.77.0.3; viaA=10.77.0.2; viaB=10.77.0.4
    else direct=fd00:77::3; viaA=fd00:77::2; viaB=fd00:77::4; fi
    echo "$name: UDP" >&2
    read -r dg dl _ < <(udp "$direct" "$args")
    read -r ag al ac < <(udp "$viaA" "$args" "$PID_OFFLOAD")
    read -r bg bl bc < <(udp "$viaB" "$args" "$PID_PLAIN")
    awk -v n="$name" -v dg="$dg" -v dl="$dl" -v ag="$ag" -v al="$al" -v ac="$ac" \
        -v bg="$bg" -v bl="$bl" -v bc="$bc" 'BEGIN {
        k = 1e9 / (1400 * 8) / 1000
        printf "| %s | %.2f (%.0f, %.1f) | %.2f (%.0f, %.1f, %d) | %.2f (%.0f, %.1f, %d) |\n",
            n, dg, dg * k, dl, ag, ag * k, al, ac, bg, bg * k, bl, bc }'
done <<'SCENARIOS'
IPv4 upload|4|
IPv4 download|4|-R
IPv6 upload|6|
SCENARIOS
