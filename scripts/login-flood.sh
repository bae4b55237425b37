#!/usr/bin/env bash
# Login flood (not part of CI): what a flood of wrong passwords costs a
# logged-in client. A release broker with a static users file (argon2) sits
# in front of the fixture's Spark Thrift Server (binary 127.0.0.1:10000).
# bob, logged in once, does GetInfo round trips for FLOOD_SECS (default 20)
# alone, then again while FLOOD_CLIENTS (default 16) clients log in as alice
# with a wrong password as fast as they can. Backoff and the per-address
# budget are set out of reach, so every attempt is an argon2 check on the
# auth pool: the worst case for the broker's CPU. Compares bob's p50/p99.
# Output: target/login-flood/{*.json,broker.log,summary.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/measure.sh
secs=${FLOOD_SECS:-20}
clients=${FLOOD_CLIENTS:-16}
out=target/login-flood
mkdir -p "$out"
rm -f "$out"/*.json

scripts/fixture.sh install >/dev/null
scripts/fixture.sh start sts-binary --mode binary --port 10000 >/dev/null
cargo build --release --quiet
bin=./target/release/kyuubi-broker

users="$out/users"
{
    printf 'bob:%s\n' "$(printf 'bob-pw\n' | "$bin" hash-password)"
    printf 'alice:%s\n' "$(printf 'alice-pw\n' | "$bin" hash-password)"
} >"$users"
chmod 600 "$users"

cat >"$out/flood.toml" <<EOF
[server]
shutdown_grace = "5s"
login_free_failures = 1000000
login_failures_per_ip = 1000000

[admin]
bind = "127.0.0.1:10929"

[[listener]]
name = "flood"
protocol = "binary"
bind = "127.0.0.1:10919"
route = "sts"
auth = "static"
users_file = "$PWD/$users"

[routes.sts]
# measures forwarding: no metadata cache
cache = false
[routes.sts.upstream]
transport = "binary"
host = "127.0.0.1"
port = 10000
EOF

"$bin" serve --config "$out/flood.toml" >"$out/broker.log" 2>&1 &
measure_pids+=($!)
wait_port 10919

url='jdbc:hive2://127.0.0.1:10919/default'
ping() { # name
    KYUUBI_BENCH_PASSWORD=bob-pw "$bin" bench --target "$url" --user bob \
        --scenario ping --duration "$secs" --json "$out/$1.json" >"$out/$1.txt" 2>&1
}
ping alone
KYUUBI_BENCH_PASSWORD=wrong "$bin" bench --target "$url" --user alice \
    --scenario connect --concurrency "$clients" --duration $((secs + 4)) \
    --json "$out/flood.json" >"$out/flood.txt" 2>&1 &
flood=$!
measure_pids+=($flood)
sleep 2 # the flood is under way before bob's second run starts
ping flooded
wait "$flood" || true
failures=$(curl -s http://127.0.0.1:10929/metrics |
    awk '/^kyuubi_broker_auth_failures_total/ {s += $2} END {print s + 0}')

python3 - "$out" "$secs" "$clients" "$failures" <<'PY' | tee "$out/summary.txt"
import json, os, sys
out, secs, clients, failures = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t = {n: json.load(open(os.path.join(out, n + ".json")))["targets"][0] for n in ("alone", "flooded")}
for n, r in t.items():
    print(f"bob {n:8} ops={r['ops']:7} errors={r['errors']} p50={r['p50_us']}us p99={r['p99_us']}us")
a, f = t["alone"], t["flooded"]
print(f"flood: {clients} clients, {failures:.0f} refused logins in ~{secs + 4}s "
      f"({failures / (secs + 4):.0f}/s, each an argon2 check)")
print(f"bob p50 x{f['p50_us'] / max(a['p50_us'], 1):.2f}, p99 x{f['p99_us'] / max(a['p99_us'], 1):.2f} under the flood")
ok = a["errors"] == 0 and f["errors"] == 0 and f["ops"] > 0
print("PASS (bob was served throughout)" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
