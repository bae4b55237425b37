//! Big replies reach the client as they arrive, not after the broker has
//! read them whole, on every bridge: proved with small fake upstreams (HTTP,
//! and binary from `common`) that send the first part of a FetchResults
//! reply and then stall, hang up, or meet a client that stops reading. The
//! real-server side of the same paths is the 1M-row fetch of
//! `tests/bridges.rs` on all four bridges.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kyuubi_broker::secret::Secret;
use kyuubi_broker::tcli::gen::*;
use kyuubi_broker::wire::sasl;
use kyuubi_broker::wire::thrift::peek_header;
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TFieldIdentifier, TInputProtocol,
    TMessageIdentifier, TMessageType, TOutputProtocol, TSerializable, TStructIdentifier, TType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const ROWS: usize = 60_000;
/// A reply bigger than what loopback socket buffers hold (about 8 MB).
const HUGE: usize = 500_000;
const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

fn message<T: TSerializable>(
    name: &str,
    kind: TMessageType,
    seqid: i32,
    field: i16,
    v: &T,
) -> Vec<u8> {
    let mut buf = Vec::new();
    {
        let mut p = TBinaryOutputProtocol::new(&mut buf, true);
        p.write_message_begin(&TMessageIdentifier::new(name, kind, seqid))
            .unwrap();
        p.write_struct_begin(&TStructIdentifier::new("x")).unwrap();
        p.write_field_begin(&TFieldIdentifier::new("f", TType::Struct, field))
            .unwrap();
        v.write_to_out_protocol(&mut p).unwrap();
        p.write_field_end().unwrap();
        p.write_field_stop().unwrap();
        p.write_struct_end().unwrap();
    }
    buf
}

fn ok() -> TStatus {
    TStatus::new(TStatusCode::SUCCESS_STATUS, None, None, None, None)
}

fn handle_id(b: u8) -> THandleIdentifier {
    THandleIdentifier::new(vec![b; 16], vec![b; 16])
}

fn big_page() -> TFetchResultsResp {
    page_of(ROWS)
}

fn page_of(rows: usize) -> TFetchResultsResp {
    let values: Vec<String> = (0..rows).map(|i| format!("row-{i:08}")).collect();
    TFetchResultsResp::new(
        ok(),
        Some(false),
        Some(TRowSet::new(
            0,
            vec![],
            Some(vec![TColumn::StringVal(TStringColumn::new(
                values,
                vec![0],
            ))]),
            None,
            None,
        )),
    )
}

/// The reply the fake sends for a call, with pages of `rows` rows.
fn reply_of(call: &[u8], rows: usize) -> Vec<u8> {
    let h = peek_header(call).unwrap();
    answer(h.name, h.seqid, rows)
}

fn answer(name: &str, seqid: i32, rows: usize) -> Vec<u8> {
    let op = TOperationHandle::new(handle_id(2), TOperationType::EXECUTE_STATEMENT, true, None);
    match name {
        "OpenSession" => message(
            "OpenSession",
            TMessageType::Reply,
            seqid,
            0,
            &TOpenSessionResp::new(
                ok(),
                TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
                Some(TSessionHandle::new(handle_id(1))),
                None,
            ),
        ),
        "ExecuteStatement" => message(
            "ExecuteStatement",
            TMessageType::Reply,
            seqid,
            0,
            &TExecuteStatementResp::new(ok(), Some(op)),
        ),
        "FetchResults" => message(
            "FetchResults",
            TMessageType::Reply,
            seqid,
            0,
            &page_of(rows),
        ),
        other => message(
            other,
            TMessageType::Reply,
            seqid,
            0,
            &TCloseOperationResp::new(ok()),
        ),
    }
}

/// After the first 256 KiB of a FetchResults body: wait for `release`, or
/// (with `cut`) hang up.
async fn fake_http_upstream(release: Arc<Notify>, cut: bool) -> SocketAddr {
    fake_http_upstream_of(release, cut, ROWS).await
}

/// As [`fake_http_upstream`], with FetchResults pages of `rows` rows.
async fn fake_http_upstream_of(release: Arc<Notify>, cut: bool, rows: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // one request: headers, then Content-Length bytes
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + len).skip(end).collect();
                    let out = reply_of(&body, rows);
                    let big = peek_header(&body).unwrap().name == "FetchResults";
                    let mut resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-thrift\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    let split = if big { 256 * 1024 } else { out.len() };
                    resp.extend_from_slice(format!("{:x}\r\n", split).as_bytes());
                    resp.extend_from_slice(&out[..split]);
                    resp.extend_from_slice(b"\r\n");
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                    if big {
                        if cut {
                            return; // hangs up mid-body
                        }
                        release.notified().await;
                        let rest = &out[split..];
                        let mut tail = format!("{:x}\r\n", rest.len()).into_bytes();
                        tail.extend_from_slice(rest);
                        tail.extend_from_slice(b"\r\n");
                        if s.write_all(&tail).await.is_err() {
                            return;
                        }
                    }
                    if s.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A hand-written client on either transport: one Thrift call out, one
/// reply in.
trait Peer {
    async fn send<T: TSerializable>(&mut self, method: &str, req: &T);
    async fn reply<T: TSerializable>(&mut self) -> T;

    /// Opens a session and a statement, and asks for `rows` of its rows.
    async fn ask_for_rows(&mut self, rows: usize) {
        self.send(
            "OpenSession",
            &TOpenSessionReq::new(
                TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
                None,
                None,
                None,
            ),
        )
        .await;
        let open: TOpenSessionResp = self.reply().await;
        let session = open.session_handle.unwrap();
        self.send(
            "ExecuteStatement",
            &TExecuteStatementReq::new(session, "select big".to_string(), None, None, None),
        )
        .await;
        let ex: TExecuteStatementResp = self.reply().await;
        let op = ex.operation_handle.unwrap();
        self.send(
            "FetchResults",
            &TFetchResultsReq::new(op, TFetchOrientation::FETCH_NEXT, rows as i64, None),
        )
        .await;
    }
}

/// A SASL PLAIN client speaking frames by hand, to see bytes as they come.
struct Raw {
    s: TcpStream,
    seqid: i32,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&sasl::plain_client_hello("carol", &Secret::new("pw")))
            .await
            .unwrap();
        let mut done = [0u8; 5];
        s.read_exact(&mut done).await.unwrap();
        assert_eq!(done.to_vec(), sasl::encode(sasl::Status::Complete, b""));
        Raw { s, seqid: 0 }
    }
}

impl Peer for Raw {
    async fn send<T: TSerializable>(&mut self, method: &str, req: &T) {
        self.seqid += 1;
        let msg = message(method, TMessageType::Call, self.seqid, 1, req);
        let mut frame = (msg.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&msg);
        self.s.write_all(&frame).await.unwrap();
    }

    /// Frames until they hold one whole message (a reply may span frames).
    async fn reply<T: TSerializable>(&mut self) -> T {
        let mut msg = Vec::new();
        loop {
            let mut len = [0u8; 4];
            self.s.read_exact(&mut len).await.unwrap();
            let mut part = vec![0u8; u32::from_be_bytes(len) as usize];
            self.s.read_exact(&mut part).await.unwrap();
            msg.extend_from_slice(&part);
            if kyuubi_broker::wire::thrift::message_len(&msg).is_ok() {
                break;
            }
        }
        decode(&msg)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_reply_from_an_http_upstream_reaches_a_binary_client_before_the_upstream_finishes() {
    let release = Arc::new(Notify::new());
    let up = fake_http_upstream(release.clone(), false).await;
    let b = start_broker(&route_toml("http", up, "")).await;
    let mut c = Raw::connect(b.binary).await;
    c.ask_for_rows(ROWS).await;
    // the upstream has sent 256 KiB and waits: the client must already have
    // some of it (a broker that buffers the reply would send nothing yet)
    let mut first = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(20), c.s.read_exact(&mut first))
        .await
        .expect("the first 64 KiB arrived while the upstream was still sending")
        .unwrap();
    release.notify_one();
    // the rest, and the whole message decodes to every row
    let mut msg = Vec::new();
    let mut stream = first.clone();
    loop {
        while stream.len() < 4 {
            let mut b = [0u8; 65536];
            let n = c.s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early");
            stream.extend_from_slice(&b[..n]);
        }
        let len = u32::from_be_bytes(stream[..4].try_into().unwrap()) as usize;
        while stream.len() < 4 + len {
            let mut b = [0u8; 65536];
            let n = c.s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early");
            stream.extend_from_slice(&b[..n]);
        }
        msg.extend_from_slice(&stream[4..4 + len]);
        stream = stream.split_off(4 + len);
        if kyuubi_broker::wire::thrift::message_len(&msg).is_ok() {
            break;
        }
    }
    assert!(stream.is_empty(), "nothing after the reply");
    let page: TFetchResultsResp = decode(&msg);
    assert_eq!(page, big_page());
    // the same connection goes on: the stream is in step
    c.send(
        "CloseOperation",
        &TCloseOperationReq::new(TOperationHandle::new(
            handle_id(2),
            TOperationType::EXECUTE_STATEMENT,
            true,
            None,
        )),
    )
    .await;
    let closed: TCloseOperationResp = c.reply().await;
    assert_eq!(closed.status.status_code, TStatusCode::SUCCESS_STATUS);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_cut_mid_reply_closes_that_client_only() {
    let up = fake_http_upstream(Arc::new(Notify::new()), true).await;
    let b = start_broker(&route_toml("http", up, "")).await;
    for _ in 0..2 {
        let mut c = Raw::connect(b.binary).await;
        c.ask_for_rows(ROWS).await;
        // part of the reply, then the connection ends: never a whole reply
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), c.s.read_to_end(&mut got))
            .await
            .expect("the broker closes the client's connection");
        assert!(closed.is_ok());
        assert!(
            got.len() >= 64 * 1024,
            "the part that came was relayed: {}",
            got.len()
        );
        assert!(
            kyuubi_broker::wire::thrift::message_len(&got[4..]).is_err(),
            "not a whole message"
        );
    }
    b.shutdown().await;
}

/// An HTTP/1.1 client speaking Thrift over HTTP by hand on one keep-alive
/// connection, to see a response's bytes as they come.
struct RawHttp {
    s: TcpStream,
    seqid: i32,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl RawHttp {
    async fn connect(addr: SocketAddr) -> RawHttp {
        RawHttp::on(TcpStream::connect(addr).await.unwrap())
    }

    fn on(s: TcpStream) -> RawHttp {
        RawHttp {
            s,
            seqid: 0,
            buf: Vec::new(),
        }
    }

    /// More bytes into `buf`; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut b = vec![0u8; 65536];
        match self.s.read(&mut b).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// A response's status line and headers, lower-cased.
    async fn head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                self.buf.drain(..i + 4);
                return head;
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        }
    }

    /// The body after `head`: by Content-Length or chunked; `None` when the
    /// connection ended first.
    async fn body(&mut self, head: &str) -> Option<Vec<u8>> {
        if let Some(len) = header(head, "content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if !self.fill().await {
                    return None;
                }
            }
            return Some(self.buf.drain(..len).collect());
        }
        assert_eq!(header(head, "transfer-encoding"), Some("chunked"));
        let mut body = Vec::new();
        loop {
            let line = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if !self.fill().await {
                    return None;
                }
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.buf[..line]).unwrap(), 16).unwrap();
            while self.buf.len() < line + 2 + size + 2 {
                if !self.fill().await {
                    return None;
                }
            }
            body.extend_from_slice(&self.buf[line + 2..line + 2 + size]);
            self.buf.drain(..line + 2 + size + 2);
            if size == 0 {
                return Some(body);
            }
        }
    }
}

impl Peer for RawHttp {
    async fn send<T: TSerializable>(&mut self, method: &str, req: &T) {
        self.seqid += 1;
        let msg = message(method, TMessageType::Call, self.seqid, 1, req);
        // carol:pw
        let mut r = format!(
            "POST /cliservice HTTP/1.1\r\nhost: broker\r\nauthorization: Basic Y2Fyb2w6cHc=\r\n\
             content-type: application/x-thrift\r\ncontent-length: {}\r\n\r\n",
            msg.len()
        )
        .into_bytes();
        r.extend_from_slice(&msg);
        self.s.write_all(&r).await.unwrap();
    }

    async fn reply<T: TSerializable>(&mut self) -> T {
        let head = self.head().await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let body = self.body(&head).await.expect("a whole body");
        decode(&body)
    }
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

fn decode<T: TSerializable>(msg: &[u8]) -> T {
    let mut p = TBinaryInputProtocol::new(msg, true);
    p.read_message_begin().unwrap();
    p.read_struct_begin().unwrap();
    assert_eq!(p.read_field_begin().unwrap().id, Some(0));
    T::read_from_in_protocol(&mut p).unwrap()
}

fn op_handle() -> TOperationHandle {
    TOperationHandle::new(handle_id(2), TOperationType::EXECUTE_STATEMENT, true, None)
}

async fn metrics_of(b: &Broker) -> String {
    admin_get(b.addrs["admin"], "/metrics").await.1
}

fn fetches(metrics: &str, outcome: &str) -> u64 {
    series(metrics, "kyuubi_broker_rpc_duration_seconds_count")
        .iter()
        .filter(|(l, _)| {
            l.contains("method=\"FetchResults\"")
                && l.contains("client_transport=\"http\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

async fn broker_with_admin(route: &str, server: &str) -> Broker {
    let toml =
        format!("[server]\nshutdown_grace = \"10s\"\n{server}\n{ADMIN}{LISTENERS}\n{route}\n");
    start_broker_toml(&toml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_reply_from_an_http_upstream_reaches_an_http_client_before_the_upstream_finishes() {
    let release = Arc::new(Notify::new());
    let up = fake_http_upstream(release.clone(), false).await;
    let b = broker_with_admin(&route_toml("http", up, ""), "").await;
    let mut c = RawHttp::connect(b.http).await;
    c.ask_for_rows(ROWS).await;
    // the upstream gave no length: the response is chunked, and its head and
    // first 64 KiB arrive while the upstream still holds the rest back
    let got_head = tokio::time::timeout(Duration::from_secs(20), async {
        let head = c.head().await;
        while c.buf.len() < 64 * 1024 {
            assert!(c.fill().await, "closed early");
        }
        head
    })
    .await
    .expect("the first 64 KiB arrived while the upstream was still sending");
    assert!(got_head.starts_with("http/1.1 200"), "{got_head}");
    assert_eq!(header(&got_head, "transfer-encoding"), Some("chunked"));
    assert_eq!(
        fetches(&metrics_of(&b).await, "ok"),
        0,
        "the exchange ends with the body, not with its head"
    );
    release.notify_one();
    let body = c.body(&got_head).await.expect("the whole body");
    let page: TFetchResultsResp = decode(&body);
    assert_eq!(page, big_page());
    // the same connection goes on: the response ended where it should
    c.send("CloseOperation", &TCloseOperationReq::new(op_handle()))
        .await;
    let closed: TCloseOperationResp = c.reply().await;
    assert_eq!(closed.status.status_code, TStatusCode::SUCCESS_STATUS);
    let m = metrics_of(&b).await;
    assert_eq!(fetches(&m, "ok"), 1, "counted once, when the body ended");
    let sizes = series(&m, "kyuubi_broker_rpc_response_size_bytes_sum");
    let fetched: f64 = sizes
        .iter()
        .filter(|(l, _)| l.contains("method=\"FetchResults\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        fetched as usize,
        body.len(),
        "the size counted is what was sent"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upstream_cut_mid_reply_breaks_that_http_response_only() {
    // the reply's frame says its whole length; 256 KiB of it come, then the
    // upstream hangs up
    let whole = message("FetchResults", TMessageType::Reply, 0, 0, &big_page());
    let up = FakeUpstream::binary()
        .on_call(move |c| match c.method.as_str() {
            "FetchResults" => {
                let mut w = whole.clone();
                // the seqid the client sent: bytes 4..8 after the name
                let name_end = 8 + "FetchResults".len();
                w[name_end..name_end + 4].copy_from_slice(&c.seqid.to_be_bytes());
                let mut raw = (w.len() as u32).to_be_bytes().to_vec();
                raw.extend_from_slice(&w[..256 * 1024]);
                Reply::RawThenHangUp(raw)
            }
            _ => Reply::Answer,
        })
        .start()
        .await;
    let b = broker_with_admin(&route_toml("binary", up.addr, ""), "").await;
    let mut c = RawHttp::connect(b.http).await;
    c.ask_for_rows(ROWS).await;
    let head = tokio::time::timeout(Duration::from_secs(20), c.head())
        .await
        .expect("a response head");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // a binary upstream's frame gives the length: Content-Length, not chunked
    let full = message("FetchResults", TMessageType::Reply, 0, 0, &big_page()).len();
    assert_eq!(
        header(&head, "content-length"),
        Some(full.to_string().as_str())
    );
    let body = tokio::time::timeout(Duration::from_secs(20), c.body(&head))
        .await
        .expect("the broker ends the response");
    assert!(
        body.is_none(),
        "the body stops short: never a shorter good reply"
    );
    assert!(c.buf.len() >= 64 * 1024, "the part that came was passed on");
    let m = metrics_of(&b).await;
    assert_eq!(fetches(&m, "relay_broken"), 1, "{m}");
    // everyone else goes on: a new connection opens a session
    let mut other = RawHttp::connect(b.http).await;
    other
        .send(
            "OpenSession",
            &TOpenSessionReq::new(
                TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
                None,
                None,
                None,
            ),
        )
        .await;
    let open: TOpenSessionResp = other.reply().await;
    assert_eq!(open.status.status_code, TStatusCode::SUCCESS_STATUS);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_stops_reading_a_streamed_reply_is_closed_after_the_write_timeout() {
    let release = Arc::new(Notify::new());
    release.notify_one(); // the upstream sends all of it at once
    let up = fake_http_upstream_of(release, false, HUGE).await;
    let b = broker_with_admin(&route_toml("http", up, ""), "client_write_timeout = \"1s\"").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut c = RawHttp::on(sock.connect(b.http).await.unwrap());
    c.ask_for_rows(HUGE).await;
    // the client reads nothing more; the broker gives up on it
    let timed_out = |m: &str| {
        series(m, "kyuubi_broker_connections_timed_out_total")
            .iter()
            .filter(|(l, _)| l.contains("listener=\"http\"") && l.contains("reason=\"write\""))
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics_of(&b).await;
        if timed_out(&m) >= 1.0 {
            assert_eq!(fetches(&m, "client_closed"), 1, "{m}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write timeout within 30 s: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // what did arrive is not a whole reply, and the connection is closed
    let head = c.head().await;
    assert!(c.body(&head).await.is_none(), "the body stops short");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_replies_from_a_binary_upstream_stream_to_an_http_client_with_their_length_and_the_link_goes_on(
) {
    let up = FakeUpstream::binary()
        // the same answers as the HTTP fake's, framed
        .on_call(|c| Reply::Message(answer(&c.method, c.seqid, ROWS)))
        .start()
        .await;
    let b = broker_with_admin(&route_toml("binary", up.addr, ""), "").await;
    let mut c = RawHttp::connect(b.http).await;
    c.ask_for_rows(ROWS).await;
    for round in 0..3 {
        if round > 0 {
            c.send(
                "FetchResults",
                &TFetchResultsReq::new(
                    op_handle(),
                    TFetchOrientation::FETCH_NEXT,
                    ROWS as i64,
                    None,
                ),
            )
            .await;
        }
        let head = c.head().await;
        let full = message("FetchResults", TMessageType::Reply, 0, 0, &big_page()).len();
        assert_eq!(
            header(&head, "content-length"),
            Some(full.to_string().as_str())
        );
        let body = c.body(&head).await.expect("the whole body");
        let page: TFetchResultsResp = decode(&body);
        assert_eq!(page, big_page(), "round {round}");
    }
    // the upstream link was whole after each reply: one upstream connection
    let m = metrics_of(&b).await;
    assert_eq!(fetches(&m, "ok"), 3, "{m}");
    assert_eq!(
        fetches(&m, "client_closed") + fetches(&m, "closed"),
        0,
        "{m}"
    );
    b.shutdown().await;
}
