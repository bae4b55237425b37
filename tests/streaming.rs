//! Big replies from an HTTP upstream reach a binary client as they arrive,
//! not after the broker has read them whole: proved with a small fake HTTP
//! upstream that sends the first part of a FetchResults reply and then
//! stalls (or hangs up). The real-server side of the same path is the
//! 1M-row fetch of `tests/bridges.rs` (binary client, HTTP upstream).

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
    let values: Vec<String> = (0..ROWS).map(|i| format!("row-{i:08}")).collect();
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

/// The reply the fake sends for a call.
fn reply(call: &[u8]) -> Vec<u8> {
    let h = peek_header(call).unwrap();
    let op = TOperationHandle::new(handle_id(2), TOperationType::EXECUTE_STATEMENT, true, None);
    match h.name {
        "OpenSession" => message(
            "OpenSession",
            TMessageType::Reply,
            h.seqid,
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
            h.seqid,
            0,
            &TExecuteStatementResp::new(ok(), Some(op)),
        ),
        "FetchResults" => message("FetchResults", TMessageType::Reply, h.seqid, 0, &big_page()),
        other => message(
            other,
            TMessageType::Reply,
            h.seqid,
            0,
            &TCloseOperationResp::new(ok()),
        ),
    }
}

/// After the first 256 KiB of a FetchResults body: wait for `release`, or
/// (with `cut`) hang up.
async fn fake_http_upstream(release: Arc<Notify>, cut: bool) -> SocketAddr {
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
                    let out = reply(&body);
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
        let mut p = TBinaryInputProtocol::new(&msg[..], true);
        p.read_message_begin().unwrap();
        p.read_struct_begin().unwrap();
        assert_eq!(p.read_field_begin().unwrap().id, Some(0));
        T::read_from_in_protocol(&mut p).unwrap()
    }

    /// Opens a session and a statement, and asks for its rows.
    async fn ask_for_rows(&mut self) {
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
            &TFetchResultsReq::new(op, TFetchOrientation::FETCH_NEXT, ROWS as i64, None),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_reply_from_an_http_upstream_reaches_a_binary_client_before_the_upstream_finishes() {
    let release = Arc::new(Notify::new());
    let up = fake_http_upstream(release.clone(), false).await;
    let b = start_broker(&route_toml("http", up, "")).await;
    let mut c = Raw::connect(b.binary).await;
    c.ask_for_rows().await;
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
    let mut p = TBinaryInputProtocol::new(&msg[..], true);
    p.read_message_begin().unwrap();
    p.read_struct_begin().unwrap();
    p.read_field_begin().unwrap();
    let page = TFetchResultsResp::read_from_in_protocol(&mut p).unwrap();
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
        c.ask_for_rows().await;
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
