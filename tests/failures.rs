//! Failures and limits: dead, silent or garbage-speaking upstreams, malformed
//! client input, HTTP-level errors, and graceful shutdown. Each failure must
//! give the client a clear error and leave every other session working.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::error::UpstreamError;
use kyuubi_broker::secret::Secret;
use kyuubi_broker::tcli::gen::{TGetInfoReq, TGetInfoResp, TGetInfoType, TStatusCode};
use kyuubi_broker::wire::sasl;
use kyuubi_broker::wire::thrift::{peek_header, ttype, MessageType, Writer};
use serde_json::json;
use tokio::net::TcpStream;

async fn binary_client(b: &Broker) -> Hs2Client {
    Hs2Client::connect(
        &client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain),
        "alice",
        "alice-pw",
    )
    .await
    .expect("SASL handshake with the broker")
}

async fn http_client(b: &Broker) -> Hs2Client {
    Hs2Client::connect(
        &client_cfg(Transport::Http, b.http, UpstreamSasl::Plain),
        "alice",
        "alice-pw",
    )
    .await
    .unwrap()
}

/// What a binary client's OpenSession gets from a broker in front of a
/// misbehaving upstream.
async fn open_session_error(fake: FakeUpstream, upstream_extra: &str) -> String {
    let up = fake.start().await;
    let b = start_broker(&route_toml("binary", up.addr, upstream_extra)).await;
    let mut c = binary_client(&b).await;
    let msg = status_error(c.open_session().await.unwrap_err());
    b.shutdown().await;
    msg
}

fn status_error(e: ClientError) -> String {
    match e {
        ClientError::Status(TStatusCode::ERROR_STATUS, msg, _) => msg,
        other => panic!("expected a TStatus ERROR, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_binary_client_a_tstatus_naming_the_upstream() {
    let dead = closed_port().await;
    let b = start_broker(&route_toml("binary", dead, "")).await;
    let mut c = binary_client(&b).await;
    let msg = status_error(c.open_session().await.unwrap_err());
    assert!(
        msg.contains(&format!("cannot connect to upstream {dead}")),
        "{msg}"
    );
    // the same connection can try again and gets the same clear answer
    let msg = status_error(c.open_session().await.unwrap_err());
    assert!(msg.contains("cannot connect"), "{msg}");
    b.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_gives_http_client_502_with_a_text_body() {
    let dead = closed_port().await;
    let b = start_broker(&route_toml("http", dead, "")).await;
    let (status, _, body) = http_post(
        b.http,
        "/cliservice",
        &basic("alice", "pw"),
        &open_session_msg(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&format!(
            "cannot connect to upstream http://{dead}/cliservice"
        )),
        "{body}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn silent_upstream_hits_the_connect_timeout_not_a_hang() {
    let t0 = Instant::now();
    let msg = open_session_error(
        FakeUpstream::binary().silent_from_accept(),
        "connect_timeout = \"1s\"",
    )
    .await;
    assert!(
        msg.contains("timed out after 1.0s connecting to upstream"),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn stalled_upstream_reply_gives_504_to_http_clients_and_tstatus_to_binary() {
    let up = FakeUpstream::binary().silent_after_sasl().start().await;
    let b = start_broker(&route_toml("binary", up.addr, "read_timeout = \"1s\"")).await;
    let (status, _, body) = http_post(
        b.http,
        "/cliservice",
        &basic("alice", "pw"),
        &open_session_msg(),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not reply within 1.0s"), "{body}");
    let mut c = binary_client(&b).await;
    let msg = status_error(c.open_session().await.unwrap_err());
    assert!(msg.contains("did not reply within 1.0s"), "{msg}");
    b.shutdown().await;
}

#[tokio::test]
async fn garbage_from_upstream_is_reported_as_a_malformed_reply() {
    let msg = open_session_error(FakeUpstream::binary().garbage_replies(), "").await;
    assert!(msg.contains("sent a malformed reply"), "{msg}");
}

#[tokio::test]
async fn reply_to_another_call_is_refused_and_not_relayed() {
    let msg = open_session_error(FakeUpstream::binary().replies_with_wrong_seqid(), "").await;
    assert!(
        msg.contains("reply OpenSession #999 does not answer OpenSession #1"),
        "{msg}"
    );
}

#[tokio::test]
async fn upstream_refusing_credentials_is_reported_with_its_reason() {
    let msg = open_session_error(
        FakeUpstream::binary().reject_sasl("Error validating the login"),
        "",
    )
    .await;
    assert!(
        msg.contains("refused the broker's credentials: Error validating the login"),
        "{msg}"
    );
}

#[tokio::test]
async fn secrets_never_appear_in_client_errors() {
    let dead = closed_port().await;
    std::env::set_var("KB_TEST_UPSTREAM_PW", "s3cr3t-upstream-pw");
    let route = format!(
        "{}\n[routes.r.credentials]\nmode = \"static\"\nuser = \"etl\"\npassword_env = \"KB_TEST_UPSTREAM_PW\"\n",
        route_toml("http", dead, "token = \"abcdefghij0123456789abcdefghij01\"")
    );
    let b = start_broker(&route).await;
    let (status, _, body) = http_post(
        b.http,
        "/cliservice",
        &basic("alice", "client-pw"),
        &open_session_msg(),
    )
    .await;
    assert_eq!(status, 502);
    assert!(body.contains("/cliservice/token/****"), "{body}");
    for secret in [
        "abcdefghij0123456789abcdefghij01",
        "s3cr3t-upstream-pw",
        "client-pw",
    ] {
        assert!(!body.contains(secret), "secret leaked: {body}");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn malformed_client_input_closes_only_that_connection() {
    let up = FakeUpstream::binary().start().await;
    let b = start_broker_with(
        &route_toml("binary", up.addr, ""),
        "max_message_bytes = 1048576",
    )
    .await;
    let mut good = binary_client(&b).await;
    let session = good
        .open_session()
        .await
        .expect("session through the broker");

    // garbage bytes: closed without a reply
    assert_eq!(
        send_and_read_all(b.binary, b"\x17\x03\x03garbage").await,
        b""
    );
    // HTTP sent to the binary port: closed
    assert_eq!(
        send_and_read_all(b.binary, b"POST /cliservice HTTP/1.1\r\n\r\n").await,
        b""
    );
    // SASL message declaring 2 GiB: refused before allocating, with an ERROR message
    let reply = send_and_read_all(b.binary, &[1, 0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(
        reply.first(),
        Some(&(sasl::Status::Error as u8)),
        "{reply:?}"
    );
    // before login the handshake cap applies (server.handshake_max_bytes)
    assert!(String::from_utf8_lossy(&reply).contains("exceeds the limit of 65536 bytes"));
    // GSSAPI on a listener without Kerberos: BAD with a clear reason
    let reply = send_and_read_all(b.binary, &sasl::encode(sasl::Status::Start, b"GSSAPI")).await;
    assert_eq!(reply.first(), Some(&(sasl::Status::Bad as u8)));
    assert!(String::from_utf8_lossy(&reply).contains("Kerberos (SASL GSSAPI) is not enabled"));
    // a valid handshake followed by an oversized data frame: closed
    let mut hello = sasl::plain_client_hello("mallory", &Secret::new("x"));
    hello.extend_from_slice(&[0x10, 0, 0, 0]);
    let reply = send_and_read_all(b.binary, &hello).await;
    assert_eq!(
        reply,
        sasl::encode(sasl::Status::Complete, b""),
        "only the handshake answer, then close"
    );
    // a truncated SASL handshake: closed
    assert_eq!(
        send_and_read_all(b.binary, &[1, 0, 0, 0, 5, b'P']).await,
        b""
    );

    // the good session is unaffected
    let op = good
        .execute(&session, "select 41 + 1")
        .await
        .expect("still works");
    let rows = good.fetch(&op, 10).await.unwrap();
    assert!(rows.results.is_some());
    good.close_session(session).await.unwrap();
    assert_eq!(
        up.calls(),
        [
            "OpenSession",
            "ExecuteStatement",
            "FetchResults",
            "CloseSession"
        ],
        "only the good session's calls reached the upstream"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn unknown_method_from_client_is_relayed_and_answered_by_the_upstream() {
    let sts = sts_binary().await;
    let b = start_broker(&route_toml("binary", sts, "")).await;
    let mut c = binary_client(&b).await;
    let session = c.open_session().await.unwrap();
    let mut w = Writer::default();
    w.message_begin("GetLog", MessageType::Call, 99);
    w.field(ttype::STRUCT, 1);
    w.stop();
    w.stop();
    let reply = c.call_raw(Bytes::from(w.buf)).await.unwrap();
    let h = peek_header(&reply).unwrap();
    // the real server's own answer to a method it lacks
    assert_eq!(
        (h.name, h.kind, h.seqid),
        ("GetLog", MessageType::Exception, 99)
    );
    // and the connection stays usable
    let info: TGetInfoResp = c
        .call(
            "GetInfo",
            &TGetInfoReq {
                session_handle: session.clone(),
                info_type: TGetInfoType::CLI_DBMS_NAME,
            },
        )
        .await
        .unwrap();
    assert_eq!(info.status.status_code, TStatusCode::SUCCESS_STATUS);
    b.shutdown().await;
}

#[tokio::test]
async fn nosasl_client_is_recognised_by_its_first_byte_and_served() {
    let sts = sts_binary().await;
    let b = start_broker(&route_toml("binary", sts, "")).await;
    let mut c = Hs2Client::connect(
        &client_cfg(Transport::Binary, b.binary, UpstreamSasl::Nosasl),
        "carol",
        "pw",
    )
    .await
    .unwrap();
    let session = c.open_session().await.expect("NOSASL OpenSession");
    let op = c.execute(&session, "select current_user()").await.unwrap();
    let rows = c.fetch(&op, 1).await.unwrap();
    let cols = format!("{:?}", rows.results.unwrap().columns);
    assert!(
        cols.contains("\"carol\""),
        "the OpenSession user is the identity: {cols}"
    );
    c.close_session(session).await.unwrap();
    b.shutdown().await;
}

#[tokio::test]
async fn http_listener_answers_protocol_errors_with_the_right_status() {
    let up = FakeUpstream::binary().start().await;
    let b = start_broker_with(
        &route_toml("binary", up.addr, ""),
        "max_message_bytes = 1048576",
    )
    .await;
    let auth = basic("alice", "pw");
    let get = raw_http(
        b.http,
        b"GET /cliservice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(get.starts_with("HTTP/1.1 405"), "{get}");
    assert_eq!(
        http_post(b.http, "/elsewhere", &auth, &open_session_msg())
            .await
            .0,
        404
    );
    assert_eq!(
        http_post(b.http, "/cliservice/token/abc", &auth, b"x")
            .await
            .0,
        400,
        "sub-paths reach the endpoint"
    );
    let (s, h, _) = http_post(b.http, "/cliservice", "", &open_session_msg()).await;
    assert_eq!(s, 401);
    assert!(
        h.to_ascii_lowercase().contains("www-authenticate: basic"),
        "{h}"
    );
    assert_eq!(
        http_post(
            b.http,
            "/cliservice",
            "Authorization: Negotiate YII=\r\n",
            &open_session_msg()
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http_post(b.http, "/cliservice", &auth, &vec![0u8; 2 << 20])
            .await
            .0,
        413
    );
    let (s, _, body) = http_post(b.http, "/cliservice", &auth, b"\x80\x01\x00\x01garbage").await;
    assert_eq!(s, 400);
    assert!(body.contains("malformed Thrift message"), "{body}");
    let wrong_ct = raw_http(
        b.http,
        b"POST /cliservice HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
    )
    .await;
    assert!(wrong_ct.starts_with("HTTP/1.1 415"), "{wrong_ct}");

    // an unknown session handle is a Thrift-level answer, not an HTTP error
    let (s, _, body) =
        http_post_bytes(b.http, "/cliservice", &auth, &get_info_msg([7u8; 16])).await;
    assert_eq!(s, 200);
    let h = peek_header(&body).unwrap();
    assert_eq!(h.name, "GetInfo");
    assert!(String::from_utf8_lossy(&body).contains("unknown or expired session handle"));
    assert_eq!(up.calls(), Vec::<String>::new(), "nothing was relayed");
    b.shutdown().await;
}

#[tokio::test]
async fn http_auth_cookie_replaces_credentials_on_later_calls() {
    let up = FakeUpstream::binary().start().await;
    let b = start_broker(&route_toml("binary", up.addr, "")).await;
    let (s, headers, body) = http_post_bytes(
        b.http,
        "/cliservice",
        &basic("alice", "pw"),
        &open_session_msg(),
    )
    .await;
    assert_eq!(s, 200);
    let cookie = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .expect("a hive.server2.auth cookie is issued")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("hive.server2.auth="));
    let guid = session_guid(&body);
    // no Authorization header, only the cookie
    let (s, _, body) = http_post_bytes(
        b.http,
        "/cliservice",
        &format!("Cookie: {cookie}\r\n"),
        &get_info_msg(guid),
    )
    .await;
    assert_eq!(s, 200);
    assert!(!String::from_utf8_lossy(&body).contains("unknown or expired"));
    assert_eq!(
        up.calls(),
        ["OpenSession", "GetInfo"],
        "relayed on the cookie"
    );
    // a forged cookie is not accepted
    let forged = format!("Cookie: {}x\r\n", cookie);
    assert_eq!(
        http_post_bytes(b.http, "/cliservice", &forged, &get_info_msg(guid))
            .await
            .0,
        401
    );
    assert_eq!(up.calls().len(), 2, "the forged call was not relayed");
    b.shutdown().await;
}

#[tokio::test]
async fn an_http_doas_parameter_is_stripped_unless_impersonation_is_allowed() {
    use kyuubi_broker::tcli::gen::TColumn;
    let sts = sts_binary().await;
    let user_with_doas = |b: &Broker| {
        let mut cfg = client_cfg(Transport::Http, b.http, UpstreamSasl::Plain);
        cfg.http_path = "cliservice?doAs=admin".into();
        async move {
            let mut c = Hs2Client::connect(&cfg, "alice", "pw").await.unwrap();
            let s = c.open_session().await.unwrap();
            let op = c.execute(&s, "select current_user()").await.unwrap();
            match &c
                .fetch(&op, 1)
                .await
                .unwrap()
                .results
                .unwrap()
                .columns
                .unwrap()[0]
            {
                TColumn::StringVal(v) => v.values[0].clone(),
                other => panic!("{other:?}"),
            }
        }
    };
    let b = start_broker(&route_toml("binary", sts, "")).await;
    assert_eq!(user_with_doas(&b).await, "alice", "doAs stripped");
    b.shutdown().await;
    // allowed: the server acts on it, so the check above can fail
    let allowed = format!(
        "{}\n[routes.r.session]\nallow_impersonation = true\n",
        route_toml("binary", sts, "")
    );
    let b = start_broker(&allowed).await;
    assert_eq!(
        user_with_doas(&b).await,
        "admin",
        "doAs passed on as hive.server2.proxy.user"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn another_users_session_handle_is_refused_over_http() {
    let up = FakeUpstream::binary().start().await;
    let b = start_broker(&route_toml("binary", up.addr, "")).await;
    let (_, _, body) = http_post_bytes(
        b.http,
        "/cliservice",
        &basic("alice", "pw"),
        &open_session_msg(),
    )
    .await;
    let guid = session_guid(&body);
    let (s, _, body) = http_post_bytes(
        b.http,
        "/cliservice",
        &basic("bob", "pw"),
        &get_info_msg(guid),
    )
    .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("unknown or expired session handle"));
    assert_eq!(up.calls(), ["OpenSession"], "bob's call was not relayed");
    b.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_the_in_flight_rpc_finish_then_refuses_new_connections() {
    let slow = "select sum(id % 7) from range(0, 3000000000, 1, 2)";
    // sees each statement go on to the server: then its RPC is in flight
    let relay = CountingRelay::watching(sts_binary().await, slow.as_bytes()).await;
    let mut b = start_broker(&route_toml("binary", relay.addr, "")).await;
    let mut c = binary_client(&b).await;
    let mut h = http_client(&b).await;
    let session = c.open_session().await.unwrap();
    let hsession = h.open_session().await.unwrap();
    let in_flight = tokio::spawn(async move {
        let r = c.execute(&session, slow).await.map(|_| ());
        (r, Instant::now())
    });
    let in_flight_http = tokio::spawn(async move { h.execute(&hsession, slow).await.map(|_| ()) });
    tokio::time::timeout(Duration::from_secs(60), relay.forwarded(2))
        .await
        .expect("both statements reach the server");
    let stop_at = Instant::now();
    let addr = b.binary;
    b.begin_shutdown();
    assert!(!in_flight.is_finished() && !in_flight_http.is_finished());
    refused_within(addr, Duration::from_secs(10)).await;
    let (r, done_at) = in_flight.await.unwrap();
    r.expect("the binary RPC in flight completes");
    in_flight_http
        .await
        .unwrap()
        .expect("the HTTP RPC in flight completes");
    assert!(done_at > stop_at);
    b.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_query_fails_clients_in_time_and_broker_keeps_serving() {
    let doomed = tokio::task::spawn_blocking(|| sts("sts-kill", "binary", 10002))
        .await
        .unwrap();
    let shared = sts_binary().await;
    // one broker, two routes: the doomed server, and a healthy one
    let b = start_broker_toml(&format!(
        r#"
{LISTENERS}
[[listener]]
name = "healthy"
protocol = "binary"
bind = "127.0.0.1:0"
route = "healthy"
auth = "none"
allow_any_user = true

{}
[routes.healthy.upstream]
transport = "binary"
host = "127.0.0.1"
port = {}
"#,
        route_toml("binary", doomed, "read_timeout = \"60s\""),
        shared.port()
    ))
    .await;
    let mut bin = py_client_spawn("impyla", "binary", b.binary.port(), "long", None, &[]);
    let mut http = py_client_spawn("impyla", "http", b.http.port(), "long", None, &[]);
    // the doomed server runs both queries
    bin.event("running", Duration::from_secs(120)).await;
    http.event("running", Duration::from_secs(120)).await;
    let pid: i32 = std::fs::read_to_string(fixture_dir().join("sts-kill/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed_at = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    for (name, run) in [("binary", bin), ("http", http)] {
        let v = run.finish().await;
        assert_eq!(v["raised"], json!(true), "{name}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(&doomed.port().to_string()) || msg.contains("502"),
            "{name}: {msg}"
        );
    }
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "errors arrive within the read timeout"
    );
    stop_sts("sts-kill");

    // new sessions on the dead route get a clear error ...
    let mut c = binary_client(&b).await;
    let msg = status_error(c.open_session().await.unwrap_err());
    assert!(
        msg.contains(&format!("cannot connect to upstream {doomed}")),
        "{msg}"
    );
    // ... and the same broker serves new sessions on its healthy route
    let v = py_client(
        "impyla",
        "binary",
        b.addrs["healthy"].port(),
        "fetch",
        Some("10"),
    )
    .await;
    assert_eq!(v["rows"], json!(10));
    b.shutdown().await;
}

// ---- raw protocol helpers ------------------------------------------------

/// Waits until connecting to `addr` is refused: the listener has closed.
async fn refused_within(addr: SocketAddr, within: Duration) {
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            t0.elapsed() < within,
            "{addr} still accepts connections {within:?} after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fixture_dir() -> std::path::PathBuf {
    std::env::var_os("KB_FIXTURE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/tmp/kyuubi-broker-fixture".into())
}

fn open_session_msg() -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("OpenSession", MessageType::Call, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::I32, 1);
    w.i32(9);
    w.stop();
    w.stop();
    w.buf
}

fn get_info_msg(guid: [u8; 16]) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("GetInfo", MessageType::Call, 2);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRING, 1);
    w.binary(&guid);
    w.field(ttype::STRING, 2);
    w.binary(&[0u8; 16]);
    w.stop();
    w.stop();
    w.field(ttype::I32, 2);
    w.i32(17);
    w.stop();
    w.stop();
    w.buf
}

fn session_guid(reply: &[u8]) -> [u8; 16] {
    let h = peek_header(reply).unwrap();
    kyuubi_broker::tcli::reply_session_handle(reply, &h)
        .unwrap()
        .expect("session handle")
        .0
}

#[tokio::test]
async fn an_upstream_cut_mid_reply_closes_that_client_only_and_the_broker_keeps_serving() {
    // FetchResults gets a frame that claims 300,000 bytes but hangs up after 100,000
    let up = FakeUpstream::binary()
        .cut_mid_reply(300_000, 100_000)
        .start()
        .await;
    let b = start_broker(&route_toml("binary", up.addr, "")).await;
    for _ in 0..2 {
        let mut c = binary_client(&b).await;
        let session = c.open_session().await.unwrap();
        // a handle this connection opened (others are refused unforwarded)
        let op = c.execute(&session, "select 1").await.unwrap();
        // the big reply is relayed as it arrives, then breaks off: the
        // client's connection is closed, not left with a partial frame
        let t0 = Instant::now();
        let r = c.fetch(&op, 10).await;
        assert!(t0.elapsed() < Duration::from_secs(10), "{r:?}");
        assert!(
            matches!(r, Err(ClientError::Transport(UpstreamError::Closed { .. }))),
            "must be the connection closing, not a reply: {r:?}"
        );
    }
    b.shutdown().await;
}
