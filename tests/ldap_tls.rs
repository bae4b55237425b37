//! LDAP over TLS for `auth = "ldap"` listeners, against the fixture's slapd
//! with the test CA's certificate (`scripts/fixture.sh ldap-start`:
//! `ldaps://127.0.0.1:6360`, StartTLS on `ldap://127.0.0.1:3890`): alice
//! logs in over ldaps:// and over StartTLS; a certificate the broker does
//! not trust is "authentication service unavailable" to the client (never
//! "authentication failed"), with the certificate problem in the broker's
//! log; TLS keys that cannot work stop startup naming the key.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use kyuubi_broker::client::ClientError;
use kyuubi_broker::config::{Config, Transport};
use kyuubi_broker::error::UpstreamError;
use serde_json::Value;

const PATTERN: &str = "user_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\"";
const UNAVAILABLE: &str = "kyuubi-broker: authentication service unavailable; try again shortly";

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

/// The `error` fields logged for `listener`, once at least one is there.
async fn logged_errors(listener: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
        let errors: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["listener"] == listener && v["target"] != "audit")
            .filter_map(|v| v["fields"]["error"].as_str().map(str::to_string))
            .collect();
        if !errors.is_empty() {
            return errors;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{listener}: no error logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fixture's slapd (with TLS) and test certificates.
async fn fixture() -> PathBuf {
    let certs = tls_dir().await;
    ldap_server().await;
    certs
}

/// A binary listener `<tag>_bin` and an HTTP listener `<tag>_http`, both
/// checking passwords against LDAP with `ldap` (lines of `[listener.ldap]`
/// after `user_dn_pattern`), in front of `route`.
fn toml(tag: &str, ldap: &str, route: &str) -> String {
    let listener = |name: &str, protocol: &str| {
        format!(
            "[[listener]]\nname = \"{tag}_{name}\"\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\nauth = \"ldap\"\n[listener.ldap]\n{PATTERN}\n{ldap}\n"
        )
    };
    format!(
        "[server]\nshutdown_grace = \"5s\"\n{}{}{route}",
        listener("bin", "binary"),
        listener("http", "http")
    )
}

async fn broker(tag: &str, ldap: &str, route: &str) -> Broker {
    logs();
    start_broker_toml(&toml(tag, ldap, route)).await
}

/// alice is herself upstream and a wrong password is the usual refusal, on
/// both transports.
async fn alice_logs_in(b: &Broker, tag: &str) {
    for (t, l) in [(Transport::Binary, "bin"), (Transport::Http, "http")] {
        let addr = b.addrs[&format!("{tag}_{l}")];
        assert_eq!(
            current_user(addr, t, "alice", "alice-pw").await.unwrap(),
            "alice",
            "{t:?}"
        );
        login_refused(current_user(addr, t, "alice", "nope").await, t, "alice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldaps_with_tls_ca_logs_alice_in_on_both_transports() {
    let certs = fixture().await;
    let ldap = format!(
        "url = \"ldaps://localhost:6360\"\ntls_ca = \"{}\"",
        certs.join("ca.pem").display()
    );
    let b = broker(
        "ldaps",
        &ldap,
        &route_toml("binary", sts_binary().await, ""),
    )
    .await;
    alice_logs_in(&b, "ldaps").await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_on_ldap_3890_with_tls_ca_logs_alice_in_on_both_transports() {
    let certs = fixture().await;
    let ldap = format!(
        "url = \"ldap://localhost:3890\"\nstarttls = true\ntls_ca = \"{}\"",
        certs.join("ca.pem").display()
    );
    let b = broker(
        "starttls",
        &ldap,
        &route_toml("binary", sts_binary().await, ""),
    )
    .await;
    alice_logs_in(&b, "starttls").await;
    b.shutdown().await;
}

/// alice's right password, against an LDAP server the broker cannot get
/// a trusted TLS connection to: the retryable "unavailable" answer on both
/// transports, and `reason` in the broker's log only.
async fn tls_fails(tag: &str, ldap: &str, reason: &str) {
    let dead = closed_port().await;
    let b = broker(tag, ldap, &route_toml("binary", dead, "")).await;
    let bin = b.addrs[&format!("{tag}_bin")];
    match current_user(bin, Transport::Binary, "alice", "alice-pw").await {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => {
            assert_eq!(reason, UNAVAILABLE, "{tag}")
        }
        other => panic!("{tag}: expected the unavailable answer, got {other:?}"),
    }
    let http = b.addrs[&format!("{tag}_http")];
    let (status, head, body) =
        http_post(http, "/cliservice", &basic("alice", "alice-pw"), b"x").await;
    assert_eq!(status, 503, "{tag}: {head}\n{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after:"),
        "{tag}: {head}"
    );
    assert!(
        body.contains("authentication service unavailable")
            && !body.contains("authentication failed")
            && !body.contains("certificate"),
        "{tag}: {body}"
    );
    for l in ["bin", "http"] {
        let errors = logged_errors(&format!("{tag}_{l}")).await;
        assert!(
            errors.iter().all(|e| e
                .starts_with("authentication service unavailable: TLS to the LDAP server failed")
                && e.contains(reason)),
            "{tag}_{l}: {errors:?}"
        );
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_ldap_certificate_or_a_failed_handshake_is_service_unavailable_with_the_reason_logged(
) {
    let certs = fixture().await;
    let other = certs.join("other-ca.pem");
    for (tag, url) in [
        ("other_ldaps", "url = \"ldaps://localhost:6360\""),
        (
            "other_starttls",
            "url = \"ldap://localhost:3890\"\nstarttls = true",
        ),
    ] {
        let ldap = format!("{url}\ntls_ca = \"{}\"", other.display());
        tls_fails(
            tag,
            &ldap,
            "its certificate is not signed by a trusted CA; check ldap.tls_ca",
        )
        .await;
    }
    // the right CA, but ldaps:// to the plain port
    tls_fails(
        "plain_port",
        &format!(
            "url = \"ldaps://localhost:3890\"\ntls_ca = \"{}\"",
            certs.join("ca.pem").display()
        ),
        "the server closed the connection in the TLS handshake",
    )
    .await;
    // no tls_ca: the system's roots, which do not hold the test CA either
    tls_fails(
        "system_roots",
        "url = \"ldaps://localhost:6360\"",
        "set ldap.tls_ca",
    )
    .await;
}

#[tokio::test]
async fn ldap_tls_keys_that_cannot_work_stop_startup_naming_the_key() {
    let certs = fixture().await;
    let route = route_toml("binary", "127.0.0.1:1".parse().unwrap(), "");
    let err = |ldap: &str| {
        Config::from_toml(&toml("cfg", ldap, &route), "t")
            .unwrap_err()
            .to_string()
    };
    let ca = certs.join("ca.pem");
    let e = err(&format!(
        "url = \"ldap://localhost:3890\"\ntls_ca = \"{}\"",
        ca.display()
    ));
    assert!(
        e.starts_with(
            "listener[0].ldap.tls_ca: is set, but no URL is ldaps:// and starttls is false"
        ),
        "{e}"
    );
    let e = err("url = \"ldaps://localhost:6360\"\nstarttls = true");
    assert!(
        e.starts_with(
            "listener[0].ldap.starttls: is true, but ldaps://localhost:6360 is TLS already"
        ),
        "{e}"
    );
    // readable but no CA in it: found when the authenticator is built
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let cfg = Config::from_toml(
        &toml(
            "cfg",
            &format!(
                "url = \"ldaps://localhost:6360\"\ntls_ca = \"{}\"",
                junk.display()
            ),
            &route,
        ),
        "t",
    )
    .unwrap();
    let e = match kyuubi_broker::prepare(cfg) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a tls_ca without certificates was taken"),
    };
    assert!(
        e.starts_with("listener[0].ldap.tls_ca: ") && e.contains("no \"BEGIN CERTIFICATE\" block"),
        "{e}"
    );
}
