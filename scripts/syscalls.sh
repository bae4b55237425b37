#!/usr/bin/env bash
# Syscalls per small RPC (not part of CI): `strace -c -f` on a release broker
# and on HAProxy 2.6 (TCP mode), each between one client doing RPCS
# (default 10000) GetInfo round trips (`kyuubi-broker bench --scenario ping`)
# and the fixture's Spark Thrift Server on 127.0.0.1:10000. The client's
# connect and OpenSession are done before strace attaches (a warm-up run of
# the same client), so the counts are the steady state; divide by RPCS.
# Output: target/syscalls/{broker,haproxy}.strace and summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/measure.sh
rpcs=${RPCS:-10000}
out=target/syscalls
mkdir -p "$out"
command -v strace >/dev/null || {
    echo "strace is needed (apt-get install strace)" >&2
    exit 2
}
scripts/install-haproxy.sh
scripts/fixture.sh install >/dev/null
scripts/fixture.sh start sts-binary --mode binary --port 10000 >/dev/null
cargo build --release --quiet
bin=./target/release/kyuubi-broker

cat >"$out/broker.toml" <<'EOF'
[server]
shutdown_grace = "5s"

[[listener]]
name = "b"
protocol = "binary"
bind = "127.0.0.1:10949"
route = "sts"
auth = "none"
allow_any_user = true

[routes.sts]
# measures forwarding: no metadata cache
cache = false
[routes.sts.upstream]
transport = "binary"
host = "127.0.0.1"
port = 10000
EOF
cat >"$out/haproxy.cfg" <<'EOF'
global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe
  bind 127.0.0.1:10959
  default_backend be
backend be
  server s1 127.0.0.1:10000
EOF

"$bin" serve --config "$out/broker.toml" >"$out/broker.log" 2>&1 &
broker=$!
measure_pids+=($broker)
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
"$haproxy" -f "$out/haproxy.cfg" -db >"$out/haproxy.log" 2>&1 &
ha=$!
measure_pids+=($ha)
wait_port 10949
wait_port 10959

# A warm-up run first (the broker's first connection pays for lazy setup),
# then the measured run with strace attached to every thread. The measured
# run's own connect, OpenSession and CloseSession are counted too: a fixed
# few dozen syscalls, under 0.01 per RPC at 10,000.
measure() { # name pid port
    local name=$1 pid=$2 port=$3
    "$bin" bench --target "jdbc:hive2://127.0.0.1:$port/default" --user sys \
        --scenario ping --iterations 2000 >/dev/null 2>&1
    strace -c -f -p "$pid" -o "$out/$name.strace" 2>"$out/$name.attach" &
    local st=$!
    for _ in $(seq 100); do
        grep -q attached "$out/$name.attach" 2>/dev/null && break
        sleep 0.05
    done
    "$bin" bench --target "jdbc:hive2://127.0.0.1:$port/default" --user sys \
        --scenario ping --iterations "$rpcs" --json "$out/$name.json" >/dev/null 2>&1
    kill -INT "$st"
    wait "$st" 2>/dev/null || true
}
measure broker "$broker" 10949
measure haproxy "$ha" 10959

python3 - "$out" "$rpcs" <<'PY' | tee "$out/summary.txt"
import os, re, sys
out, rpcs = sys.argv[1], int(sys.argv[2])
for name in ("broker", "haproxy"):
    calls = {}
    for line in open(os.path.join(out, name + ".strace")):
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    clock = sum(v for k, v in calls.items() if k.startswith("clock_"))
    total = sum(calls.values()) - clock
    top = ", ".join(f"{k} {v / rpcs:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if not k.startswith("clock_"))
    print(f"{name:8} {total / rpcs:.2f} syscalls per GetInfo (clock reads {clock / rpcs:.2f} more): {top}")
PY
