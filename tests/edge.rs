//! The client edge: outcomes that never reach an upstream (a refused login,
//! a malformed call, a handshake timeout, an authentication service that is
//! down) are answered in the transport's own form, counted in `/metrics`
//! with their outcome, and logged exactly once. None of these tests needs a
//! live upstream: the route points at a closed port.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::secret::Secret;
use kyuubi_broker::tcli::gen::TStatusCode;
use kyuubi_broker::wire::sasl;
use kyuubi_broker::wire::thrift::{ttype, MessageType, Writer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every log line of this test binary, as JSON.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(sink.clone()))
            .init();
        buf
    })
}

/// The log lines of `listener`'s exchanges (not its start-up line), as
/// (message, fields).
fn lines_of(listener: &str) -> Vec<(String, Value)> {
    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["listener"] == listener)
        // the audit stream is a log of its own (tests/secrets.rs reads it)
        .filter(|v| v["target"] != "audit")
        .filter(|v| {
            !v["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .ends_with("listener up")
        })
        .map(|v| {
            (
                v["fields"]["message"].as_str().unwrap().to_string(),
                v["fields"].clone(),
            )
        })
        .collect()
}

async fn metrics(b: &Broker) -> String {
    admin_get(b.addrs["admin"], "/metrics").await.1
}

/// A broker whose listeners `<tag>_bin` and `<tag>_http` authenticate with
/// `auth` (TOML lines) in front of a dead upstream, with a short handshake
/// timeout and the admin listener.
async fn broker(tag: &str, auth: &str) -> Broker {
    logs();
    let dead = closed_port().await;
    let toml = format!(
        r#"
[server]
handshake_timeout = "400ms"
shutdown_grace = "5s"
[admin]
bind = "127.0.0.1:0"
[[listener]]
name = "{tag}_bin"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
{auth}
[[listener]]
name = "{tag}_http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
{auth}
{}"#,
        route_toml("binary", dead, "")
    );
    start_broker_toml(&toml).await
}

/// Static users: alice / alice-pw.
fn users(dir: &tempfile::TempDir) -> String {
    let f = dir.path().join("users");
    let hash = kyuubi_broker::auth::hash_password("alice-pw");
    std::fs::write(&f, format!("alice:{hash}\n")).unwrap();
    format!("auth = \"static\"\nusers_file = \"{}\"", f.display())
}

/// Waits until `cond` holds for the logs of `listener` (the edge logs after
/// it has answered, so the client may see the answer first).
async fn logged(listener: &str, cond: impl Fn(&[(String, Value)]) -> bool) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = lines_of(listener);
        if cond(&l) {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{listener}: expected log lines not written: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_refused_login_is_answered_counted_by_mechanism_and_logged_once_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker("refused", &users(&dir)).await;
    let bin = b.addrs["refused_bin"];
    let http = b.addrs["refused_http"];

    // SASL PLAIN: BAD with the one refusal text, then the connection closes
    let reply = send_and_read_all(
        bin,
        &sasl::plain_client_hello("alice", &Secret::new("nope")),
    )
    .await;
    assert_eq!(reply.first(), Some(&(sasl::Status::Bad as u8)), "{reply:?}");
    let text = String::from_utf8_lossy(&reply[5..]).into_owned();
    assert_eq!(
        text,
        "kyuubi-broker: authentication failed for user 'alice'"
    );

    // HTTP Basic: 401 with the challenge
    let (status, head, body) = http_post(http, "/cliservice", &basic("alice", "nope"), b"x").await;
    assert_eq!(status, 401, "{body}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("www-authenticate: basic"), "{head}");
    assert_eq!(
        body,
        "kyuubi-broker: authentication failed for user 'alice'"
    );

    // NOSASL: the OpenSession carries the password; the refusal is its TStatus
    let cfg = client_cfg(Transport::Binary, bin, UpstreamSasl::Nosasl);
    let mut c = Hs2Client::connect(&cfg, "alice", "nope").await.unwrap();
    match c.open_session().await.unwrap_err() {
        ClientError::Status(TStatusCode::ERROR_STATUS, msg, state) => {
            assert_eq!(state.as_deref(), Some("28000"));
            assert!(
                msg.contains("authentication failed for user 'alice'"),
                "{msg}"
            );
        }
        other => panic!("expected a TStatus refusal, got {other:?}"),
    }

    let m = metrics(&b).await;
    let failures = series(&m, "kyuubi_broker_auth_failures_total");
    for (listener, mechanism) in [
        ("refused_bin", "plain"),
        ("refused_http", "basic"),
        ("refused_bin", "nosasl"),
    ] {
        let key = format!("listener=\"{listener}\",mechanism=\"{mechanism}\"");
        assert_eq!(failures.get(&key), Some(&1.0), "{key} in {failures:?}");
    }
    let errors = series(&m, "kyuubi_broker_client_errors_total");
    assert_eq!(
        errors.get("listener=\"refused_bin\",kind=\"unauthenticated\""),
        Some(&2.0),
        "{errors:?}"
    );
    let logins = series(&m, "kyuubi_broker_login_duration_seconds_count");
    for (l, mechanism) in [
        ("refused_http", "basic"),
        ("refused_bin", "plain"),
        ("refused_bin", "nosasl"),
    ] {
        let key = format!("listener=\"{l}\",mechanism=\"{mechanism}\",outcome=\"unauthenticated\"");
        assert_eq!(logins.get(&key), Some(&1.0), "{key}: {logins:?}");
    }
    let rpcs = series(&m, "kyuubi_broker_rpc_duration_seconds_count");
    assert_eq!(
        rpcs.get("method=\"OpenSession\",route=\"r\",client_transport=\"binary\",upstream_transport=\"binary\",outcome=\"unauthenticated\""),
        Some(&1.0),
        "{rpcs:?}"
    );

    // one line per refusal: two logins and the NOSASL OpenSession
    let bin_lines = logged("refused_bin", |l| l.len() >= 2).await;
    let http_lines = logged("refused_http", |l| !l.is_empty()).await;
    let msgs = |l: &[(String, Value)]| l.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>();
    assert_eq!(msgs(&http_lines), ["login failed"], "{http_lines:?}");
    let mut got = msgs(&bin_lines);
    got.sort();
    assert_eq!(got, ["login failed", "rpc refused"], "{bin_lines:?}");
    for (_, f) in bin_lines.iter().chain(&http_lines) {
        assert_eq!(f["outcome"], "unauthenticated", "{f}");
        assert_eq!(f["user"], "alice", "the user who tried: {f}");
        assert!(
            !f.to_string().contains("nope"),
            "a password reached the log: {f}"
        );
    }
    b.shutdown().await;
}

#[tokio::test]
async fn a_malformed_call_after_login_is_answered_closed_counted_and_logged_once() {
    let b = broker("garbage", "auth = \"none\"\nallow_any_user = true").await;
    let bin = b.addrs["garbage_bin"];
    // a good handshake, then a frame that is no Thrift message
    let mut bytes = sasl::plain_client_hello("carol", &Secret::new("pw"));
    bytes.extend_from_slice(&[0, 0, 0, 8]);
    bytes.extend_from_slice(b"NOTTHRFT");
    let reply = send_and_read_all(bin, &bytes).await;
    assert_eq!(
        reply,
        sasl::encode(sasl::Status::Complete, b""),
        "only the login is answered"
    );

    // a well-framed OpenSession whose body does not decode is answered, and
    // the stream is still in step: the same connection answers it again
    let mut c = Hs2Client::connect(
        &client_cfg(Transport::Binary, bin, UpstreamSasl::Plain),
        "carol",
        "pw",
    )
    .await
    .unwrap();
    let mut w = Writer::default();
    w.message_begin("OpenSession", MessageType::Call, 7);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRING, 1);
    w.buf.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
    let bad = bytes::Bytes::from(w.buf);
    for _ in 0..2 {
        let reply = c.call_raw(bad.clone()).await.expect("answered, not closed");
        let text = String::from_utf8_lossy(&reply).into_owned();
        assert!(text.contains("bad request from client"), "{text}");
    }

    // over HTTP the same body is a 400 that names the problem
    let (status, _, body) = http_post(
        b.addrs["garbage_http"],
        "/cliservice",
        &basic("carol", "pw"),
        b"NOTTHRFT",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("malformed Thrift message"), "{body}");

    let m = metrics(&b).await;
    let errors = series(&m, "kyuubi_broker_client_errors_total");
    for (l, n) in [("garbage_bin", 3.0), ("garbage_http", 1.0)] {
        let key = format!("listener=\"{l}\",kind=\"bad_request\"");
        assert_eq!(errors.get(&key), Some(&n), "{key}: {errors:?}");
    }
    let rpcs = series(&m, "kyuubi_broker_rpc_duration_seconds_count");
    assert_eq!(
        rpcs.get("method=\"invalid\",route=\"r\",client_transport=\"binary\",upstream_transport=\"binary\",outcome=\"bad_request\""),
        Some(&1.0),
        "{rpcs:?}"
    );
    // one line per refused call: the unframed one and the two undecodable ones
    let refused_lines =
        |l: &[(String, Value)]| l.iter().filter(|(m, _)| m == "rpc refused").count();
    let lines = logged("garbage_bin", |l| refused_lines(l) >= 3).await;
    assert_eq!(refused_lines(&lines), 3, "{lines:?}");
    for (m, f) in &lines {
        if m == "rpc refused" {
            assert_eq!(f["outcome"], "bad_request", "{f}");
        }
    }
    // the login before it was logged on its own line
    assert!(
        lines
            .iter()
            .any(|(m, f)| m == "client authenticated" && f["user"] == "carol"),
        "{lines:?}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_handshake_timeout_closes_the_connection_and_shows_in_metrics_and_one_log_line() {
    let b = broker("slow", "auth = \"none\"\nallow_any_user = true").await;
    // binary: half a SASL message, then silence
    let t0 = std::time::Instant::now();
    let reply = send_and_read_all(b.addrs["slow_bin"], &[1, 0, 0, 0, 5, b'P']).await;
    assert_eq!(
        reply, b"",
        "a stalled handshake gets no answer, only the close"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "closed at the deadline, not before"
    );
    // HTTP: a request head that never ends
    let mut s = TcpStream::connect(b.addrs["slow_http"]).await.unwrap();
    s.write_all(b"POST /cliservice HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the broker closes a connection whose headers are late")
        .ok();

    // a keep-alive connection that served a request and then idles is closed
    // by the same timer, but that is no failed handshake
    let mut s = TcpStream::connect(b.addrs["slow_http"]).await.unwrap();
    let req = format!(
        "POST /cliservice HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-thrift\r\nContent-Length: 1\r\n{}\r\nx",
        basic("carol", "pw")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the broker closes the idle keep-alive connection")
        .ok();
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "answered first"
    );

    let bin_lines = logged("slow_bin", |l| !l.is_empty()).await;
    let http_lines = logged("slow_http", |l| l.len() >= 2).await;
    let http_lines: Vec<_> = http_lines
        .into_iter()
        .filter(|(_, f)| f["outcome"] != "bad_request")
        .collect();
    let m = metrics(&b).await;
    let errors = series(&m, "kyuubi_broker_client_errors_total");
    for l in ["slow_bin", "slow_http"] {
        let key = format!("listener=\"{l}\",kind=\"handshake_timeout\"");
        assert_eq!(errors.get(&key), Some(&1.0), "{key}: {errors:?}");
    }
    let logins = series(&m, "kyuubi_broker_login_duration_seconds_count");
    assert_eq!(
        logins.get("listener=\"slow_bin\",mechanism=\"plain\",outcome=\"handshake_timeout\""),
        Some(&1.0),
        "{logins:?}"
    );
    assert_eq!(bin_lines.len(), 1, "{bin_lines:?}");
    assert_eq!(bin_lines[0].1["outcome"], "handshake_timeout");
    assert_eq!(http_lines.len(), 1, "{http_lines:?}");
    assert_eq!(http_lines[0].1["outcome"], "handshake_timeout");
    b.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_ldap_server_is_one_retryable_unavailable_answer_that_hides_its_address() {
    let ldap = closed_port().await;
    let auth = format!(
        "auth = \"ldap\"\n[listener.ldap]\nurl = \"ldap://{ldap}\"\nuser_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\""
    );
    let b = broker("ldapdown", &auth).await;
    let reply = send_and_read_all(
        b.addrs["ldapdown_bin"],
        &sasl::plain_client_hello("alice", &Secret::new("alice-pw")),
    )
    .await;
    assert_eq!(
        reply.first(),
        Some(&(sasl::Status::Error as u8)),
        "{reply:?}"
    );
    let text = String::from_utf8_lossy(&reply[5..]).into_owned();
    assert_eq!(
        text,
        "kyuubi-broker: authentication service unavailable; try again shortly"
    );

    let http = b.addrs["ldapdown_http"];
    let (status, head, resp) =
        http_post(http, "/cliservice", &basic("alice", "alice-pw"), b"x").await;
    assert_eq!(status, 503, "{resp}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    for shown in [&text, &resp, &head] {
        assert!(
            !shown.contains(&ldap.port().to_string()),
            "the LDAP address leaked: {shown}"
        );
    }
    // the broker's failure, not the client's: no client error, no auth failure
    let m = metrics(&b).await;
    let logins = series(&m, "kyuubi_broker_login_duration_seconds_count");
    for (l, mechanism) in [("ldapdown_bin", "plain"), ("ldapdown_http", "basic")] {
        let key =
            format!("listener=\"{l}\",mechanism=\"{mechanism}\",outcome=\"auth_unavailable\"");
        assert_eq!(logins.get(&key), Some(&1.0), "{key}: {logins:?}");
    }
    for name in [
        "kyuubi_broker_client_errors_total",
        "kyuubi_broker_auth_failures_total",
    ] {
        let counted = series(&m, name);
        assert!(
            !counted.keys().any(|k| k.contains("ldapdown")),
            "{name}: {counted:?}"
        );
    }
    // the broker's own log keeps the detail an operator needs
    let lines = logged("ldapdown_bin", |l| !l.is_empty()).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].1["error"]
            .as_str()
            .unwrap()
            .contains(&ldap.to_string()),
        "{lines:?}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_listener_whose_users_file_is_broken_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("users");
    std::fs::write(&f, "alice:not-a-hash\n").unwrap();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\nauth = \"static\"\nusers_file = \"{}\"\n{}",
        f.display(),
        route_toml("binary", "127.0.0.1:1".parse().unwrap(), "")
    );
    let cfg =
        kyuubi_broker::config::Config::from_toml(&toml, "t").expect("the file itself is valid");
    let e = kyuubi_broker::prepare(cfg)
        .err()
        .expect("the authenticator cannot be built")
        .to_string();
    assert!(e.starts_with("listener[0].users_file:"), "{e}");
    assert!(e.contains(":1:") && e.contains("argon2"), "{e}");
}

#[tokio::test]
async fn a_hostile_user_name_reaches_the_log_truncated_with_its_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker("hostile_name", &users(&dir)).await;
    // a forged log line, terminal escapes and 6,000 characters more (no
    // ':', which ends the user name in HTTP Basic)
    let evil = format!(
        "mallory\nFORGED ERROR admin logged in\r\x1b[31m{}",
        "x".repeat(6000)
    );
    let reply = send_and_read_all(
        b.addrs["hostile_name_bin"],
        &sasl::plain_client_hello(&evil, &Secret::new("nope")),
    )
    .await;
    assert_eq!(reply.first(), Some(&(sasl::Status::Bad as u8)), "{reply:?}");
    let (status, _, _) = http_post(
        b.addrs["hostile_name_http"],
        "/cliservice",
        &basic(&evil, "nope"),
        b"x",
    )
    .await;
    assert_eq!(status, 401);

    for listener in ["hostile_name_bin", "hostile_name_http"] {
        let lines = logged(listener, |l| !l.is_empty()).await;
        for (_, f) in &lines {
            for key in ["user", "error"] {
                let Some(v) = f[key].as_str() else { continue };
                assert!(
                    !v.chars().any(char::is_control),
                    "{listener}: raw control characters in {key}: {v:?}"
                );
                assert!(
                    v.chars().count() <= 600,
                    "{listener}: {key} not truncated ({} characters)",
                    v.chars().count()
                );
            }
            let user = f["user"].as_str().expect("the user field");
            assert!(user.starts_with("mallory\\nFORGED"), "{user:?}");
            assert!(user.ends_with('…'), "truncation is marked: {user:?}");
            assert!(user.chars().count() <= 128 + 16, "{user:?}");
        }
    }
    // the forged line is data inside a field, never a line of its own
    let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")),
        "a client forged a log line"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_at_the_handshake_timeout_but_is_no_failed_login(
) {
    let b = broker("mute", "auth = \"none\"\nallow_any_user = true").await;
    for l in ["mute_bin", "mute_http"] {
        let mut s = TcpStream::connect(b.addrs[l]).await.unwrap();
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the broker closes a connection that never spoke")
            .ok();
        assert!(out.is_empty(), "{l}: nothing to answer: {out:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "{l}: closed early"
        );
    }
    // the close is counted once the edge has recorded it
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(&b).await;
        let t = series(&m, "kyuubi_broker_connections_timed_out_total");
        if t.values().sum::<f64>() >= 2.0 || tokio::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let timed_out = series(&m, "kyuubi_broker_connections_timed_out_total");
    for l in ["mute_bin", "mute_http"] {
        let key = format!("listener=\"{l}\",reason=\"no_request\"");
        assert_eq!(timed_out.get(&key), Some(&1.0), "{key}: {timed_out:?}");
    }
    let errors = series(&m, "kyuubi_broker_client_errors_total");
    assert!(
        !errors.keys().any(|k| k.contains("mute_")),
        "a silent connection is not a client error: {errors:?}"
    );
    let logins = series(&m, "kyuubi_broker_login_duration_seconds_count");
    assert!(
        !logins.keys().any(|k| k.contains("mute_")),
        "nor a login: {logins:?}"
    );
    for l in ["mute_bin", "mute_http"] {
        assert!(lines_of(l).is_empty(), "{l}: {:?}", lines_of(l));
    }
    b.shutdown().await;
}
