//! Binary connections after the handshake: NOSASL deadline, trickled bare messages, idle and slow-reader connections.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::prelogin::{normal_client_served, nosasl_open_session, read_to_close};
use kyuubi_broker::wire::thrift::{ttype, MessageType, Writer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SHORT_HANDSHAKE: &str = "handshake_timeout = \"1s\"\nmax_connections = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nosasl_client_stalling_in_its_open_session_is_closed_and_frees_its_slot() {
    let b = start_broker_with(
        &route_toml("binary", sts_binary().await, ""),
        SHORT_HANDSHAKE,
    )
    .await;
    let open = nosasl_open_session("carol", "pw");
    let mut stalled = TcpStream::connect(b.binary).await.unwrap();
    stalled.write_all(&open[..open.len() / 2]).await.unwrap();
    let t0 = Instant::now();
    let got = read_to_close(&mut stalled, Duration::from_secs(10)).await;
    assert!(
        got.is_some(),
        "still open after 10 s (handshake_timeout = 1s)"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // with max_connections = 2, both slots are free again
    normal_client_served(&b).await;
    normal_client_served(&b).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nosasl_client_whose_first_message_is_not_open_session_is_refused_and_closed() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let mut w = Writer::default();
    w.message_begin("GetInfo", MessageType::Call, 5);
    w.field(ttype::STRUCT, 1);
    w.stop();
    w.stop();
    let mut s = TcpStream::connect(b.binary).await.unwrap();
    s.write_all(&w.buf).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10))
        .await
        .expect("closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("before OpenSession"), "{text}");
    normal_client_served(&b).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_nosasl_login_closes_the_connection() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let mut s = TcpStream::connect(b.binary).await.unwrap();
    // an empty user name is refused even where any name is accepted
    s.write_all(&nosasl_open_session("", "pw")).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10))
        .await
        .expect("the connection is closed after the refusal");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("authentication failed"),
        "refusal written first: {text}"
    );
    normal_client_served(&b).await;
    b.shutdown().await;
}
