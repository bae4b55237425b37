//! Errors of one RPC, and the one place where they become a client reply:
//! a TStatus for Thrift clients, an HTTP status for HTTP-level failures.

use http::StatusCode;

use crate::tcli::{error_reply, ReplyStatus};
use crate::wire::thrift::WireError;

/// A failure talking to an upstream. `upstream` is a display name with any
/// token masked, so these texts are safe to log and to send to clients.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        upstream: String,
        source: std::io::Error,
    },
    #[error("timed out after {secs:.1}s connecting to {upstream}")]
    ConnectTimeout { upstream: String, secs: f64 },
    #[error("{upstream} did not reply within {secs:.1}s")]
    ReadTimeout { upstream: String, secs: f64 },
    #[error("{upstream} closed the connection")]
    Closed { upstream: String },
    #[error("I/O error talking to {upstream}: {source}")]
    Io {
        upstream: String,
        source: std::io::Error,
    },
    #[error("{upstream} refused the broker's credentials: {reason}")]
    AuthRejected { upstream: String, reason: String },
    #[error("{upstream} answered HTTP {status}")]
    HttpStatus { upstream: String, status: u16 },
    #[error("{upstream} sent a malformed reply: {detail}")]
    Protocol { upstream: String, detail: String },
}

impl UpstreamError {
    pub fn http_status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::ReadTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::ReadTimeout { .. } => "read_timeout",
            UpstreamError::Closed { .. } => "closed",
            UpstreamError::Io { .. } => "io",
            UpstreamError::AuthRejected { .. } => "auth_rejected",
            UpstreamError::HttpStatus { .. } => "http_status",
            UpstreamError::Protocol { .. } => "protocol",
        }
    }
}

/// Why one RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client sent bytes that are not a TCLIService call.
    #[error("bad request from client: {0}")]
    BadRequest(String),
    /// A session or operation handle the broker does not know (expired, or
    /// owned by an upstream connection that has gone away).
    #[error("unknown or expired {0} handle; open a new session")]
    UnknownHandle(&'static str),
    #[error("kyuubi-broker is shutting down; reconnect shortly")]
    ShuttingDown,
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The client is known but may not use this resource.
    #[error("user {user} has no account mapping on computing resource {resource}")]
    NoMapping { user: String, resource: String },
    /// A reply being relayed piecewise broke off: the client holds part of
    /// a frame, so its connection must be closed.
    #[error("reply relay broken: {0}")]
    RelayBroken(String),
}

impl From<WireError> for RpcError {
    fn from(e: WireError) -> Self {
        RpcError::BadRequest(e.to_string())
    }
}

impl RpcError {
    pub fn kind(&self) -> &'static str {
        match self {
            RpcError::Upstream(e) => e.kind(),
            RpcError::BadRequest(_) => "bad_request",
            RpcError::UnknownHandle(_) => "unknown_handle",
            RpcError::ShuttingDown => "shutting_down",
            RpcError::Auth(_) => "unauthenticated",
            RpcError::NoMapping { .. } => "no_mapping",
            RpcError::RelayBroken(_) => "relay_broken",
        }
    }

    /// The Thrift reply a binary client gets for this failure.
    pub fn to_thrift_reply(&self, method: &str, seqid: i32) -> Vec<u8> {
        let (status, state) = match self {
            RpcError::UnknownHandle(_) => (ReplyStatus::InvalidHandle, "HY000"),
            // 08S01: communication link failure, as JDBC drivers expect
            RpcError::Upstream(_) | RpcError::ShuttingDown | RpcError::RelayBroken(_) => {
                (ReplyStatus::Error, "08S01")
            }
            RpcError::BadRequest(_) => (ReplyStatus::Error, "HY000"),
            // 28000: invalid authorization specification
            RpcError::Auth(_) | RpcError::NoMapping { .. } => (ReplyStatus::Error, "28000"),
        };
        // the mapping refusal is quoted exactly, without a prefix
        let text = match self {
            RpcError::NoMapping { .. } => self.to_string(),
            _ => format!("kyuubi-broker: {self}"),
        };
        error_reply(method, seqid, status, state, &text)
    }

    /// For HTTP clients: transport-level failures become an HTTP status with
    /// a text body; `None` means answer with the Thrift reply (HTTP 200).
    pub fn http_status(&self) -> Option<StatusCode> {
        match self {
            RpcError::Upstream(e) => Some(e.http_status()),
            RpcError::ShuttingDown => Some(StatusCode::SERVICE_UNAVAILABLE),
            RpcError::RelayBroken(_) => Some(StatusCode::BAD_GATEWAY),
            RpcError::BadRequest(_) => Some(StatusCode::BAD_REQUEST),
            RpcError::Auth(crate::auth::AuthError::Unavailable(_)) => {
                Some(StatusCode::SERVICE_UNAVAILABLE)
            }
            RpcError::Auth(_) => Some(StatusCode::UNAUTHORIZED),
            RpcError::UnknownHandle(_) | RpcError::NoMapping { .. } => None,
        }
    }
}
