//! HTTP client for the management API: signs every request, applies the
//! read/write timeouts, waits out throttling, retries 5xx only where a
//! request is safe to repeat, and reports errors with code, message and
//! request id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::{debug, warn};

use super::credentials::CloudCredential;
use super::request::{self, ApiRequest, KyuubiRef, Method, Refused, TokenBody};
use super::sign::{self, SignInput};

const USER_AGENT: &str = concat!("kyuubi-broker/", env!("CARGO_PKG_VERSION"));

/// Where the API is served.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://host` or `http://host:port` (overrides, emulators).
    pub base: String,
    /// The `host` header (with `:port` when the URL has one).
    pub host: String,
}

impl Endpoint {
    /// The regional endpoint: public, or VPC.
    pub fn regional(region: &str, vpc: bool) -> Endpoint {
        let host = if vpc {
            format!("{}-vpc.{region}.aliyuncs.com", request::PRODUCT)
        } else {
            format!("{}.{region}.aliyuncs.com", request::PRODUCT)
        };
        Endpoint {
            base: format!("https://{host}"),
            host,
        }
    }

    /// An explicit endpoint: `http://127.0.0.1:8080`, `https://host`, or a bare `host[:port]` (HTTPS).
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = match s.split_once("://") {
            Some((sch @ ("http" | "https"), rest)) => (sch, rest),
            Some((other, _)) => {
                return Err(format!("endpoint scheme '{other}' is not http or https"))
            }
            None => ("https", s),
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "endpoint '{s}' must be scheme://host[:port] with no path"
            ));
        }
        Ok(Endpoint {
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{action}: cannot reach the management API at {endpoint}: {detail}")]
    Transport {
        action: &'static str,
        endpoint: String,
        detail: String,
    },
    #[error("{action}: HTTP {status}, code {code}: {message} (requestId {request_id})")]
    Api {
        action: &'static str,
        status: u16,
        code: String,
        message: String,
        request_id: String,
    },
    #[error("{action}: unexpected reply: {detail}")]
    Decode {
        action: &'static str,
        detail: String,
    },
}

impl ApiError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The API said this object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Api { status: 404, .. })
            || self
                .code()
                .is_some_and(|c| c.contains("NotFound") || c.contains("NotExist"))
    }
}

/// Retry policy; the defaults follow the reference guidance.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Attempts in all, for throttling and (safe) 5xx/transport failures.
    pub max_attempts: u32,
    /// Wait when throttled without an `x-acs-retry-after` header (random in range).
    pub throttle_wait: (Duration, Duration),
    /// First backoff for 5xx; doubles per attempt.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 5,
            throttle_wait: (Duration::from_secs(5), Duration::from_secs(10)),
            backoff: Duration::from_millis(500),
        }
    }
}

/// Cheap to clone: the connection pool is shared.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    credential: CloudCredential,
    pub retry: Retry,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(alias = "Code", default)]
    code: Option<String>,
    #[serde(alias = "Message", default)]
    message: Option<String>,
    #[serde(alias = "RequestId", default)]
    request_id: Option<String>,
}

/// reqwest is built without a default TLS provider: install the process-wide
/// one (ring) before building any client. A second call is a no-op.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ApiClient {
    pub fn new(endpoint: Endpoint, credential: CloudCredential) -> ApiClient {
        install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(USER_AGENT)
            .build()
            .expect("TLS backend initialises");
        ApiClient {
            http,
            endpoint,
            credential,
            retry: Retry::default(),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
        }
    }

    /// Sends a request (with retries) and returns the JSON reply.
    pub async fn send(&self, req: &ApiRequest) -> Result<serde_json::Value, ApiError> {
        let mut attempt = 1;
        loop {
            let err = match self.send_once(req).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let wait = match &err.0 {
                _ if attempt >= self.retry.max_attempts => None,
                Failure::Throttled(after) => Some(after.unwrap_or_else(|| {
                    let (lo, hi) = self.retry.throttle_wait;
                    rand::thread_rng().gen_range(lo..=hi)
                })),
                Failure::Server | Failure::Transport if req.idempotent() => {
                    Some(self.retry.backoff * 2u32.pow(attempt - 1))
                }
                _ => None,
            };
            match wait {
                Some(w) => {
                    warn!(action = req.action(), attempt, error = %err.1, "retrying in {w:?}");
                    tokio::time::sleep(w).await;
                    attempt += 1;
                }
                None => return Err(err.1),
            }
        }
    }

    async fn send_once(&self, req: &ApiRequest) -> Result<serde_json::Value, (Failure, ApiError)> {
        // checked when built; checked again here, at the last step before the wire
        request::refuse_forbidden(req.action(), req.method(), req.path())
            .map_err(|e| (Failure::Other, e.into()))?;
        let body = req.body().unwrap_or_default().to_vec();
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), self.endpoint.host.clone()),
            ("x-acs-version".into(), request::VERSION.into()),
            ("x-acs-action".into(), req.action().into()),
            ("x-acs-date".into(), utc_timestamp(SystemTime::now())),
            ("x-acs-signature-nonce".into(), nonce()),
            ("accept".into(), "application/json".into()),
            ("x-acs-content-sha256".into(), sign::sha256_hex(&body)),
        ];
        if req.body().is_some() {
            headers.push((
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            ));
        }
        let c = &self.credential;
        if let Some(t) = &c.security_token {
            headers.push(("x-acs-accesskey-id".into(), c.access_key_id.clone()));
            headers.push(("x-acs-security-token".into(), t.expose().into()));
        }
        let signed = sign::sign(
            &SignInput {
                method: req.method().as_str(),
                path: req.path(),
                query: req.query(),
                headers: &headers,
                body: &body,
            },
            &c.access_key_id,
            c.access_key_secret.expose(),
        );
        let query = sign::canonical_query(req.query());
        let url = if query.is_empty() {
            format!("{}{}", self.endpoint.base, req.path())
        } else {
            format!("{}{}?{}", self.endpoint.base, req.path(), query)
        };
        let method = match req.method() {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        };
        let timeout = match req.method() {
            Method::Get => self.read_timeout,
            _ => self.write_timeout,
        };
        let mut rb = self.http.request(method, &url).timeout(timeout);
        for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
            rb = rb.header(k.as_str(), v.as_str());
        }
        rb = rb.header("authorization", signed.authorization);
        if req.body().is_some() {
            rb = rb.body(body);
        }
        let transport = |detail: String| {
            (
                Failure::Transport,
                ApiError::Transport {
                    action: req.action(),
                    endpoint: self.endpoint.base.clone(),
                    detail,
                },
            )
        };
        let resp = rb.send().await.map_err(|e| transport(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("x-acs-retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let bytes = resp.bytes().await.map_err(|e| transport(error_chain(&e)))?;
        debug!(action = req.action(), status, "management API reply");
        if status < 400 {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(serde_json::Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                (
                    Failure::Other,
                    ApiError::Decode {
                        action: req.action(),
                        detail: e.to_string(),
                    },
                )
            });
        }
        let eb: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        let (code, message, request_id) = match eb {
            Some(b) => (
                b.code.unwrap_or_default(),
                b.message.unwrap_or_default(),
                b.request_id.unwrap_or_default(),
            ),
            None => (
                String::new(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                String::new(),
            ),
        };
        let failure = if retry_after.is_some() || code.starts_with("Throttling") {
            Failure::Throttled(retry_after)
        } else if status >= 500 {
            Failure::Server
        } else {
            Failure::Other
        };
        Err((
            failure,
            ApiError::Api {
                action: req.action(),
                status,
                code,
                message,
                request_id,
            },
        ))
    }

    async fn send_as<T: DeserializeOwned>(
        &self,
        req: Result<ApiRequest, Refused>,
    ) -> Result<T, ApiError> {
        let req = req?;
        let v = self.send(&req).await?;
        serde_json::from_value(v).map_err(|e| ApiError::Decode {
            action: req.action(),
            detail: e.to_string(),
        })
    }

    /// Follows `nextToken` until the last page; `items` names the list field.
    async fn paged<T: DeserializeOwned>(
        &self,
        page: impl Fn(Option<&str>) -> Result<ApiRequest, Refused>,
        items: &str,
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let req = page(next.as_deref())?;
            let mut v = self.send(&req).await?;
            if let Some(list) = v.get_mut(items).map(serde_json::Value::take) {
                let list: Vec<T> = serde_json::from_value(list).map_err(|e| ApiError::Decode {
                    action: req.action(),
                    detail: e.to_string(),
                })?;
                out.extend(list);
            }
            match v
                .get("nextToken")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty())
            {
                Some(t) => next = Some(t.to_string()),
                None => return Ok(out),
            }
        }
    }

    pub async fn list_workspaces(&self, region: &str) -> Result<Vec<Workspace>, ApiError> {
        self.paged(|next| request::list_workspaces(region, next), "workspaces")
            .await
    }

    pub async fn get_workspace(
        &self,
        region: &str,
        workspace: &str,
    ) -> Result<Workspace, ApiError> {
        let r: WorkspaceReply = self
            .send_as(request::get_workspace(region, workspace))
            .await?;
        Ok(r.workspace)
    }

    pub async fn list_workspace_queues(
        &self,
        region: &str,
        workspace: &str,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let r: QueuesReply = self
            .send_as(request::list_workspace_queues(region, workspace))
            .await?;
        Ok(r.queues.unwrap_or_default())
    }

    pub async fn list_release_versions(
        &self,
        region: &str,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        self.paged(
            |next| request::list_release_versions(region, next),
            "releaseVersions",
        )
        .await
    }

    pub async fn list_kyuubi_services(
        &self,
        r: &KyuubiRef,
    ) -> Result<Vec<KyuubiService>, ApiError> {
        let d: Data<KyuubiServices> = self.send_as(request::list_kyuubi_services(r)).await?;
        Ok(d.data.kyuubi_services.unwrap_or_default())
    }

    pub async fn get_kyuubi_service(&self, r: &KyuubiRef) -> Result<KyuubiService, ApiError> {
        let d: Data<KyuubiService> = self.send_as(request::get_kyuubi_service(r)).await?;
        Ok(d.data)
    }

    pub async fn start_kyuubi_service(&self, r: &KyuubiRef) -> Result<(), ApiError> {
        self.send(&request::start_kyuubi_service(r)?)
            .await
            .map(|_| ())
    }

    /// Stops the gateway, dropping every JDBC session on it. Callers check
    /// state and get confirmation first.
    pub async fn stop_kyuubi_service(&self, r: &KyuubiRef) -> Result<(), ApiError> {
        self.send(&request::stop_kyuubi_service(r)?)
            .await
            .map(|_| ())
    }

    pub async fn create_kyuubi_token(
        &self,
        r: &KyuubiRef,
        body: &TokenBody,
    ) -> Result<String, ApiError> {
        let d: Data<Created> = self.send_as(request::create_kyuubi_token(r, body)).await?;
        Ok(d.data.token_id)
    }

    pub async fn list_kyuubi_tokens(&self, r: &KyuubiRef) -> Result<Vec<TokenInfo>, ApiError> {
        let d: Data<Tokens> = self.send_as(request::list_kyuubi_token(r)).await?;
        Ok(d.data.tokens.unwrap_or_default())
    }

    pub async fn get_kyuubi_token(
        &self,
        r: &KyuubiRef,
        token_id: &str,
    ) -> Result<TokenInfo, ApiError> {
        let d: Data<TokenInfo> = self.send_as(request::get_kyuubi_token(r, token_id)).await?;
        Ok(d.data)
    }

    pub async fn update_kyuubi_token(
        &self,
        r: &KyuubiRef,
        token_id: &str,
        body: &TokenBody,
    ) -> Result<(), ApiError> {
        self.send(&request::update_kyuubi_token(r, token_id, body)?)
            .await
            .map(|_| ())
    }

    /// Deletes a token. Callers check it (GetKyuubiToken) and get
    /// confirmation first.
    pub async fn delete_kyuubi_token(&self, r: &KyuubiRef, token_id: &str) -> Result<(), ApiError> {
        self.send(&request::delete_kyuubi_token(r, token_id)?)
            .await
            .map(|_| ())
    }
}

enum Failure {
    Throttled(Option<Duration>),
    Server,
    Transport,
    Other,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn nonce() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill(&mut b);
    sign::hex(&b)
}

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC.
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Deserialize)]
struct Data<T> {
    data: T,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    token_id: String,
}

#[derive(Deserialize)]
struct Tokens {
    #[serde(default)]
    tokens: Option<Vec<TokenInfo>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KyuubiServices {
    #[serde(default)]
    kyuubi_services: Option<Vec<KyuubiService>>,
}

#[derive(Deserialize)]
struct WorkspaceReply {
    workspace: Workspace,
}

#[derive(Deserialize)]
struct QueuesReply {
    #[serde(default)]
    queues: Option<Vec<serde_json::Value>>,
}

/// A token as the API shows it (the value is masked).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenInfo {
    pub token_id: String,
    pub name: Option<String>,
    /// Masked, e.g. `dxj**********wfg`.
    pub token: Option<String>,
    pub created_by: Option<String>,
    pub create_time: Option<i64>,
    pub expire_time: Option<i64>,
    pub last_used_time: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workspace {
    pub workspace_id: String,
    pub workspace_name: Option<String>,
    pub workspace_status: Option<String>,
    pub region_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KyuubiService {
    pub kyuubi_service_id: String,
    pub name: Option<String>,
    pub state: Option<String>,
    pub queue: Option<String>,
    pub release_version: Option<String>,
    pub inner_endpoint: Option<String>,
    pub public_endpoint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso8601() {
        let t = UNIX_EPOCH + Duration::from_secs(1_735_787_045); // 2025-01-02T03:04:05Z
        assert_eq!(utc_timestamp(t), "2025-01-02T03:04:05Z");
        assert_eq!(
            utc_timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn endpoints_follow_the_regional_rule_or_an_override() {
        let e = Endpoint::regional("cn-hangzhou", false);
        assert_eq!(
            e.base,
            "https://emr-serverless-spark.cn-hangzhou.aliyuncs.com"
        );
        assert_eq!(
            Endpoint::regional("cn-beijing", true).host,
            "emr-serverless-spark-vpc.cn-beijing.aliyuncs.com"
        );
        let o = Endpoint::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (o.base.as_str(), o.host.as_str()),
            ("http://127.0.0.1:8080", "127.0.0.1:8080")
        );
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://h/path").is_err());
    }
}
