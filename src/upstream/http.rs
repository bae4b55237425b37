//! Thrift-over-HTTP upstream: one POST per message over a keep-alive pool.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;

use super::Target;
use crate::error::UpstreamError;
use crate::identity::Credential;
use crate::tls::client::ClientTls;

const AUTH_COOKIE: &str = "hive.server2.auth";

/// The read buffer of one pooled upstream HTTP connection (a reply of
/// 10,000 rows still takes few reads).
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// A keep-alive connection pool for one upstream.
#[derive(Clone)]
pub struct HttpPool {
    client: PoolClient,
}

/// Plain or HTTPS; plaintext routes build no TLS config at all.
#[derive(Clone)]
enum PoolClient {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl PoolClient {
    fn request(&self, req: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            PoolClient::Plain(c) => c.request(req),
            PoolClient::Tls(c) => c.request(req),
        }
    }
}

impl HttpPool {
    /// `tls`: the upstream speaks HTTPS, verified by it.
    pub fn new(connect_timeout: Duration, tls: Option<&ClientTls>) -> HttpPool {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            // A fixed read buffer per pooled connection: hyper's adaptive one
            // grows (to ~400 KiB by default) on a big reply and keeps that
            // size while the connection lives, so RSS crept up for minutes
            // as each pooled connection met its first big reply. Fixed, the
            // pool costs its connection count times this from the start.
            .http1_read_buf_exact_size(UPSTREAM_READ_BUF);
        let client = match tls {
            None => PoolClient::Plain(builder.build(conn)),
            Some(t) => {
                conn.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*t.config).clone())
                    .https_only()
                    .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                        t.server_name.clone(),
                    ))
                    .enable_http1()
                    .wrap_connector(conn);
                PoolClient::Tls(builder.build(https))
            }
        };
        HttpPool { client }
    }
}

/// How requests authenticate before the upstream's cookie exists.
enum HttpAuth {
    Basic(HeaderValue),
    /// A fresh SPNEGO token per request for this service principal.
    Negotiate(Arc<crate::kerberos::Initiator>, String),
}

/// One identity's view of an HTTP upstream: its Basic header (or SPNEGO
/// principal) and the upstream's auth cookie, so the upstream need not
/// re-check credentials on every call.
pub struct HttpChannel {
    target: Arc<Target>,
    pool: HttpPool,
    auth: HttpAuth,
    client_ip: HeaderValue,
    cookie: std::sync::Mutex<Option<HeaderValue>>,
}

impl HttpChannel {
    pub fn new(
        target: Arc<Target>,
        cred: &Credential,
        pool: &HttpPool,
        client_ip: std::net::IpAddr,
    ) -> Result<HttpChannel, UpstreamError> {
        let auth = match (&target.service, &cred.kerberos) {
            (Some(service), Some(init)) => HttpAuth::Negotiate(init.clone(), service.clone()),
            (Some(_), None) => {
                return Err(UpstreamError::Protocol {
                    upstream: target.display.clone(),
                    detail: format!("{} has no Kerberos credentials", cred.user),
                })
            }
            (None, _) => HttpAuth::Basic(basic_header(&target, cred)?),
        };
        Ok(HttpChannel {
            target,
            pool: pool.clone(),
            auth,
            client_ip: HeaderValue::from_str(&client_ip.to_string())
                .expect("an IP is a valid header"),
            cookie: std::sync::Mutex::new(None),
        })
    }

    fn cookie(&self) -> Option<HeaderValue> {
        self.cookie
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub async fn call(&self, msg: Bytes) -> Result<Bytes, UpstreamError> {
        match self.call_streaming(msg, None).await? {
            HttpReply::Whole(b) => Ok(b),
            HttpReply::Partial(_) => unreachable!("no relay size was given"),
        }
    }

    /// As [`HttpChannel::call`]; with `relay_above`, a reply body longer
    /// than that comes back as soon as that much is in, with the rest of
    /// the body to relay ([`HttpRest`]).
    pub async fn call_streaming(
        &self,
        msg: Bytes,
        relay_above: Option<usize>,
    ) -> Result<HttpReply, UpstreamError> {
        match self.call_once(msg.clone(), relay_above).await {
            // The upstream's cookie expired: a 401 means nothing ran, so
            // authenticate afresh and send the call once more.
            Err(UpstreamError::AuthRejected { .. })
                if matches!(self.auth, HttpAuth::Negotiate(..)) && self.cookie().is_some() =>
            {
                *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.call_once(msg, relay_above).await
            }
            r => r,
        }
    }

    async fn authorization(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        match &self.auth {
            HttpAuth::Basic(h) => Ok(Some(h.clone())),
            // Hive sends no Negotiate header while it holds the cookie
            HttpAuth::Negotiate(..) if self.cookie().is_some() => Ok(None),
            HttpAuth::Negotiate(init, service) => {
                let tok = init.spnego_token(service.clone()).await.map_err(|e| {
                    UpstreamError::AuthRejected {
                        upstream: self.target.display.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let mut h = HeaderValue::from_str(&format!(
                    "Negotiate {}",
                    base64::engine::general_purpose::STANDARD.encode(tok)
                ))
                .expect("base64 is a valid header");
                h.set_sensitive(true);
                Ok(Some(h))
            }
        }
    }

    async fn call_once(
        &self,
        msg: Bytes,
        relay_above: Option<usize>,
    ) -> Result<HttpReply, UpstreamError> {
        let t = &self.target;
        let mut req = Request::post(t.http_uri()?)
            .header(CONTENT_TYPE, "application/x-thrift")
            .header(ACCEPT, "application/x-thrift")
            .header(
                USER_AGENT,
                concat!("kyuubi-broker/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-real-ip", self.client_ip.clone())
            .header("x-forwarded-for", self.client_ip.clone());
        if let Some(a) = self.authorization().await? {
            req = req.header(AUTHORIZATION, a);
        }
        if let Some(c) = self.cookie() {
            req = req.header(COOKIE, c);
        }
        let req = req
            .body(Full::new(msg))
            .map_err(|e| UpstreamError::Protocol {
                upstream: t.display.clone(),
                detail: e.to_string(),
            })?;
        let exchange = async {
            let resp = self
                .pool
                .client
                .request(req)
                .await
                .map_err(|e| classify(t, e))?;
            let status = resp.status();
            if let Some(c) = auth_cookie(resp.headers()) {
                *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            }
            if let (StatusCode::OK, Some(above)) = (status, relay_above) {
                return read_head(t, resp.into_body(), above).await;
            }
            let body = Limited::new(resp.into_body(), t.max_message_bytes)
                .collect()
                .await
                .map_err(|e| UpstreamError::Protocol {
                    upstream: t.display.clone(),
                    detail: format!("reading the reply body: {e}"),
                })?
                .to_bytes();
            match status {
                StatusCode::OK => Ok(HttpReply::Whole(body)),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Err(UpstreamError::AuthRejected {
                        upstream: t.display.clone(),
                        reason: format!("HTTP {}: {}", status.as_u16(), snippet(&body)),
                    })
                }
                s => Err(UpstreamError::HttpStatus {
                    upstream: t.display.clone(),
                    status: s.as_u16(),
                }),
            }
        };
        // a deadline, not a timer per request (see `deadline`)
        crate::deadline::Deadline::new()
            .within(t.read_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::ReadTimeout {
                upstream: t.display.clone(),
                secs: t.read_timeout.as_secs_f64(),
            })?
    }
}

/// An HTTP upstream's reply: whole, or its first part and the rest of the
/// body still to come.
pub enum HttpReply {
    Whole(Bytes),
    Partial(HttpRest),
}

/// The rest of a big reply body. Dropped before the end, the connection is
/// not reused (hyper discards a body that was not read to its end).
pub struct HttpRest {
    pub head: Bytes,
    /// Parts read past the head while telling a big reply from a small
    /// one, handed out before the body's next frames.
    queued: std::collections::VecDeque<Bytes>,
    body: hyper::body::Incoming,
    /// The body's length, when the upstream gave it (Content-Length).
    pub len: Option<usize>,
    max: usize,
    read_timeout: Duration,
    upstream: String,
}

impl HttpRest {
    /// The next part of the body, `None` at its end. Bounded by the route's
    /// read timeout per part and by `max_message_bytes` in all.
    pub async fn next(&mut self, so_far: usize) -> Result<Option<Bytes>, String> {
        if let Some(part) = self.queued.pop_front() {
            return Ok(Some(part));
        }
        loop {
            let frame = tokio::time::timeout(self.read_timeout, self.body.frame())
                .await
                .map_err(|_| {
                    format!(
                        "{}: no reply data for {:.0} s (read_timeout)",
                        self.upstream,
                        self.read_timeout.as_secs_f64()
                    )
                })?;
            let Some(frame) = frame else { return Ok(None) };
            let frame =
                frame.map_err(|e| format!("{}: reading the reply body: {e}", self.upstream))?;
            // trailers carry no message bytes
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if so_far + data.len() > self.max {
                return Err(format!(
                    "{}: reply larger than max_message_bytes ({})",
                    self.upstream, self.max
                ));
            }
            return Ok(Some(data));
        }
    }
}

/// The head of a streamed reply holds at least this much (a message
/// header is far shorter), so the caller can check what it answers.
const HEAD_MIN: usize = 1024;

/// Reads a 200 reply's body until `above` bytes are in or it ends. The
/// parts are kept as hyper gave them: only a reply that ends below `above`
/// in several parts, or a head shorter than [`HEAD_MIN`], is joined.
async fn read_head(
    t: &Target,
    mut body: hyper::body::Incoming,
    above: usize,
) -> Result<HttpReply, UpstreamError> {
    use hyper::body::Body;
    let broken = |detail: String| UpstreamError::Protocol {
        upstream: t.display.clone(),
        detail,
    };
    let too_big = || {
        broken(format!(
            "reply larger than max_message_bytes ({})",
            t.max_message_bytes
        ))
    };
    let len = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    if len.is_some_and(|n| n > t.max_message_bytes) {
        return Err(too_big());
    }
    let mut parts = std::collections::VecDeque::new();
    let mut total = 0;
    let ended = loop {
        if total > above {
            break false;
        }
        match body.frame().await {
            None => break true,
            Some(Err(e)) => return Err(broken(format!("reading the reply body: {e}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    total += d.len();
                    if total > t.max_message_bytes {
                        return Err(too_big());
                    }
                    if !d.is_empty() {
                        parts.push_back(d);
                    }
                }
            }
        }
    };
    if ended {
        return Ok(HttpReply::Whole(join(&mut parts, usize::MAX)));
    }
    Ok(HttpReply::Partial(HttpRest {
        head: join(&mut parts, HEAD_MIN),
        queued: parts,
        body,
        len,
        max: t.max_message_bytes,
        read_timeout: t.read_timeout,
        upstream: t.display.clone(),
    }))
}

/// Takes parts from the front of `parts` until `at_least` bytes are taken
/// (or none are left), as one buffer: the first part itself when it is
/// enough, else a copy of the parts joined.
fn join(parts: &mut std::collections::VecDeque<Bytes>, at_least: usize) -> Bytes {
    let Some(first) = parts.pop_front() else {
        return Bytes::new();
    };
    if first.len() >= at_least || parts.is_empty() {
        return first;
    }
    let mut joined = bytes::BytesMut::from(&first[..]);
    while joined.len() < at_least {
        let Some(p) = parts.pop_front() else { break };
        joined.extend_from_slice(&p);
    }
    joined.freeze()
}

fn basic_header(target: &Target, cred: &Credential) -> Result<HeaderValue, UpstreamError> {
    let raw = format!("{}:{}", cred.user, cred.password.expose());
    let mut basic = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
    .map_err(|_| UpstreamError::Protocol {
        upstream: target.display.clone(),
        detail: "credentials cannot be sent as an HTTP header".into(),
    })?;
    basic.set_sensitive(true);
    Ok(basic)
}

fn classify(t: &Target, e: hyper_util::client::legacy::Error) -> UpstreamError {
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(&e);
    let mut timed_out = false;
    let mut tls = None;
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
            tls = tls.or_else(|| crate::tls::explain(io));
        }
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            tls = tls.or_else(|| Some(crate::tls::explain_rustls(r)));
        }
        src = s.source();
    }
    if let Some(reason) = tls {
        UpstreamError::Tls {
            upstream: t.display.clone(),
            reason,
        }
    } else if e.is_connect()
        && (timed_out || chain.contains("timed out") || chain.contains("timeout"))
    {
        UpstreamError::ConnectTimeout {
            upstream: t.display.clone(),
            secs: t.connect_timeout.as_secs_f64(),
        }
    } else if e.is_connect() {
        UpstreamError::Connect {
            upstream: t.display.clone(),
            source: std::io::Error::other(chain),
        }
    } else {
        UpstreamError::Closed {
            upstream: t.display.clone(),
        }
    }
}

/// The `hive.server2.auth=...` pair from a Set-Cookie header, if present.
fn auth_cookie(headers: &http::HeaderMap) -> Option<HeaderValue> {
    headers.get_all(SET_COOKIE).iter().find_map(|v| {
        let s = v.to_str().ok()?;
        let pair = s.split(';').next()?.trim();
        pair.starts_with(AUTH_COOKIE)
            .then(|| HeaderValue::from_str(pair).ok())?
    })
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn parts(sizes: &[usize]) -> VecDeque<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Bytes::from(vec![i as u8; *n]))
            .collect()
    }

    #[test]
    fn a_first_part_long_enough_is_the_head_itself_not_a_copy() {
        let mut q = parts(&[4096, 100]);
        let ptr = q[0].as_ptr();
        let head = join(&mut q, HEAD_MIN);
        assert_eq!(head.as_ptr(), ptr);
        assert_eq!(head.len(), 4096);
        assert_eq!(q.len(), 1, "the second part stays queued");
    }

    #[test]
    fn short_parts_are_joined_until_the_head_is_long_enough() {
        let mut q = parts(&[600, 300, 300, 5000]);
        let head = join(&mut q, HEAD_MIN);
        assert_eq!(head.len(), 1200);
        assert_eq!(&head[..600], &[0u8; 600][..]);
        assert_eq!(&head[600..900], &[1u8; 300][..]);
        assert_eq!(&head[900..], &[2u8; 300][..]);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].len(), 5000);
    }

    #[test]
    fn a_whole_reply_in_several_parts_is_joined_in_order() {
        let mut q = parts(&[3, 2, 1]);
        let whole = join(&mut q, usize::MAX);
        assert_eq!(&whole[..], &[0, 0, 0, 1, 1, 2]);
        assert!(q.is_empty());
        assert!(join(&mut q, usize::MAX).is_empty());
    }
}
