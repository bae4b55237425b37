//! Kerberos against real parts: the fixture's MIT KDC (realm EXAMPLE.COM),
//! Spark Thrift Servers started with Kerberos auth (binary 10005, HTTP
//! 10006), beeline holding a ticket, impyla, and the broker's own client.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::error::UpstreamError;
use kyuubi_broker::tcli::gen::TStatusCode;

const KDC: &str = "/tmp/hs2-kdc";
const BROKER_PRINCIPAL: &str = "kyuubi/localhost@EXAMPLE.COM";

/// Starts the KDC and points this process's MIT krb5 at its krb5.conf. MIT
/// reads the file once, so it is set before any Kerberos call.
fn kdc() {
    static KDC_UP: Once = Once::new();
    KDC_UP.call_once(|| {
        let conf = fixture(&["kdc-start"]);
        std::env::set_var("KRB5_CONFIG", conf);
    });
}

async fn kdc_async() {
    tokio::task::spawn_blocking(kdc).await.unwrap();
}

async fn sts_kerberos(mode: &'static str) -> std::net::SocketAddr {
    kdc_async().await;
    tokio::task::spawn_blocking(move || match mode {
        "http" => sts_auth("sts-kerberos-http", "http", 10006, "kerberos"),
        _ => sts_auth("sts-kerberos", "binary", 10005, "kerberos"),
    })
    .await
    .unwrap()
}

/// A ticket for `user` from its keytab, in a cache of its own.
fn kinit(dir: &Path, user: &str) -> String {
    let cache = format!("FILE:{}", dir.join(format!("cc-{user}")).display());
    let st = Command::new("kinit")
        .args([
            "-k",
            "-t",
            &format!("{KDC}/{user}.keytab"),
            &format!("{user}@EXAMPLE.COM"),
        ])
        .env("KRB5CCNAME", &cache)
        .status()
        .expect("kinit runs");
    assert!(st.success(), "kinit {user}");
    cache
}

/// beeline with Hadoop UGI in Kerberos mode and the fixture's krb5.conf:
/// what a Kerberos JDBC user has.
async fn beeline_kerberos(dir: &Path, ccache: &str, url: &str, sql: &str) -> BeelineRun {
    let conf = dir.join("hadoop-conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("core-site.xml"),
        "<?xml version=\"1.0\"?><configuration><property><name>hadoop.security.authentication</name><value>kerberos</value></property></configuration>\n",
    )
    .unwrap();
    let opts = format!("-Djava.security.krb5.conf={KDC}/krb5.conf");
    let conf = conf.display().to_string();
    beeline_env(
        url,
        "",
        "",
        sql,
        &[
            ("KRB5CCNAME", ccache),
            ("HADOOP_CONF_DIR", &conf),
            ("SPARK_BEELINE_OPTS", &opts),
        ],
    )
    .await
}

fn kerberos_listeners(qop: &str) -> String {
    format!(
        r#"
[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "kerberos"
[listener.kerberos]
keytab = "{KDC}/kyuubi-localhost.keytab"
principal = "{BROKER_PRINCIPAL}"
qop = {qop}
krb5_conf = "{KDC}/krb5.conf"

[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
auth = "kerberos"
[listener.kerberos]
keytab = "{KDC}/kyuubi-localhost.keytab"
principal = "{BROKER_PRINCIPAL}"
"#
    )
}

/// The client's own name upstream: a Kerberos client has no password to
/// pass on, so the broker's service credential carries it.
async fn same_name_route() -> String {
    route_toml(
        "binary",
        sts_binary().await,
        "[routes.r.credentials]\nmode = \"static\"\nuser = \"broker\"\npassword = \"broker-pw\"\n\
         [routes.r.mapping]\ntype = \"system\"\nsame_name_for_unlisted = true\n",
    )
}

fn url(addr: std::net::SocketAddr, mode: &str, extra: &str) -> String {
    // Hive JDBC takes the service host from the URL: use the principal's
    let base = match mode {
        "http" => format!(
            "jdbc:hive2://localhost:{}/;transportMode=http;httpPath=cliservice",
            addr.port()
        ),
        _ => format!("jdbc:hive2://localhost:{}/", addr.port()),
    };
    format!("{base};principal={BROKER_PRINCIPAL}{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beeline_with_a_ticket_authenticates_to_the_broker_at_each_qop_and_over_http() {
    kdc_async().await;
    let route = same_name_route().await;
    let b = start_broker_toml(&format!(
        "{}\n{route}",
        kerberos_listeners(r#"["auth", "auth-int", "auth-conf"]"#)
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cc = kinit(dir.path(), "alice");
    let sql = "select current_user(), count(*) from range(100000);\n";
    for (addr, mode, extra) in [
        (b.binary, "binary", ";saslQop=auth"),
        (b.binary, "binary", ";saslQop=auth-int"),
        (b.binary, "binary", ";saslQop=auth-conf"),
        (b.http, "http", ""),
    ] {
        let run = beeline_kerberos(dir.path(), &cc, &url(addr, mode, extra), sql).await;
        assert!(
            run.ok && run.stdout.contains("alice,100000"),
            "{mode}{extra}: {}\n{}",
            run.stdout,
            run.stderr
        );
    }
    b.shutdown().await;

    // a level the listener does not offer is refused, so the QOP is real
    let b = start_broker_toml(&format!("{}\n{route}", kerberos_listeners(r#"["auth"]"#))).await;
    let run = beeline_kerberos(
        dir.path(),
        &cc,
        &url(b.binary, "binary", ";saslQop=auth-conf"),
        sql,
    )
    .await;
    assert!(!run.stdout.contains("alice,100000"), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("No common protection layer between client and server"),
        "{}",
        run.stderr
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_with_a_ticket_authenticate_to_the_broker() {
    kdc_async().await;
    let route = same_name_route().await;
    // QOP auth only: thrift_sasl hands pure-sasl the frame length with each
    // wrapped frame, so Python clients fail above auth (a client-side bug)
    let b = start_broker_toml(&format!("{}\n{route}", kerberos_listeners(r#"["auth"]"#))).await;
    let dir = tempfile::tempdir().unwrap();
    let cc = kinit(dir.path(), "alice");
    // impyla over both transports, PyHive over binary (its HTTP transport
    // takes fixed headers only, so it cannot make a SPNEGO token per call)
    for (client, mode, port) in [
        ("impyla", "binary", b.binary.port()),
        ("impyla", "http", b.http.port()),
        ("pyhive", "binary", b.binary.port()),
    ] {
        let krb5 = format!("{KDC}/krb5.conf");
        let v = py_client_env(
            client,
            mode,
            port,
            "query",
            Some("select current_user()"),
            &["--kerberos-service", "kyuubi"],
            &[("KRB5CCNAME", &cc), ("KRB5_CONFIG", &krb5)],
        )
        .await;
        assert_eq!(v["rows"], serde_json::json!([["alice"]]), "{client} {mode}");
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_ticket_or_with_a_password_are_refused_clearly() {
    kdc_async().await;
    let route = same_name_route().await;
    let b = start_broker_toml(&format!("{}\n{route}", kerberos_listeners(r#"["auth"]"#))).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = format!("FILE:{}", dir.path().join("no-tickets").display());
    let run = beeline_kerberos(
        dir.path(),
        &empty,
        &url(b.binary, "binary", ""),
        "select 1;\n",
    )
    .await;
    assert!(!run.ok, "a ticket-less beeline must fail: {}", run.stdout);
    assert!(run.stderr.contains("GSS initiate failed"), "{}", run.stderr);

    // user + password (SASL PLAIN, HTTP Basic) on a Kerberos listener
    let plain = Hs2Client::connect(
        &client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain),
        "alice",
        "alice-pw",
    )
    .await;
    match plain.err() {
        // SASL BAD from the listener
        Some(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => {
            assert!(reason.contains("takes Kerberos only"), "{reason}")
        }
        other => panic!("PLAIN must be refused, got {other:?}"),
    }
    let mut http = Hs2Client::connect(
        &client_cfg(Transport::Http, b.http, UpstreamSasl::Plain),
        "alice",
        "alice-pw",
    )
    .await
    .unwrap();
    match http.open_session().await {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => assert!(
            reason.starts_with("HTTP 401: ") && reason.contains("Kerberos"),
            "{reason}"
        ),
        other => panic!("HTTP Basic must be refused with 401, got {other:?}"),
    }

    // and the broker still serves a proper client
    let cc = kinit(dir.path(), "alice");
    let run = beeline_kerberos(dir.path(), &cc, &url(b.binary, "binary", ""), "select 1;\n").await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    b.shutdown().await;
}

fn kerberos_mapping(upstream: &str) -> String {
    format!(
        "{upstream}principal = \"hive/_HOST@EXAMPLE.COM\"\n\
         [routes.r.mapping]\ntype = \"kerberos\"\nkrb5_conf = \"{KDC}/krb5.conf\"\n\
         [routes.r.mapping.accounts.alice]\nprincipal = \"bob@EXAMPLE.COM\"\nkeytab = \"{KDC}/bob.keytab\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_authenticates_to_kerberos_servers_as_the_mapped_principal() {
    let (bin, http) = tokio::join!(sts_kerberos("binary"), sts_kerberos("http"));
    for (transport, sts) in [("binary", bin), ("http", http)] {
        // `_HOST` is the upstream host: name it as the principal does
        let upstream = format!(
            "[routes.r.upstream]\ntransport = \"{transport}\"\nhost = \"localhost\"\nport = {}\n",
            sts.port()
        );
        let b = start_broker(&kerberos_mapping(&upstream)).await;
        for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
            assert_eq!(
                current_user(addr, t, "alice", "x").await.unwrap(),
                "bob",
                "{transport} upstream, {t:?} client"
            );
            match current_user(addr, t, "bob", "x").await {
                Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
                    assert_eq!(
                        msg,
                        "user bob has no account mapping on computing resource r"
                    );
                    assert_eq!(state.as_deref(), Some("28000"));
                }
                other => panic!("bob must be refused, got {other:?}"),
            }
        }
        // what impyla shows over both client transports
        for mode in ["binary", "http"] {
            let port = if mode == "http" { b.http } else { b.binary }.port();
            let v = py_client_args(
                "impyla",
                mode,
                port,
                "query",
                Some("select current_user()"),
                &["--user", "alice"],
            )
            .await;
            assert_eq!(
                v["rows"][0][0], "bob",
                "{transport} upstream, impyla {mode}: {v}"
            );
        }
        b.shutdown().await;
    }

    // a keytab that holds no key for the mapped principal: a clear error, no secret
    let upstream = format!(
        "[routes.r.upstream]\ntransport = \"binary\"\nhost = \"localhost\"\nport = {}\n",
        bin.port()
    );
    let wrong = kerberos_mapping(&upstream).replace("bob.keytab", "alice.keytab");
    let b = start_broker(&wrong).await;
    match current_user(b.binary, Transport::Binary, "alice", "x").await {
        // 08S01: the broker could not authenticate upstream, not a refusal of alice
        Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
            assert_eq!(state.as_deref(), Some("08S01"), "{msg}");
            assert!(
                msg.contains(
                    "refused the broker's credentials: Kerberos: credentials for bob@EXAMPLE.COM"
                ),
                "{msg}"
            );
        }
        other => panic!("expected the broker's own credential failure, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kerberos_mapping_example_maps_alice_and_refuses_bob() {
    let sts = sts_kerberos("binary").await;
    ldap_server().await;
    let text =
        std::fs::read_to_string(root().join("config/examples/kerberos-mapping.toml")).unwrap();
    assert!(text.contains("bind = \"127.0.0.1:10009\"") && text.contains("port = 10000"));
    // the fixture's Kerberos server listens on 10005 in this suite; ports 0 for the broker
    let toml = text
        .replace("127.0.0.1:10009", "127.0.0.1:0")
        .replace("127.0.0.1:10010", "127.0.0.1:0")
        .replace("port = 10000", &format!("port = {}", sts.port()));
    let b = start_broker_toml(&toml).await;
    let (bin, http) = (b.addrs["binary"], b.addrs["http"]);
    for (t, addr) in [(Transport::Binary, bin), (Transport::Http, http)] {
        assert_eq!(
            current_user(addr, t, "alice", "alice-pw").await.unwrap(),
            "bob",
            "{t:?}"
        );
        match current_user(addr, t, "bob", "bob-pw").await {
            Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
                assert_eq!(
                    msg,
                    "user bob has no account mapping on computing resource sts-kerberos"
                );
                assert_eq!(state.as_deref(), Some("28000"));
            }
            other => panic!("{t:?}: bob must be refused, got {other:?}"),
        }
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_principal_tickets_are_refreshed_before_they_expire() {
    // carol's tickets live 60 s. MIT refreshes a keytab-backed cache from
    // the keytab at half-life (and within 30 s of expiry), so the remaining
    // lifetime jumps back up instead of running down.
    kdc_async().await;
    let init = std::sync::Arc::new(kyuubi_broker::kerberos::Initiator::new(
        "carol@EXAMPLE.COM",
        &PathBuf::from(KDC).join("carol.keytab"),
    ));
    let first = init.lifetime().await.unwrap();
    assert!(first <= Duration::from_secs(60), "{first:?}");
    let mut seen = vec![first];
    let mut lowest = first;
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = init.lifetime().await.unwrap();
        seen.push(now);
        assert!(now > Duration::from_secs(20), "tickets ran down: {seen:?}");
        lowest = lowest.min(now);
        if now > lowest + Duration::from_secs(10) {
            return;
        }
    }
    panic!("no refresh within 50 s of a 60 s ticket: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_as_kerberos_client_negotiates_each_qop_with_a_kerberos_listener() {
    // broker A: a Kerberos listener offering one QOP, in front of Spark;
    // broker B: maps alice to her principal and reaches A with GSSAPI at
    // the same QOP, so B's client-side wrap/unwrap carries every frame
    kdc_async().await;
    let route_a = same_name_route().await;
    for qop in ["auth-int", "auth-conf"] {
        let a = start_broker_toml(&format!(
            "{}\n{route_a}",
            kerberos_listeners(&format!("[\"{qop}\"]"))
        ))
        .await;
        let upstream = format!(
            "[routes.r.upstream]\ntransport = \"binary\"\nhost = \"localhost\"\nport = {}\nqop = \"{qop}\"\n",
            a.binary.port()
        );
        let b = start_broker(
            &kerberos_mapping(&upstream)
                .replace("hive/_HOST@EXAMPLE.COM", BROKER_PRINCIPAL)
                .replace("bob@EXAMPLE.COM", "alice@EXAMPLE.COM")
                .replace("bob.keytab", "alice.keytab"),
        )
        .await;
        for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
            assert_eq!(
                current_user(addr, t, "alice", "x").await.unwrap(),
                "alice",
                "{qop}, {t:?} client"
            );
        }
        b.shutdown().await;
        a.shutdown().await;
    }
}
