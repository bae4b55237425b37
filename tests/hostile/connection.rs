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

// ---- after login: idle and slow-reader connections ------------------------

use kyuubi_broker::tcli::reply_session_handle;
use kyuubi_broker::wire::io::{FrameError, Framing, MessageIo};
use kyuubi_broker::wire::sasl;
use kyuubi_broker::wire::thrift::peek_header;

/// A normal client logs in through the broker and opens a session on the
/// fake upstream.
async fn fake_client_served(b: &Broker) {
    use kyuubi_broker::config::{Transport, UpstreamSasl};
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain);
    let mut c = kyuubi_broker::client::Hs2Client::connect(&cfg, "dave", "pw")
        .await
        .expect("a normal client logs in");
    c.open_session().await.expect("and opens a session");
}

const WITH_ADMIN: &str = "\n[admin]\nbind = \"127.0.0.1:0\"";

/// A SASL PLAIN login and an OpenSession on a raw connection: the
/// connection, and the session handle's (guid, secret).
async fn raw_session(addr: std::net::SocketAddr) -> (MessageIo, Vec<u8>, Vec<u8>) {
    let pw = kyuubi_broker::secret::Secret::new("pw");
    let mut io = MessageIo::new(TcpStream::connect(addr).await.unwrap(), 1 << 30);
    io.write_raw(&sasl::plain_client_hello("carol", &pw))
        .await
        .unwrap();
    let done = io.read_sasl().await.unwrap();
    assert_eq!(done.status, sasl::Status::Complete);
    io.write_message(Framing::Sasl, &nosasl_open_session("carol", "pw"))
        .await
        .unwrap();
    let reply = io.read_message(Framing::Sasl).await.unwrap();
    let h = peek_header(&reply).unwrap();
    let (guid, secret) = reply_session_handle(&reply, &h)
        .unwrap()
        .expect("a session");
    (io, guid.to_vec(), secret)
}

fn get_info(guid: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("GetInfo", MessageType::Call, 2);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRING, 1);
    w.binary(guid);
    w.field(ttype::STRING, 2);
    w.binary(secret);
    w.stop();
    w.stop();
    w.field(ttype::I32, 2);
    w.i32(2);
    w.stop();
    w.stop();
    w.buf
}

/// Polls the broker's /metrics until `series{reason}` reaches `n`.
async fn timed_out_count(b: &Broker, reason: &str, n: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let m = admin_get(b.addrs["admin"], "/metrics").await.1;
        let got = series(&m, "kyuubi_broker_connections_timed_out_total")
            .iter()
            .filter(|(k, _)| k.contains(&format!("reason=\"{reason}\"")))
            .map(|(_, v)| *v)
            .sum::<f64>() as u64;
        if got >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_in_connection_that_sends_nothing_is_closed_at_client_idle_timeout() {
    let up = FakeUpstream::binary().start().await;
    let server = format!("client_idle_timeout = \"1s\"{WITH_ADMIN}");
    let b = start_broker_with(&route_toml("binary", up.addr, ""), &server).await;
    let (mut io, _, _) = raw_session(b.binary).await;
    let t0 = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), io.read_message(Framing::Sasl)).await;
    let took = t0.elapsed();
    assert!(
        matches!(got, Ok(Err(FrameError::Eof))),
        "an idle logged-in connection must be closed without a reply: {got:?}"
    );
    assert!(took >= Duration::from_millis(900), "closed early: {took:?}");
    assert_eq!(
        timed_out_count(&b, "idle", 1, Duration::from_secs(5)).await,
        1
    );
    // its session went with it (a binary upstream ends the sessions of a
    // connection that closes)
    let m = admin_get(b.addrs["admin"], "/metrics").await.1;
    let open = series(&m, "kyuubi_broker_sessions");
    assert_eq!(open.values().sum::<f64>() as u64, 0, "{open:?}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_slower_than_the_idle_timeout_still_reaches_its_client() {
    // a long synchronous query: the client waits on the broker, not idle
    let up = FakeUpstream::binary()
        .on_call(|c| match c.method.as_str() {
            "GetInfo" => Reply::AnswerAfter(Duration::from_millis(2500)),
            _ => Reply::Answer,
        })
        .start()
        .await;
    let server = format!("client_idle_timeout = \"1s\"{WITH_ADMIN}");
    let b = start_broker_with(&route_toml("binary", up.addr, ""), &server).await;
    let (mut io, guid, secret) = raw_session(b.binary).await;
    io.write_message(Framing::Sasl, &get_info(&guid, &secret))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(15), io.read_message(Framing::Sasl))
        .await
        .expect("a reply within 15 s")
        .expect("the reply, not a closed connection");
    assert_eq!(peek_header(&reply).unwrap().name, "GetInfo");
    assert_eq!(timed_out_count(&b, "idle", 0, Duration::ZERO).await, 0);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_big_reply_is_closed_at_client_write_timeout() {
    // 48 MiB: more than loopback's socket buffers on both sides can hold
    let big = {
        let mut w = Writer::default();
        w.message_begin("GetInfo", MessageType::Reply, 2);
        w.field(ttype::STRUCT, 0);
        w.field(ttype::STRING, 99);
        w.binary(&vec![b'x'; 48 << 20]);
        w.stop();
        w.stop();
        w.buf
    };
    let up = FakeUpstream::binary()
        .on_call(move |c| match c.method.as_str() {
            "GetInfo" => Reply::Message(big.clone()),
            _ => Reply::Answer,
        })
        .start()
        .await;
    let server = format!("client_write_timeout = \"1s\"{WITH_ADMIN}");
    let b = start_broker_with(&route_toml("binary", up.addr, ""), &server).await;
    let (mut io, guid, secret) = raw_session(b.binary).await;
    io.write_message(Framing::Sasl, &get_info(&guid, &secret))
        .await
        .unwrap();
    // ... and never read
    let n = timed_out_count(&b, "write", 1, Duration::from_secs(20)).await;
    assert_eq!(n, 1, "the stalled reader's connection was not closed");
    fake_client_served(&b).await;
    drop(io);
    b.shutdown().await;
}
