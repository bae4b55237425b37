//! The emulated Kyuubi gateway front: `POST /cliservice/token/<token>` is
//! checked against the emulator's live tokens, then relayed to a real
//! HiveServer2 over HTTP (e.g. `http://127.0.0.1:10001/cliservice`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tracing::warn;

use super::Emulator;

type Upstream = Client<HttpConnector, Full<Bytes>>;

/// Relayed request and reply headers.
const PASS: [&str; 4] = ["authorization", "cookie", "content-type", "accept"];
const PASS_BACK: [&str; 2] = ["content-type", "set-cookie"];

/// `tls`: serve HTTPS, as the gateway's public endpoint (port 443) does.
pub async fn serve_gateway(
    listener: TcpListener,
    emu: Arc<Emulator>,
    upstream: Uri,
    tls: Option<Arc<crate::tls::server::ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(HttpConnector::new());
    let upstream = Arc::new(upstream);
    super::serve_http(listener, tls, shutdown, move |req| {
        let (emu, client, upstream) = (emu.clone(), client.clone(), upstream.clone());
        async move { relay(req, &emu, &client, &upstream).await }
    })
    .await
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// The token in `/<anything>/token/<token>[/...]`.
pub(crate) fn token_in_path(path: &str) -> Option<&str> {
    let mut it = path.split('/').skip_while(|s| *s != "token");
    it.next()?;
    it.next().filter(|t| !t.is_empty())
}

async fn relay(
    req: Request<Incoming>,
    emu: &Emulator,
    client: &Upstream,
    upstream: &Uri,
) -> Response<Full<Bytes>> {
    let Some(token) = token_in_path(req.uri().path()) else {
        return text(
            StatusCode::UNAUTHORIZED,
            "Authentication Error: no token in the path (use /cliservice/token/<token>)",
        );
    };
    if !emu.accept_token(token) {
        return text(
            StatusCode::UNAUTHORIZED,
            "Authentication Error: invalid or expired token",
        );
    }
    let mut out = Request::post(upstream.clone());
    for name in PASS {
        for v in req.headers().get_all(name) {
            out = out.header(name, v);
        }
    }
    let body = match Limited::new(req.into_body(), 1 << 30).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "cannot read the request body"),
    };
    let Ok(out) = out.body(Full::new(body)) else {
        return text(StatusCode::BAD_REQUEST, "cannot build the upstream request");
    };
    let resp = match client.request(out).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "emulated gateway: upstream unreachable");
            return text(
                StatusCode::BAD_GATEWAY,
                "emulated gateway: upstream unreachable",
            );
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::BAD_GATEWAY,
                "emulated gateway: upstream reply cut short",
            )
        }
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    for name in PASS_BACK {
        for v in headers.get_all(name) {
            r.headers_mut().append(name, v.clone());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::token_in_path;

    #[test]
    fn token_is_the_segment_after_token() {
        assert_eq!(token_in_path("/cliservice/token/abc"), Some("abc"));
        assert_eq!(token_in_path("/cliservice/token/abc/x"), Some("abc"));
        assert_eq!(token_in_path("/cliservice"), None);
        assert_eq!(token_in_path("/cliservice/token/"), None);
    }
}
