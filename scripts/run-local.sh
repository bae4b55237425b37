#!/usr/bin/env bash
# The main job on a fresh machine: installs and starts a local Spark Thrift
# Server (127.0.0.1:10000), then runs kyuubi-broker in front of it with
# config/local.toml until Ctrl-C. Connect with:
#   beeline -u 'jdbc:hive2://127.0.0.1:10009/' -n "$USER" -p x
#   beeline -u 'jdbc:hive2://127.0.0.1:10010/;transportMode=http;httpPath=cliservice' -n "$USER" -p x
# Metrics and status: http://127.0.0.1:10019/metrics, /status, or `kyuubi-broker stats`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/fixture.sh install
scripts/fixture.sh start sts-binary --mode binary --port 10000
trap 'scripts/fixture.sh stop sts-binary' EXIT
cargo build --release
./target/release/kyuubi-broker serve --config config/local.toml
