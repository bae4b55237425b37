//! Thrift-over-HTTP listener: one POST per RPC to the configured path (or any
//! sub-path), Basic or SPNEGO credentials or the broker's `hive.server2.auth`
//! cookie. Every response, success or refusal, is built by `respond`; a big
//! FetchResults reply is streamed into its body as it arrives from the
//! upstream ([`ReplyBody`]), and its exchange is finished at the edge when
//! the body ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE,
    WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::cookie::CookieJar;
use super::limits::{Refusal, Slot, UserSlot};
use super::{Listener, Shared, Tls};
use crate::auth::AuthError;
use crate::edge::{Exchange, Kind};
use crate::error::{RpcError, Side};
use crate::identity::ClientIdentity;
use crate::secret::Secret;
use crate::session::{HttpClient, HttpOut};
use crate::tcli::Call;
use crate::upstream::Pending;
use crate::wire::stream::Stream;

/// Per-listener state shared by its connections.
pub struct HttpListener {
    l: Listener,
    cookies: CookieJar,
}

impl HttpListener {
    pub fn new(l: Listener) -> Arc<HttpListener> {
        Arc::new(HttpListener {
            cookies: CookieJar::new(l.config.cookie_max_age, l.tls.is_some()),
            l,
        })
    }

    /// The 401 challenge this listener's clients should answer.
    fn scheme(&self) -> &'static str {
        if self.l.auth.kerberos().is_some() {
            NEGOTIATE
        } else {
            BASIC
        }
    }
}

/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 8192;

/// The connection settings every request of this listener is read under:
/// its head within `handshake_timeout` and `handshake_max_bytes` (a request
/// is not authenticated before its head is in).
fn builder(shared: &Shared) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(shared.server.handshake_timeout)
        .max_buf_size(shared.server.handshake_max_bytes.max(MIN_BUF));
    b
}

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<HttpListener>,
    shared: Arc<Shared>,
    admission: Result<Slot, Refusal>,
) {
    // a streamed reply goes out part by part: Nagle would hold each part
    // back for the client's delayed ACK (40 ms)
    let _ = stream.set_nodelay(true);
    let stream = match super::tls_handshake(stream, peer, &listener.l, &shared).await {
        Tls::Ready(s) => s,
        Tls::Plaintext(tcp, _) => {
            return refuse(tcp.into(), peer, listener, shared, RpcError::TlsRequired).await
        }
        Tls::Failed => return,
    };
    let slot = match admission {
        Ok(s) => s,
        Err(r) => return refuse(stream, peer, listener, shared, r.error).await,
    };
    let cert = listener.l.cert_user(&stream).map(|user| {
        Arc::new(CertLogin {
            user,
            recorded: AtomicBool::new(false),
        })
    });
    let _open = shared.broker.metrics.connection(&listener.l.config.name);
    let span = tracing::debug_span!("http", listener = %listener.l.config.name, %peer);
    let sh = shared.clone();
    let hl = listener.clone();
    // hyper's header timeout also ends idle keep-alive connections: only a
    // connection that never sent a request head in time failed a handshake
    let served = Arc::new(AtomicBool::new(false));
    let seen = served.clone();
    // the user this connection counts against, from its first
    // authenticated request on
    let user = Arc::new(Mutex::new(None::<UserSlot>));
    let who = user.clone();
    let svc = service_fn(move |req| {
        seen.store(true, Ordering::Relaxed);
        let (listener, shared, user) = (hl.clone(), sh.clone(), user.clone());
        let cert = cert.clone();
        async move {
            let r = handle(req, peer, &listener, &shared, &user, cert.as_deref()).await;
            Ok::<_, Infallible>(r)
        }
    });
    let started = Instant::now();
    let spoke = Arc::new(AtomicBool::new(false));
    let write_timeout = shared.server.client_write_timeout;
    let stalled = Arc::new(AtomicBool::new(false));
    let stream = Spoke {
        inner: stream,
        spoke: spoke.clone(),
        write_timeout,
        stall: None,
        stalled: stalled.clone(),
    };
    let conn = builder(&shared).serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.cancel.cancelled() => {
            // finish the request in flight, then close
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        // a client that stopped taking a reply: its connection is closed
        // (and the reply's exchange finished as the client's failure)
        Err(_) if stalled.load(Ordering::Relaxed) => {
            let held = who.lock().unwrap_or_else(|p| p.into_inner());
            let user = held.as_ref().map_or("", |s| s.user());
            listener
                .l
                .edge
                .timed_out(peer, user, "write", write_timeout);
        }
        // hyper closes a connection whose request head is late: the client
        // sees the close, the edge records why
        // opened ahead of need and never used (hyper's and browsers' pools
        // do this): not a failed login
        Err(e) if e.is_timeout() && !spoke.load(Ordering::Relaxed) => {
            listener
                .l
                .edge
                .unused(peer, shared.server.handshake_timeout);
        }
        Err(e) if e.is_timeout() && !served.load(Ordering::Relaxed) => {
            let e = RpcError::HandshakeTimeout(shared.server.handshake_timeout);
            let ex = Exchange::new(Kind::Login, peer, "", "unknown", started);
            listener.l.edge.finish(&ex, Err(&e));
        }
        Err(e) if e.is_timeout() => debug!(parent: &span, "idle keep-alive connection closed"),
        // hyper answered 431 itself; the edge still records it
        Err(e) if e.is_parse_too_large() => {
            let max = shared.server.handshake_max_bytes.max(MIN_BUF);
            let e = RpcError::TooLarge { len: None, max };
            let ex = Exchange::new(Kind::Unparsed, peer, "", "unknown", started);
            listener.l.edge.finish(&ex, Err(&e));
        }
        Err(e) => debug!(parent: &span, error = %e, "HTTP connection ended with an error"),
        Ok(()) => {}
    }
    drop(slot);
}

/// A connection refused at a cap, or a plaintext client on an HTTPS port:
/// its one request is answered with `error` (a 503 naming the cap, with
/// Retry-After; a 400 saying to use https), then it is closed.
/// The request's head is read under the handshake limits; a small body is
/// drained first so that closing does not reset the connection before the
/// client has read the answer.
async fn refuse(
    stream: Stream,
    peer: SocketAddr,
    listener: Arc<HttpListener>,
    shared: Arc<Shared>,
    error: RpcError,
) {
    let refusal = Arc::new(Mutex::new(Some(error)));
    let hl = listener.clone();
    let sh = shared.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (listener, shared, refusal) = (hl.clone(), sh.clone(), refusal.clone());
        async move {
            let started = Instant::now();
            let max = shared.server.handshake_max_bytes;
            let body = Limited::new(req.into_body(), max).collect();
            let _ = tokio::time::timeout(shared.server.http_body_timeout, body).await;
            let taken = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
            let e = taken.unwrap_or(RpcError::ShuttingDown);
            let ex = Exchange::new(Kind::Unparsed, peer, "", "unknown", started);
            Ok::<_, Infallible>(respond(&listener, &ex, Err(e), Extra::default()))
        }
    });
    let conn = builder(&shared)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        debug!(listener = %listener.l.config.name, %peer, error = %e, "refused HTTP connection ended with an error");
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<ReplyBody> {
    let mut r = Response::new(ReplyBody::whole(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn thrift(body: ReplyBody) -> Response<ReplyBody> {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-thrift"),
    );
    r
}

const BASIC: &str = "Basic realm=\"kyuubi-broker\"";
const NEGOTIATE: &str = "Negotiate";

pub(crate) fn path_matches(path: &str, base: &str) -> bool {
    let p = path.trim_start_matches('/');
    p == base
        || p.strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The value of an `Authorization: <scheme> <value>` header, if present;
/// another scheme is refused with `wrong_scheme`.
fn authorization<'r, B>(
    req: &'r Request<B>,
    scheme: &str,
    wrong_scheme: &'static str,
) -> Result<Option<&'r str>, &'static str> {
    let Some(h) = req.headers().get(AUTHORIZATION) else {
        return Ok(None);
    };
    let h = h.to_str().map_err(|_| "malformed Authorization header")?;
    let (given, value) = h.split_once(' ').ok_or("malformed Authorization header")?;
    if !given.eq_ignore_ascii_case(scheme) {
        return Err(wrong_scheme);
    }
    Ok(Some(value))
}

pub(crate) fn basic_credentials<B>(
    req: &Request<B>,
) -> Result<Option<(String, Secret)>, &'static str> {
    let wrong = "only Basic authentication is enabled on this listener";
    let Some(value) = authorization(req, "basic", wrong)? else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| "malformed Basic credentials")?;
    let raw = String::from_utf8(raw).map_err(|_| "malformed Basic credentials")?;
    let (user, pass) = raw.split_once(':').ok_or("malformed Basic credentials")?;
    Ok(Some((user.to_string(), Secret::new(pass))))
}

/// Headers a successful reply carries besides the Thrift body.
#[derive(Default)]
struct Extra {
    set_cookie: Option<String>,
    /// The mutual-authentication token of RFC 4559.
    negotiate: Option<Vec<u8>>,
}

/// The one way out for every outcome on the HTTP listener: finishes the
/// exchange at the edge (time, metrics, log) and builds the response. A
/// streamed reply's exchange is finished by its body, when the last byte is
/// out or the relay broke.
fn respond(
    listener: &Arc<HttpListener>,
    ex: &Exchange<'_>,
    result: Result<HttpOut, RpcError>,
    extra: Extra,
) -> Response<ReplyBody> {
    let mut resp = match result {
        Ok(HttpOut::Reply(reply)) => {
            listener.l.edge.finish(ex, Ok(reply.len()));
            thrift(ReplyBody::whole(reply))
        }
        Ok(HttpOut::Stream(p)) => thrift(ReplyBody::stream(p, Finish::of(listener, ex))),
        Err(e) => {
            listener.l.edge.finish(ex, Err(&e));
            let a = e.answer();
            // a malformed body was read whole: the connection can go on
            let close = a.close && !matches!(e, RpcError::Malformed(_));
            match (a.http, ex.kind) {
                (Some(status), _) => {
                    let mut r = text(status, a.text);
                    let h = r.headers_mut();
                    if status == StatusCode::UNAUTHORIZED {
                        h.insert(
                            WWW_AUTHENTICATE,
                            http::HeaderValue::from_static(listener.scheme()),
                        );
                    }
                    if status == StatusCode::METHOD_NOT_ALLOWED {
                        h.insert(ALLOW, http::HeaderValue::from_static("POST"));
                    }
                    if a.retryable && status == StatusCode::SERVICE_UNAVAILABLE {
                        h.insert(RETRY_AFTER, http::HeaderValue::from_static("5"));
                    }
                    if let RpcError::Auth(AuthError::Throttled { retry_after, .. }) = &e {
                        h.insert(RETRY_AFTER, http::HeaderValue::from(*retry_after));
                    }
                    // the body may be unread (a refusal, a timeout): the
                    // connection cannot carry another request
                    if close {
                        h.insert(CONNECTION, http::HeaderValue::from_static("close"));
                    }
                    r
                }
                // refusals inside TCLIService (unknown handle, no mapping)
                // are Thrift replies, as HiveServer2 gives them
                (None, Kind::Call(c)) => thrift(ReplyBody::whole(
                    e.to_thrift_reply(c.wire_name(), c.seqid).into(),
                )),
                (None, _) => text(StatusCode::BAD_REQUEST, a.text),
            }
        }
    };
    if let Some(c) = extra.set_cookie {
        if let Ok(v) = http::HeaderValue::from_str(&c) {
            resp.headers_mut().insert(SET_COOKIE, v);
        }
    }
    if let Some(t) = extra.negotiate {
        let v = format!(
            "Negotiate {}",
            base64::engine::general_purpose::STANDARD.encode(t)
        );
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(WWW_AUTHENTICATE, v);
        }
    }
    resp
}

/// Method, path, content type and shutdown: what makes a request a Thrift
/// call at this endpoint, checked before any credential is looked at.
fn check_request(
    req: &Request<Incoming>,
    cfg: &crate::config::ListenerConfig,
    shared: &Shared,
) -> Result<(), RpcError> {
    let refuse = |status, text: &str| {
        Err(RpcError::NotThrift {
            status,
            text: text.into(),
        })
    };
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "Thrift over HTTP takes POST only",
        );
    }
    if !path_matches(req.uri().path(), &cfg.http_path) {
        let hint = format!("no Thrift endpoint here; use /{}", cfg.http_path);
        return refuse(StatusCode::NOT_FOUND, &hint);
    }
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-thrift") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/x-thrift",
        );
    }
    if shared.cancel.is_cancelled() {
        return Err(RpcError::ShuttingDown);
    }
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &Arc<HttpListener>,
    shared: &Shared,
    user_slot: &Mutex<Option<UserSlot>>,
    cert: Option<&CertLogin>,
) -> Response<ReplyBody> {
    let started = Instant::now();
    if let Err(e) = check_request(&req, &listener.l.config, shared) {
        let ex = Exchange::new(Kind::Unparsed, peer, "", "unknown", started);
        return respond(listener, &ex, Err(e), Extra::default());
    }
    let do_as = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case("doAs"))
            .map(|(_, v)| v.to_string())
    });
    let login = match authenticate_request(&req, peer, listener, cert).await {
        Ok(l) => l,
        Err((mechanism, user, e)) => {
            let ex = Exchange::new(Kind::Login, peer, &user, mechanism, started);
            return respond(listener, &ex, Err(e), Extra::default());
        }
    };
    if login.checked {
        // credentials were verified for this request: a login of its own
        let user = login.identity.user.as_str();
        let ex = Exchange::new(Kind::Login, peer, user, login.mechanism, started);
        listener.l.edge.finish(&ex, Ok(0));
    }
    let extra = Extra {
        set_cookie: login.set_cookie,
        negotiate: login.negotiate,
    };
    let (user, mechanism) = (login.identity.user.as_str(), login.mechanism);
    let started = Instant::now();
    if let Err(e) = count_user(user_slot, listener, shared, user, peer) {
        let ex = Exchange::new(Kind::Unparsed, peer, user, mechanism, started);
        return respond(listener, &ex, Err(e), extra);
    }
    // only now, with the credentials checked, is the body read
    let max = shared.server.max_message_bytes;
    let body = match read_body(req.into_body(), max, shared.server.http_body_timeout).await {
        Ok(b) => b,
        Err(e) => {
            let ex = Exchange::new(Kind::Unparsed, peer, user, mechanism, started);
            return respond(listener, &ex, Err(e), extra);
        }
    };
    let call = match Call::parse(&body) {
        Ok(c) => c,
        Err(e) => {
            let ex = Exchange::new(Kind::Unparsed, peer, user, mechanism, started);
            return respond(
                listener,
                &ex,
                Err(RpcError::Malformed(e.to_string())),
                extra,
            );
        }
    };
    let client = HttpClient {
        route: &listener.l.route,
        identity: &login.identity,
        do_as,
    };
    let request_bytes = body.len();
    let statement = listener.l.edge.statement_of(&call, &body);
    let mut upstream = Duration::ZERO;
    let result = shared
        .broker
        .call_http(&client, &call, body, &mut upstream)
        .await;
    let ex = Exchange {
        upstream,
        request_bytes,
        statement,
        ..Exchange::new(Kind::Call(&call), peer, user, mechanism, started)
    };
    respond(listener, &ex, result, extra)
}

/// Counts this connection against `user`'s cap, once per connection (again
/// only if a later request authenticates as someone else).
fn count_user(
    slot: &Mutex<Option<UserSlot>>,
    listener: &HttpListener,
    shared: &Shared,
    user: &str,
    peer: SocketAddr,
) -> Result<(), RpcError> {
    let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
    if held.as_ref().is_some_and(|s| s.user() == user) {
        return Ok(());
    }
    // the connection stops counting for its earlier user either way
    *held = None;
    *held = Some(
        shared
            .limits
            .user_slot(&listener.l.edge.listener, user, peer.ip())?,
    );
    Ok(())
}

/// The whole body, at most `max` bytes, within `limit`. The timer is armed
/// only if the body is not already in (the common small request).
async fn read_body(body: Incoming, max: usize, limit: Duration) -> Result<Bytes, RpcError> {
    let collect = Limited::new(body, max).collect();
    tokio::pin!(collect);
    let collected = tokio::select! {
        biased;
        r = &mut collect => r,
        _ = tokio::time::sleep(limit) => return Err(RpcError::BodyTimeout(limit)),
    };
    match collected {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => RpcError::TooLarge { len: None, max },
            None => RpcError::Malformed(format!("cannot read the request body: {e}")),
        }),
    }
}

/// A SPNEGO token from `Authorization: Negotiate <base64>`.
pub(crate) fn negotiate_token<B>(req: &Request<B>) -> Result<Option<Vec<u8>>, &'static str> {
    let wrong = "this listener takes Kerberos only (SPNEGO: Authorization: Negotiate)";
    let Some(value) = authorization(req, "negotiate", wrong)? else {
        return Ok(None);
    };
    // Hive JDBC 2.x sends "Negotiate : <token>"; others wrap lines or drop padding
    let value = value.trim_start().strip_prefix(':').unwrap_or(value);
    let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let compact = compact.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(compact)
        .map(Some)
        .map_err(|_| "malformed Negotiate token")
}

/// A connection's verified client certificate, on a listener that logs in
/// by certificate: the user it names, and whether its login was recorded.
struct CertLogin {
    user: String,
    recorded: AtomicBool,
}

/// Who sent a request.
struct Login {
    identity: ClientIdentity,
    mechanism: &'static str,
    /// Credentials were checked (not just a cookie honoured).
    checked: bool,
    set_cookie: Option<String>,
    negotiate: Option<Vec<u8>>,
}

/// A refused request: the mechanism tried, the user named (if any), why.
type Refused = (&'static str, String, RpcError);

async fn authenticate_request(
    req: &Request<Incoming>,
    peer: SocketAddr,
    listener: &HttpListener,
    cert: Option<&CertLogin>,
) -> Result<Login, Refused> {
    let unusable = |m, why: &str| (m, String::new(), AuthError::Unusable(why.into()).into());
    if listener.l.auth.by_certificate() {
        // the connection's certificate, on every request: no cookie stands
        // in for it (one could be replayed from another connection); one
        // login per connection is recorded, as on a binary listener
        let (user, password) = match basic_credentials(req) {
            Ok(Some(c)) => c,
            Ok(None) => (String::new(), Secret::new("")),
            Err(msg) => return Err(unusable("certificate", msg)),
        };
        let name = cert.map(|c| c.user.as_str());
        return match listener
            .l
            .auth
            .authenticate(&user, password, peer, name)
            .await
        {
            Ok(identity) => Ok(Login {
                identity,
                mechanism: "certificate",
                checked: cert.is_some_and(|c| !c.recorded.swap(true, Ordering::Relaxed)),
                set_cookie: None,
                negotiate: None,
            }),
            Err(e) => Err(("certificate", user, e.into())),
        };
    }
    if let Some(c) = req.headers().get(COOKIE).and_then(|v| v.to_str().ok()) {
        if let Some(identity) = listener.cookies.check(c).await {
            return Ok(Login {
                identity,
                mechanism: "cookie",
                checked: false,
                set_cookie: None,
                negotiate: None,
            });
        }
    }
    if let Some(acceptor) = listener.l.auth.kerberos() {
        let token = match negotiate_token(req) {
            Ok(Some(t)) => t,
            Ok(None) => return Err(unusable("spnego", "Kerberos (SPNEGO) credentials required")),
            Err(msg) => return Err(unusable("spnego", msg)),
        };
        return match acceptor.spnego(token).await {
            Ok((who, reply)) => {
                debug!(principal = %who.principal, "SPNEGO context established");
                let identity = ClientIdentity::from_ticket(who.user, peer);
                let cookie = listener.cookies.issue(identity.clone()).await;
                Ok(Login {
                    identity,
                    mechanism: "spnego",
                    checked: true,
                    set_cookie: Some(cookie),
                    negotiate: reply,
                })
            }
            Err(e) => Err(unusable("spnego", &e.to_string())),
        };
    }
    match basic_credentials(req) {
        Ok(Some((user, password))) => {
            match listener
                .l
                .auth
                .authenticate(&user, password, peer, None)
                .await
            {
                Ok(identity) => {
                    let cookie = listener.cookies.issue(identity.clone()).await;
                    Ok(Login {
                        identity,
                        mechanism: "basic",
                        checked: true,
                        set_cookie: Some(cookie),
                        negotiate: None,
                    })
                }
                Err(e) => Err(("basic", user, e.into())),
            }
        }
        Ok(None) => Err(unusable("basic", "credentials required (HTTP Basic)")),
        Err(msg) => Err(unusable("basic", msg)),
    }
}

/// A client stream that remembers whether the client sent any byte, which
/// tells a late request head (a failed handshake) from a connection that
/// was never used; and that fails a write the client has not taken within
/// `server.client_write_timeout`, so a client that stops reading holds no
/// upstream link (nor a streamed reply) for ever. The timer is armed only
/// when a write has to wait.
struct Spoke {
    inner: Stream,
    spoke: Arc<AtomicBool>,
    write_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set once a write ran out of `write_timeout`.
    stalled: Arc<AtomicBool>,
}

impl Spoke {
    /// `r`, a write's outcome, with the stall timer applied to it.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let limit = self.write_timeout;
        let t = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if t.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled.store(true, Ordering::Relaxed);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client took no reply data for {limit:?} (client_write_timeout)"),
        )))
    }
}

impl tokio::io::AsyncRead for Spoke {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && !self.spoke.load(Ordering::Relaxed) {
            self.spoke.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Spoke {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body: a whole reply (or refusal text), or a big reply
/// streamed from the upstream part by part as hyper asks for more, so the
/// broker holds one part of it at a time, never the reply.
pub(crate) enum ReplyBody {
    Whole(Option<Bytes>),
    Stream(Box<Streaming>),
}

/// One part of a streamed reply being read.
type NextPart = Pin<Box<dyn Future<Output = (Pending, Result<Option<Bytes>, String>)> + Send>>;

pub(crate) struct Streaming {
    /// The reply between parts; in `reading` while a part is awaited.
    pending: Option<Pending>,
    reading: Option<(NextPart, Instant)>,
    len: Option<u64>,
    /// Finished once: at the end, on a broken relay, or when dropped early.
    finish: Option<Finish>,
}

impl ReplyBody {
    fn whole(b: Bytes) -> ReplyBody {
        ReplyBody::Whole(Some(b))
    }

    fn stream(p: Pending, finish: Finish) -> ReplyBody {
        ReplyBody::Stream(Box::new(Streaming {
            len: p.size().map(|n| n as u64),
            pending: Some(p),
            reading: None,
            finish: Some(finish),
        }))
    }
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ReplyBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReplyBody::Stream(s) => s.poll_part(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Whole(b) => b.is_none(),
            ReplyBody::Stream(s) => s.finish.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            // with the upstream's length hyper sends Content-Length;
            // without, chunked
            ReplyBody::Stream(s) => match s.len {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

impl Streaming {
    fn poll_part(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let (next, since) = match &mut self.reading {
            Some(r) => r,
            None => {
                let Some(mut p) = self.pending.take() else {
                    return Poll::Ready(None);
                };
                let next: NextPart = Box::pin(async move {
                    let r = p.next().await;
                    (p, r)
                });
                self.reading.insert((next, Instant::now()))
            }
        };
        let Poll::Ready((p, r)) = next.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        let waited = since.elapsed();
        self.reading = None;
        if let Some(f) = self.finish.as_mut() {
            f.upstream += waited;
        }
        match r {
            Ok(Some(part)) => {
                // hyper sends no more than the length it announced and may
                // drop the body without asking for its end: the exchange is
                // finished with its last byte
                if p.is_through() {
                    self.end(Ok(p.sent()));
                }
                self.pending = Some(p);
                Poll::Ready(Some(Ok(Frame::data(part))))
            }
            Ok(None) => {
                self.end(Ok(p.sent()));
                Poll::Ready(None)
            }
            Err(detail) => {
                // hyper ends the response unfinished (no last chunk, or short
                // of its Content-Length) and closes the connection: the
                // client sees a broken reply, never a shorter good one
                let e = RpcError::RelayBroken {
                    side: Side::Upstream,
                    detail,
                };
                let text = e.to_string();
                self.end(Err(&e));
                Poll::Ready(Some(Err(std::io::Error::other(text))))
            }
        }
    }

    /// Finishes the exchange at the edge, the first time only.
    fn end(&mut self, result: Result<usize, &RpcError>) {
        if let Some(f) = self.finish.take() {
            f.done(result);
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // hyper drops the body when the client went away (or stopped
        // reading) before the end
        let e = RpcError::RelayBroken {
            side: Side::Client,
            detail: "the client connection ended before the reply was through".into(),
        };
        self.end(Err(&e));
    }
}

/// A streamed reply's exchange, owned, to finish at the edge when the body
/// ends.
pub(crate) struct Finish {
    listener: Arc<HttpListener>,
    /// Always a call: only a call's reply is streamed.
    call: Option<Call>,
    peer: SocketAddr,
    user: String,
    mechanism: &'static str,
    started: Instant,
    upstream: Duration,
    request_bytes: usize,
    statement: Option<Bytes>,
}

impl Finish {
    fn of(listener: &Arc<HttpListener>, ex: &Exchange<'_>) -> Finish {
        let call = match ex.kind {
            Kind::Call(c) => Some(c.clone()),
            _ => None,
        };
        Finish {
            listener: listener.clone(),
            call,
            peer: ex.peer,
            user: ex.user.to_string(),
            mechanism: ex.mechanism,
            started: ex.started,
            upstream: ex.upstream,
            request_bytes: ex.request_bytes,
            statement: ex.statement.clone(),
        }
    }

    fn done(self, result: Result<usize, &RpcError>) {
        let ex = Exchange {
            upstream: self.upstream,
            request_bytes: self.request_bytes,
            statement: self.statement.clone(),
            ..Exchange::new(
                self.call.as_ref().map_or(Kind::Unparsed, Kind::Call),
                self.peer,
                &self.user,
                self.mechanism,
                self.started,
            )
        };
        self.listener.l.edge.finish(&ex, result);
    }
}

#[cfg(test)]
mod tests {
    use super::path_matches;

    #[test]
    fn configured_path_and_sub_paths_match_but_prefixes_do_not() {
        assert!(path_matches("/cliservice", "cliservice"));
        assert!(path_matches("/cliservice/", "cliservice"));
        assert!(path_matches("/cliservice/token/abc", "cliservice"));
        assert!(!path_matches("/cliservicex", "cliservice"));
        assert!(!path_matches("/", "cliservice"));
    }
}
