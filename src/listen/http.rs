//! Thrift-over-HTTP listener: one POST per RPC to the configured path (or any
//! sub-path), Basic auth or the broker's `hive.server2.auth` cookie.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::cookie::CookieJar;
use super::Shared;
use crate::config::ListenerConfig;
use crate::secret::Secret;
use crate::session::{Call, ClientConn, ClientIdentity, ClientKind};

/// Per-listener state shared by its connections.
pub struct HttpListener {
    pub config: ListenerConfig,
    auth: crate::auth::Authenticator,
    route: Arc<crate::session::Route>,
    cookies: CookieJar,
}

impl HttpListener {
    pub fn new(l: super::Listener) -> Arc<HttpListener> {
        Arc::new(HttpListener {
            cookies: CookieJar::new(l.config.cookie_max_age),
            config: l.config,
            auth: l.auth,
            route: l.route,
        })
    }
}

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<HttpListener>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let _open = shared.broker.metrics.connection(&listener.config.name);
    let span = tracing::debug_span!("http", listener = %listener.config.name, %peer);
    let sh = shared.clone();
    let svc = service_fn(move |req| {
        let (listener, shared) = (listener.clone(), sh.clone());
        async move { Ok::<_, Infallible>(handle(req, peer, &listener, &shared).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.server.handshake_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.cancel.cancelled() => {
            // finish the request in flight, then close
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(parent: &span, error = %e, "HTTP connection ended with an error");
    }
    drop(permit);
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn thrift(body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-thrift"),
    );
    r
}

/// 401 with the scheme the client should use (`BASIC` or `NEGOTIATE`).
fn unauthorized(scheme: &'static str, msg: &str) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        format!("Authentication Error: {msg}"),
    );
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, http::HeaderValue::from_static(scheme));
    r
}

const BASIC: &str = "Basic realm=\"kyuubi-broker\"";
const NEGOTIATE: &str = "Negotiate";

fn path_matches(path: &str, base: &str) -> bool {
    let p = path.trim_start_matches('/');
    p == base
        || p.strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Identity from the Authorization header: Basic only on this listener.
/// The value of an `Authorization: <scheme> <value>` header, if present;
/// another scheme is refused with `wrong_scheme`.
fn authorization<'r>(
    req: &'r Request<Incoming>,
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

fn basic_credentials(req: &Request<Incoming>) -> Result<Option<(String, Secret)>, &'static str> {
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

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &HttpListener,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let cfg = &listener.config;
    if req.method() != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Thrift over HTTP takes POST only",
        );
        r.headers_mut()
            .insert(ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    if !path_matches(req.uri().path(), &cfg.http_path) {
        return text(
            StatusCode::NOT_FOUND,
            format!("no Thrift endpoint here; use /{}", cfg.http_path),
        );
    }
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-thrift") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/x-thrift",
        );
    }
    if shared.cancel.is_cancelled() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "kyuubi-broker is shutting down",
        );
    }

    let do_as = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case("doAs"))
            .map(|(_, v)| v.to_string())
    });
    let (identity, set_cookie, negotiate) = match authenticate_request(&req, peer, listener).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };

    let body = match Limited::new(req.into_body(), shared.server.max_message_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request exceeds {} bytes", shared.server.max_message_bytes),
            )
        }
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    let call = match Call::parse(&body) {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, error = %e, "malformed HTTP request body");
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let mut conn = ClientConn::new(ClientKind::Http, listener.route.clone(), Some(identity));
    conn.do_as = do_as;
    let mut resp = match shared.broker.forward(&mut conn, &call, body).await {
        Ok(reply) => thrift(reply),
        Err(e) => match e.http_status() {
            Some(status) => text(status, format!("kyuubi-broker: {e}")),
            None => thrift(e.to_thrift_reply(call.wire_name(), call.seqid).into()),
        },
    };
    if let Some(c) = set_cookie {
        if let Ok(v) = http::HeaderValue::from_str(&c) {
            resp.headers_mut().insert(SET_COOKIE, v);
        }
    }
    if let Some(t) = negotiate {
        // the mutual-authentication token of RFC 4559
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

/// A SPNEGO token from `Authorization: Negotiate <base64>`.
fn negotiate_token(req: &Request<Incoming>) -> Result<Option<Vec<u8>>, &'static str> {
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

/// The identity, a cookie to set, and a SPNEGO reply token to return.
type Authenticated = (ClientIdentity, Option<String>, Option<Vec<u8>>);

async fn authenticate_request(
    req: &Request<Incoming>,
    peer: SocketAddr,
    listener: &HttpListener,
) -> Result<Authenticated, Response<Full<Bytes>>> {
    if let Some(c) = req.headers().get(COOKIE).and_then(|v| v.to_str().ok()) {
        if let Some(id) = listener.cookies.check(c).await {
            return Ok((id, None, None));
        }
    }
    if let Some(acceptor) = listener.auth.kerberos() {
        let token = match negotiate_token(req) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(unauthorized(
                    NEGOTIATE,
                    "Kerberos (SPNEGO) credentials required",
                ))
            }
            Err(msg) => {
                debug!(%peer, msg, "refused an Authorization header");
                return Err(unauthorized(NEGOTIATE, msg));
            }
        };
        return match acceptor.spnego(token).await {
            Ok((who, reply)) => {
                debug!(principal = %who.principal, user = %who.user, "client authenticated (SPNEGO)");
                let id = ClientIdentity::from_ticket(who.user, peer);
                let cookie = listener.cookies.issue(id.clone()).await;
                Ok((id, Some(cookie), reply))
            }
            Err(e) => {
                warn!(%peer, error = %e, "SPNEGO authentication failed");
                Err(unauthorized(NEGOTIATE, &e.to_string()))
            }
        };
    }
    match basic_credentials(req) {
        Ok(Some((user, password))) => {
            match listener.auth.authenticate(&user, password, peer).await {
                Ok(id) => {
                    let cookie = listener.cookies.issue(id.clone()).await;
                    Ok((id, Some(cookie), None))
                }
                Err(e) => Err(unauthorized(BASIC, &e.to_string())),
            }
        }
        Ok(None) => Err(unauthorized(BASIC, "credentials required (HTTP Basic)")),
        Err(msg) => Err(unauthorized(BASIC, msg)),
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
