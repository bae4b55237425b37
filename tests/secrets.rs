//! No secret of the fixture reaches anything the broker writes: its log
//! (JSON, at debug level), its audit log, `/metrics`, `/status`,
//! `/readyz`, or the error texts clients get. One broker with every kind of
//! secret in play (argon2 users, LDAP with a service bind password, a mapped
//! upstream password, a gateway token in an HTTP upstream's path) is put
//! through right and wrong logins on both transports, NOSASL logins and a
//! failing upstream; then every output is searched for every secret, as
//! given and Base64-encoded (HTTP Basic carries `user:password` that way).

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const STATIC_PW: &str = "Static-Alice-Pw-7q";
const WRONG_PW: &str = "Wrong-Guess-Pw-3x";
const WRONG_LDAP_PW: &str = "Wrong-Ldap-Pw-5z";
const GATEWAY_TOKEN: &str = "TokPathSecret91";
/// The fixture's: alice's LDAP password, bob's (the mapped upstream
/// account) and the LDAP admin's (the service bind).
const LDAP_ALICE: &str = "alice-pw";
const MAPPED_PW: &str = "bob-pw";
const BIND_PW: &str = "admin-pw";

/// Every log line of this test binary at debug level, and the audit file.
fn outputs(dir: &std::path::Path) -> (&'static Arc<Mutex<Vec<u8>>>, std::path::PathBuf) {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let audit = dir.join("audit.jsonl");
    let logs = LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = kyuubi_broker::audit::AuditSink::open(&audit).unwrap();
        let log = buf.clone();
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || Capture(log.clone()))
                    .with_filter(tracing_subscriber::EnvFilter::new("debug")),
            )
            .with(kyuubi_broker::audit::layer(sink))
            .init();
        buf
    });
    (logs, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fixture_secret_reaches_logs_audit_metrics_status_or_error_texts() {
    let dir = tempfile::tempdir().unwrap();
    let (logs, audit) = outputs(dir.path());
    ldap_server().await;
    let sts = sts_binary().await;
    let dead = closed_port().await;
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("alice:{}\n", kyuubi_broker::auth::hash_password(STATIC_PW)),
    )
    .unwrap();
    let toml = format!(
        r#"
[server]
shutdown_grace = "5s"
[admin]
bind = "127.0.0.1:0"
[[listener]]
name = "static_bin"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "static"
users_file = "{users}"
[[listener]]
name = "ldap_http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
auth = "ldap"
[listener.ldap]
url = "ldap://127.0.0.1:3890"
base_dn = "ou=people,dc=example,dc=com"
bind_dn = "cn=admin,dc=example,dc=com"
bind_password = "{BIND_PW}"
[[listener]]
name = "ldap_bin"
protocol = "binary"
bind = "127.0.0.1:0"
route = "tok"
auth = "ldap"
[listener.ldap]
url = "ldap://127.0.0.1:3890"
user_dn_pattern = "uid=%s,ou=people,dc=example,dc=com"
{route}
[routes.r.mapping]
type = "ldap"
[routes.r.mapping.accounts.alice]
user = "bob"
password = "{MAPPED_PW}"
[routes.tok.upstream]
transport = "http"
host = "127.0.0.1"
port = {dead_port}
token = "{GATEWAY_TOKEN}"
"#,
        users = users.display(),
        route = route_toml("binary", sts, ""),
        dead_port = dead.port(),
    );
    let b = start_broker_toml(&toml).await;
    let (bin, http, tok) = (
        b.addrs["static_bin"],
        b.addrs["ldap_http"],
        b.addrs["ldap_bin"],
    );
    let mut texts: Vec<String> = Vec::new();

    // right and wrong logins on every listener; NOSASL carries the password
    // in its OpenSession
    let ok = current_user(bin, Transport::Binary, "alice", STATIC_PW).await;
    assert_eq!(ok.unwrap(), "bob", "alice is mapped to bob upstream");
    for (addr, t, pw) in [
        (bin, Transport::Binary, WRONG_PW),
        (http, Transport::Http, WRONG_LDAP_PW),
        (tok, Transport::Binary, WRONG_LDAP_PW),
    ] {
        let r = current_user(addr, t, "alice", pw).await;
        texts.push(format!("{r:?}"));
        assert!(r.is_err(), "{t:?} {pw}");
    }
    let ok = current_user(http, Transport::Http, "alice", LDAP_ALICE).await;
    assert_eq!(ok.unwrap(), "bob");
    for pw in [STATIC_PW, WRONG_PW] {
        let cfg = client_cfg(Transport::Binary, bin, UpstreamSasl::Nosasl);
        let r = match Hs2Client::connect(&cfg, "alice", pw).await {
            Ok(mut c) => scalar(&mut c, &[], "select current_user()", 0).await,
            Err(e) => Err(e),
        };
        texts.push(format!("{r:?}"));
    }
    // a failing upstream whose path holds the gateway token
    let r = current_user(tok, Transport::Binary, "alice", LDAP_ALICE).await;
    let e = r.expect_err("the token route's upstream is down");
    texts.push(format!("{e:?} / {e}"));

    let mut outputs = vec![
        ("metrics", admin_get(b.addrs["admin"], "/metrics").await.1),
        ("status", admin_get(b.addrs["admin"], "/status").await.1),
        ("readyz", admin_get(b.addrs["admin"], "/readyz").await.1),
    ];
    b.shutdown().await;
    outputs.push(("client error texts", texts.join("\n")));
    outputs.push((
        "log",
        String::from_utf8_lossy(&logs.lock().unwrap()).into_owned(),
    ));
    // the audit writer is a thread of its own: wait for the login events
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let audit_text = loop {
        let t = std::fs::read_to_string(&audit).unwrap_or_default();
        if t.contains("login") || std::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        audit_text.contains("login"),
        "the audit log records the logins: {audit_text}"
    );
    outputs.push(("audit log", audit_text));
    assert!(
        outputs[4].1.contains("authentication failed"),
        "the log was captured"
    );

    let b64 = base64::engine::general_purpose::STANDARD;
    for secret in [
        STATIC_PW,
        WRONG_PW,
        WRONG_LDAP_PW,
        GATEWAY_TOKEN,
        LDAP_ALICE,
        MAPPED_PW,
        BIND_PW,
    ] {
        let encoded = [
            secret.to_string(),
            b64.encode(format!("alice:{secret}")),
            b64.encode(secret),
        ];
        for (what, text) in &outputs {
            for s in &encoded {
                assert!(
                    !text.contains(s.as_str()),
                    "{what} contains the secret {secret:?} (as {s:?})"
                );
            }
        }
    }
}
