#!/usr/bin/env bash
# The benchmark harness: installs haproxy when missing, then runs
# `cargo bench --bench proxy` (direct vs broker vs HAProxy, 1M-row fetch,
# idle sessions, the TLS pass with the certificates of
# `scripts/fixture.sh tls-certs`) and the codec micro-benchmarks. With the fixture's Spark
# Thrift Server running on 127.0.0.1:10000 it adds one realistic pass.
# Reports: target/bench-report/{report.json,report.md,latency.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-haproxy.sh
cargo bench --bench proxy
# the metadata cache and warm sessions against the fixture's Spark Thrift
# Server (skipped, saying so, when it does not run on 127.0.0.1:10000)
cargo bench --bench bi
# the 1M-row fetch on all four bridges (the fixture's binary and HTTP Spark
# Thrift Servers on 10000/10001 when they run, and the responder)
cargo bench --bench bridges
cargo bench --bench codec
