//! Why a client exchange (a login or an RPC) failed, and the one decision of
//! how each failure is answered: [`RpcError::answer`] picks the outcome
//! label, the SQLSTATE, the HTTP status, the SASL status and the text the
//! client sees. Each transport then writes that answer in its own form, in
//! one function each (`listen::binary::answer`, `listen::http::respond`).

use http::StatusCode;

use crate::auth::AuthError;
use crate::governor::QueueTimeout;
use crate::mapping::NoMapping;
use crate::tcli::{error_reply, ReplyStatus};
use crate::wire::io::FrameError;
use crate::wire::sasl;
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
    /// The TLS handshake with the upstream failed: `reason` says how to
    /// fix it (an untrusted CA, an expiry, a name mismatch).
    #[error("TLS to {upstream} failed: {reason}")]
    Tls { upstream: String, reason: String },
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
            UpstreamError::Tls { .. } => "tls",
        }
    }
}

/// Which peer of a relayed reply went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// Why one client exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client sent bytes that are not a message at all (a broken frame,
    /// a header that does not parse, not SASL during the handshake): the
    /// stream is out of step, so the connection is closed after the answer.
    #[error("malformed request from client: {0}")]
    Malformed(String),
    /// A well-framed call the broker cannot use (a body that does not
    /// decode, a handle missing): answered, and the connection goes on.
    #[error("bad request from client: {0}")]
    BadRequest(String),
    /// A declared size above the limit, refused before allocating.
    #[error("message {}exceeds the limit of {max} bytes", .len.map(|n| format!("of {n} bytes ")).unwrap_or_default())]
    TooLarge { len: Option<usize>, max: usize },
    /// An HTTP request that is not a Thrift call at this endpoint (wrong
    /// method, path or content type); `status` is what the client gets.
    #[error("{text}")]
    NotThrift { status: StatusCode, text: String },
    /// A session or operation handle the broker does not know (expired, or
    /// owned by an upstream connection that has gone away, or another user's).
    #[error("unknown or expired {0} handle; open a new session")]
    UnknownHandle(&'static str),
    #[error("kyuubi-broker is shutting down; reconnect shortly")]
    ShuttingDown,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    NoMapping(#[from] NoMapping),
    #[error("no complete handshake within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// A reply being relayed piecewise broke off: the client holds part of
    /// a frame, so its connection must be closed.
    #[error("reply relay broken on the {} side: {detail}", match .side { Side::Client => "client", Side::Upstream => "upstream" })]
    RelayBroken { side: Side, detail: String },
    /// A connection cap is reached: refused, the client may retry later.
    #[error("too many connections: {} ({} = {limit}); try again later", .cap.what(), .cap.key())]
    Limit { cap: Cap, limit: usize },
    /// The client's address is in `server.deny_clients`.
    #[error("connections from this address are not accepted")]
    Denied,
    /// An HTTP request body that did not arrive in time.
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// A plaintext client on a TLS listener (answered in plaintext).
    #[error("this port speaks TLS: connect with ssl=true (https:// for HTTP)")]
    TlsRequired,
    /// The user already has `server.max_sessions_per_user` live sessions.
    #[error("this user has {0} sessions open (server.max_sessions_per_user); close one (CloseSession) or try again later")]
    SessionLimit(usize),
    /// No place under a route's `max_upstream_sessions` (or the per-user
    /// cap) came free within its `queue_timeout`.
    #[error(transparent)]
    QueueTimeout(#[from] QueueTimeout),
}

/// Which connection cap refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Global,
    Listener,
    PerIp,
    PerUser,
}

impl Cap {
    /// The `reason` label of `connections_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Cap::Global => "global",
            Cap::Listener => "listener",
            Cap::PerIp => "per_ip",
            Cap::PerUser => "per_user",
        }
    }

    /// The setting the client's administrator would raise.
    pub fn key(self) -> &'static str {
        match self {
            Cap::Global => "server.max_connections",
            Cap::Listener => "listener max_connections",
            Cap::PerIp => "server.max_connections_per_ip",
            Cap::PerUser => "server.max_connections_per_user",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Cap::Global => "the broker serves its maximum number of connections",
            Cap::Listener => "this listener serves its maximum number of connections",
            Cap::PerIp => "this client address has its maximum number of connections open",
            Cap::PerUser => "this user has their maximum number of connections open",
        }
    }
}

impl From<WireError> for RpcError {
    fn from(e: WireError) -> Self {
        RpcError::BadRequest(e.to_string())
    }
}

impl From<FrameError> for RpcError {
    /// A framing failure on the client's connection.
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, max } => RpcError::TooLarge {
                len: Some(len),
                max,
            },
            other => RpcError::Malformed(other.to_string()),
        }
    }
}

/// Who caused a failure: what the metrics count it as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// What the client sent, or who it is (`client_errors_total`).
    Client,
    /// The broker or a service it relies on (an LDAP server, shutdown).
    Broker,
    /// The upstream (`upstream_errors_total`).
    Upstream,
}

/// How a failure is answered, whatever the transport.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: ReplyStatus,
    pub sql_state: &'static str,
    /// For HTTP clients: `None` means a Thrift reply in an HTTP 200.
    pub http: Option<StatusCode>,
    /// During a SASL handshake: BAD for a refusal, ERROR for anything else.
    pub sasl: sasl::Status,
    /// Whether trying again later may succeed (HTTP adds `Retry-After`).
    pub retryable: bool,
    /// A binary client's connection is closed after the answer: its stream
    /// may be out of step, or the broker is going away.
    pub close: bool,
    /// What the client is shown: never a secret, an LDAP URL or a bind DN.
    pub text: String,
}

/// One row of [`RpcError::rule`]'s table.
#[derive(Clone, Copy)]
struct Rule {
    outcome: &'static str,
    blame: Blame,
    status: ReplyStatus,
    sql_state: &'static str,
    http: Option<StatusCode>,
    sasl: sasl::Status,
    retryable: bool,
    close: bool,
}

impl Rule {
    /// The link failed (upstream, timeout, shutdown): 08S01, communication
    /// link failure, which JDBC drivers treat as worth retrying.
    fn link(outcome: &'static str, blame: Blame) -> Rule {
        Rule {
            outcome,
            blame,
            status: ReplyStatus::Error,
            sql_state: "08S01",
            http: Some(StatusCode::BAD_GATEWAY),
            sasl: sasl::Status::Error,
            retryable: true,
            close: false,
        }
    }

    /// What the client sent cannot be served.
    fn client(outcome: &'static str) -> Rule {
        Rule {
            outcome,
            blame: Blame::Client,
            status: ReplyStatus::Error,
            sql_state: "HY000",
            http: Some(StatusCode::BAD_REQUEST),
            sasl: sasl::Status::Error,
            retryable: false,
            close: false,
        }
    }

    /// Who the client is may not do this: 28000, invalid authorization.
    fn refusal(outcome: &'static str) -> Rule {
        Rule {
            outcome,
            blame: Blame::Client,
            status: ReplyStatus::Error,
            sql_state: "28000",
            http: Some(StatusCode::UNAUTHORIZED),
            sasl: sasl::Status::Bad,
            retryable: false,
            close: false,
        }
    }
}

impl RpcError {
    /// The outcome label (metrics, logs).
    pub fn kind(&self) -> &'static str {
        self.rule().outcome
    }

    /// Who caused the failure.
    pub fn blame(&self) -> Blame {
        self.rule().blame
    }

    /// The upstream's failures, by kind (counted per route in
    /// `upstream_errors_total`).
    pub fn upstream_kind(&self) -> Option<&'static str> {
        let r = self.rule();
        (r.blame == Blame::Upstream).then_some(r.outcome)
    }

    /// A login the client got wrong: refused, or no usable credentials (an
    /// authentication service that is down is the broker's failure).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            RpcError::Auth(AuthError::Refused(_) | AuthError::Unusable(_))
        )
    }

    /// The one table of how failures are answered.
    fn rule(&self) -> Rule {
        use StatusCode as H;
        match self {
            RpcError::Upstream(e) => Rule {
                http: Some(e.http_status()),
                ..Rule::link(e.kind(), Blame::Upstream)
            },
            RpcError::Malformed(_) => Rule {
                close: true,
                ..Rule::client("bad_request")
            },
            RpcError::BadRequest(_) => Rule::client("bad_request"),
            RpcError::TooLarge { .. } => Rule {
                http: Some(H::PAYLOAD_TOO_LARGE),
                close: true,
                ..Rule::client("too_large")
            },
            RpcError::NotThrift { status, .. } => Rule {
                http: Some(*status),
                ..Rule::client("bad_request")
            },
            RpcError::UnknownHandle(_) => Rule {
                status: ReplyStatus::InvalidHandle,
                http: None,
                ..Rule::client("unknown_handle")
            },
            RpcError::ShuttingDown => Rule {
                http: Some(H::SERVICE_UNAVAILABLE),
                close: true,
                ..Rule::link("shutting_down", Blame::Broker)
            },
            RpcError::Auth(AuthError::Unavailable(_)) => Rule {
                http: Some(H::SERVICE_UNAVAILABLE),
                ..Rule::link("auth_unavailable", Blame::Broker)
            },
            RpcError::Auth(AuthError::Throttled { .. }) => Rule {
                retryable: true,
                http: Some(H::TOO_MANY_REQUESTS),
                ..Rule::refusal("login_throttled")
            },
            RpcError::Auth(_) => Rule::refusal("unauthenticated"),
            RpcError::NoMapping(_) => Rule {
                http: None,
                ..Rule::refusal("no_mapping")
            },
            RpcError::HandshakeTimeout(_) => Rule {
                http: Some(H::REQUEST_TIMEOUT),
                close: true,
                ..Rule::link("handshake_timeout", Blame::Client)
            },
            RpcError::RelayBroken {
                side: Side::Upstream,
                ..
            } => Rule {
                close: true,
                ..Rule::link("relay_broken", Blame::Upstream)
            },
            RpcError::RelayBroken {
                side: Side::Client, ..
            } => Rule {
                close: true,
                ..Rule::link("client_closed", Blame::Client)
            },
            // 08004: the server rejected the connection
            RpcError::Limit { .. } => Rule {
                sql_state: "08004",
                http: Some(H::SERVICE_UNAVAILABLE),
                sasl: sasl::Status::Bad,
                close: true,
                ..Rule::link("limit", Blame::Client)
            },
            RpcError::Denied => Rule {
                sql_state: "08004",
                http: Some(H::FORBIDDEN),
                sasl: sasl::Status::Bad,
                close: true,
                ..Rule::refusal("denied")
            },
            RpcError::TlsRequired => Rule {
                sasl: sasl::Status::Bad,
                close: true,
                ..Rule::client("tls_required")
            },
            RpcError::BodyTimeout(_) => Rule {
                http: Some(H::REQUEST_TIMEOUT),
                close: true,
                ..Rule::link("body_timeout", Blame::Client)
            },
            // a Thrift error in an HTTP 200, as HiveServer2 refuses a session:
            // JDBC shows the text instead of retrying a 503
            RpcError::SessionLimit(_) => Rule {
                sql_state: "08004",
                http: None,
                retryable: true,
                ..Rule::refusal("session_limit")
            },
            // as a session cap: the gateway is busy, not the client wrong
            RpcError::QueueTimeout(_) => Rule {
                sql_state: "08004",
                http: None,
                retryable: true,
                ..Rule::refusal("queue_timeout")
            },
        }
    }

    /// How this failure is answered.
    pub fn answer(&self) -> Answer {
        let r = self.rule();
        let text = match self {
            // quoted exactly, as DataWorks words it
            RpcError::NoMapping(_) => self.to_string(),
            // the detail (LDAP URL, bind DN) is for the broker's log only
            RpcError::Auth(AuthError::Unavailable(_)) => {
                "kyuubi-broker: authentication service unavailable; try again shortly".into()
            }
            _ => format!("kyuubi-broker: {self}"),
        };
        Answer {
            status: r.status,
            sql_state: r.sql_state,
            http: r.http,
            sasl: r.sasl,
            retryable: r.retryable,
            close: r.close,
            text,
        }
    }

    /// The Thrift reply a binary client (or an HTTP client, for failures
    /// answered inside HTTP 200) gets for this failure.
    pub fn to_thrift_reply(&self, method: &str, seqid: i32) -> Vec<u8> {
        let a = self.answer();
        error_reply(method, seqid, a.status, a.sql_state, &a.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_auth_service_is_one_retryable_503_that_hides_the_detail() {
        let e = RpcError::Auth(AuthError::Unavailable(
            "LDAP server unreachable (ldap://10.0.0.5:389)".into(),
        ));
        let a = e.answer();
        assert_eq!(a.http, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(a.sasl, sasl::Status::Error);
        assert!(a.retryable && a.text.contains("authentication service unavailable"));
        assert!(!a.text.contains("ldap://"), "{}", a.text);
        assert_eq!(e.kind(), "auth_unavailable");
        assert_eq!(e.blame(), Blame::Broker);
        assert!(!e.is_auth_failure(), "an outage is not a wrong password");
        // the log line keeps the detail
        assert!(e.to_string().contains("ldap://10.0.0.5:389"));
    }

    #[test]
    fn a_queue_timeout_is_a_retryable_08004_in_a_thrift_reply_naming_route_and_cap() {
        let e = RpcError::from(QueueTimeout {
            route: "sts".into(),
            cap: crate::governor::Cap::Route,
            limit: 20,
            queue_timeout: std::time::Duration::from_secs(30),
        });
        let a = e.answer();
        assert_eq!((a.sql_state, a.http, a.retryable), ("08004", None, true));
        assert_eq!(
            a.text,
            "kyuubi-broker: route 'sts': all 20 upstream sessions (max_upstream_sessions) are in \
             use and none came free within queue_timeout 30s; retry later"
        );
        assert_eq!((e.kind(), e.blame()), ("queue_timeout", Blame::Client));
    }

    #[test]
    fn refusals_are_28000_and_sasl_bad_and_a_relay_break_names_its_side() {
        let refused = RpcError::Auth(AuthError::Refused("bob".into())).answer();
        assert_eq!(
            (refused.sql_state, refused.sasl, refused.http),
            ("28000", sasl::Status::Bad, Some(StatusCode::UNAUTHORIZED))
        );
        let cut = RpcError::RelayBroken {
            side: Side::Upstream,
            detail: "closed".into(),
        };
        assert_eq!(cut.upstream_kind(), Some("relay_broken"));
        assert!(cut.to_string().contains("upstream side"), "{cut}");
        let gone = RpcError::RelayBroken {
            side: Side::Client,
            detail: "reset".into(),
        };
        assert_eq!((gone.kind(), gone.upstream_kind()), ("client_closed", None));
    }
}
