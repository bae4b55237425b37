//! TLS on both sides, with the fixture's test CA (`scripts/fixture.sh
//! tls-certs`): TLS listeners in front of a real Spark Thrift Server, real
//! clients (beeline with a JKS trust store, impyla, PyHive over https), a
//! real TLS Spark Thrift Server as the upstream, the failures a user must be
//! able to tell apart (untrusted CA, expired, wrong name, plaintext on a TLS
//! port, no client certificate) and a certificate swapped under load.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamConfig, UpstreamSasl};
use kyuubi_broker::error::UpstreamError;

/// A broker with a TLS binary listener "binary", an HTTPS listener "http"
/// (both with `tls`, a `[listener.tls]` body) and an admin listener, in
/// front of `route`.
async fn tls_broker(tls: &str, route: &str) -> (Broker, SocketAddr) {
    let toml = format!(
        r#"
[server]
shutdown_grace = "10s"
handshake_timeout = "3s"

[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true

[listener.tls]
{tls}

[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true

[listener.tls]
{tls}

{route}
"#
    );
    let b = start_broker_toml(&toml).await;
    let admin = b.addrs["admin"];
    (b, admin)
}

fn server_tls(dir: &Path, name: &str) -> String {
    format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}-key.pem")).display()
    )
}

/// How a test client reaches a TLS listener: verified against `ca`, by the
/// name `localhost`.
fn tls_client(t: Transport, addr: SocketAddr, ca: &Path) -> UpstreamConfig {
    let mut c = client_cfg(t, addr, UpstreamSasl::Plain);
    c.tls = true;
    c.tls_ca = Some(ca.to_path_buf());
    c.tls_server_name = Some("localhost".into());
    c
}

async fn select_user(cfg: &UpstreamConfig) -> Result<String, ClientError> {
    let mut c = Hs2Client::connect(cfg, "alice", "x").await?;
    scalar(&mut c, &[], "select current_user()", 0).await
}

fn tls_error(r: Result<String, ClientError>) -> String {
    match r {
        Err(ClientError::Transport(UpstreamError::Tls { reason, .. })) => reason,
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

/// Polls a metric until `ok` holds for it (a file-change reload is checked
/// every 2 s), failing after `within`.
async fn metric_until(
    admin: SocketAddr,
    name: &str,
    labels: &str,
    within: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let end = Instant::now() + within;
    loop {
        let (_, text) = admin_get(admin, "/metrics").await;
        let v = series(&text, name).get(labels).copied().unwrap_or(0.0);
        if ok(v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{name}{{{labels}}} = {v} after {within:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tls_listeners_serve_queries_verified_against_the_test_ca_and_report_the_certificate_expiry(
) {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, admin) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    let ca = dir.join("ca.pem");
    for t in [Transport::Binary, Transport::Http] {
        let addr = if t == Transport::Binary {
            b.binary
        } else {
            b.http
        };
        assert_eq!(
            select_user(&tls_client(t, addr, &ca)).await.unwrap(),
            "alice",
            "{t:?}"
        );
    }
    let (_, text) = admin_get(admin, "/metrics").await;
    let expiry = series(&text, "kyuubi_broker_tls_cert_expiry_seconds");
    // the fixture's certificates are valid for 825 days
    for l in ["binary", "http"] {
        let left = expiry[&format!("listener=\"{l}\"")];
        assert!(
            left > 800.0 * 86400.0 && left < 826.0 * 86400.0,
            "{l}: {left}"
        );
    }
    let (_, status) = admin_get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let listeners = status["listeners"].as_array().unwrap();
    assert!(listeners.iter().all(|l| l["tls"] == true), "{status}");
    b.shutdown().await;
}

#[tokio::test]
async fn beeline_connects_with_ssl_true_and_a_jks_trust_store_on_binary_and_http() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, _) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    let trust = format!(
        "ssl=true;sslTrustStore={};trustStorePassword=changeit",
        dir.join("truststore.jks").display()
    );
    for (mode, url) in [
        (
            "binary",
            format!("jdbc:hive2://localhost:{}/default;{trust}", b.binary.port()),
        ),
        (
            "http",
            format!(
                "jdbc:hive2://localhost:{}/default;transportMode=http;httpPath=cliservice;{trust}",
                b.http.port()
            ),
        ),
    ] {
        let run = beeline(&url, "alice", "x", "select 'tls-ok', current_user();\n").await;
        assert!(
            run.ok && run.stdout.contains("tls-ok,alice"),
            "{mode}: {}\n{}",
            run.stdout,
            run.stderr
        );
    }
    b.shutdown().await;
}

#[tokio::test]
async fn impyla_with_use_ssl_and_pyhive_over_https_query_through_tls_listeners() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, _) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    for (client, mode, port) in [
        ("impyla", "binary", b.binary.port()),
        ("impyla", "http", b.http.port()),
        ("pyhive", "http", b.http.port()),
    ] {
        let v = py_client_args(
            client,
            mode,
            port,
            "query",
            Some("select 'py-tls'"),
            &["--ssl-ca", ca],
        )
        .await;
        assert_eq!(v["rows"][0][0], "py-tls", "{client} {mode}: {v}");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn a_plaintext_client_on_a_tls_port_is_told_to_use_ssl_and_tls_clients_are_still_served() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, admin) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    // SASL PLAIN in clear: the broker answers SASL BAD with the fix
    let plain = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain);
    match Hs2Client::connect(&plain, "alice", "x").await {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => {
            assert!(
                reason.contains("this port speaks TLS: connect with ssl=true"),
                "{reason}"
            )
        }
        other => panic!(
            "expected a refusal naming ssl=true, got {:?}",
            other.map(|_| ())
        ),
    }
    // HTTP in clear: 400 with the same text
    let (status, _, body) = http_post(b.http, "/cliservice", "", b"\x80\x01\x00\x01").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("this port speaks TLS"), "{body}");
    // a byte stream that is neither: closed
    let mut s = tokio::net::TcpStream::connect(b.binary).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"\x00\x00garbage").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "garbage on a TLS port gets no answer: {:?}",
        &buf[..n]
    );
    let ca = dir.join("ca.pem");
    assert_eq!(
        select_user(&tls_client(Transport::Binary, b.binary, &ca))
            .await
            .unwrap(),
        "alice"
    );
    let (_, text) = admin_get(admin, "/metrics").await;
    let failures = series(&text, "kyuubi_broker_tls_handshake_failures_total");
    // the SASL client and the garbage
    assert_eq!(
        failures[r#"listener="binary",reason="plaintext""#] as u64, 2,
        "{text}"
    );
    assert_eq!(
        failures[r#"listener="http",reason="plaintext""#] as u64, 1,
        "{text}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused_by_its_own_tls_check_and_the_broker_counts_it() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, admin) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    let other = dir.join("other-ca.pem");
    let reason = tls_error(select_user(&tls_client(Transport::Binary, b.binary, &other)).await);
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");
    metric_until(
        admin,
        "kyuubi_broker_tls_handshake_failures_total",
        r#"listener="binary",reason="protocol""#,
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    b.shutdown().await;
}

/// A TLS upstream serving `cert`: another broker with TLS listeners in
/// front of the real Spark Thrift Server.
async fn tls_upstream(dir: &Path, cert: &str) -> Broker {
    let up = sts_binary().await;
    tls_broker(&server_tls(dir, cert), &route_toml("binary", up, ""))
        .await
        .0
}

#[tokio::test]
async fn an_untrusted_expired_or_misnamed_upstream_certificate_gives_a_client_error_naming_the_upstream_not_the_token(
) {
    let dir = tls_dir().await;
    let ca = dir.join("ca.pem");
    for (cert, expect) in [
        ("other-server", "not signed by a trusted CA"),
        ("expired", "its certificate has expired"),
        ("wrong-host", "not valid for this host name"),
    ] {
        let upstream = tls_upstream(&dir, cert).await;
        for (t, addr) in [("binary", upstream.binary), ("http", upstream.http)] {
            let route = route_toml(
                t,
                addr,
                &format!(
                    "tls = true\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\n{}",
                    ca.display(),
                    if t == "http" {
                        "token = \"SeCrEtToKeN42\""
                    } else {
                        ""
                    }
                ),
            );
            let front = start_broker(&route).await;
            let r = current_user(front.binary, Transport::Binary, "alice", "x").await;
            let text = format!("{r:?}");
            assert!(text.contains(expect), "{cert} via {t}: {text}");
            assert!(
                text.contains(&format!("127.0.0.1:{}", addr.port())),
                "names the upstream: {text}"
            );
            assert!(
                !text.contains("SeCrEtToKeN42"),
                "the token stays secret: {text}"
            );
            front.shutdown().await;
        }
        upstream.shutdown().await;
    }
}

#[tokio::test]
async fn a_real_tls_spark_thrift_server_is_reached_on_binary_and_http_with_verification_on() {
    let dir = tls_dir().await;
    let ca = dir.join("ca.pem");
    for mode in ["binary", "http"] {
        let up = sts_ssl(mode).await;
        let extra = format!(
            "tls = true\ntls_ca = \"{}\"\nhttp_path = \"cliservice\"",
            ca.display()
        );
        let front = start_broker(&route_toml(mode, up, &extra)).await;
        for t in [Transport::Binary, Transport::Http] {
            let addr = if t == Transport::Binary {
                front.binary
            } else {
                front.http
            };
            let who = current_user(addr, t, "alice", "x").await.unwrap();
            assert_eq!(who, "alice", "{mode} upstream, {t:?} client");
        }
        front.shutdown().await;
    }
}

#[tokio::test]
async fn a_listener_requiring_client_certificates_refuses_a_client_without_one() {
    let (dir, up) = (tls_dir().await, sts_http().await);
    let tls = format!(
        "{}client_ca = \"{}\"\n",
        server_tls(&dir, "server"),
        dir.join("ca.pem").display()
    );
    let extra = "http_path = \"cliservice\"";
    let (b, admin) = tls_broker(&tls, &route_toml("http", up, extra)).await;
    let ca = dir.join("ca.pem");
    // PyHive over https with the fixture's client certificate: served
    let args = pyhive_with_client_cert(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = py_client_args(
        "pyhive",
        "http",
        b.http.port(),
        "query",
        Some("select 'mtls'"),
        &args,
    )
    .await;
    assert_eq!(v["rows"][0][0], "mtls", "{v}");
    // without one: the handshake fails, on both listeners
    let r = select_user(&tls_client(Transport::Binary, b.binary, &ca)).await;
    assert!(r.is_err(), "no client certificate, yet served: {r:?}");
    let r = select_user(&tls_client(Transport::Http, b.http, &ca)).await;
    assert!(r.is_err(), "no client certificate, yet served: {r:?}");
    for l in ["binary", "http"] {
        metric_until(
            admin,
            "kyuubi_broker_tls_handshake_failures_total",
            &format!("listener=\"{l}\",reason=\"client_certificate\""),
            Duration::from_secs(5),
            |v| v >= 1.0,
        )
        .await;
    }
    b.shutdown().await;
}

fn copy(from: &Path, to: &Path) {
    // written beside and renamed: a reader never sees half a file
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_is_served_to_new_connections_while_old_ones_keep_working() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    copy(&dir.join("server.pem"), &cert);
    copy(&dir.join("server-key.pem"), &key);
    let tls = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let (b, admin) = tls_broker(&tls, &route_toml("binary", up, "")).await;
    let (ca, other_ca) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
    let mut old = Hs2Client::connect(&tls_client(Transport::Binary, b.binary, &ca), "alice", "x")
        .await
        .unwrap();
    let session = old.open_session_with(&[]).await.unwrap();

    // a broken pair: logged and counted, the old certificate stays
    std::fs::write(
        live.path().join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    copy(&live.path().join("bad.pem"), &cert);
    let labels = r#"listener="binary",result="error""#;
    metric_until(
        admin,
        "kyuubi_broker_tls_reloads_total",
        labels,
        Duration::from_secs(10),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        select_user(&tls_client(Transport::Binary, b.binary, &ca))
            .await
            .unwrap(),
        "alice"
    );

    // the other CA's pair: new connections get it
    copy(&dir.join("other-server-key.pem"), &key);
    copy(&dir.join("other-server.pem"), &cert);
    let labels = r#"listener="binary",result="ok""#;
    metric_until(
        admin,
        "kyuubi_broker_tls_reloads_total",
        labels,
        Duration::from_secs(10),
        |v| v >= 1.0,
    )
    .await;
    let reason = tls_error(select_user(&tls_client(Transport::Binary, b.binary, &ca)).await);
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");
    assert_eq!(
        select_user(&tls_client(Transport::Binary, b.binary, &other_ca))
            .await
            .unwrap(),
        "alice"
    );

    // the connection from before the swap still runs statements
    let op = old.execute(&session, "select 'still here'").await.unwrap();
    let rows = old.fetch(&op, 1).await.unwrap();
    assert!(format!("{rows:?}").contains("still here"));
    old.close_session(session).await.unwrap();
    b.shutdown().await;
}

#[test]
fn a_listener_key_that_does_not_match_its_certificate_stops_startup_naming_the_key() {
    let dir = PathBuf::from(fixture(&["tls-certs"]));
    let toml = format!(
        r#"
[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true

[listener.tls]
cert = "{}"
key = "{}"

[routes.r.upstream]
transport = "binary"
host = "127.0.0.1"
port = 10000
"#,
        dir.join("server.pem").display(),
        dir.join("client-key.pem").display()
    );
    let cfg = kyuubi_broker::config::Config::from_toml(&toml, "test").unwrap();
    let e = kyuubi_broker::prepare(cfg)
        .err()
        .expect("a mismatched key is refused")
        .to_string();
    assert!(
        e.contains("listener[0].tls") && e.contains("does not go with listener.tls.cert"),
        "{e}"
    );
    assert!(!e.contains("PRIVATE KEY"), "{e}");
}

#[tokio::test]
async fn a_binary_tls_upstream_resumes_its_session_on_reconnect_and_an_https_upstream_keeps_one_connection(
) {
    let dir = tls_dir().await;
    let up = sts_binary().await;
    let (upstream, upstream_admin) =
        tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    let verify = format!(
        "tls = true\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"",
        dir.join("ca.pem").display()
    );
    let handshakes = |listener: &'static str| async move {
        let (_, text) = admin_get(upstream_admin, "/metrics").await;
        let s = series(&text, "kyuubi_broker_tls_handshakes_total");
        let get = |kind: &str| {
            s.get(&format!("listener=\"{listener}\",kind=\"{kind}\""))
                .copied()
                .unwrap_or(0.0) as u64
        };
        (get("full"), get("resumed"))
    };
    // binary: each client connection is an upstream connection of its own
    let front = start_broker(&route_toml("binary", upstream.binary, &verify)).await;
    for _ in 0..3 {
        let who = current_user(front.binary, Transport::Binary, "alice", "x").await;
        assert_eq!(who.unwrap(), "alice");
    }
    let (full, resumed) = handshakes("binary").await;
    assert_eq!(
        (full, resumed),
        (1, 2),
        "one full handshake, then resumptions"
    );
    front.shutdown().await;
    // HTTP: calls share the route's keep-alive pool
    let front = start_broker(&route_toml("http", upstream.http, &verify)).await;
    for _ in 0..3 {
        let who = current_user(front.binary, Transport::Binary, "alice", "x").await;
        assert_eq!(who.unwrap(), "alice");
    }
    let (full, resumed) = handshakes("http").await;
    assert_eq!(
        full + resumed,
        1,
        "every call over one kept-alive TLS connection"
    );
    front.shutdown().await;
    upstream.shutdown().await;
}

/// A broker whose listeners log clients in by their certificate's common
/// name, in front of the real Spark Thrift Server (passthrough identity:
/// the upstream sees that name).
async fn certificate_broker(dir: &Path) -> (Broker, SocketAddr) {
    let up = sts_binary().await;
    let toml = format!(
        r#"
[server]
shutdown_grace = "10s"

[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "certificate"

[listener.tls]
{tls}client_ca = "{ca}"

[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
auth = "certificate"

[listener.tls]
{tls}client_ca = "{ca}"

{route}
"#,
        tls = server_tls(dir, "server"),
        ca = dir.join("ca.pem").display(),
        route = route_toml("binary", up, "")
    );
    let b = start_broker_toml(&toml).await;
    let admin = b.addrs["admin"];
    (b, admin)
}

/// hs2_client.py options: https verified against the test CA, with the
/// fixture's client certificate (CN alice).
fn pyhive_with_client_cert(dir: &Path) -> Vec<String> {
    let path = |f: &str| dir.join(f).display().to_string();
    vec![
        "--ssl-ca".into(),
        path("ca.pem"),
        "--client-cert".into(),
        path("client.pem"),
        "--client-key".into(),
        path("client-key.pem"),
    ]
}

fn with_client_cert(mut c: UpstreamConfig, dir: &Path) -> UpstreamConfig {
    c.tls_cert = Some(dir.join("client.pem"));
    c.tls_key = Some(dir.join("client-key.pem"));
    c
}

#[tokio::test]
async fn a_certificate_listener_logs_in_the_user_its_client_certificate_names() {
    let dir = tls_dir().await;
    let (b, admin) = certificate_broker(&dir).await;
    let ca = dir.join("ca.pem");
    for t in [Transport::Binary, Transport::Http] {
        let addr = if t == Transport::Binary {
            b.binary
        } else {
            b.http
        };
        let cfg = with_client_cert(tls_client(t, addr, &ca), &dir);
        // the certificate (CN alice) is the login: no password, as
        // "alice" or "anonymous" (what Hive JDBC sends without -n)
        for claimed in ["alice", "anonymous"] {
            let mut c = Hs2Client::connect(&cfg, claimed, "").await.unwrap();
            let who = scalar(&mut c, &[], "select current_user()", 0)
                .await
                .unwrap();
            assert_eq!(who, "alice", "{t:?} as '{claimed}'");
        }
        // another name than the certificate's is refused, and says why
        let refused = match Hs2Client::connect(&cfg, "bob", "bob-pw").await {
            Ok(mut c) => scalar(&mut c, &[], "select current_user()", 0)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        let text = format!("{refused:?}");
        assert!(
            text.contains("the client certificate names 'alice'"),
            "{t:?}: {text}"
        );
    }
    // one login per HTTP connection (as per binary connection), not per request
    let (_, text) = admin_get(admin, "/metrics").await;
    let logins = series(&text, "kyuubi_broker_login_duration_seconds_count");
    let http_ok: f64 = logins
        .iter()
        .filter(|(k, _)| {
            k.contains("listener=\"http\"")
                && k.contains("certificate")
                && k.contains("outcome=\"ok\"")
        })
        .map(|(_, v)| v)
        .sum();
    // two connections of our client (alice, anonymous), five requests each
    assert_eq!(http_ok as u64, 2, "{text}");
    // PyHive over https with the certificate: the same user upstream
    let mut args = pyhive_with_client_cert(&dir);
    args.extend(["--user", "", "--password", ""].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = py_client_args(
        "pyhive",
        "http",
        b.http.port(),
        "query",
        Some("select current_user()"),
        &args,
    )
    .await;
    assert_eq!(v["rows"][0][0], "alice", "{v}");
    b.shutdown().await;
}

#[tokio::test]
async fn a_route_with_a_client_certificate_logs_in_to_an_upstream_that_requires_one() {
    let dir = tls_dir().await;
    // the upstream: a broker whose HTTPS listener logs in by certificate
    let (b, _) = certificate_broker(&dir).await;
    let extra = format!(
        "tls = true\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nhttp_path = \"cliservice\"",
        dir.join("ca.pem").display(),
        dir.join("client.pem").display(),
        dir.join("client-key.pem").display()
    );
    let front = start_broker(&route_toml("http", b.http, &extra)).await;
    let who = current_user(front.binary, Transport::Binary, "anonymous", "").await;
    assert_eq!(
        who.unwrap(),
        "alice",
        "the upstream saw the front broker's certificate"
    );
    front.shutdown().await;
    // without tls_cert the same route is refused at the handshake
    let extra = format!(
        "tls = true\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\nhttp_path = \"cliservice\"",
        dir.join("ca.pem").display()
    );
    let front = start_broker(&route_toml("http", b.http, &extra)).await;
    let r = current_user(front.binary, Transport::Binary, "anonymous", "").await;
    assert!(r.is_err(), "no client certificate, yet served: {r:?}");
    front.shutdown().await;
    b.shutdown().await;
}

#[test]
fn the_identity_of_a_client_certificate_is_its_common_name_or_the_san_asked_for() {
    use kyuubi_broker::tls::server::{cert_identity, CertIdentity};
    use rustls::pki_types::pem::PemObject;
    let dir = PathBuf::from(fixture(&["tls-certs"]));
    let cert = rustls::pki_types::CertificateDer::from_pem_file(dir.join("client.pem")).unwrap();
    assert_eq!(
        cert_identity(&cert, CertIdentity::Cn).as_deref(),
        Some("alice")
    );
    assert_eq!(
        cert_identity(&cert, CertIdentity::SanEmail).as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(
        cert_identity(&cert, CertIdentity::SanDns),
        None,
        "it has no DNS name"
    );
    let server = rustls::pki_types::CertificateDer::from_pem_file(dir.join("server.pem")).unwrap();
    assert_eq!(
        cert_identity(&server, CertIdentity::SanDns).as_deref(),
        Some("localhost")
    );
}

#[tokio::test]
async fn rsa_and_ed25519_listener_certificates_serve_as_ecdsa_does() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let ca = dir.join("ca.pem");
    for cert in ["server-rsa", "server-ed25519"] {
        let (b, _) = tls_broker(&server_tls(&dir, cert), &route_toml("binary", up, "")).await;
        for t in [Transport::Binary, Transport::Http] {
            let addr = if t == Transport::Binary {
                b.binary
            } else {
                b.http
            };
            let who = select_user(&tls_client(t, addr, &ca)).await;
            assert_eq!(who.unwrap(), "alice", "{cert} {t:?}");
        }
        b.shutdown().await;
    }
}

#[tokio::test]
async fn a_tls_client_over_the_connection_cap_is_refused_over_tls_with_the_cap_named() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let toml = format!(
        r#"
[server]
shutdown_grace = "10s"
max_connections = 1

[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true

[listener.tls]
{}
{}
"#,
        server_tls(&dir, "server"),
        route_toml("binary", up, "")
    );
    let b = start_broker_toml(&toml).await;
    let cfg = tls_client(Transport::Binary, b.binary, &dir.join("ca.pem"));
    // the one slot, held by a logged-in client
    let mut first = Hs2Client::connect(&cfg, "alice", "x").await.unwrap();
    let s = first.open_session_with(&[]).await.unwrap();
    // the second completes its TLS handshake and is told why, in SASL
    match Hs2Client::connect(&cfg, "alice", "x").await {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => {
            assert!(reason.contains("server.max_connections = 1"), "{reason}")
        }
        other => panic!("expected the cap's refusal, got {:?}", other.map(|_| ())),
    }
    first.close_session(s).await.unwrap();
    drop(first);
    // the slot is free again
    let t0 = Instant::now();
    while select_user(&cfg).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn a_listener_with_client_certificates_never_resumes_a_session_so_every_certificate_is_checked_again(
) {
    let dir = tls_dir().await;
    let (b, admin) = certificate_broker(&dir).await;
    let cfg = with_client_cert(
        tls_client(Transport::Binary, b.binary, &dir.join("ca.pem")),
        &dir,
    );
    for _ in 0..3 {
        let mut c = Hs2Client::connect(&cfg, "anonymous", "").await.unwrap();
        let s = c.open_session_with(&[]).await.unwrap();
        c.close_session(s).await.unwrap();
    }
    let (_, text) = admin_get(admin, "/metrics").await;
    let hs = series(&text, "kyuubi_broker_tls_handshakes_total");
    assert_eq!(
        hs.get(r#"listener="binary",kind="full""#)
            .copied()
            .map(|v| v as u64),
        Some(3),
        "{text}"
    );
    assert_eq!(
        hs.get(r#"listener="binary",kind="resumed""#),
        None,
        "{text}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_silent_connection_or_a_tcp_health_check_on_a_tls_port_is_no_failed_handshake() {
    let (dir, up) = (tls_dir().await, sts_binary().await);
    let (b, admin) = tls_broker(&server_tls(&dir, "server"), &route_toml("binary", up, "")).await;
    // connect and close at once (a TCP health check)
    drop(tokio::net::TcpStream::connect(b.binary).await.unwrap());
    // connect and say nothing until the 3 s handshake timeout closes it
    let mut silent = tokio::net::TcpStream::connect(b.binary).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("closed by the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    metric_until(
        admin,
        "kyuubi_broker_connections_timed_out_total",
        r#"listener="binary",reason="no_request""#,
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    let (_, text) = admin_get(admin, "/metrics").await;
    let failures = series(&text, "kyuubi_broker_tls_handshake_failures_total");
    assert!(failures.is_empty(), "no handshake failed: {text}");
    b.shutdown().await;
}
