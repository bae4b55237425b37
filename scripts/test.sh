#!/usr/bin/env bash
# The whole test suite: checks formatting and lints (default features and
# --no-default-features), installs the fixture (Spark Thrift Server 4.0.1 from
# the pyspark package, PyHive, impyla, beeline, slapd, an MIT KDC, ZooKeeper), starts
# the shared servers, runs every cargo test against them, and stops what it
# started.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

scripts/build-deps.sh
# style and lints first: they fail fast, before any server starts
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --no-default-features -- -D warnings
echo "[test] fmt and clippy (both feature sets) clean after $((SECONDS - t0)) s"
scripts/fixture.sh install
scripts/fixture.sh ldap-start >/dev/null
# the shared upstreams, started in parallel (about 20 s each)
scripts/fixture.sh start sts-binary --mode binary --port 10000 >/dev/null &
b=$!
scripts/fixture.sh start sts-http --mode http --port 10001 >/dev/null &
h=$!
scripts/fixture.sh start sts-ldap --mode binary --port 10003 --auth ldap >/dev/null &
l=$!
trap 'scripts/fixture.sh stop all; scripts/fixture.sh zk-stop' EXIT
# ZooKeeper for the discovery tests (about 1 s)
scripts/fixture.sh zk-start >/dev/null
scripts/fixture.sh kdc-start >/dev/null
scripts/fixture.sh start sts-kerberos --mode binary --port 10005 --auth kerberos >/dev/null &
kb=$!
scripts/fixture.sh start sts-kerberos-http --mode http --port 10006 --auth kerberos >/dev/null &
kh=$!
# TLS upstreams, with the fixture's test CA (written before they start)
scripts/fixture.sh tls-certs >/dev/null
scripts/fixture.sh start sts-ssl --mode binary --port 10007 --ssl >/dev/null &
sb=$!
scripts/fixture.sh start sts-ssl-http --mode http --port 10008 --ssl >/dev/null &
sh=$!
wait $b
wait $h
wait $l
wait $kb
wait $kh
wait $sb
wait $sh
echo "[test] fixture ready after $((SECONDS - t0)) s"

cargo test --all-targets "$@"
echo "[test] whole suite: $((SECONDS - t0)) s wall"
