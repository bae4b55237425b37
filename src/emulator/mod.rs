//! A local emulator of the EMR Serverless Spark management API (the token
//! and Kyuubi-service endpoints) and of the Kyuubi gateway's token check, for
//! tests and demos. It verifies ACS3 signatures, keeps tokens in memory,
//! returns them masked, uses the reference's response and error envelopes,
//! and injects faults on demand (`POST /_emulator/faults`).

mod api;
mod gateway;

/// For the fuzz targets ([`crate::fuzzing`]).
pub(crate) use gateway::token_in_path;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use api::serve_api;
pub use gateway::serve_gateway;

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    pub region: String,
    pub workspace: String,
    pub kyuubi_service: String,
}

/// Faults applied to the next requests (counts decrease as they are used).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "snake_case")]
pub struct Faults {
    /// Answer this many requests with code `Throttling`.
    pub throttle: u32,
    /// Send `x-acs-retry-after` (ms) with throttling answers.
    pub retry_after_ms: Option<u64>,
    /// Answer this many requests with HTTP 503.
    pub server_errors: u32,
    /// Delay every request by this much.
    pub latency_ms: u64,
    /// Answer every request for these actions (`x-acs-action`, e.g.
    /// `GetKyuubiToken`) with HTTP 503 until the faults are replaced: an
    /// outage of one operation rather than a few bad replies.
    pub fail_actions: Vec<String>,
}

#[derive(Debug, Clone)]
struct Token {
    name: String,
    value: String,
    created_ms: i64,
    expire_ms: Option<i64>,
    expire_days: Option<i32>,
    last_used_ms: Option<i64>,
    member_arns: Vec<String>,
}

/// What tests may read back (never token values).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub tokens: Vec<(String, String)>,
    pub kyuubi_state: String,
    pub delete_workspace_attempts: u32,
    pub creates: u32,
    pub deletes: u32,
    pub requests: u64,
    /// Signed requests per `x-acs-action`, failed ones included.
    pub calls: BTreeMap<String, u64>,
}

#[derive(Default)]
struct State {
    tokens: BTreeMap<String, Token>,
    kyuubi_state: String,
    delete_workspace_attempts: u32,
    creates: u32,
    deletes: u32,
    requests: u64,
    calls: BTreeMap<String, u64>,
    faults: Faults,
    /// Nonces seen in the last 15 minutes.
    nonces: HashMap<String, Instant>,
}

pub struct Emulator {
    cfg: EmulatorConfig,
    state: Mutex<State>,
}

/// Serves HTTP/1 on `listener` until `shutdown`, one task per connection.
/// `tls`: serve HTTPS with this certificate (the gateway's public endpoint).
async fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::server::ServerTls>>,
    shutdown: impl std::future::Future<Output = ()>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = match &tls {
                None => crate::wire::stream::Stream::Plain(stream),
                Some(t) => {
                    let limit = Duration::from_secs(10);
                    match tokio::time::timeout(limit, t.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e.detail(), "emulator TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

impl Emulator {
    pub fn new(cfg: EmulatorConfig) -> Arc<Emulator> {
        Arc::new(Emulator {
            cfg,
            state: Mutex::new(State {
                kyuubi_state: "RUNNING".into(),
                ..State::default()
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids of the tokens that exist now.
    pub fn token_ids(&self) -> Vec<String> {
        self.state().tokens.keys().cloned().collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.state();
        Snapshot {
            tokens: s
                .tokens
                .iter()
                .map(|(id, t)| (id.clone(), t.name.clone()))
                .collect(),
            kyuubi_state: s.kyuubi_state.clone(),
            delete_workspace_attempts: s.delete_workspace_attempts,
            creates: s.creates,
            deletes: s.deletes,
            requests: s.requests,
            calls: s.calls.clone(),
        }
    }

    /// Replaces the faults, as `POST /_emulator/faults` does.
    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// True if `value` is a live token; records its use.
    pub fn accept_token(&self, value: &str) -> bool {
        let mut s = self.state();
        let now = now_ms();
        let hit = s
            .tokens
            .values_mut()
            .find(|t| bool::from(t.value.as_bytes().ct_eq(value.as_bytes())));
        match hit {
            Some(t) if t.expire_ms.is_none_or(|e| e > now) => {
                t.last_used_ms = Some(now);
                true
            }
            _ => false,
        }
    }

    fn remember_nonce(&self, nonce: &str) -> bool {
        let mut s = self.state();
        let horizon = Duration::from_secs(15 * 60);
        s.nonces.retain(|_, seen| seen.elapsed() < horizon);
        s.nonces.insert(nonce.to_string(), Instant::now()).is_none()
    }
}

/// `dxj**********wfg`: first and last three characters.
fn mask(v: &str) -> String {
    if v.len() < 8 {
        return "****".into();
    }
    format!("{}**********{}", &v[..3], &v[v.len() - 3..])
}

fn valid_token_value(v: &str) -> bool {
    v.len() == 32
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}
