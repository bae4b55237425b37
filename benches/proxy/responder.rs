//! A minimal HiveServer2 responder for the benchmark: it answers at once, so
//! whatever sits between it and the client shows its own cost. Binary (SASL
//! PLAIN accepted for anyone), optionally over TLS, and HTTP (any path, no
//! auth). A measurement fixture only; never part of the product.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kyuubi_broker::tcli::gen::*;
use kyuubi_broker::tls::server::ServerTls;
use kyuubi_broker::wire::io::{Framing, MessageIo};
use kyuubi_broker::wire::sasl::Status;
use kyuubi_broker::wire::stream::Stream;
use kyuubi_broker::wire::thrift::peek_header;
use thrift::protocol::{
    TBinaryOutputProtocol, TFieldIdentifier, TMessageIdentifier, TMessageType, TOutputProtocol,
    TSerializable, TStructIdentifier, TType,
};
use tokio::net::TcpListener;

/// Rows per FetchResults batch of the large result.
pub const BATCH: usize = 10_000;

pub struct Responder {
    /// Operation → batches of the large result still to send.
    big: Mutex<HashMap<Vec<u8>, usize>>,
    next: AtomicU64,
    /// A FetchResults body of BATCH rows × (bigint, string), encoded once.
    batch_body: Vec<u8>,
    total_rows: usize,
}

fn ok() -> TStatus {
    TStatus {
        status_code: TStatusCode::SUCCESS_STATUS,
        info_messages: None,
        sql_state: None,
        error_code: None,
        error_message: None,
    }
}

/// `<method>_result { 0: resp }` as a Thrift REPLY body (without the header).
fn body<T: TSerializable>(resp: &T) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut p = TBinaryOutputProtocol::new(&mut out, true);
        p.write_struct_begin(&TStructIdentifier::new("result"))
            .unwrap();
        p.write_field_begin(&TFieldIdentifier::new("success", TType::Struct, 0))
            .unwrap();
        resp.write_to_out_protocol(&mut p).unwrap();
        p.write_field_end().unwrap();
        p.write_field_stop().unwrap();
        p.write_struct_end().unwrap();
    }
    out
}

fn header(name: &str, seqid: i32) -> Vec<u8> {
    let mut out = Vec::new();
    TBinaryOutputProtocol::new(&mut out, true)
        .write_message_begin(&TMessageIdentifier::new(name, TMessageType::Reply, seqid))
        .unwrap();
    out
}

fn rows(n: usize) -> TRowSet {
    TRowSet {
        start_row_offset: 0,
        rows: vec![],
        columns: Some(vec![
            TColumn::I64Val(TI64Column {
                values: (0..n as i64).collect(),
                nulls: vec![0],
            }),
            TColumn::StringVal(TStringColumn {
                values: (0..n).map(|i| format!("row-{i:08}")).collect(),
                nulls: vec![0],
            }),
        ]),
        binary_columns: None,
        column_count: None,
    }
}

impl Responder {
    pub fn new(total_rows: usize) -> Arc<Responder> {
        let batch = TFetchResultsResp {
            status: ok(),
            has_more_rows: Some(true),
            results: Some(rows(BATCH)),
        };
        Arc::new(Responder {
            big: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            batch_body: body(&batch),
            total_rows,
        })
    }

    fn handle_id(&self, big: bool) -> THandleIdentifier {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut guid = vec![0u8; 16];
        guid[..8].copy_from_slice(&n.to_be_bytes());
        guid[8] = big as u8;
        THandleIdentifier {
            guid,
            secret: vec![7u8; 16],
        }
    }

    fn op(&self, big: bool) -> Option<TOperationHandle> {
        let id = self.handle_id(big);
        if big {
            self.big
                .lock()
                .unwrap()
                .insert(id.guid.clone(), self.total_rows / BATCH);
        }
        Some(TOperationHandle {
            operation_id: id,
            operation_type: TOperationType::EXECUTE_STATEMENT,
            has_result_set: true,
            modified_row_count: None,
        })
    }

    /// The operation GUID of a FetchResults/CloseOperation request.
    fn op_guid(msg: &[u8]) -> Option<Vec<u8>> {
        let h = peek_header(msg).ok()?;
        kyuubi_broker::tcli::request_guid(msg, &h)
            .ok()?
            .map(|g| g.to_vec())
    }

    pub fn reply(&self, msg: &[u8]) -> Vec<u8> {
        let Ok(h) = peek_header(msg) else {
            return Vec::new();
        };
        let name = h.name.to_string();
        let mut out = header(&name, h.seqid);
        match name.as_str() {
            "OpenSession" => out.extend(body(&TOpenSessionResp {
                status: ok(),
                server_protocol_version: TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
                session_handle: Some(TSessionHandle {
                    session_id: self.handle_id(false),
                }),
                configuration: None,
            })),
            "ExecuteStatement" => {
                let big =
                    kyuubi_broker::tcli::read_statement(msg).is_some_and(|s| s.contains("range("));
                out.extend(body(&TExecuteStatementResp {
                    status: ok(),
                    operation_handle: self.op(big),
                }))
            }
            "GetTables" => out.extend(body(&TGetTablesResp {
                status: ok(),
                operation_handle: self.op(false),
            })),
            "GetColumns" => out.extend(body(&TGetColumnsResp {
                status: ok(),
                operation_handle: self.op(false),
            })),
            "FetchResults" => {
                let guid = Self::op_guid(msg).unwrap_or_default();
                let left = self.big.lock().unwrap().get_mut(&guid).map(|n| {
                    let had = *n;
                    *n = n.saturating_sub(1);
                    had
                });
                match left {
                    Some(n) if n > 0 => out.extend_from_slice(&self.batch_body),
                    Some(_) => out.extend(body(&TFetchResultsResp {
                        status: ok(),
                        has_more_rows: Some(false),
                        results: Some(rows(0)),
                    })),
                    None => out.extend(body(&TFetchResultsResp {
                        status: ok(),
                        has_more_rows: Some(false),
                        results: Some(rows(usize::from(guid.get(8) == Some(&0)))),
                    })),
                }
            }
            "CloseOperation" => {
                if let Some(g) = Self::op_guid(msg) {
                    self.big.lock().unwrap().remove(&g);
                }
                out.extend(body(&TCloseOperationResp { status: ok() }))
            }
            "CloseSession" => out.extend(body(&TCloseSessionResp { status: ok() })),
            "GetInfo" => out.extend(body(&TGetInfoResp {
                status: ok(),
                info_value: TGetInfoValue::StringValue("bench-responder".into()),
            })),
            other => panic!("the bench responder does not answer {other}"),
        }
        out
    }

    /// Serves binary clients (SASL PLAIN, anyone) until the process ends.
    pub async fn serve_binary(self: Arc<Self>) -> SocketAddr {
        self.serve_binary_on(None).await
    }

    /// The same over TLS (the broker's own server side, rustls): the
    /// floor of what TLS costs without any hop in between.
    pub async fn serve_binary_tls(self: Arc<Self>, tls: Arc<ServerTls>) -> SocketAddr {
        self.serve_binary_on(Some(tls)).await
    }

    async fn serve_binary_on(self: Arc<Self>, tls: Option<Arc<ServerTls>>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let me = self.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let stream = match tls {
                        None => Stream::from(s),
                        Some(t) => match t.accept(s).await {
                            Ok(s) => s,
                            Err(_) => return,
                        },
                    };
                    let mut io = MessageIo::new(stream, 1 << 30);
                    // START "PLAIN", then the credentials
                    for _ in 0..2 {
                        if io.read_sasl().await.is_err() {
                            return;
                        }
                    }
                    if io.write_sasl(Status::Complete, b"").await.is_err() {
                        return;
                    }
                    while let Ok(msg) = io.read_message(Framing::Sasl).await {
                        let reply = me.reply(&msg);
                        if io.write_message(Framing::Sasl, &reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Serves Thrift over HTTP on any path.
    pub async fn serve_http(self: Arc<Self>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let me = self.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let reply = body.map(|b| me.reply(&b)).unwrap_or_default();
                            let mut r = hyper::Response::new(Full::new(Bytes::from(reply)));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/x-thrift"),
                            );
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }
}
