//! The admin listener (default 127.0.0.1:10019): `/metrics` (Prometheus),
//! `/healthz` (the process serves), `/readyz` (listeners up and every
//! upstream reachable), `/status` (JSON: routes with their session caps,
//! queue and waits, live sessions per user, per-method latency, tokens
//! masked). A small connection cap refuses (503)
//! rather than queues, and each request's head must arrive within the
//! handshake timeout, so slow clients cannot keep a scraper out for long.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::ServerConfig;
use crate::governor::GovernorStatus;
use crate::metrics::{LiveSessions, MethodRow};
use crate::session::Broker;

/// One client listener as the admin endpoints show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    pub protocol: String,
    pub addr: String,
    pub route: String,
    pub auth: String,
    /// Serves TLS.
    #[serde(default)]
    pub tls: bool,
}

pub struct AdminState {
    pub broker: Arc<Broker>,
    /// Listeners that came up.
    pub listeners: Vec<ListenerInfo>,
    /// Listeners configured (readiness needs all of them).
    pub configured: usize,
    pub rotation: Option<crate::tokens::Rotation>,
    /// ZooKeeper registration, with `[cluster]`.
    pub discovery: Option<Arc<std::sync::Mutex<crate::cluster::discovery::DiscoveryStatus>>>,
    pub started: Instant,
    /// TLS listeners, for their certificates' time to expiry.
    pub tls: Vec<(Arc<str>, Arc<crate::tls::server::ServerTls>)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_s: u64,
    pub listeners: Vec<ListenerInfo>,
    pub routes: Vec<RouteStatus>,
    pub sessions: Vec<LiveSessions>,
    pub methods: Vec<MethodRow>,
    pub token: Option<TokenStatus>,
    /// With `[cluster]`: the ZooKeeper registration.
    #[serde(default)]
    pub discovery: Option<crate::cluster::discovery::DiscoveryStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RouteStatus {
    pub name: String,
    /// Secrets masked (a path token shows as ****).
    pub upstream: String,
    /// Its session caps, places in use, queue and waits.
    #[serde(default)]
    pub governor: GovernorStatus,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenStatus {
    pub token_id: Option<String>,
    /// The first four characters, then ****.
    pub value: Option<String>,
    pub age_s: Option<i64>,
    pub expires_in_s: Option<i64>,
    pub rotations: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// In a fleet: "leader" or "follower".
    #[serde(default)]
    pub role: Option<String>,
    /// In a fleet: the broker that last wrote the token record.
    #[serde(default)]
    pub leader: Option<String>,
    /// In a fleet: leader's write to this broker's switch, last time.
    #[serde(default)]
    pub last_switch_lag_ms: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub listeners_up: usize,
    pub listeners_configured: usize,
    pub upstreams: Vec<UpstreamCheck>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UpstreamCheck {
    pub route: String,
    pub upstream: String,
    pub reachable: bool,
    pub error: Option<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn mask(v: &str) -> String {
    format!("{}****", v.chars().take(4).collect::<String>())
}

impl AdminState {
    fn token(&self) -> Option<TokenStatus> {
        let r = self.rotation.as_ref()?;
        let (status, live) = (&r.status, &r.live);
        let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = now_ms();
        Some(TokenStatus {
            token_id: s.active_token_id,
            value: live.borrow().as_ref().map(|t| mask(t.expose())),
            age_s: s.active_since_ms.map(|t| (now - t) / 1000),
            expires_in_s: s.expires_ms.map(|t| (t - now) / 1000),
            rotations: s.rotations,
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error,
            role: s.role.map(str::to_string),
            leader: s.leader,
            last_switch_lag_ms: s.last_switch_lag_ms,
        })
    }

    pub fn status(&self) -> Status {
        let m = &self.broker.metrics;
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            listeners: self.listeners.clone(),
            routes: self
                .broker
                .routes()
                .map(|r| RouteStatus {
                    name: r.name.to_string(),
                    upstream: r.target.display.clone(),
                    governor: r.governor.status(),
                })
                .collect(),
            sessions: m.live_sessions(),
            methods: m.table(),
            token: self.token(),
            discovery: self
                .discovery
                .as_ref()
                .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        }
    }

    fn metrics_text(&self) -> String {
        if let Some(t) = self.token() {
            let secs = |s: Option<i64>| s.map(|v| Duration::from_secs(v.max(0) as u64));
            self.broker
                .metrics
                .set_token(secs(t.age_s), secs(t.expires_in_s));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (name, t) in &self.tls {
            if let Some(end) = t.not_after() {
                self.broker
                    .metrics
                    .set_tls_cert_expiry(name, (end - now) as f64);
            }
        }
        self.broker.metrics.render()
    }

    pub async fn readiness(&self) -> Readiness {
        let mut checks = tokio::task::JoinSet::new();
        for r in self.broker.routes() {
            checks.spawn(async move {
                let t = &r.target;
                let r2 = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
                )
                .await;
                let error = match r2 {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("no TCP connection within 2 s".into()),
                };
                UpstreamCheck {
                    route: r.name.to_string(),
                    upstream: t.display.clone(),
                    reachable: error.is_none(),
                    error,
                }
            });
        }
        let mut upstreams = checks.join_all().await;
        upstreams.sort_by(|a, b| a.route.cmp(&b.route));
        Readiness {
            ready: self.listeners.len() == self.configured && upstreams.iter().all(|u| u.reachable),
            listeners_up: self.listeners.len(),
            listeners_configured: self.configured,
            upstreams,
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).expect("status serializes");
    reply(status, "application/json", body)
}

async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics_text(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let r = state.readiness().await;
            let code = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &r)
        }
        "/status" => json(StatusCode::OK, &state.status()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /metrics /healthz /readyz /status\n",
        ),
    }
}

/// The admin listener's limits: `admin.max_connections` served at once,
/// as many more answered with a 503 (beyond that, closed at once), and
/// the server's header and body timeouts.
pub struct AdminLimits {
    serving: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    max: usize,
    header_timeout: Duration,
    body_timeout: Duration,
}

impl AdminLimits {
    pub fn new(admin: Option<&crate::config::AdminConfig>, server: &ServerConfig) -> AdminLimits {
        let max = admin.map_or(16, |a| a.max_connections);
        AdminLimits {
            serving: Arc::new(Semaphore::new(max)),
            refusing: Arc::new(Semaphore::new(max)),
            max,
            header_timeout: server.handshake_timeout,
            body_timeout: server.http_body_timeout,
        }
    }

    fn builder(&self) -> http1::Builder {
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(16 * 1024);
        b
    }
}

/// The admin endpoints take no body: a request with one is answered without
/// reading it, and the connection is closed rather than drained, so a body
/// sent slowly holds nothing. The timeout bounds a request in any case.
async fn guarded(
    req: Request<Incoming>,
    state: &AdminState,
    limit: Duration,
) -> Response<Full<Bytes>> {
    let has_body = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(http::header::TRANSFER_ENCODING);
    let mut r = match tokio::time::timeout(limit, handle(req, state)).await {
        Ok(r) => r,
        Err(_) => reply(
            StatusCode::REQUEST_TIMEOUT,
            "text/plain",
            "request timed out\n",
        ),
    };
    if has_body {
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    r
}

const ADMIN_LISTENER: &str = "admin";

/// Serves until `cancel`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: AdminLimits,
    cancel: CancellationToken,
) {
    info!(addr = ?listener.local_addr().ok(), max_connections = limits.max, "admin listener up (/metrics /healthz /readyz /status)");
    let limits = Arc::new(limits);
    let name: Arc<str> = ADMIN_LISTENER.into();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let st = state.clone();
        let lim = limits.clone();
        let Ok(permit) = limits.serving.clone().try_acquire_owned() else {
            state.broker.metrics.connection_refused(&name, "listener");
            info!(target: "audit", event = "cap_refused", listener = ADMIN_LISTENER,
                reason = "listener", client = %peer.ip(), limit = limits.max);
            let Ok(refusing) = limits.refusing.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let max = lim.max;
                let svc = service_fn(move |_req| async move {
                    let mut r = reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("kyuubi-broker admin: too many connections (admin.max_connections = {max}); try again shortly\n"),
                    );
                    r.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    );
                    Ok::<_, Infallible>(r)
                });
                let conn = lim
                    .builder()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "refused admin connection ended with an error");
                }
                drop(refusing);
            });
            continue;
        };
        tokio::spawn(async move {
            let body_timeout = lim.body_timeout;
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(guarded(req, &st, body_timeout).await) }
            });
            if let Err(e) = lim
                .builder()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Fetches `/status` from a running broker's admin listener.
pub async fn fetch_status(addr: SocketAddr) -> Result<Status, String> {
    let url = format!("http://{addr}/status");
    crate::cloud::client::install_tls_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e} (is the broker running with an [admin] listener?)"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not a broker status: {e}"))
}

/// The per-method table `kyuubi-broker stats` prints.
pub fn format_table(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "method",
        "count",
        "errors",
        "p50_us",
        "p95_us",
        "p99_us",
        "max_us",
        "added_p50_us",
        "added_p99_us"
    );
    for m in &s.methods {
        let _ = writeln!(
            out,
            "{:<22} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            m.method,
            m.count,
            m.errors,
            m.p50_us,
            m.p95_us,
            m.p99_us,
            m.max_us,
            m.overhead_p50_us,
            m.overhead_p99_us
        );
    }
    let live: i64 = s.sessions.iter().map(|l| l.sessions).sum();
    let _ = writeln!(
        out,
        "{} live session(s); uptime {} s; kyuubi-broker {}",
        live, s.uptime_s, s.version
    );
    out
}
