#!/usr/bin/env bash
# fixture.sh - the local test fixture for kyuubi-broker: real Spark Thrift
# Server 4.0.1 instances (HiveServer2 protocol) on 127.0.0.1 and the real
# clients (beeline / Hive JDBC 2.3.10, PyHive, impyla, and the official
# EMR Serverless Spark Python SDK).
#
# Usage:
#   scripts/fixture.sh install                 venv with pyspark + clients, bind shim
#   scripts/fixture.sh start NAME [--mode binary|http] [--port N]
#                                              start (idempotent) a named server;
#                                              prints host:port when it accepts
#   scripts/fixture.sh stop NAME|all           stop by PID
#   scripts/fixture.sh status
#   scripts/fixture.sh env                     prints KB_PYTHON / KB_SPARK_HOME exports
#   scripts/fixture.sh ldap-start | ldap-stop  OpenLDAP (slapd) on ldap://127.0.0.1:3890
#                                              (StartTLS too) and ldaps://127.0.0.1:6360,
#                                              certificate /tmp/kb-tls/server.pem (tls-certs),
#                                              base dc=example,dc=com, users alice/alice-pw,
#                                              bob/bob-pw, group cn=hive-users,ou=groups
#   scripts/fixture.sh start NAME --auth ldap  a Spark Thrift Server checking passwords there
#   scripts/fixture.sh kdc-start | kdc-stop    MIT KDC, realm EXAMPLE.COM on 127.0.0.1:8800,
#                                              state + keytabs in /tmp/hs2-kdc (users alice,
#                                              bob, carol; services hive/, HTTP/, kyuubi/localhost)
#   scripts/fixture.sh start NAME --auth kerberos  a Spark Thrift Server as hive/localhost
#   scripts/fixture.sh tls-certs               a test CA and certificates in /tmp/kb-tls
#                                              (listed at cmd_tls_certs)
#   scripts/fixture.sh start NAME --ssl        a Spark Thrift Server with hive.server2.use.SSL
#                                              and /tmp/kb-tls/server.pem
#   scripts/fixture.sh zk-start | zk-stop      ZooKeeper 3.8 (Debian's zookeeper) standalone on
#                                              127.0.0.1:2181, state in /tmp/kb-zk
#   scripts/fixture.sh fleet-key               the fleet's token key (32 random bytes, hex) in
#                                              /tmp/kb-fleet.key, mode 600; kept if present
#
# Environment: KB_FIXTURE_DIR (state, default /tmp/kyuubi-broker-fixture),
# KB_CACHE_DIR (venv + shim, default ~/.cache/kyuubi-broker),
# KB_STS_START_TIMEOUT (seconds, default 240), KB_STS_MEMORY (default 1g),
# KB_LDAP_PORT / KB_LDAPS_PORT (default 3890 / 6360), KB_TLS_DIR (default /tmp/kb-tls),
# KB_ZK_PORT (default 2181), KB_ZK_DIR (default /tmp/kb-zk).
set -euo pipefail

CACHE_DIR=${KB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kyuubi-broker}
FIXTURE_DIR=${KB_FIXTURE_DIR:-/tmp/kyuubi-broker-fixture}
VENV="$CACHE_DIR/venv"
PY="$VENV/bin/python"
SHIM="$CACHE_DIR/loopback_bind.so"
LLAP_STUB="$CACHE_DIR/llap-stub"
MAIN_CLASS=org.apache.spark.sql.hive.thriftserver.HiveThriftServer2
START_TIMEOUT=${KB_STS_START_TIMEOUT:-240}
HOST=127.0.0.1

log() { printf '[fixture] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

spark_home() { "$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'; }

cmd_install() {
  command -v java >/dev/null || die "java (17 or 21) is required: apt-get install openjdk-17-jre-headless"
  mkdir -p "$CACHE_DIR"
  if ! "$PY" -c 'import pyspark, pyhive, impala, thrift_sasl, puresasl, kerberos, kazoo, alibabacloud_emr_serverless_spark20230808' 2>/dev/null; then
    log "creating client venv in $VENV (pyspark 4.0.1, PyHive 0.7.0, impyla 0.24.0, kazoo 2.11.0, the official EMR Serverless Spark SDK)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'pyspark==4.0.1' 'pyhive[hive_pure_sasl]==0.7.0' 'impyla==0.24.0' \
      thrift_sasl pure-sasl kerberos 'kazoo==2.11.0' 'alibabacloud-emr-serverless-spark20230808==2.3.0' >&2
  fi
  build_shim
  build_llap_stub
  log "installed: SPARK_HOME=$(spark_home)"
}

# Spark's HTTP mode ignores the bind host and listens on all interfaces; this
# LD_PRELOAD shim turns wildcard binds into loopback binds.
build_shim() {
  [ -f "$SHIM" ] && return 0
  command -v cc >/dev/null || die "a C compiler is needed for the loopback bind shim"
  cat >"$CACHE_DIR/loopback_bind.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real;
    if (!real) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
            static const unsigned char mapped_lo[16] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff,127,0,0,1};
            memcpy(&a.sin6_addr, mapped_lo, sizeof mapped_lo);
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real(fd, addr, len);
}
EOF
  cc -shared -fPIC -O2 -o "$SHIM.tmp" "$CACHE_DIR/loopback_bind.c" -ldl && mv "$SHIM.tmp" "$SHIM"
}

# pyspark's jars lack hive-llap-common, yet Hive's FunctionRegistry registers
# get_splits, whose class implements LlapSigner.Signable. Whenever the server
# builds a Hive client with function registration (on some threads only, so
# it depends on timing) the static init fails with NoClassDefFoundError and
# stays failed for the JVM's life: a `create table` then fails at random.
# The verifier needs only the interface to exist; nothing calls it. Built
# once, and checked by loading FunctionRegistry against the same jars.
build_llap_stub() {
  [ -f "$LLAP_STUB/ok" ] && return 0
  command -v javac >/dev/null || die "javac is needed (a JDK: apt-get install openjdk-17-jdk-headless)"
  local src="$CACHE_DIR/llap-stub-src" jars; jars="$(spark_home)/jars"
  rm -rf "$src" "$LLAP_STUB" && mkdir -p "$src/org/apache/hadoop/hive/llap/security" "$LLAP_STUB"
  cat >"$src/org/apache/hadoop/hive/llap/security/LlapSigner.java" <<'EOF'
package org.apache.hadoop.hive.llap.security;

/** Stands in for hive-llap-common's interface so that Hive's FunctionRegistry links. */
public interface LlapSigner {
  interface Signable {}

  class SignedMessage {}
}
EOF
  cat >"$src/LlapStubCheck.java" <<'EOF'
public class LlapStubCheck {
  public static void main(String[] args) throws Exception {
    Class.forName("org.apache.hadoop.hive.ql.exec.FunctionRegistry", true, LlapStubCheck.class.getClassLoader());
  }
}
EOF
  javac -d "$LLAP_STUB" "$src/org/apache/hadoop/hive/llap/security/LlapSigner.java"
  javac -d "$src" "$src/LlapStubCheck.java"
  java --add-opens java.base/java.net=ALL-UNNAMED --add-opens java.base/java.lang=ALL-UNNAMED \
    --add-opens java.base/java.util=ALL-UNNAMED -cp "$src:$LLAP_STUB:$jars/*" LlapStubCheck >"$src/check.log" 2>&1 ||
    die "Hive's FunctionRegistry does not load with the LLAP stub (log: $src/check.log)"
  touch "$LLAP_STUB/ok"
}

alive() { # pid
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "$MAIN_CLASS"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

cmd_start() {
  local name=${1:?usage: start NAME [--mode binary|http] [--port N]}; shift
  local mode=binary port="" auth=none ssl=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --auth) auth=${2:?}; shift 2 ;;
      --mode) mode=${2:?}; shift 2 ;;
      --port) port=${2:?}; shift 2 ;;
      --ssl) ssl=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  case "$mode" in binary) port=${port:-10000} ;; http) port=${port:-10001} ;; *) die "--mode binary|http" ;; esac
  local dir="$FIXTURE_DIR/$name"
  mkdir -p "$dir"
  # one start at a time per instance, so parallel test binaries can share it
  exec 9>"$dir/lock"
  flock 9
  case "$auth" in none|ldap|kerberos) ;; *) die "--auth none|ldap|kerberos" ;; esac
  local sig="mode=$mode port=$port auth=$auth"
  if [ "$ssl" = 1 ]; then sig="$sig ssl"; fi
  if [ -f "$dir/pid" ] && alive "$(cat "$dir/pid")"; then
    if [ "$(cat "$dir/signature" 2>/dev/null)" = "$sig" ] && port_open "$port"; then
      echo "$HOST:$port"; return 0
    fi
    die "instance $name runs with $(cat "$dir/signature"); stop it first"
  fi
  port_open "$port" && die "port $HOST:$port is in use by another process"
  [ -x "$PY" ] || cmd_install
  build_shim
  build_llap_stub
  local sh; sh=$(spark_home)
  rm -rf "$dir/tmp"; mkdir -p "$dir/tmp"
  # one resources dir per session: Hive deletes it when the session closes,
  # so a shared one fails other sessions' OpenSession at random
  local hive=(--hiveconf "hive.server2.thrift.bind.host=$HOST"
    --hiveconf "hive.exec.local.scratchdir=$dir/tmp/scratch"
    --hiveconf "hive.exec.scratchdir=$dir/tmp/hdfs-scratch"
    --hiveconf "hive.downloaded.resources.dir=$dir/tmp/"'${hive.session.id}'"_resources"
    --hiveconf "hive.server2.logging.operation.log.location=$dir/tmp/oplogs")
  if [ "$auth" = ldap ]; then
    # Spark reads LDAP settings from a fresh HiveConf, so they must be --hiveconf
    hive+=(--hiveconf hive.server2.authentication=LDAP
      --hiveconf "hive.server2.authentication.ldap.url=ldap://$HOST:$LDAP_PORT"
      --hiveconf "hive.server2.authentication.ldap.baseDN=ou=people,$LDAP_SUFFIX")
  elif [ "$auth" = kerberos ]; then
    [ -f "$KDC_DIR/hive-localhost.keytab" ] || die "no KDC state in $KDC_DIR; run: $0 kdc-start"
    hive+=(--hiveconf hive.server2.authentication=KERBEROS
      --hiveconf "hive.server2.authentication.kerberos.principal=hive/localhost@$REALM"
      --hiveconf "hive.server2.authentication.kerberos.keytab=$KDC_DIR/hive-localhost.keytab")
  else
    hive+=(--hiveconf hive.server2.authentication=NONE)
  fi
  if [ "$ssl" = 1 ]; then
    tls_certs >/dev/null
    hive+=(--hiveconf hive.server2.use.SSL=true
      --hiveconf "hive.server2.keystore.path=$TLS_DIR/server-keystore.jks"
      --hiveconf hive.server2.keystore.password=changeit)
  fi
  local java_opts="-Dderby.system.home=$dir -Djava.io.tmpdir=$dir/tmp"
  local extra=()
  if [ "$auth" = kerberos ]; then
    # Hadoop UGI must be in Kerberos mode too, or the keytab login is skipped
    java_opts="$java_opts -Djava.security.krb5.conf=$KDC_DIR/krb5.conf"
    extra=(--conf spark.hadoop.hadoop.security.authentication=kerberos)
  fi
  if [ "$mode" = http ]; then
    hive+=(--hiveconf hive.server2.transport.mode=http --hiveconf "hive.server2.thrift.http.port=$port"
      --hiveconf hive.server2.thrift.http.path=cliservice)
  else
    hive+=(--hiveconf hive.server2.transport.mode=binary --hiveconf "hive.server2.thrift.port=$port")
  fi
  log "starting Spark Thrift Server '$name' ($sig)"
  local t0=$SECONDS
  (
    exec 9>&- # the server must not inherit (and hold) the start lock
    cd "$dir"
    export SPARK_LOCAL_IP=$HOST LD_PRELOAD="$SHIM" SPARK_HOME="$sh"
    exec nohup "$sh/bin/spark-submit" --class "$MAIN_CLASS" --name "kb-fixture-$name" \
      --master 'local[2]' --driver-memory "${KB_STS_MEMORY:-1g}" \
      --driver-class-path "$LLAP_STUB" \
      --conf spark.ui.enabled=false --conf "spark.driver.bindAddress=$HOST" --conf "spark.driver.host=$HOST" \
      --conf "spark.local.dir=$dir/tmp" --conf "spark.sql.warehouse.dir=$dir/warehouse" \
      --conf "spark.hadoop.javax.jdo.option.ConnectionURL=jdbc:derby:;databaseName=$dir/metastore_db;create=true" \
      --conf spark.sql.shuffle.partitions=2 --conf "spark.driver.extraJavaOptions=$java_opts" \
      ${extra[@]+"${extra[@]}"} spark-internal "${hive[@]}"
  ) >"$dir/server.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/pid"
  echo "$sig" >"$dir/signature"
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      grep -E "ERROR|Exception" "$dir/server.log" | tail -n 10 >&2 || true
      die "Spark Thrift Server '$name' exited during startup (log: $dir/server.log)"
    fi
    if grep -q "HiveThriftServer2 started" "$dir/server.log" 2>/dev/null && port_open "$port"; then break; fi
    if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
      kill "$pid" 2>/dev/null || true
      tail -n 30 "$dir/server.log" >&2
      die "Spark Thrift Server '$name' not ready after ${START_TIMEOUT}s"
    fi
    sleep 0.3
  done
  log "'$name' ready in $((SECONDS - t0)) s (pid $pid)"
  echo "$HOST:$port"
}

stop_one() {
  local dir="$FIXTURE_DIR/$1" pid
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  if alive "$pid"; then
    kill "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "stopped '$1' (pid $pid)"
  fi
  rm -f "$dir/pid"
}

cmd_stop() {
  local name=${1:?usage: stop NAME|all}
  if [ "$name" = all ]; then
    [ -d "$FIXTURE_DIR" ] || return 0
    for d in "$FIXTURE_DIR"/*/; do [ -d "$d" ] && [ "$(basename "$d")" != ldap ] && stop_one "$(basename "$d")"; done
    cmd_ldap_stop
    cmd_kdc_stop
  else
    stop_one "$name"
  fi
}

cmd_status() {
  [ -d "$FIXTURE_DIR" ] || { echo "no instances"; return 0; }
  for d in "$FIXTURE_DIR"/*/; do
    [ -f "$d/pid" ] || continue
    if alive "$(cat "$d/pid")"; then echo "$(basename "$d"): running pid $(cat "$d/pid") $(cat "$d/signature")"; fi
  done
}

cmd_env() {
  echo "export KB_PYTHON=$PY"
  echo "export KB_SPARK_HOME=$(spark_home)"
}

# ------------------------------------------------------------------ LDAP ---

LDAP_DIR="$FIXTURE_DIR/ldap"
LDAP_PORT=${KB_LDAP_PORT:-3890}
LDAPS_PORT=${KB_LDAPS_PORT:-6360}
LDAP_SUFFIX="dc=example,dc=com"

ldap_install() {
  if [ -x /usr/sbin/slapd ] && command -v slappasswd >/dev/null && command -v ldapwhoami >/dev/null; then
    return 0
  fi
  log "installing slapd and ldap-utils (no system database is created)"
  echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections
  apt-cache show slapd >/dev/null 2>&1 || apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends slapd ldap-utils >&2
}

# slapd.conf, written at every start so that a data directory from an older
# fixture gets the current settings (TLS). TLS: the fixture's server.pem
# (SANs localhost, 127.0.0.1) for StartTLS on $LDAP_PORT and for ldaps on
# $LDAPS_PORT; ca.pem would check client certificates (none are asked for).
ldap_config() {
  cat >"$LDAP_DIR/slapd.conf" <<CONF
include         /etc/ldap/schema/core.schema
include         /etc/ldap/schema/cosine.schema
include         /etc/ldap/schema/inetorgperson.schema
include         /etc/ldap/schema/nis.schema
pidfile         $LDAP_DIR/slapd.pid
modulepath      /usr/lib/ldap
moduleload      back_mdb
TLSCACertificateFile   $TLS_DIR/ca.pem
TLSCertificateFile     $TLS_DIR/server.pem
TLSCertificateKeyFile  $TLS_DIR/server-key.pem
database        mdb
maxsize         67108864
suffix          "$LDAP_SUFFIX"
rootdn          "cn=admin,$LDAP_SUFFIX"
rootpw          $(slappasswd -s admin-pw)
directory       $LDAP_DIR/data
index           objectClass,uid,member eq
access to attrs=userPassword
        by self write
        by anonymous auth
        by * none
access to *
        by * read
CONF
}

# The directory's first contents (slapadd into an empty data directory).
ldap_data() {
  local n=10001 u
  {
    printf 'dn: %s\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n' "$LDAP_SUFFIX"
    printf 'dn: ou=people,%s\nobjectClass: organizationalUnit\nou: people\n\n' "$LDAP_SUFFIX"
    printf 'dn: ou=groups,%s\nobjectClass: organizationalUnit\nou: groups\n\n' "$LDAP_SUFFIX"
    for u in alice bob; do
      printf 'dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\nuid: %s\ncn: %s\nsn: %s\nuidNumber: %s\ngidNumber: 10000\nhomeDirectory: /home/%s\nuserPassword: %s\n\n' \
        "$u" "$LDAP_SUFFIX" "$u" "$u" "$u" "$n" "$u" "$(slappasswd -s "$u-pw")"
      n=$((n + 1))
    done
    printf 'dn: cn=hive-users,ou=groups,%s\nobjectClass: groupOfNames\ncn: hive-users\nmember: uid=alice,ou=people,%s\nmember: uid=bob,ou=people,%s\n\n' \
      "$LDAP_SUFFIX" "$LDAP_SUFFIX" "$LDAP_SUFFIX"
  } >"$LDAP_DIR/fixture.ldif"
}

# Whether slapd answers on both URLs, TLS verified against the test CA. By
# address: libldap replaces the host name "localhost" with this machine's
# own name before checking the certificate (rustls, in the broker, does not).
ldap_ready() {
  ldapwhoami -x -H "ldap://$HOST:$LDAP_PORT" >/dev/null 2>&1 &&
    LDAPTLS_CACERT="$TLS_DIR/ca.pem" ldapwhoami -x -ZZ -H "ldap://$HOST:$LDAP_PORT" >/dev/null 2>&1 &&
    LDAPTLS_CACERT="$TLS_DIR/ca.pem" ldapwhoami -x -H "ldaps://$HOST:$LDAPS_PORT" >/dev/null 2>&1
}

# slapd runs as the invoking user (no -u): root here, which can read the
# 0600 key in the 0700 $TLS_DIR; anyone else needs to own $TLS_DIR.
cmd_ldap_start() {
  ldap_install
  tls_certs >/dev/null
  [ -r "$TLS_DIR/server-key.pem" ] || die "slapd (running as $(id -un)) cannot read $TLS_DIR/server-key.pem"
  mkdir -p "$LDAP_DIR/data"
  exec 9>"$LDAP_DIR/lock"
  flock 9
  if [ -f "$LDAP_DIR/pid" ] && kill -0 "$(cat "$LDAP_DIR/pid")" 2>/dev/null; then
    if ldap_ready; then
      echo "ldap://$HOST:$LDAP_PORT"
      return 0
    fi
    # started by an older fixture without TLS, or before tls-certs made a new CA
    log "restarting slapd: no TLS verified by $TLS_DIR/ca.pem"
    cmd_ldap_stop
    for _ in $(seq 1 50); do port_open "$LDAP_PORT" || break; sleep 0.1; done
  fi
  port_open "$LDAP_PORT" && die "port $HOST:$LDAP_PORT is in use by another process"
  port_open "$LDAPS_PORT" && die "port $HOST:$LDAPS_PORT is in use by another process"
  ldap_config
  if [ ! -f "$LDAP_DIR/data/data.mdb" ]; then
    ldap_data
    /usr/sbin/slapd -T add -f "$LDAP_DIR/slapd.conf" -l "$LDAP_DIR/fixture.ldif" >"$LDAP_DIR/slapadd.log" 2>&1 ||
      { cat "$LDAP_DIR/slapadd.log" >&2; die "slapadd failed"; }
  fi
  (
    exec 9>&-
    exec nohup /usr/sbin/slapd -d 0 -h "ldap://$HOST:$LDAP_PORT/ ldaps://$HOST:$LDAPS_PORT/" -f "$LDAP_DIR/slapd.conf"
  ) >"$LDAP_DIR/slapd.log" 2>&1 </dev/null &
  echo $! >"$LDAP_DIR/pid"
  for _ in $(seq 1 100); do
    if ldap_ready; then
      echo "ldap://$HOST:$LDAP_PORT"
      return 0
    fi
    kill -0 "$(cat "$LDAP_DIR/pid")" 2>/dev/null || { cat "$LDAP_DIR/slapd.log" >&2; die "slapd exited"; }
    sleep 0.1
  done
  cmd_ldap_stop
  die "slapd not ready after 10 s (plain, StartTLS and ldaps on 127.0.0.1:$LDAP_PORT and :$LDAPS_PORT)"
}

# Stops the process of pid file $1 if its command line matches $2 (a stale
# file may name another process by now), waits up to 5 s for it to end, and
# removes the file; $3 names it in the log.
stop_pidfile() {
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2"; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    log "stopped $3 (pid $pid)"
  fi
  rm -f "$1"
}

cmd_ldap_stop() {
  stop_pidfile "$LDAP_DIR/pid" slapd slapd
}

# ------------------------------------------------------------------- KDC ---
# Nothing under /etc is read: MIT tools get KRB5_CONFIG / KRB5_KDC_PROFILE,
# Java gets -Djava.security.krb5.conf.

KDC_DIR=${KB_KDC_DIR:-/tmp/hs2-kdc}
KDC_PORT=${KB_KDC_PORT:-8800}
REALM=EXAMPLE.COM

kdc_install() {
  if [ -x /usr/sbin/krb5kdc ] && [ -x /usr/sbin/kadmin.local ] && command -v kinit >/dev/null; then
    return 0
  fi
  log "installing krb5-kdc krb5-admin-server krb5-user (no system service is started)"
  printf '%s\n' \
    "krb5-config krb5-config/default_realm string $REALM" \
    "krb5-config krb5-config/kerberos_servers string $HOST" \
    "krb5-config krb5-config/admin_server string $HOST" \
    "krb5-config krb5-config/add_servers boolean false" \
    "krb5-admin-server krb5-admin-server/kadmind boolean false" \
    "krb5-kdc krb5-kdc/debconf boolean false" | debconf-set-selections
  apt-cache show krb5-kdc >/dev/null 2>&1 || apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends \
    krb5-kdc krb5-admin-server krb5-user >&2
}

kdc_realm() {
  mkdir -p "$KDC_DIR"
  printf '%s\n' \
    "[libdefaults]" \
    "  default_realm = $REALM" \
    "  dns_lookup_realm = false" \
    "  dns_lookup_kdc = false" \
    "  dns_canonicalize_hostname = false" \
    "  rdns = false" \
    "  udp_preference_limit = 1" \
    "  ticket_lifetime = 24h" \
    "  renew_lifetime = 7d" \
    "  default_tkt_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96" \
    "  default_tgs_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96" \
    "  permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96" \
    "[realms]" \
    "  $REALM = {" \
    "    kdc = $HOST:$KDC_PORT" \
    "  }" \
    "[domain_realm]" \
    "  localhost = $REALM" \
    "  127.0.0.1 = $REALM" >"$KDC_DIR/krb5.conf"
  printf '%s\n' \
    "[kdcdefaults]" \
    "  kdc_listen = $HOST:$KDC_PORT" \
    "  kdc_tcp_listen = $HOST:$KDC_PORT" \
    "[realms]" \
    "  $REALM = {" \
    "    database_name = $KDC_DIR/principal" \
    "    key_stash_file = $KDC_DIR/stash" \
    "    acl_file = $KDC_DIR/kadm5.acl" \
    "    max_life = 24h" \
    "    max_renewable_life = 7d" \
    "    supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal" \
    "    default_principal_flags = +preauth" \
    "  }" \
    "[logging]" \
    "  kdc = FILE:$KDC_DIR/krb5kdc.log" >"$KDC_DIR/kdc.conf"
  : >"$KDC_DIR/kadm5.acl"
  kdb5_util create -s -r "$REALM" -P "kb-master-$RANDOM$RANDOM" >"$KDC_DIR/setup.log" 2>&1 ||
    { cat "$KDC_DIR/setup.log" >&2; die "kdb5_util create failed"; }
  local u sp
  for u in alice bob; do
    # -norandkey keeps the password usable alongside the keytab
    kadmin.local -q "addprinc -pw $u-pw $u@$REALM" >>"$KDC_DIR/setup.log" 2>&1
    kadmin.local -q "ktadd -norandkey -k $KDC_DIR/$u.keytab $u@$REALM" >>"$KDC_DIR/setup.log" 2>&1
  done
  # carol's tickets live 60 s: the broker's ticket refresh is tested with her
  kadmin.local -q "addprinc -maxlife 60s -pw carol-pw carol@$REALM" >>"$KDC_DIR/setup.log" 2>&1
  kadmin.local -q "ktadd -norandkey -k $KDC_DIR/carol.keytab carol@$REALM" >>"$KDC_DIR/setup.log" 2>&1
  for sp in hive/localhost HTTP/localhost kyuubi/localhost; do
    kadmin.local -q "addprinc -randkey $sp@$REALM" >>"$KDC_DIR/setup.log" 2>&1
    kadmin.local -q "ktadd -k $KDC_DIR/${sp//\//-}.keytab $sp@$REALM" >>"$KDC_DIR/setup.log" 2>&1
  done
  chmod 600 "$KDC_DIR"/*.keytab
}

kdc_alive() {
  [ -f "$KDC_DIR/krb5kdc.pid" ] || return 1
  local pid
  pid=$(cat "$KDC_DIR/krb5kdc.pid")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q krb5kdc
}

cmd_kdc_start() {
  kdc_install
  mkdir -p "$KDC_DIR"
  exec 9>"$KDC_DIR/lock"
  flock 9
  export KRB5_CONFIG="$KDC_DIR/krb5.conf" KRB5_KDC_PROFILE="$KDC_DIR/kdc.conf"
  if kdc_alive; then
    echo "$KDC_DIR/krb5.conf"
    return 0
  fi
  if [ ! -f "$KDC_DIR/principal" ] || [ ! -f "$KDC_DIR/carol.keytab" ]; then
    find "$KDC_DIR" -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf {} +
    kdc_realm
  fi
  port_open "$KDC_PORT" && die "port $HOST:$KDC_PORT is in use by another process"
  (
    exec 9>&-
    exec nohup /usr/sbin/krb5kdc -n -r "$REALM"
  ) >"$KDC_DIR/krb5kdc.out" 2>&1 </dev/null &
  echo $! >"$KDC_DIR/krb5kdc.pid"
  for _ in $(seq 1 100); do
    # ready means it issues tickets, not just that the port is open
    if port_open "$KDC_PORT" &&
      KRB5CCNAME="MEMORY:selftest" kinit -k -t "$KDC_DIR/alice.keytab" "alice@$REALM" 2>/dev/null; then
      echo "$KDC_DIR/krb5.conf"
      return 0
    fi
    # alive, not kdc_alive: until the subshell has exec'd, its command
    # line is still the shell's
    kill -0 "$(cat "$KDC_DIR/krb5kdc.pid")" 2>/dev/null ||
      { cat "$KDC_DIR/krb5kdc.out" >&2; die "krb5kdc exited"; }
    sleep 0.1
  done
  die "krb5kdc not ready after 10 s"
}

cmd_kdc_stop() {
  kdc_alive || { rm -f "$KDC_DIR/krb5kdc.pid"; return 0; }
  local pid
  pid=$(cat "$KDC_DIR/krb5kdc.pid")
  kill "$pid"
  log "stopped krb5kdc (pid $pid)"
  rm -f "$KDC_DIR/krb5kdc.pid"
}

# --- TLS test certificates -------------------------------------------------
TLS_DIR=${KB_TLS_DIR:-/tmp/kb-tls}

# A fresh key in PKCS#8 PEM at $1: EC P-256, or $2 = rsa | ed25519.
tls_key() {
  case "${2:-ec}" in
    rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null ;;
    ed25519) openssl genpkey -algorithm ED25519 -out "$1" 2>/dev/null ;;
    *) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null ;;
  esac
}

# A self-signed CA: file prefix $1, subject CN $2.
tls_ca() {
  tls_key "$TLS_DIR/$1-key.pem"
  openssl req -x509 -new -key "$TLS_DIR/$1-key.pem" -subj "/CN=$2" -days 3650 -sha256 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$TLS_DIR/$1.pem"
}

# A certificate signed by CA prefix $1: file prefix $2, subject CN $3,
# extensions $4 (lines of an openssl extension section), key type $5.
tls_issue() {
  local ca=$1 name=$2 cn=$3 ext=$4
  tls_key "$TLS_DIR/$name-key.pem" "${5:-ec}"
  openssl req -new -key "$TLS_DIR/$name-key.pem" -subj "/CN=$cn" -out "$TLS_DIR/$name.csr"
  printf '%s\n' "$ext" >"$TLS_DIR/$name.ext"
  openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/$ca.pem" -CAkey "$TLS_DIR/$ca-key.pem" \
    -CAcreateserial -days 825 -sha256 -extfile "$TLS_DIR/$name.ext" -out "$TLS_DIR/$name.pem" 2>/dev/null
  rm -f "$TLS_DIR/$name.csr" "$TLS_DIR/$name.ext"
}

# An expired certificate for localhost signed by ca: `x509 -req` cannot date
# a certificate in the past, `openssl ca` can.
tls_expired() {
  local db="$TLS_DIR/cadb"
  mkdir -p "$db"
  : >"$db/index.txt"
  echo 1000 >"$db/serial"
  printf '%s\n' '[ca]' 'default_ca = test' '[test]' "database = $db/index.txt" \
    "serial = $db/serial" "new_certs_dir = $db" 'default_md = sha256' 'policy = any' \
    '[any]' 'commonName = supplied' '[ext]' 'subjectAltName = DNS:localhost,IP:127.0.0.1' \
    'extendedKeyUsage = serverAuth' >"$db/ca.cnf"
  tls_key "$TLS_DIR/expired-key.pem"
  openssl req -new -key "$TLS_DIR/expired-key.pem" -subj "/CN=localhost" -out "$db/expired.csr"
  openssl ca -batch -notext -config "$db/ca.cnf" -cert "$TLS_DIR/ca.pem" -keyfile "$TLS_DIR/ca-key.pem" \
    -startdate 20200101000000Z -enddate 20210101000000Z -extensions ext \
    -in "$db/expired.csr" -out "$TLS_DIR/expired.pem" 2>/dev/null
  rm -rf "$db"
}

# Writes to $TLS_DIR (KB_TLS_DIR, default /tmp/kb-tls); EC P-256, PKCS#8 keys:
#   ca.pem ca-key.pem                  the test CA
#   server.pem server-key.pem          SANs localhost and 127.0.0.1, signed by ca
#   client.pem client-key.pem          CN alice, e-mail alice@example.com, clientAuth
#   truststore.jks                     ca.pem for Java clients, password changeit
#   server-keystore.jks                server.pem and its key for a Spark Thrift Server
#                                      (store and key password changeit)
#   other-ca.pem other-server.pem/-key.pem   the same names, signed by a CA nobody trusts
#   wrong-host.pem wrong-host-key.pem  signed by ca, valid only for wrong.example
#   expired.pem expired-key.pem        signed by ca, SANs as server.pem, expired in 2021
#   server-rsa.pem server-ed25519.pem  as server.pem, with an RSA 2048 and an Ed25519 key
#                                      (-key.pem beside each)
# Idempotent: an existing complete set is kept.
TLS_SET=complete-2
# Call it through tls_certs (one writer at a time).
cmd_tls_certs() {
  if [ -f "$TLS_DIR/$TLS_SET" ]; then echo "$TLS_DIR"; return 0; fi
  command -v openssl >/dev/null || die "openssl is needed (apt-get install openssl)"
  command -v keytool >/dev/null || die "keytool is needed (a JDK: apt-get install openjdk-17-jdk-headless)"
  [ -n "$TLS_DIR" ] && [ "$TLS_DIR" != / ] || die "KB_TLS_DIR is empty"
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  chmod 700 "$TLS_DIR"
  local server_ext
  server_ext=$(printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'extendedKeyUsage=serverAuth')
  tls_ca ca "kyuubi-broker test CA"
  tls_ca other-ca "an untrusted test CA"
  tls_issue ca server localhost "$server_ext"
  tls_issue ca client alice "$(printf '%s\n' 'subjectAltName=email:alice@example.com' 'extendedKeyUsage=clientAuth')"
  tls_issue ca server-rsa localhost "$server_ext" rsa
  tls_issue ca server-ed25519 localhost "$server_ext" ed25519
  tls_issue other-ca other-server localhost "$server_ext"
  tls_issue ca wrong-host wrong.example "$(printf '%s\n' 'subjectAltName=DNS:wrong.example' 'extendedKeyUsage=serverAuth')"
  tls_expired
  rm -f "$TLS_DIR"/*.srl
  keytool -importcert -noprompt -alias kb-test-ca -file "$TLS_DIR/ca.pem" \
    -keystore "$TLS_DIR/truststore.jks" -storetype JKS -storepass changeit >/dev/null 2>&1
  openssl pkcs12 -export -in "$TLS_DIR/server.pem" -inkey "$TLS_DIR/server-key.pem" \
    -certfile "$TLS_DIR/ca.pem" -name server -passout pass:changeit -out "$TLS_DIR/server.p12"
  keytool -importkeystore -noprompt -srckeystore "$TLS_DIR/server.p12" -srcstoretype PKCS12 \
    -srcstorepass changeit -destkeystore "$TLS_DIR/server-keystore.jks" -deststoretype JKS \
    -deststorepass changeit >/dev/null 2>&1
  rm -f "$TLS_DIR/server.p12"
  chmod 600 "$TLS_DIR"/*-key.pem
  # "complete" is what the first version of this function looked for
  touch "$TLS_DIR/$TLS_SET" "$TLS_DIR/complete"
  log "TLS test certificates in $TLS_DIR"
  echo "$TLS_DIR"
}

# cmd_tls_certs one at a time (tests call it in parallel; it starts with
# rm -rf), with a lock beside $TLS_DIR since the directory is replaced.
tls_certs() {
  mkdir -p "$(dirname "$TLS_DIR")"
  (
    flock 8
    cmd_tls_certs
  ) 8>"$TLS_DIR.lock"
}

# ---- ZooKeeper (issue 13: discovery and the fleet's rotation record) ----
ZK_PORT=${KB_ZK_PORT:-2181}
ZK_DIR=${KB_ZK_DIR:-/tmp/kb-zk}
ZK_JAR=/usr/share/java/zookeeper.jar

zk_install() {
  [ -r "$ZK_JAR" ] && return 0
  log "installing Debian's zookeeper (the server is started by zk-start, not as a service)"
  apt-cache show zookeeper >/dev/null 2>&1 || apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends zookeeper >&2
}

# "imok" from the four-letter word, the server's own readiness answer
zk_ready() {
  local reply
  reply=$( (exec 3<>"/dev/tcp/$HOST/$ZK_PORT" && printf ruok >&3 && timeout 2 cat <&3) 2>/dev/null) || true
  [ "$reply" = imok ]
}

cmd_zk_start() {
  zk_install
  mkdir -p "$ZK_DIR/conf" "$ZK_DIR/data"
  exec 9>"$ZK_DIR/lock"
  flock 9
  if [ -f "$ZK_DIR/pid" ] && kill -0 "$(cat "$ZK_DIR/pid")" 2>/dev/null && zk_ready; then
    echo "$HOST:$ZK_PORT"
    return 0
  fi
  port_open "$ZK_PORT" && die "port $HOST:$ZK_PORT is in use by another process"
  # standalone, loopback only; no AdminServer (it would take 8080)
  cat >"$ZK_DIR/conf/zoo.cfg" <<CONF
tickTime=500
initLimit=10
syncLimit=5
dataDir=$ZK_DIR/data
clientPort=$ZK_PORT
clientPortAddress=$HOST
maxClientCnxns=200
minSessionTimeout=1000
maxSessionTimeout=60000
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,cons
CONF
  (
    exec 9>&-
    # Debian's jar names its dependencies in its manifest; it ships no
    # slf4j binding, so the server logs nothing (zk.log has the JVM's output)
    exec nohup java -Xmx256m -cp "$ZK_JAR" \
      org.apache.zookeeper.server.ZooKeeperServerMain "$ZK_DIR/conf/zoo.cfg"
  ) >"$ZK_DIR/zk.log" 2>&1 </dev/null &
  echo $! >"$ZK_DIR/pid"
  for _ in $(seq 1 300); do
    if zk_ready; then
      echo "$HOST:$ZK_PORT"
      return 0
    fi
    kill -0 "$(cat "$ZK_DIR/pid")" 2>/dev/null || { tail -20 "$ZK_DIR/zk.log" >&2; die "ZooKeeper exited"; }
    sleep 0.1
  done
  cmd_zk_stop
  die "ZooKeeper not ready after 30 s on $HOST:$ZK_PORT (log: $ZK_DIR/zk.log)"
}

cmd_zk_stop() {
  stop_pidfile "$ZK_DIR/pid" ZooKeeperServerMain ZooKeeper
}

cmd_fleet_key() {
  local key=/tmp/kb-fleet.key
  if [ ! -s "$key" ]; then
    (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$key")
    log "wrote a new fleet key to $key"
  fi
  echo "$key"
}

case "${1:-}" in
  tls-certs) tls_certs ;;
  kdc-start) cmd_kdc_start ;;
  kdc-stop) cmd_kdc_stop ;;
  zk-start) cmd_zk_start ;;
  zk-stop) cmd_zk_stop ;;
  fleet-key) cmd_fleet_key ;;
  install) shift; cmd_install ;;
  ldap-start) cmd_ldap_start ;;
  ldap-stop) cmd_ldap_stop ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
