//! Before login: oversized and NUL-flooded SASL messages, handshake-phase size caps, malformed PLAIN.

use std::time::Duration;

use crate::common::*;
use kyuubi_broker::config::Transport;
use kyuubi_broker::wire::sasl;
use kyuubi_broker::wire::thrift::{message_len, peek_header, ttype, MessageType, Writer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes: then `None`).
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A bare (NOSASL) OpenSession as `user` / `password`.
pub fn nosasl_open_session(user: &str, password: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("OpenSession", MessageType::Call, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::I32, 1);
    w.i32(9);
    w.field(ttype::STRING, 2);
    w.string(user);
    w.field(ttype::STRING, 3);
    w.string(password);
    w.stop();
    w.stop();
    w.buf
}

/// A normal SASL PLAIN client is logged in and served.
pub async fn normal_client_served(b: &Broker) {
    let user = current_user(b.binary, Transport::Binary, "carol", "pw").await;
    assert_eq!(user.unwrap(), "carol", "a normal client is still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_nul_flood_plain_response_is_refused_at_its_header() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let rss_before = rss_kib();
    let mut s = TcpStream::connect(b.binary).await.unwrap();
    s.write_all(&sasl::encode(sasl::Status::Start, b"PLAIN"))
        .await
        .unwrap();
    let len: u32 = 64 << 20;
    let mut head = vec![sasl::Status::Ok as u8];
    head.extend_from_slice(&len.to_be_bytes());
    s.write_all(&head).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // the flood itself, as far as the broker lets it in
    let flood = tokio::spawn(async move {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            if wr.write_all(&zeros).await.is_err() {
                break;
            }
        }
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut reply)).await;
    flood.abort();
    assert!(
        matches!(reply.first(), Some(3) | Some(4)),
        "SASL BAD or ERROR: {reply:?}"
    );
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("exceeds the limit of 65536 bytes"), "{text}");
    assert!(
        rss_kib() < rss_before + 32 * 1024,
        "the broker buffered the flood: {} -> {} KiB",
        rss_before,
        rss_kib()
    );
    normal_client_served(&b).await;
    b.shutdown().await;
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nosasl_open_session_trickled_one_byte_at_a_time_is_served() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let mut s = TcpStream::connect(b.binary).await.unwrap();
    s.set_nodelay(true).unwrap();
    for byte in nosasl_open_session("carol", "pw") {
        s.write_all(&[byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let n = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("an OpenSession reply")
            .unwrap();
        assert!(n > 0, "closed before the reply");
        got.extend_from_slice(&buf[..n]);
        if let Ok(n) = message_len(&got) {
            break n;
        }
    };
    let h = peek_header(&got[..n]).unwrap();
    assert_eq!((h.name, h.kind), ("OpenSession", MessageType::Reply));
    normal_client_served(&b).await;
    b.shutdown().await;
}
