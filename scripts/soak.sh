#!/usr/bin/env bash
# Soak run (not part of CI): a release broker in front of the fixture's real
# Spark Thrift Servers (binary 127.0.0.1:10000, HTTP 127.0.0.1:10001), 200
# clients on loopback (binary and HTTP; small queries and 10k-row fetches)
# for SOAK_SECS (default 600). The broker's RSS is sampled every 10 s.
# Passes when no client saw an error and the RSS at the end is within 10%
# of the RSS after warm-up (the first minute, or a tenth of a shorter run).
# Output: target/soak/{rss.csv,*.json,broker.log,summary.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/measure.sh
secs=${SOAK_SECS:-600}
warm=$((secs / 10 < 60 ? secs / 10 : 60))
out=target/soak
mkdir -p "$out"
rm -f "$out"/*.json "$out"/rss.csv

scripts/fixture.sh install >/dev/null
scripts/fixture.sh start sts-binary --mode binary --port 10000 >/dev/null
scripts/fixture.sh start sts-http --mode http --port 10001 >/dev/null
cargo build --release --quiet

cat >"$out/soak.toml" <<'EOF'
[server]
shutdown_grace = "10s"
max_connections = 1024

[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "soak-binary"
protocol = "binary"
bind = "127.0.0.1:10909"
route = "sts-binary"
auth = "none"
allow_any_user = true

[[listener]]
name = "soak-http"
protocol = "http"
bind = "127.0.0.1:10910"
route = "sts-http"
auth = "none"
allow_any_user = true

[routes.sts-binary]
# measures forwarding: no metadata cache
cache = false
[routes.sts-binary.upstream]
transport = "binary"
host = "127.0.0.1"
port = 10000

[routes.sts-http]
# measures forwarding: no metadata cache
cache = false
[routes.sts-http.upstream]
transport = "http"
host = "127.0.0.1"
port = 10001
http_path = "cliservice"
EOF

./target/release/kyuubi-broker serve --config "$out/soak.toml" >"$out/broker.log" 2>&1 &
broker=$!
measure_pids+=($broker)
pids=()
wait_port 10909

bin='jdbc:hive2://127.0.0.1:10909/default'
http='jdbc:hive2://127.0.0.1:10910/default;transportMode=http;httpPath=cliservice'
run() { # name url scenario concurrency [extra...]
    local name=$1 url=$2 scenario=$3 n=$4
    shift 4
    ./target/release/kyuubi-broker bench --target "$url" --user soak \
        --scenario "$scenario" --concurrency "$n" --duration "$secs" \
        --json "$out/$name.json" "$@" >"$out/$name.txt" 2>&1 &
    pids+=($!)
    measure_pids+=($!)
}
run binary-small "$bin" small 80
run http-small "$http" small 80
run binary-fetch "$bin" fetch 20 --rows 10000
run http-fetch "$http" fetch 20 --rows 10000

echo "elapsed_s,rss_kib" >"$out/rss.csv"
start=$SECONDS
while [ $((SECONDS - start)) -lt "$secs" ]; do
    sleep 10
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$broker/status")
    echo "$((SECONDS - start)),$rss" >>"$out/rss.csv"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()

python3 - "$out" "$warm" "$status" <<'EOF' | tee "$out/summary.txt"
import csv, json, sys, glob, os
out, warm, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ops = errors = 0
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    for t in json.load(open(f))["targets"]:
        ops += t["ops"]; errors += t["errors"]
        print(f"{os.path.basename(f)[:-5]:14} ops={t['ops']:8} errors={t['errors']} "
              f"p50={t['p50_us']}us p99={t['p99_us']}us first_error={t['first_error']}")
rows = [(int(r["elapsed_s"]), int(r["rss_kib"])) for r in csv.DictReader(open(os.path.join(out, "rss.csv")))]
after_warm = next(rss for t, rss in rows if t >= warm)
end = rows[-1][1]
peak = max(r for _, r in rows)
growth = (end - after_warm) / after_warm * 100
print(f"clients=200 ops={ops} errors={errors} rss_after_warmup={after_warm} KiB "
      f"rss_end={end} KiB peak={peak} KiB growth={growth:+.1f}%")
ok = status == 0 and errors == 0 and ops > 0 and growth <= 10
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
