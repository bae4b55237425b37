//! The broker core, shared by both client transports: one RPC in, one reply
//! out. [`Broker::forward`] is the single place where an RPC starts and ends;
//! [`upstream_credential`] is where the upstream identity is chosen; the
//! OpenSession rewrite happens in `Broker::open_session`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::config::{
    Config, CredentialsConfig, MappingConfig, SessionPolicy, Transport, UpstreamSasl,
};
use crate::error::{RpcError, UpstreamError};
use crate::mapping::{self, UpstreamIdentity};
use crate::metrics::{Metrics, Observation};
use crate::secret::Secret;
use crate::tcli::{self, Guid, OpenSessionEdit, Scope};
use crate::upstream::{HttpPool, Link, Target};
use crate::wire::thrift::{peek_header, MessageType, Writer};

/// A configured route (computing resource): the upstream, the identity
/// used there, and its session settings.
pub struct Route {
    /// Shared with metric labels and handle records without copying.
    pub name: Arc<str>,
    pub target: Arc<Target>,
    credentials: CredentialsConfig,
    mapping: Option<MappingConfig>,
    /// Kerberos principals this route authenticates as upstream.
    initiators: mapping::Initiators,
    policy: SessionPolicy,
    pool: HttpPool,
}

/// Who the client is, as established by the listener.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub user: String,
    pub password: Secret,
    pub addr: SocketAddr,
}

impl ClientIdentity {
    /// A client authenticated by a Kerberos ticket: there is no password
    /// to pass on.
    pub fn from_ticket(user: String, addr: SocketAddr) -> ClientIdentity {
        ClientIdentity {
            user,
            password: Secret::default(),
            addr,
        }
    }
}

/// Chooses the identity presented upstream for a client: the one place.
pub fn upstream_credential(
    route: &Route,
    client: &ClientIdentity,
) -> Result<UpstreamIdentity, RpcError> {
    mapping::upstream_identity(
        &route.name,
        &route.credentials,
        route.mapping.as_ref(),
        client,
        &route.initiators,
    )
}

/// A parsed call: enough to route it and to answer it on failure.
#[derive(Debug, Clone)]
pub struct Call {
    /// TCLIService method name, or "other" (a bounded set, fit for labels).
    pub method: &'static str,
    pub seqid: i32,
    pub scope: Scope,
    /// The name as sent, for methods outside TCLIService.
    other_name: Option<Box<str>>,
}

impl Call {
    pub fn parse(msg: &[u8]) -> Result<Call, RpcError> {
        let h = peek_header(msg)?;
        if h.kind != MessageType::Call {
            return Err(RpcError::BadRequest(format!(
                "expected a CALL message, got {:?}",
                h.kind
            )));
        }
        Ok(match tcli::canonical(h.name) {
            Some((method, scope)) => Call {
                method,
                seqid: h.seqid,
                scope,
                other_name: None,
            },
            None => Call {
                method: "other",
                seqid: h.seqid,
                scope: Scope::Unknown,
                other_name: Some(h.name.into()),
            },
        })
    }

    /// The method name as it appears on the wire.
    pub fn wire_name(&self) -> &str {
        self.other_name.as_deref().unwrap_or(self.method)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Binary,
    Http,
}

impl ClientKind {
    fn as_str(self) -> &'static str {
        match self {
            ClientKind::Binary => "binary",
            ClientKind::Http => "http",
        }
    }
}

/// State of one binary client connection, or of one HTTP request.
pub struct ClientConn {
    pub kind: ClientKind,
    pub route: Arc<Route>,
    /// `None` for a NOSASL client until its OpenSession names the user.
    pub identity: Option<ClientIdentity>,
    /// Binary clients: the connection's upstream link, opened at OpenSession.
    link: Option<Link>,
    /// Binary clients: sessions opened on this connection (guid, secret).
    sessions: Vec<(Guid, Vec<u8>)>,
    /// HTTP clients: a `doAs` query parameter (an impersonation request).
    pub do_as: Option<String>,
}

impl ClientConn {
    pub fn new(kind: ClientKind, route: Arc<Route>, identity: Option<ClientIdentity>) -> Self {
        ClientConn {
            kind,
            route,
            identity,
            link: None,
            sessions: Vec::new(),
            do_as: None,
        }
    }
}

/// An HTTP client's session on one upstream link; its operations map to
/// the same entry.
struct Owned {
    link: Link,
    route: Arc<str>,
    user: String,
    /// The session handle's secret, needed to close it on shutdown.
    secret: Vec<u8>,
}

pub struct Broker {
    routes: HashMap<String, Arc<Route>>,
    pub metrics: Arc<Metrics>,
    /// RPCs at least this slow are logged (zero: never).
    slow_rpc: Duration,
    /// HTTP clients are stateless per request; these route each handle to the
    /// link that created it.
    sessions: Cache<Guid, Arc<Owned>>,
    operations: Cache<Guid, Arc<Owned>>,
}

impl Broker {
    /// `live_token` is the rotating gateway token, for routes that use it.
    pub fn new(config: &Config, live_token: Option<watch::Receiver<Option<Secret>>>) -> Broker {
        let routes = config
            .routes
            .iter()
            .map(|(name, r)| {
                let target = Arc::new(Target::from_config(
                    &r.upstream,
                    config.server.max_message_bytes,
                    live_token.clone(),
                ));
                let route = Route {
                    name: name.as_str().into(),
                    pool: HttpPool::new(target.connect_timeout),
                    target,
                    initiators: mapping::initiators(&r.credentials, r.mapping.as_ref()),
                    credentials: r.credentials.clone(),
                    mapping: r.mapping.clone(),
                    policy: r.session.clone(),
                };
                (name.clone(), Arc::new(route))
            })
            .collect();
        let idle = config.server.session_idle_timeout;
        let metrics = Arc::new(Metrics::new());
        let m = metrics.clone();
        Broker {
            routes,
            metrics,
            slow_rpc: config.server.slow_rpc_threshold,
            // every way out of the cache (CloseSession, idle expiry, shutdown) ends a session
            sessions: Cache::builder()
                .time_to_idle(idle)
                .eviction_listener(move |_, v: Arc<Owned>, _| m.session_closed(&v.route, &v.user))
                .build(),
            operations: Cache::builder()
                .time_to_idle(idle)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Every route, by name.
    pub fn routes(&self) -> impl Iterator<Item = Arc<Route>> {
        let mut v: Vec<Arc<Route>> = self.routes.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter()
    }

    pub fn route(&self, name: &str) -> Option<Arc<Route>> {
        self.routes.get(name).cloned()
    }

    /// Forwards one call and returns the upstream's reply. Every RPC passes
    /// through here, success or not: this is where it is timed and logged.
    pub async fn forward(
        &self,
        conn: &mut ClientConn,
        call: &Call,
        msg: Bytes,
    ) -> Result<Bytes, RpcError> {
        match self.forward_to(conn, call, msg, None).await? {
            Out::Reply(r) => Ok(r),
            Out::Relayed(_) => unreachable!("nothing is relayed without a sink"),
        }
    }

    /// As [`Broker::forward`]; with a `sink` (a binary client's connection),
    /// big FetchResults replies from a binary upstream are relayed to it as
    /// they arrive instead of being read whole first.
    pub async fn forward_to(
        &self,
        conn: &mut ClientConn,
        call: &Call,
        msg: Bytes,
        sink: Option<Sink<'_>>,
    ) -> Result<Out, RpcError> {
        let span = tracing::debug_span!(
            "rpc",
            method = call.method,
            seqid = call.seqid,
            route = %conn.route.name,
            client = conn.kind.as_str(),
            upstream = conn.route.target.transport.as_str(),
        );
        let started = Instant::now();
        let req_bytes = msg.len();
        let mut upstream_time = Duration::ZERO;
        let statement =
            (call.method == "ExecuteStatement" && !self.slow_rpc.is_zero()).then(|| msg.clone());
        let result = self
            .dispatch(conn, call, msg, &mut upstream_time, sink)
            .instrument(span.clone())
            .await;
        let total = started.elapsed();
        self.metrics.observe(&Observation {
            method: call.method,
            route: &conn.route.name,
            client_transport: conn.kind.as_str(),
            upstream_transport: conn.route.target.transport.as_str(),
            outcome: match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            },
            total,
            upstream: upstream_time,
            request_bytes: req_bytes,
            response_bytes: result.as_ref().map_or(0, Out::size),
            upstream_error: match &result {
                Err(RpcError::Upstream(e)) => Some(e.kind()),
                _ => None,
            },
        });
        if !self.slow_rpc.is_zero() && total >= self.slow_rpc {
            warn!(
                method = call.method,
                route = %conn.route.name,
                user = conn.identity.as_ref().map_or("", |i| i.user.as_str()),
                total_ms = total.as_millis() as u64,
                upstream_ms = upstream_time.as_millis() as u64,
                statement = statement.as_ref().map(loggable_statement).unwrap_or_default(),
                "slow rpc"
            );
        }
        let (total_us, upstream_us) = (total.as_micros() as u64, upstream_time.as_micros() as u64);
        let (method, seqid, route) = (call.wire_name(), call.seqid, &conn.route.name);
        match &result {
            Ok(reply) => {
                debug!(method, seqid, %route, total_us, upstream_us, req_bytes, resp_bytes = reply.size(), "rpc ok")
            }
            Err(e @ RpcError::UnknownHandle(_)) => {
                info!(method, seqid, %route, total_us, outcome = e.kind(), error = %e, "rpc refused")
            }
            Err(e) => {
                warn!(method, seqid, %route, total_us, upstream_us, outcome = e.kind(), error = %e, "rpc failed")
            }
        }
        result
    }

    async fn dispatch(
        &self,
        conn: &mut ClientConn,
        call: &Call,
        msg: Bytes,
        upstream_time: &mut Duration,
        sink: Option<Sink<'_>>,
    ) -> Result<Out, RpcError> {
        if call.scope == Scope::OpenSession {
            return self
                .open_session(conn, call, msg, upstream_time)
                .await
                .map(Out::Reply);
        }
        if let (Some(sink), "FetchResults", Some(link @ Link::Binary(up))) =
            (sink, call.method, conn.link.as_ref())
        {
            if !sink.io.has_layer() {
                return relay(up, link, call, msg, upstream_time, sink, &conn.route.target).await;
            }
        }
        match conn.kind {
            ClientKind::Binary => {
                let link = conn
                    .link
                    .clone()
                    .ok_or(RpcError::UnknownHandle("session"))?;
                let reply = timed(upstream_time, link.call(msg.clone())).await?;
                check_reply(&reply, call, &conn.route.target, &link).await?;
                if call.method == "CloseSession" {
                    if let Some(g) = tcli::request_guid(&msg, &peek_header(&msg)?)? {
                        let before = conn.sessions.len();
                        conn.sessions.retain(|(s, _)| *s != g);
                        if conn.sessions.len() < before {
                            self.session_ended(conn);
                        }
                    }
                }
                Ok(Out::Reply(reply))
            }
            ClientKind::Http => {
                let (session, guid) = self.lookup(conn, call, &msg).await?;
                let reply = timed(upstream_time, session.link.call(msg)).await?;
                self.track_handles(conn, call, guid, &session, &reply)
                    .await?;
                Ok(Out::Reply(reply))
            }
        }
    }

    /// Opens (or, for a binary client, reuses) the upstream link and rewrites
    /// the OpenSession request for it.
    async fn open_session(
        &self,
        conn: &mut ClientConn,
        call: &Call,
        msg: Bytes,
        upstream_time: &mut Duration,
    ) -> Result<Bytes, RpcError> {
        // listeners authenticate before OpenSession reaches here
        let identity = conn
            .identity
            .clone()
            .ok_or_else(|| RpcError::BadRequest("OpenSession before authentication".into()))?;
        let route = conn.route.clone();
        let up = upstream_credential(&route, &identity)?;
        let cred = up.credential;
        let target = &route.target;
        let info = tcli::read_open_session(&msg)?;
        let mut client_conf = info.configuration;
        if let Some(d) = &conn.do_as {
            // the key both HiveServer2 and Kyuubi read
            client_conf.push((mapping::IMPERSONATION_KEYS[0].to_string(), d.clone()));
        }
        let mut forced = up.forced;
        forced.push((
            mapping::CLIENT_IP_KEY.to_string(),
            identity.addr.ip().to_string(),
        ));
        let (conf, stripped) = mapping::session_conf(&route.policy, &client_conf, &forced);
        for key in stripped {
            warn!(user = %identity.user, %key, peer = %identity.addr, "stripped a client-supplied setting: possible spoofing attempt");
        }
        let edit = OpenSessionEdit {
            credentials: (target.transport == Transport::Binary
                && target.sasl == UpstreamSasl::Nosasl)
                .then(|| (cred.user.clone(), cred.password.expose().to_string())),
            configuration: Some(conf),
        };
        let msg = Bytes::from(tcli::rewrite_open_session(&msg, &edit)?);

        let reuse = match &conn.link {
            Some(l) if conn.kind == ClientKind::Binary && l.is_usable().await => Some(l.clone()),
            _ => None,
        };
        let link = match reuse {
            Some(l) => l,
            None => {
                let t0 = Instant::now();
                let l = Link::open(target, &cred, &route.pool, identity.addr.ip()).await;
                *upstream_time += t0.elapsed();
                l?
            }
        };
        let reply = timed(upstream_time, link.call(msg)).await?;
        let h = check_reply(&reply, call, target, &link).await?;
        if let Some((guid, secret)) =
            tcli::reply_session_handle(&reply, &h).map_err(|e| malformed(target, e))?
        {
            info!(user = %identity.user, upstream_user = %cred.user, route = %route.name, "session opened");
            self.metrics.session_opened(&route.name, &identity.user);
            match conn.kind {
                ClientKind::Binary => conn.sessions.push((guid, secret)),
                ClientKind::Http => {
                    let owned = Owned {
                        link: link.clone(),
                        route: route.name.clone(),
                        user: identity.user.clone(),
                        secret,
                    };
                    self.sessions.insert(guid, Arc::new(owned)).await;
                }
            }
        }
        if conn.kind == ClientKind::Binary {
            conn.link = Some(link);
        }
        conn.identity = Some(identity);
        Ok(reply)
    }

    /// HTTP clients: the session that owns the handle in this request, and
    /// the handle's GUID.
    async fn lookup(
        &self,
        conn: &ClientConn,
        call: &Call,
        msg: &[u8],
    ) -> Result<(Arc<Owned>, Guid), RpcError> {
        let h = peek_header(msg)?;
        let guid = tcli::request_guid(msg, &h)?.ok_or_else(|| {
            RpcError::BadRequest(format!("{} without a handle", call.wire_name()))
        })?;
        let (found, what) = match call.scope {
            Scope::Operation => (self.operations.get(&guid).await, "operation"),
            Scope::Unknown => match self.operations.get(&guid).await {
                Some(o) => (Some(o), "operation"),
                None => (self.sessions.get(&guid).await, "session"),
            },
            _ => (self.sessions.get(&guid).await, "session"),
        };
        let owned = found.ok_or(RpcError::UnknownHandle(what))?;
        // Handles are bearer secrets; still, never let one user drive another's session.
        match &conn.identity {
            Some(id) if id.user == owned.user => Ok((owned, guid)),
            _ => Err(RpcError::UnknownHandle(what)),
        }
    }

    /// HTTP clients: remember new operation handles (they share their
    /// session's entry) and forget closed ones. Closing a session drops its
    /// operations too, which releases the upstream link.
    async fn track_handles(
        &self,
        conn: &ClientConn,
        call: &Call,
        guid: Guid,
        session: &Arc<Owned>,
        reply: &[u8],
    ) -> Result<(), RpcError> {
        let target = &conn.route.target;
        let h = check_reply(reply, call, target, &session.link).await?;
        match call.method {
            m if tcli::creates_operation(m) => {
                if let Some(op) =
                    tcli::reply_operation_guid(reply, &h).map_err(|e| malformed(target, e))?
                {
                    self.operations.insert(op, session.clone()).await;
                }
            }
            "CloseOperation" => self.operations.invalidate(&guid).await,
            "CloseSession" => {
                self.sessions.invalidate(&guid).await;
                // compare by address: a captured Arc would keep the link alive
                let closed = Arc::as_ptr(session) as usize;
                // only fails if closures were not enabled at build time
                let _ = self
                    .operations
                    .invalidate_entries_if(move |_, v| Arc::as_ptr(v) as usize == closed);
                // the link belongs to this session alone: close it now
                // rather than when the cache lets go of the entry
                session.link.close().await;
            }
            _ => {}
        }
        Ok(())
    }

    /// A binary client went away: close the sessions it left open upstream.
    /// Binary upstreams close them when the TCP connection drops; HTTP
    /// upstreams need an explicit CloseSession.
    pub async fn client_gone(&self, conn: &mut ClientConn) {
        for _ in 0..conn.sessions.len() {
            self.session_ended(conn);
        }
        let Some(link) = conn.link.take() else { return };
        if let Link::Http(_) = link {
            for (guid, secret) in conn.sessions.drain(..) {
                close_upstream_session(&link, &guid, &secret).await;
            }
        }
    }

    fn session_ended(&self, conn: &ClientConn) {
        let user = conn.identity.as_ref().map_or("", |i| i.user.as_str());
        self.metrics.session_closed(&conn.route.name, user);
    }

    /// On shutdown: close every session HTTP clients left open.
    pub async fn close_all_sessions(&self) {
        let live: Vec<(Arc<Guid>, Arc<Owned>)> = self.sessions.iter().collect();
        for (guid, owned) in live {
            close_upstream_session(&owned.link, &guid, &owned.secret).await;
            self.sessions.invalidate(guid.as_ref()).await;
        }
    }
}

async fn close_upstream_session(link: &Link, guid: &Guid, secret: &[u8]) {
    let mut w = Writer::default();
    w.message_begin("CloseSession", MessageType::Call, 0);
    use crate::wire::thrift::ttype::{STRING, STRUCT};
    w.field(STRUCT, 1);
    w.field(STRUCT, 1);
    w.field(STRUCT, 1);
    w.field(STRING, 1);
    w.binary(guid);
    w.field(STRING, 2);
    w.binary(secret);
    w.stop();
    w.stop();
    w.stop();
    w.stop();
    if let Err(e) = link.call(Bytes::from(w.buf)).await {
        debug!(error = %e, "closing a left-over session failed");
    }
}

/// Where a binary client's replies go, for relaying big ones piecewise.
pub struct Sink<'a> {
    pub io: &'a mut crate::wire::io::MessageIo,
    pub framing: crate::wire::io::Framing,
}

/// A reply: whole, or already relayed to the sink (`usize` bytes).
pub enum Out {
    Reply(Bytes),
    Relayed(usize),
}

impl Out {
    /// Bytes in the reply.
    pub fn size(&self) -> usize {
        match self {
            Out::Reply(b) => b.len(),
            Out::Relayed(n) => *n,
        }
    }
}

/// Replies above this size are relayed as they arrive: the client starts
/// receiving before the upstream has finished sending.
const RELAY_ABOVE: usize = 64 * 1024;

/// FetchResults for a binary client over a binary upstream: the reply's
/// header is checked, then the frame is passed on chunk by chunk.
async fn relay(
    up: &Arc<tokio::sync::Mutex<crate::upstream::BinaryConn>>,
    link: &Link,
    call: &Call,
    msg: Bytes,
    upstream_time: &mut Duration,
    sink: Sink<'_>,
    target: &Target,
) -> Result<Out, RpcError> {
    let head = {
        let mut c = up.lock().await;
        timed(upstream_time, c.call_head(msg, RELAY_ABOVE)).await?
    };
    let (len, head) = match head {
        crate::upstream::Head::Whole(reply) => {
            check_reply(&reply, call, target, link).await?;
            return Ok(Out::Reply(reply));
        }
        crate::upstream::Head::Partial { len, head } => (len, head),
    };
    check_reply(&head, call, target, link).await?;
    let t0 = Instant::now();
    let sent = async {
        sink.io
            .write_frame_head(sink.framing, len, &head)
            .await
            .map_err(|e| format!("client: {e}"))?;
        up.lock().await.relay_rest(len - head.len(), sink.io).await
    }
    .await;
    *upstream_time += t0.elapsed();
    sent.map_err(RpcError::RelayBroken)?;
    Ok(Out::Relayed(len))
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

async fn timed<T>(acc: &mut Duration, f: impl std::future::Future<Output = T>) -> T {
    let t0 = Instant::now();
    let r = f.await;
    *acc += t0.elapsed();
    r
}

fn malformed(target: &Target, e: impl std::fmt::Display) -> RpcError {
    RpcError::Upstream(UpstreamError::Protocol {
        upstream: target.display.clone(),
        detail: e.to_string(),
    })
}

/// The reply must answer this call: same method and sequence id. If not,
/// the stream is out of step and the link is closed.
async fn check_reply<'a>(
    reply: &'a [u8],
    call: &Call,
    target: &Target,
    link: &Link,
) -> Result<crate::wire::thrift::MessageHeader<'a>, RpcError> {
    let problem = match peek_header(reply) {
        Err(e) => e.to_string(),
        Ok(h)
            if h.name == call.wire_name()
                && h.seqid == call.seqid
                && matches!(h.kind, MessageType::Reply | MessageType::Exception) =>
        {
            return Ok(h)
        }
        Ok(h) => format!(
            "reply {} #{} does not answer {} #{}",
            h.name.escape_default(),
            h.seqid,
            call.wire_name(),
            call.seqid
        ),
    };
    link.close().await;
    Err(malformed(target, problem))
}

#[cfg(test)]
mod tests {
    use super::loggable_statement;
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
}
