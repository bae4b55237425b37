//! Connection caps, deny list, HTTP and admin header/body timeouts.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const PATH: &str = "/cliservice";

fn broker_toml(server: &str, admin: bool) -> String {
    let up = "127.0.0.1:10001".parse().unwrap();
    let admin = if admin {
        "[admin]\nbind = \"127.0.0.1:0\"\nmax_connections = 2\n"
    } else {
        ""
    };
    format!(
        "[server]\nshutdown_grace = \"5s\"\n{server}\n{admin}\n{LISTENERS}\n{}",
        route_toml("http", up, "")
    )
}

/// A request with credentials that a normal client would send; the reply
/// status line.
async fn post_status(addr: std::net::SocketAddr) -> (u16, String, String) {
    http_post(addr, PATH, &basic("alice", "alice-pw"), b"not thrift").await
}

/// Reads what the broker sends until it closes, within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .expect("the broker closes the connection in time")
        .ok();
    out
}

#[tokio::test]
async fn http_client_over_the_per_ip_cap_gets_503_naming_the_cap_and_others_are_served_after() {
    let b = start_broker_toml(&broker_toml("max_connections_per_ip = 1", false)).await;
    let held = TcpStream::connect(b.http).await.unwrap();
    // the held connection has been admitted once a second one is refused
    let (status, head, body) = post_status(b.http).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.to_lowercase().contains("retry-after"), "{head}");
    assert!(body.contains("server.max_connections_per_ip = 1"), "{body}");
    drop(held);
    // the place is given back: a normal request reaches the Thrift endpoint
    let served = async {
        loop {
            let (s, _, _) = post_status(b.http).await;
            if s != 503 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(15), served)
        .await
        .unwrap();
    assert_eq!(s, 400, "a non-Thrift body is a bad request, not a refusal");
    b.shutdown().await;
}

#[tokio::test]
async fn a_full_global_cap_refuses_at_once_instead_of_leaving_clients_in_the_backlog() {
    let b = start_broker_toml(&broker_toml("max_connections = 1", false)).await;
    let _held = TcpStream::connect(b.binary).await.unwrap();
    // on a slow machine the held connection may not be accepted yet
    let refused = async {
        loop {
            let (s, _, body) = post_status(b.http).await;
            if s == 503 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(15), refused)
        .await
        .unwrap();
    assert!(body.contains("server.max_connections = 1"), "{body}");
    b.shutdown().await;
}

#[tokio::test]
async fn a_listener_cap_refuses_on_that_listener_only() {
    let toml = broker_toml("", false).replace(
        "name = \"http\"\n",
        "name = \"http\"\nmax_connections = 1\n",
    );
    let b = start_broker_toml(&toml).await;
    let _held = TcpStream::connect(b.http).await.unwrap();
    let (s, _, body) = post_status(b.http).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("listener max_connections = 1"), "{body}");
    // the binary listener has no cap of its own
    let mut other = TcpStream::connect(b.binary).await.unwrap();
    other.write_all(&[1, 0, 0, 0, 5]).await.unwrap();
    other.write_all(b"PLAIN").await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(500), other.read(&mut buf)).await;
    assert!(
        r.is_err(),
        "the binary listener waits for the rest of the handshake"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_second_http_connection_of_a_user_at_the_per_user_cap_is_refused() {
    let b = start_broker_toml(&broker_toml("max_connections_per_user = 1", false)).await;
    // connection 1 authenticates as alice and stays open (keep-alive)
    let mut first = TcpStream::connect(b.http).await.unwrap();
    let req = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-thrift\r\nContent-Length: 3\r\n{}\r\nabc",
        basic("alice", "alice-pw")
    );
    first.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    let first_reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first_reply.starts_with("HTTP/1.1 "), "{first_reply}");
    assert!(!first_reply.starts_with("HTTP/1.1 503"), "{first_reply}");
    let (s, _, body) = post_status(b.http).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("server.max_connections_per_user = 1"),
        "{body}"
    );
    // another user is served
    let (s, _, _) = http_post(b.http, PATH, &basic("bob", "bob-pw"), b"x").await;
    assert_eq!(s, 400);
    b.shutdown().await;
}

#[tokio::test]
async fn denied_addresses_are_closed_without_an_answer_on_both_transports() {
    let b = start_broker_toml(&broker_toml("deny_clients = [\"127.0.0.1/32\"]", false)).await;
    for addr in [b.binary, b.http] {
        let out = send_and_read_all(addr, b"POST / HTTP/1.1\r\n\r\n").await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    b.shutdown().await;
}

#[tokio::test]
async fn http_slowloris_headers_are_closed_after_the_handshake_timeout() {
    let b = start_broker_toml(&broker_toml("handshake_timeout = \"1s\"", false)).await;
    let mut s = TcpStream::connect(b.http).await.unwrap();
    s.write_all(b"POST /cliservice HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..60 {
            if s.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // keeps sending and is still cut off: a deadline, not an idle timer
    tokio::time::timeout(Duration::from_secs(8), trickle)
        .await
        .ok();
    let _ = closed_within(&mut s, Duration::from_secs(5)).await;
    let (st, _, _) = post_status(b.http).await;
    assert_eq!(st, 400, "a normal client is served");
    b.shutdown().await;
}

#[tokio::test]
async fn http_body_trickle_is_answered_408_after_the_body_timeout() {
    let b = start_broker_toml(&broker_toml("http_body_timeout = \"1s\"", false)).await;
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-thrift\r\nContent-Length: 1000\r\n{}\r\n",
        basic("alice", "alice-pw")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let out = closed_within(&mut s, Duration::from_secs(10)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("request body not received within 1s"), "{out}");
    let (st, _, _) = post_status(b.http).await;
    assert_eq!(st, 400, "a normal client is served");
    b.shutdown().await;
}

#[tokio::test]
async fn an_unauthenticated_huge_post_is_refused_without_reading_its_body() {
    // no credentials at all: refused 401 from the headers alone
    let toml = broker_toml("", false);
    let b = start_broker_toml(&toml).await;
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-thrift\r\nContent-Length: {}\r\n\r\n",
        100 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // send until the broker stops taking bytes; it answers without reading
    let chunk = vec![0u8; 64 * 1024];
    let mut sent = 0usize;
    let pushing = async {
        while sent < 100 << 20 {
            match s.write(&chunk).await {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), pushing).await;
    assert!(
        sent < 32 << 20,
        "the broker read {sent} bytes of an unauthenticated body"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn admin_slowloris_is_refused_and_cut_off_while_metrics_answers_a_scraper() {
    let toml = broker_toml("handshake_timeout = \"2s\"", true);
    let b = start_broker_toml(&toml).await;
    let admin = b.addrs["admin"];
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHo").await.unwrap();
        slow.push(s);
    }
    // refused with a reason, or served once the slow ones are cut off
    let scrape = async {
        loop {
            let (st, body) = admin_get(admin, "/metrics").await;
            if st == 200 {
                return body;
            }
            assert_eq!(st, 503, "{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(15), scrape)
        .await
        .unwrap();
    let refused = series(&body, "kyuubi_broker_connections_refused_total");
    assert!(
        refused.keys().any(|k| k.contains("admin")),
        "refusals are counted: {refused:?}"
    );
    for s in &mut slow {
        closed_within(s, Duration::from_secs(10)).await;
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_clients_over_a_cap_are_told_which_cap_in_their_own_protocol() {
    use kyuubi_broker::client::Hs2Client;
    use kyuubi_broker::config::{Transport, UpstreamSasl};
    let route = route_toml("binary", sts_binary().await, "");
    // per IP: a SASL PLAIN client hears SASL BAD naming the key
    let b = start_broker_with(&route, "max_connections_per_ip = 1").await;
    let held = TcpStream::connect(b.binary).await.unwrap();
    let refused = current_user(b.binary, Transport::Binary, "carol", "pw").await;
    let text = format!("{refused:?}");
    assert!(text.contains("server.max_connections_per_ip = 1"), "{text}");
    // a NOSASL client hears it as the reply to its OpenSession
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Nosasl);
    let text = match Hs2Client::connect(&cfg, "carol", "pw").await {
        Ok(mut c) => format!("{:?}", c.open_session().await),
        Err(e) => format!("{e:?}"),
    };
    assert!(text.contains("server.max_connections_per_ip = 1"), "{text}");
    drop(held);
    b.shutdown().await;
    // per user: a second connection of one user is refused, others served
    let b = start_broker_with(&route, "max_connections_per_user = 1").await;
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain);
    let mut first = Hs2Client::connect(&cfg, "carol", "pw").await.unwrap();
    let s = first.open_session().await.unwrap();
    let second = current_user(b.binary, Transport::Binary, "carol", "pw").await;
    let text = format!("{second:?}");
    assert!(
        text.contains("server.max_connections_per_user = 1"),
        "{text}"
    );
    assert_eq!(
        current_user(b.binary, Transport::Binary, "dave", "pw")
            .await
            .unwrap(),
        "dave"
    );
    first.get_info(&s).await.unwrap();
    b.shutdown().await;
}
