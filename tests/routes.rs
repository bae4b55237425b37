//! Route behaviour against the real Spark Thrift Server: which identity the
//! upstream sees, the token-in-path form, and upstream sessions closed when
//! clients leave or the broker stops; and, against a fake upstream, how the
//! broker holds and releases its upstream connections.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::tcli::gen::{TSessionHandle, TStatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn cfg(transport: Transport, addr: SocketAddr) -> kyuubi_broker::config::UpstreamConfig {
    client_cfg(transport, addr, UpstreamSasl::Plain)
}

async fn current_user(c: &mut Hs2Client) -> String {
    let s = c.open_session().await.unwrap();
    let op = c.execute(&s, "select current_user()").await.unwrap();
    let rows = c.fetch(&op, 1).await.unwrap();
    c.close_session(s).await.unwrap();
    let cols = rows.results.unwrap().columns.unwrap();
    match &cols[0] {
        kyuubi_broker::tcli::gen::TColumn::StringVal(v) => v.values[0].clone(),
        other => panic!("unexpected column {other:?}"),
    }
}

/// Whether the server still has the session. (Spark answers GetInfo for
/// the DBMS name without a session lookup, so run a statement instead.)
async fn session_alive(c: &mut Hs2Client, h: &TSessionHandle) -> bool {
    match c.execute(h, "select 1").await {
        Ok(_) => true,
        Err(ClientError::Status(_, msg, _)) if msg.contains("Invalid SessionHandle") => false,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_route_shows_the_client_user_upstream() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let mut c = Hs2Client::connect(&cfg(Transport::Binary, b.binary), "alice", "alice-pw")
        .await
        .unwrap();
    assert_eq!(current_user(&mut c).await, "alice");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_credentials_are_the_identity_upstream_on_both_transports() {
    for (transport, sts, extra) in [
        ("binary", sts_binary().await, ""),
        ("http", sts_http().await, "http_path = \"cliservice\""),
    ] {
        let route = format!(
            "{}\n[routes.r.credentials]\nmode = \"static\"\nuser = \"etl_static\"\npassword = \"etl-pw\"\n",
            route_toml(transport, sts, extra)
        );
        let b = start_broker(&route).await;
        for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
            let mut c = Hs2Client::connect(&cfg(t, addr), "alice", "alice-pw")
                .await
                .unwrap();
            assert_eq!(
                current_user(&mut c).await,
                "etl_static",
                "client {t:?} -> upstream {transport}"
            );
        }
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_upstream_path_works_against_a_real_http_server() {
    let token = "k3y0123456789abcdefghijklmnopqrs";
    let b = start_broker(&route_toml(
        "http",
        sts_http().await,
        &format!("token = \"{token}\""),
    ))
    .await;
    let mut c = Hs2Client::connect(&cfg(Transport::Binary, b.binary), "alice", "alice-pw")
        .await
        .unwrap();
    assert_eq!(current_user(&mut c).await, "alice");
    b.shutdown().await;
}

#[tokio::test]
async fn token_is_sent_as_a_path_segment_with_basic_credentials() {
    let token = "k3y0123456789abcdefghijklmnopqrs";
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        let _ = s
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            .await;
        String::from_utf8_lossy(&head).into_owned()
    });
    let b = start_broker(&route_toml("http", up, &format!("token = \"{token}\""))).await;
    let mut c = Hs2Client::connect(&cfg(Transport::Binary, b.binary), "alice", "alice-pw")
        .await
        .unwrap();
    let err = match c.open_session().await {
        // 08S01: the upstream link failed
        Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
            assert_eq!(state.as_deref(), Some("08S01"), "{msg}");
            msg
        }
        other => panic!("expected the upstream's 503 as an error status, got {other:?}"),
    };
    let head = seen.await.unwrap();
    assert!(
        head.starts_with(&format!("POST /cliservice/token/{token} HTTP/1.1\r\n")),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("authorization: basic "),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-thrift"),
        "{head}"
    );
    assert!(err.contains("answered HTTP 503"), "{err}");
    assert!(err.contains("token/****") && !err.contains(token), "{err}");
    b.shutdown().await;
}

/// A session opened through the broker on the HTTP server, and a direct
/// client to that server to observe it.
async fn session_via_broker(
    b: &Broker,
    client: Transport,
) -> (Hs2Client, TSessionHandle, Hs2Client) {
    let addr = if client == Transport::Http {
        b.http
    } else {
        b.binary
    };
    let mut via = Hs2Client::connect(&cfg(client, addr), "alice", "alice-pw")
        .await
        .unwrap();
    let h = via.open_session().await.unwrap();
    let mut direct =
        Hs2Client::connect(&cfg(Transport::Http, sts_http().await), "alice", "alice-pw")
            .await
            .unwrap();
    // the upstream knows the session: this check can fail
    assert!(session_alive(&mut direct, &h).await);
    (via, h, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_upstream_sessions_http_clients_left_open() {
    let b = start_broker(&route_toml("http", sts_http().await, "")).await;
    let (_via, h, mut direct) = session_via_broker(&b, Transport::Http).await;
    b.shutdown().await;
    assert!(
        !session_alive(&mut direct, &h).await,
        "the upstream session is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_client_leaving_without_close_session_closes_it_upstream() {
    let b = start_broker(&route_toml("http", sts_http().await, "")).await;
    let (via, h, mut direct) = session_via_broker(&b, Transport::Binary).await;
    drop(via);
    let mut closed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !session_alive(&mut direct, &h).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "the broker closes sessions a binary client abandoned"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_connections_are_reused_across_rpcs() {
    let relay = CountingRelay::start(sts_http().await).await;
    let b = start_broker(&route_toml("http", relay.addr, "")).await;
    let mut c = Hs2Client::connect(&cfg(Transport::Binary, b.binary), "alice", "alice-pw")
        .await
        .unwrap();
    let s = c.open_session().await.unwrap();
    for _ in 0..20 {
        let op = c.execute(&s, "select 1").await.unwrap();
        c.fetch(&op, 1).await.unwrap();
    }
    c.close_session(s).await.unwrap();
    // 42 POSTs; a fresh connection per request would show 42 here
    assert!(
        relay.accepted() <= 2,
        "{} upstream connections for 42 RPCs",
        relay.accepted()
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_an_http_clients_session_releases_its_upstream_connection_and_operations() {
    // only the broker's connection handling is in question: a fake answers
    let up = FakeUpstream::binary().start().await;
    let relay = CountingRelay::start(up.addr).await;
    let b = start_broker(&route_toml("binary", relay.addr, "")).await;
    let mut c = Hs2Client::connect(&cfg(Transport::Http, b.http), "alice", "alice-pw")
        .await
        .unwrap();
    let s = c.open_session().await.unwrap();
    let op = c.execute(&s, "select 1").await.unwrap();
    assert_eq!(relay.open(), 1, "one upstream connection for the session");
    c.close_session(s).await.unwrap();
    let mut released = false;
    for _ in 0..50 {
        if relay.open() == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        released,
        "the upstream connection is closed with the session"
    );
    match c.fetch(&op, 1).await {
        Err(ClientError::Status(TStatusCode::INVALID_HANDLE_STATUS, msg, state)) => {
            assert!(msg.contains("unknown or expired operation handle"), "{msg}");
            assert_eq!(state.as_deref(), Some("HY000"));
        }
        other => panic!("expected an invalid-handle status, got {other:?}"),
    }
    assert_eq!(
        up.calls(),
        ["OpenSession", "ExecuteStatement", "CloseSession"],
        "the fetch on the closed session was not relayed"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nosasl_upstream_carries_the_identity_in_open_session() {
    // broker A (NOSASL upstream) -> broker B (recognises NOSASL) -> Spark
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let a = start_broker(&route_toml("binary", b.binary, "sasl = \"nosasl\"")).await;
    for (t, addr) in [(Transport::Binary, a.binary), (Transport::Http, a.http)] {
        let mut c = Hs2Client::connect(&cfg(t, addr), "alice", "alice-pw")
            .await
            .unwrap();
        assert_eq!(current_user(&mut c).await, "alice", "client {t:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}
