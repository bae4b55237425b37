//! The client edge: every outcome a client can see (each RPC, each login,
//! each request refused before a call could be read) is finished here, in
//! [`Edge::finish`]: timed, counted in metrics by outcome, and logged once.
//! The transports then write the answer, one function each
//! (`listen::binary::answer`, `listen::http::respond`), from
//! [`RpcError::answer`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::config::Transport;
use crate::error::{Blame, RpcError};
use crate::metrics::{Metrics, Observation};
use crate::tcli::{self, Call};

/// One listener's side of the edge: the labels its exchanges carry.
pub struct Edge {
    pub listener: Arc<str>,
    route: Arc<str>,
    client: Transport,
    upstream: Transport,
    metrics: Arc<Metrics>,
    /// RPCs at least this slow are logged at WARN (zero: never).
    slow_rpc: Duration,
}

/// What an exchange was.
#[derive(Clone, Copy)]
pub enum Kind<'a> {
    /// Authentication: a SASL handshake, or an HTTP request's credentials.
    Login,
    Call(&'a Call),
    /// Bytes or a request no call could be read from.
    Unparsed,
}

/// One client-visible exchange, as far as it went.
pub struct Exchange<'a> {
    pub kind: Kind<'a>,
    pub peer: SocketAddr,
    /// Empty until the client has logged in.
    pub user: &'a str,
    /// How the client authenticates: plain, gssapi, nosasl, basic, spnego,
    /// cookie; "unknown" before the handshake has shown it.
    pub mechanism: &'static str,
    pub started: Instant,
    /// The part of the exchange spent waiting on the upstream.
    pub upstream: Duration,
    pub request_bytes: usize,
    /// An ExecuteStatement's message, kept for the slow-RPC log.
    pub statement: Option<Bytes>,
}

impl<'a> Exchange<'a> {
    /// An exchange that started at `started` and has not reached the upstream.
    pub fn new(
        kind: Kind<'a>,
        peer: SocketAddr,
        user: &'a str,
        mechanism: &'static str,
        started: Instant,
    ) -> Exchange<'a> {
        Exchange {
            kind,
            peer,
            user,
            mechanism,
            started,
            upstream: Duration::ZERO,
            request_bytes: 0,
            statement: None,
        }
    }
}

/// The method label of an exchange.
const INVALID: &str = "invalid";

impl Edge {
    pub fn new(
        listener: &str,
        route: Arc<str>,
        client: Transport,
        upstream: Transport,
        metrics: Arc<Metrics>,
        slow_rpc: Duration,
    ) -> Edge {
        Edge {
            listener: listener.into(),
            route,
            client,
            upstream,
            metrics,
            slow_rpc,
        }
    }

    /// The message to keep for the slow-RPC log, if this call may need it
    /// (a cheap reference-counted clone).
    pub fn statement_of(&self, call: &Call, msg: &Bytes) -> Option<Bytes> {
        (call.method == "ExecuteStatement" && !self.slow_rpc.is_zero()).then(|| msg.clone())
    }

    /// Records the outcome of `ex`: `Ok(response bytes)` or the error the
    /// client is about to be answered with. Call it exactly once per exchange.
    pub fn finish(&self, ex: &Exchange<'_>, result: Result<usize, &RpcError>) {
        let total = ex.started.elapsed();
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        if let Err(e) = result {
            if e.blame() == Blame::Client {
                self.metrics.client_error(&self.listener, outcome);
            }
            if e.is_auth_failure() {
                self.metrics.auth_failure(&self.listener, ex.mechanism);
            }
            if let RpcError::Auth(crate::auth::AuthError::Throttled { why, retry_after }) = e {
                self.metrics.login_throttled(&self.listener, why.reason());
                let (listener, peer, user) = (&*self.listener, ex.peer, loggable(ex.user));
                info!(target: "audit", event = "login_throttled", listener, %peer, %user, reason = why.reason(), retry_after, "audit: login throttled");
            }
        }
        let method = match ex.kind {
            Kind::Login => {
                self.metrics
                    .login(&self.listener, ex.mechanism, outcome, total);
                return self.log_login(ex, total, result);
            }
            Kind::Call(c) => c.method,
            Kind::Unparsed => INVALID,
        };
        self.metrics.observe(&Observation {
            method,
            route: &self.route,
            client_transport: self.client.as_str(),
            upstream_transport: self.upstream.as_str(),
            outcome,
            total,
            upstream: ex.upstream,
            request_bytes: ex.request_bytes,
            response_bytes: *result.as_ref().unwrap_or(&0),
            upstream_error: result.err().and_then(RpcError::upstream_kind),
        });
        self.log_rpc(ex, method, total, result);
    }

    /// A logged-in connection closed by one of its timeouts (`reason`: idle
    /// or write): counted and logged here, once.
    pub fn timed_out(&self, peer: SocketAddr, user: &str, reason: &'static str, after: Duration) {
        self.metrics.connection_timed_out(&self.listener, reason);
        let (listener, user) = (&*self.listener, loggable(user));
        let after_s = after.as_secs_f64();
        info!(listener, %peer, %user, reason, after_s, "client connection closed by timeout");
    }

    /// A connection that sent nothing before the handshake timeout closed
    /// it. HTTP client pools open connections ahead of need, so this is
    /// routine: counted as a timeout (`no_request`), logged at debug, and no
    /// failed login.
    pub fn unused(&self, peer: SocketAddr, after: Duration) {
        self.metrics
            .connection_timed_out(&self.listener, "no_request");
        let after_s = after.as_secs_f64();
        debug!(listener = &*self.listener, %peer, after_s, "unused client connection closed");
    }

    /// A client's TLS handshake failed (or it spoke plaintext to a TLS port):
    /// counted by reason, logged once. A client that sent nothing before the
    /// handshake timeout is [`Edge::unused`] instead.
    pub fn tls_failed(&self, peer: SocketAddr, reason: &'static str, detail: &str) {
        self.metrics.tls_handshake_failed(&self.listener, reason);
        info!(listener = &*self.listener, %peer, reason, detail = %loggable(detail), "TLS handshake failed");
    }

    /// A TLS handshake that completed (`full` or `resumed`).
    pub fn tls_handshake(&self, kind: &'static str) {
        self.metrics.tls_handshake(&self.listener, kind);
    }

    /// A plaintext client on a TLS port: counted here; the transport's
    /// answer ([`crate::error::RpcError::TlsRequired`]) logs it.
    pub fn tls_plaintext(&self) {
        self.metrics
            .tls_handshake_failed(&self.listener, "plaintext");
    }

    /// A NOSASL client's login, which happens inside its OpenSession: the
    /// login histogram gets it, and a success its log line. A refusal is
    /// counted and logged once, as the OpenSession it failed.
    pub fn nosasl_login(
        &self,
        peer: SocketAddr,
        user: &str,
        took: Duration,
        outcome: &'static str,
    ) {
        self.metrics.login(&self.listener, "nosasl", outcome, took);
        if outcome == "ok" {
            let ex = Exchange::new(Kind::Login, peer, user, "nosasl", Instant::now());
            self.log_login(&ex, took, Ok(0));
        } else {
            let (listener, user) = (&*self.listener, loggable(user));
            info!(target: "audit", event = "login_failed", listener, %peer, %user, mechanism = "nosasl", outcome, "audit: login failed");
        }
    }

    fn log_login(&self, ex: &Exchange<'_>, total: Duration, result: Result<usize, &RpcError>) {
        let (listener, peer, mechanism) = (&*self.listener, ex.peer, ex.mechanism);
        let user = loggable(ex.user);
        let took_us = total.as_micros() as u64;
        match result {
            // every HTTP request without a cookie logs in: debug keeps the
            // ordinary log quiet; the audit file takes every level
            Ok(_) if self.client == Transport::Http => {
                debug!(target: "audit", event = "login_ok", listener, %peer, %user, mechanism, "audit: login ok")
            }
            Ok(_) => {
                info!(target: "audit", event = "login_ok", listener, %peer, %user, mechanism, "audit: login ok")
            }
            Err(e) => {
                let outcome = e.kind();
                info!(target: "audit", event = "login_failed", listener, %peer, %user, mechanism, outcome, "audit: login failed")
            }
        }
        match result {
            // an HTTP client without cookie support logs in on every request
            Ok(_) if self.client == Transport::Http => {
                debug!(listener, %peer, %user, mechanism, took_us, "client authenticated")
            }
            Ok(_) => info!(listener, %peer, %user, mechanism, took_us, "client authenticated"),
            Err(e) => {
                let error = loggable_error(e);
                warn!(listener, %peer, %user, mechanism, took_us, outcome = e.kind(), %error, "login failed")
            }
        }
    }

    fn log_rpc(
        &self,
        ex: &Exchange<'_>,
        method: &'static str,
        total: Duration,
        result: Result<usize, &RpcError>,
    ) {
        let slow = !self.slow_rpc.is_zero() && total >= self.slow_rpc;
        // the common case, on every RPC: nothing to build unless it is shown
        if result.is_ok() && !slow && !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let (listener, route, peer) = (&*self.listener, &*self.route, ex.peer);
        let wire = match ex.kind {
            Kind::Call(c) => loggable(c.wire_name()),
            _ => Cow::Borrowed(method),
        };
        let seqid = match ex.kind {
            Kind::Call(c) => c.seqid,
            _ => 0,
        };
        let (total_us, upstream_us) = (total.as_micros() as u64, ex.upstream.as_micros() as u64);
        let user = loggable(ex.user);
        if slow {
            // one line that also carries the statement, whatever the outcome
            let (outcome, error) = match result {
                Ok(_) => ("ok", Cow::Borrowed("")),
                Err(e) => (e.kind(), loggable_error(e)),
            };
            warn!(
                method = %wire, listener, route, %peer, %user,
                total_ms = total.as_millis() as u64, upstream_ms = ex.upstream.as_millis() as u64,
                outcome, %error,
                statement = ex.statement.as_ref().map(loggable_statement).unwrap_or_default(),
                "slow rpc"
            );
            return;
        }
        match result {
            Ok(bytes) => debug!(
                method = %wire, seqid, listener, route, total_us, upstream_us,
                req_bytes = ex.request_bytes, resp_bytes = bytes, "rpc ok"
            ),
            Err(e) if e.upstream_kind().is_some() => warn!(
                method = %wire, seqid, listener, route, %peer, total_us, upstream_us,
                outcome = e.kind(), error = %loggable_error(e), "rpc failed"
            ),
            // everyday refusals, and probes that are not Thrift at all
            Err(
                e @ (RpcError::UnknownHandle(_)
                | RpcError::NoMapping(_)
                | RpcError::ShuttingDown
                | RpcError::NotThrift { .. }
                | RpcError::RelayBroken { .. }),
            ) => info!(
                method = %wire, seqid, listener, route, %peer, %user,
                total_us, outcome = e.kind(), error = %loggable_error(e), "rpc refused"
            ),
            Err(e) => warn!(
                method = %wire, seqid, listener, route, %peer, %user,
                total_us, outcome = e.kind(), error = %loggable_error(e), "rpc refused"
            ),
        }
    }
}

/// An error for a log line: its text may quote the client (a user name, a
/// SASL payload), so it is escaped and cut like other client text.
fn loggable_error(e: &RpcError) -> Cow<'static, str> {
    Cow::Owned(loggable_max(&e.to_string(), 512).into_owned())
}

/// Client-supplied text for a log line: at most 128 characters, control
/// characters escaped, so a client cannot forge or flood log lines.
pub fn loggable(s: &str) -> Cow<'_, str> {
    loggable_max(s, 128)
}

fn loggable_max(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max) + 8);
    for c in s.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if s.chars().count() > max {
        out.push('…');
    }
    Cow::Owned(out)
}

/// An ExecuteStatement's SQL for the slow-RPC log: 200 characters at most,
/// and withheld entirely if it might carry a secret.
fn loggable_statement(msg: &Bytes) -> String {
    let Some(sql) = tcli::read_statement(msg) else {
        return String::new();
    };
    let lower = sql.to_ascii_lowercase();
    if [
        "password",
        "secret",
        "token",
        "access.key",
        "accesskey",
        "credential",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        return format!(
            "<{} characters withheld: may contain a secret>",
            sql.chars().count()
        );
    }
    let mut out: String = sql.chars().take(200).collect();
    if out.len() < sql.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{loggable, loggable_statement};
    use crate::wire::thrift::{ttype, MessageType, Writer};
    use bytes::Bytes;

    fn execute(sql: &str) -> Bytes {
        let mut w = Writer::default();
        w.message_begin("ExecuteStatement", MessageType::Call, 1);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRING, 2);
        w.string(sql);
        w.stop();
        w.stop();
        Bytes::from(w.buf)
    }

    #[test]
    fn slow_log_truncates_statements_and_withholds_possible_secrets() {
        assert_eq!(loggable_statement(&execute("select 1")), "select 1");
        let long = "x".repeat(500);
        let shown = loggable_statement(&execute(&long));
        assert_eq!(shown.chars().count(), 201, "200 characters and an ellipsis");
        let secret = "create table t options (password 'hunter2')";
        let shown = loggable_statement(&execute(secret));
        assert!(
            !shown.contains("hunter2") && shown.contains("withheld"),
            "{shown}"
        );
    }

    #[test]
    fn client_text_in_logs_is_escaped_and_cut() {
        assert_eq!(loggable("alice"), "alice");
        assert_eq!(loggable("eve\nFAKE LOG LINE"), "eve\\nFAKE LOG LINE");
        let long = "u".repeat(1000);
        assert_eq!(loggable(&long).chars().count(), 129);
    }
}
