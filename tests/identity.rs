//! Client authentication and account mapping against real parts: slapd
//! (the fixture's OpenLDAP), a Spark Thrift Server with auth NONE, and one
//! with LDAP authentication; clients are impyla and the broker's own.

mod common;

use std::net::SocketAddr;

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::error::UpstreamError;
use kyuubi_broker::tcli::gen::TStatusCode;
use serde_json::json;

const LDAP_URL: &str = "ldap://127.0.0.1:3890";

/// A broker whose listeners authenticate against the fixture LDAP.
async fn ldap_broker(ldap_table: &str, route: &str) -> Broker {
    ldap_server().await;
    let listeners = LISTENERS
        .replace("auth = \"none\"\nallow_any_user = true", "auth = \"ldap\"")
        .replace(
            "route = \"r\"\nauth = \"ldap\"",
            &format!("route = \"r\"\nauth = \"ldap\"\n[listener.ldap]\nurl = \"{LDAP_URL}\"\n{ldap_table}"),
        );
    start_broker_toml(&format!("{listeners}\n{route}")).await
}

const PATTERN: &str = "user_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\"";

async fn client(
    addr: SocketAddr,
    t: Transport,
    user: &str,
    pw: &str,
) -> Result<Hs2Client, ClientError> {
    Hs2Client::connect(&client_cfg(t, addr, UpstreamSasl::Plain), user, pw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_client_auth_accepts_alice_and_refuses_wrong_passwords_alike() {
    let b = ldap_broker(PATTERN, &route_toml("binary", sts_binary().await, "")).await;
    for t in [Transport::Binary, Transport::Http] {
        let addr = if t == Transport::Http {
            b.http
        } else {
            b.binary
        };
        assert_eq!(
            current_user(addr, t, "alice", "alice-pw").await.unwrap(),
            "alice",
            "{t:?}"
        );
        let wrong = login_refused(current_user(addr, t, "alice", "nope").await, t, "alice");
        let unknown = login_refused(current_user(addr, t, "mallory", "nope").await, t, "mallory");
        assert_eq!(
            wrong.replace("alice", "X"),
            unknown.replace("mallory", "X"),
            "{t:?}: one message for both"
        );
    }
    // a real client: impyla over both transports
    for mode in ["binary", "http"] {
        let port = if mode == "http" {
            b.http.port()
        } else {
            b.binary.port()
        };
        let ok = py_client_args(
            "impyla",
            mode,
            port,
            "fetch",
            Some("3"),
            &["--user", "alice", "--password", "alice-pw"],
        )
        .await;
        assert_eq!(ok["rows"], json!(3));
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_search_as_bind_dn_with_a_group_requirement() {
    let table = "base_dn = \"ou=people,dc=example,dc=com\"\nbind_dn = \"cn=admin,dc=example,dc=com\"\nbind_password = \"admin-pw\"\ngroup_dn = \"cn=hive-users,ou=groups,dc=example,dc=com\"";
    let b = ldap_broker(table, &route_toml("binary", sts_binary().await, "")).await;
    assert_eq!(
        current_user(b.binary, Transport::Binary, "bob", "bob-pw")
            .await
            .unwrap(),
        "bob"
    );
    login_refused(
        current_user(b.binary, Transport::Binary, "bob", "alice-pw").await,
        Transport::Binary,
        "bob",
    );
    b.shutdown().await;
    // a required group bob is not in refuses him like a wrong password (the
    // fixture's one group holds both users: its parent OU, with no members,
    // stands in)
    let strict = table.replace("cn=hive-users,ou=groups", "ou=groups");
    let b = ldap_broker(&strict, &route_toml("binary", sts_binary().await, "")).await;
    login_refused(
        current_user(b.binary, Transport::Binary, "bob", "bob-pw").await,
        Transport::Binary,
        "bob",
    );
    b.shutdown().await;
    // a group that does not exist is the service's failure, not a wrong password
    let missing = table.replace("cn=hive-users,ou=groups", "cn=nobody,ou=groups");
    let b = ldap_broker(&missing, &route_toml("binary", sts_binary().await, "")).await;
    // a SASL ERROR (not BAD) on binary, a retryable 503 on HTTP; the LDAP
    // detail stays in the broker's log
    match current_user(b.binary, Transport::Binary, "bob", "bob-pw").await {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => assert_eq!(
            reason,
            "kyuubi-broker: authentication service unavailable; try again shortly"
        ),
        other => panic!("binary: expected the service-unavailable answer, got {other:?}"),
    }
    match current_user(b.http, Transport::Http, "bob", "bob-pw").await {
        Err(ClientError::Transport(UpstreamError::HttpStatus { status, .. })) => {
            assert_eq!(status, 503)
        }
        other => panic!("http: expected 503, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_mapping_gives_alice_and_bob_their_mapped_upstream_users() {
    let route = format!(
        "{}\n[routes.r.mapping]\ntype = \"system\"\nusers = {{ alice = \"etl_alice\", bob = \"etl_bob\" }}\n",
        route_toml("binary", sts_binary().await, "")
    );
    let b = ldap_broker(PATTERN, &route).await;
    assert_eq!(
        current_user(b.binary, Transport::Binary, "alice", "alice-pw")
            .await
            .unwrap(),
        "etl_alice"
    );
    assert_eq!(
        current_user(b.http, Transport::Http, "bob", "bob-pw")
            .await
            .unwrap(),
        "etl_bob"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmapped_user_is_refused_with_the_exact_message_and_sqlstate_28000() {
    let route = format!(
        "{}\n[routes.r.mapping]\ntype = \"system\"\nusers = {{ alice = \"etl_alice\" }}\n",
        route_toml("binary", sts_binary().await, "")
    );
    let b = ldap_broker(PATTERN, &route).await;
    for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
        let mut c = client(addr, t, "bob", "bob-pw").await.unwrap();
        match c.open_session().await {
            Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
                assert_eq!(
                    msg,
                    "user bob has no account mapping on computing resource r"
                );
                assert_eq!(state.as_deref(), Some("28000"));
            }
            other => panic!("{t:?}: expected the refusal, got {other:?}"),
        }
    }
    // what a real client shows: impyla fails to open the session with it
    let out = tokio::process::Command::new(python())
        .arg(root().join("tests/clients/hs2_client.py"))
        .args([
            "--client",
            "impyla",
            "--mode",
            "binary",
            "--port",
            &b.binary.port().to_string(),
        ])
        .args(["--user", "bob", "--password", "bob-pw", "error"])
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("HiveServer2Error: user bob has no account mapping on computing resource r"),
        "{shown}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openldap_mapping_sends_the_mapped_account_to_an_ldap_protected_server() {
    let sts = sts_ldap().await;
    let route = format!(
        "{}\n[routes.r.mapping]\ntype = \"ldap\"\n[routes.r.mapping.accounts.alice]\nuser = \"bob\"\npassword = \"bob-pw\"\n",
        route_toml("binary", sts, "")
    );
    let b = ldap_broker(PATTERN, &route).await;
    for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
        assert_eq!(
            current_user(addr, t, "alice", "alice-pw").await.unwrap(),
            "bob",
            "{t:?}"
        );
    }
    b.shutdown().await;
    // a wrong mapped password is the upstream's refusal, named clearly
    let bad = route.replace("password = \"bob-pw\"", "password = \"stale\"");
    let b = ldap_broker(PATTERN, &bad).await;
    let err = match current_user(b.binary, Transport::Binary, "alice", "alice-pw").await {
        // 08S01: the link to the upstream failed, not the client's login
        Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
            assert_eq!(state.as_deref(), Some("08S01"), "{msg}");
            msg
        }
        other => panic!("expected the upstream's refusal, got {other:?}"),
    };
    assert!(
        err.contains(&format!(
            "upstream {sts} (binary, SASL PLAIN) refused the broker's credentials: \
             Error validating the login"
        )),
        "{err}"
    );
    assert!(!err.contains("stale"), "no secret in the error: {err}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_proxy_user_is_stripped() {
    let spoof = [("hive.server2.proxy.user", "admin")];
    let b = ldap_broker(PATTERN, &route_toml("binary", sts_binary().await, "")).await;
    let mut c = client(b.binary, Transport::Binary, "alice", "alice-pw")
        .await
        .unwrap();
    assert_eq!(
        scalar(&mut c, &spoof, "select current_user()", 0)
            .await
            .unwrap(),
        "alice"
    );
    b.shutdown().await;
    // when impersonation is allowed the server acts on the key: the check above can fail
    let allowed = format!(
        "{}\n[routes.r.session]\nallow_impersonation = true\n",
        route_toml("binary", sts_binary().await, "")
    );
    let b = ldap_broker(PATTERN, &allowed).await;
    let mut c = client(b.binary, Transport::Binary, "alice", "alice-pw")
        .await
        .unwrap();
    let r = scalar(&mut c, &spoof, "select current_user()", 0)
        .await
        .unwrap();
    assert_eq!(r, "admin", "the server acted on the proxy user");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_spark_conf_precedence_reaches_the_server() {
    let sts = sts_binary().await;
    let client_says = [("set:hiveconf:spark.sql.shuffle.partitions", "3")];
    for (global_wins, expect) in [(true, "7"), (false, "3")] {
        let route = format!(
            "{}\n[routes.r.session]\nspark_conf = {{ \"spark.sql.shuffle.partitions\" = \"7\" }}\nglobal_takes_precedence = {global_wins}\n",
            route_toml("binary", sts, "")
        );
        let b = ldap_broker(PATTERN, &route).await;
        let mut c = client(b.binary, Transport::Binary, "alice", "alice-pw")
            .await
            .unwrap();
        let v = scalar(&mut c, &client_says, "set spark.sql.shuffle.partitions", 1)
            .await
            .unwrap();
        assert_eq!(v, expect, "global_takes_precedence = {global_wins}");
        let v = scalar(&mut c, &[], "set spark.sql.shuffle.partitions", 1)
            .await
            .unwrap();
        assert_eq!(v, "7", "without a client value the global one applies");
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_users_file_authenticates_with_argon2() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("carol:{}\n", kyuubi_broker::auth::hash_password("carol-pw")),
    )
    .unwrap();
    let listeners = LISTENERS.replace(
        "auth = \"none\"\nallow_any_user = true",
        &format!("auth = \"static\"\nusers_file = \"{}\"", users.display()),
    );
    let b = start_broker_toml(&format!(
        "{listeners}\n{}",
        route_toml("binary", sts_binary().await, "")
    ))
    .await;
    assert_eq!(
        current_user(b.binary, Transport::Binary, "carol", "carol-pw")
            .await
            .unwrap(),
        "carol"
    );
    login_refused(
        current_user(b.http, Transport::Http, "carol", "wrong").await,
        Transport::Http,
        "carol",
    );
    b.shutdown().await;
}
