//! The broker core, shared by both client transports: one RPC in, one reply
//! out, with nothing about how the client's side is framed. A binary
//! client's connection is a [`BinaryClient`], which owns its upstream link;
//! an HTTP request is an [`HttpClient`], whose session is found by handle.
//! [`upstream_credential`] is where the upstream identity is chosen; the
//! OpenSession rewrite happens in `Broker::open_upstream`. Timing, metrics
//! and logs are the edge's ([`crate::edge`]): these functions only add the
//! time they wait on the upstream to the caller's counter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::notification::RemovalCause;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::Authenticator;
use crate::config::{
    Config, CredentialsConfig, MappingConfig, SessionPolicy, Transport, UpstreamSasl,
};
use crate::error::{RpcError, UpstreamError};
use crate::governor::{Governor, Permit};
use crate::identity::ClientIdentity;
use crate::mapping::{self, NoMapping, UpstreamIdentity};
use crate::metacache::{self, Ddl, MetaCache, Recording, Replay, SessionScope};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::tcli::{self, Call, Guid, OpenSessionEdit, OpenSessionInfo, Scope};
use crate::upstream::{HttpPool, Link, Pending, Streamed, Target};
use crate::warm::{Recipe, WarmKey, WarmPolicy, WarmPool};
use crate::wire::io::ReplySink;
use crate::wire::thrift::{peek_header, MessageHeader, MessageType, Writer};

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
    /// How long metadata answers are cached; `None`: not cached.
    cache_ttl: Option<Duration>,
    /// Places for upstream sessions under the route's caps.
    pub governor: Arc<Governor>,
}

/// Chooses the identity presented upstream for a client: the one place.
pub fn upstream_credential(
    route: &Route,
    client: &ClientIdentity,
) -> Result<UpstreamIdentity, NoMapping> {
    mapping::upstream_identity(
        &route.name,
        &route.credentials,
        route.mapping.as_ref(),
        client,
        &route.initiators,
    )
}

/// A reply to an HTTP client: whole, or the start of a big one whose rest
/// is still arriving from the upstream.
pub enum HttpOut {
    Reply(Bytes),
    Stream(Pending),
}

/// A reply: whole, or already relayed to the client (`usize` bytes).
pub enum Out {
    Reply(Bytes),
    Relayed(usize),
}

/// One binary client connection: it owns one upstream link (opened at its
/// first OpenSession) and the sessions opened on it.
pub struct BinaryClient {
    route: Arc<Route>,
    /// The listener's authenticator, for a NOSASL client's OpenSession.
    auth: Arc<Authenticator>,
    /// `None` for a NOSASL client until its OpenSession names the user.
    identity: Option<ClientIdentity>,
    peer: std::net::SocketAddr,
    /// The user a NOSASL client named, until (and after) it is checked.
    claimed: String,
    /// The user name of the client's TLS certificate, on a listener that
    /// logs in by certificate.
    cert: Option<String>,
    /// A NOSASL login that just happened: how long it took, and whether it
    /// passed (the listener reports it at the edge).
    login: Option<(Duration, bool)>,
    link: Option<Link>,
    /// Sessions opened on this connection (guid, secret).
    sessions: Vec<(Guid, Vec<u8>)>,
    /// Each session's place under the route's caps.
    permits: HashMap<Guid, Permit>,
    /// Operations started on this connection, with their session.
    operations: HashMap<Guid, Guid>,
    /// Each session's cache scope (who it is upstream, its protocol).
    scopes: HashMap<Guid, SessionScope>,
    /// Operations answered from the metadata cache.
    replays: HashMap<Guid, Replay>,
    /// Upstream metadata operations being recorded for the cache.
    recordings: HashMap<Guid, Recording>,
    /// Statements that change metadata, until they end.
    ddl: HashMap<Guid, metacache::Ddl>,
}

/// Open operations one binary connection may hold. Beyond it, calls that
/// start an operation are refused (a client that never closes operations
/// would otherwise grow this table and the upstream's without bound).
pub const MAX_OPERATIONS_PER_CONNECTION: usize = 10_000;

impl BinaryClient {
    pub fn new(
        route: Arc<Route>,
        auth: Arc<Authenticator>,
        identity: Option<ClientIdentity>,
        peer: std::net::SocketAddr,
        cert: Option<String>,
    ) -> BinaryClient {
        BinaryClient {
            route,
            auth,
            identity,
            peer,
            claimed: String::new(),
            cert,
            login: None,
            link: None,
            sessions: Vec::new(),
            permits: HashMap::new(),
            operations: HashMap::new(),
            scopes: HashMap::new(),
            replays: HashMap::new(),
            recordings: HashMap::new(),
            ddl: HashMap::new(),
        }
    }

    /// The authenticated user, or the one a NOSASL client claims to be
    /// (empty before its first OpenSession).
    pub fn user(&self) -> &str {
        self.identity
            .as_ref()
            .map_or(self.claimed.as_str(), |i| i.user.as_str())
    }

    /// The NOSASL login the last call performed, if it did: its duration
    /// and whether it passed.
    pub fn take_login(&mut self) -> Option<(Duration, bool)> {
        self.login.take()
    }
}

/// One HTTP request: no state of its own; its session and operations are
/// found through the broker's handle tables.
pub struct HttpClient<'a> {
    pub route: &'a Arc<Route>,
    pub identity: &'a ClientIdentity,
    /// A `doAs` query parameter (an impersonation request).
    pub do_as: Option<String>,
}

/// An HTTP client's session on one upstream link; its operations map to
/// the same entry.
struct Owned {
    link: Link,
    route: Arc<str>,
    user: String,
    /// The session handle's secret, needed to close it on shutdown.
    secret: Vec<u8>,
    /// For the metadata cache; `None` once the session has state of its
    /// own (see [`SessionScope::after`]).
    scope: std::sync::Mutex<Option<SessionScope>>,
    /// Released by the sessions cache's eviction listener: operations
    /// share this record and may hold it a while longer.
    permit: Permit,
}

/// An HTTP client's operation answered from the metadata cache.
struct SharedReplay {
    route: Arc<str>,
    user: String,
    session: Guid,
    replay: std::sync::Mutex<Replay>,
}

/// An HTTP client's operation being recorded; taken out when it closes.
struct SharedRecording {
    session: Guid,
    rec: std::sync::Mutex<Option<Recording>>,
}

/// Live upstream sessions per user, over every route and transport, held
/// under `server.max_sessions_per_user`.
struct SessionCounts {
    cap: usize,
    by_user: std::sync::Mutex<HashMap<String, usize>>,
}

impl SessionCounts {
    /// Takes one of `user`'s sessions before the upstream is asked, so two
    /// concurrent OpenSessions cannot both pass the last free one.
    fn reserve(
        &self,
        user: &str,
        route: &Route,
        peer: std::net::SocketAddr,
    ) -> Result<(), RpcError> {
        let mut m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user.to_string()).or_default();
        if *n >= self.cap {
            let limit = self.cap;
            let user = crate::edge::loggable(user);
            info!(target: "audit", event = "cap_refused", route = %route.name, reason = "sessions_per_user", client = %peer.ip(), %user, limit);
            return Err(RpcError::SessionLimit(self.cap));
        }
        *n += 1;
        Ok(())
    }

    fn release(&self, user: &str) {
        let mut m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(user);
            }
        }
    }
}

pub struct Broker {
    routes: HashMap<String, Arc<Route>>,
    pub metrics: Arc<Metrics>,
    counts: Arc<SessionCounts>,
    /// HTTP clients are stateless per request; these route each handle to the
    /// link that created it.
    sessions: Cache<Guid, Arc<Owned>>,
    operations: Cache<Guid, Arc<Owned>>,
    meta: MetaCache,
    warm: Arc<WarmPool>,
    /// HTTP clients' cached and recorded operations.
    replays: Cache<Guid, Arc<SharedReplay>>,
    recordings: Cache<Guid, Arc<SharedRecording>>,
    /// HTTP clients' statements that change metadata, until they end.
    ddl_ops: Cache<Guid, Arc<(Guid, Ddl)>>,
}

/// An upstream session just opened.
struct Opened {
    link: Link,
    reply: Bytes,
    /// The session handle (guid, secret), unless the upstream refused.
    handle: Option<(Guid, Vec<u8>)>,
    scope: SessionScope,
}

/// Replies above this size are relayed as they arrive: the client starts
/// receiving before the upstream has finished sending.
const RELAY_ABOVE: usize = 64 * 1024;

impl Broker {
    /// `live_token` is the rotating gateway token, for routes that use it.
    /// `upstream_tls`: by route, how a TLS upstream is verified.
    pub fn new(
        config: &Config,
        live_token: Option<watch::Receiver<Option<Secret>>>,
        upstream_tls: &std::collections::BTreeMap<String, crate::tls::client::ClientTls>,
    ) -> Broker {
        let mut metrics = Metrics::new();
        let meta = MetaCache::new(config.server.metadata_cache_bytes, metrics.registry_mut());
        let policies = config
            .routes
            .iter()
            .filter(|(_, r)| r.warm_sessions > 0)
            .map(|(name, r)| {
                let policy = WarmPolicy {
                    per_key: r.warm_sessions,
                    per_route: r.warm_sessions_max.unwrap_or(4 * r.warm_sessions),
                    idle: r.warm_idle,
                };
                (Arc::<str>::from(name.as_str()), policy)
            })
            .collect();
        let warm = Arc::new(WarmPool::new(policies, metrics.registry_mut()));
        let metrics = Arc::new(metrics);
        let routes = config
            .routes
            .iter()
            .map(|(name, r)| {
                let name: Arc<str> = name.as_str().into();
                let target = Arc::new(Target::from_config(
                    &r.upstream,
                    config.server.max_message_bytes,
                    live_token.clone(),
                    upstream_tls.get(&*name).cloned(),
                ));
                let governor = Governor::new(
                    name.clone(),
                    r.max_upstream_sessions,
                    r.max_upstream_sessions_per_user,
                    r.queue_timeout,
                    metrics.governor(&name),
                );
                let route = Route {
                    name: name.clone(),
                    governor,
                    pool: HttpPool::new(target.connect_timeout, target.tls.as_ref()),
                    target,
                    initiators: mapping::initiators(&r.credentials, r.mapping.as_ref()),
                    credentials: r.credentials.clone(),
                    mapping: r.mapping.clone(),
                    policy: r.session.clone(),
                    cache_ttl: r.cache.then_some(r.cache_ttl),
                };
                (name.to_string(), Arc::new(route))
            })
            .collect();
        let idle = config.server.session_idle_timeout;
        let counts = Arc::new(SessionCounts {
            cap: config.server.max_sessions_per_user,
            by_user: Default::default(),
        });
        let operations: Cache<Guid, Arc<Owned>> = Cache::builder()
            .time_to_idle(idle)
            .support_invalidation_closures()
            .build();
        let (m, c, ops) = (metrics.clone(), counts.clone(), operations.clone());
        // every way out of the cache (CloseSession, idle expiry, shutdown)
        // ends a session; only expiry leaves it open upstream, so it is
        // closed there too (its operations go with it)
        let gone = move |guid: Arc<Guid>, v: Arc<Owned>, cause: RemovalCause| {
            m.session_closed(&v.route, &v.user);
            c.release(&v.user);
            if cause != RemovalCause::Expired {
                // closed upstream already (CloseSession), or shutting down
                v.permit.release();
                return;
            }
            let closed = Arc::as_ptr(&v) as usize;
            let _ = ops.invalidate_entries_if(move |_, o| Arc::as_ptr(o) as usize == closed);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    debug!(route = %v.route, "closing a session idle for server.session_idle_timeout");
                    close_upstream_session(&v.link, &guid, &v.secret).await;
                    v.link.close().await;
                    // only now is the upstream's session gone
                    v.permit.release();
                });
            } else {
                v.permit.release();
            }
        };
        Broker {
            routes,
            metrics,
            counts,
            sessions: Cache::builder()
                .time_to_idle(idle)
                .eviction_listener(gone)
                .build(),
            operations,
            meta,
            warm,
            replays: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(idle)
                .support_invalidation_closures()
                .build(),
            recordings: Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(idle)
                .support_invalidation_closures()
                .build(),
            ddl_ops: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(idle)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Runs the handle tables' pending work (idle expiry and its upstream
    /// CloseSession); [`crate::run`] calls it on a tick, since moka does it
    /// only when the tables are used.
    pub async fn housekeep(&self) {
        self.sessions.run_pending_tasks().await;
        self.operations.run_pending_tasks().await;
        self.replays.run_pending_tasks().await;
        self.recordings.run_pending_tasks().await;
        self.ddl_ops.run_pending_tasks().await;
        self.warm.housekeep().await;
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

    /// One call from a binary client. Replies may be relayed to `sink` as
    /// they arrive; the time spent on the upstream is added to `upstream`.
    pub async fn call_binary(
        &self,
        c: &mut BinaryClient,
        call: &Call,
        msg: Bytes,
        sink: &mut ReplySink<'_>,
        upstream: &mut Duration,
    ) -> Result<Out, RpcError> {
        if call.scope == Scope::OpenSession {
            // boxed, like every path but the plain forward below: this
            // future is built and moved on every RPC, so its size should be
            // the forwarding path's, not that of the biggest path's state
            return Box::pin(self.open_binary(c, call, msg, upstream))
                .await
                .map(Out::Reply);
        }
        let link = c.link.clone().ok_or(RpcError::UnknownHandle("session"))?;
        let guid = handle_of(call, &msg)?;
        if call.scope != Scope::Session {
            if let Some(r) = c.replays.get_mut(&guid) {
                let reply = r.serve(call, &msg)?;
                if call.method == "CloseOperation" {
                    c.replays.remove(&guid);
                }
                return Ok(Out::Reply(reply));
            }
        }
        // only handles opened on this connection are forwarded (a handle is
        // a bearer secret, but one user must never drive another's session
        // or read its rows)
        self.owned_by_connection(c, call, guid)?;
        let creates = tcli::creates_operation(call.method);
        if creates && c.operations.len() + c.replays.len() >= MAX_OPERATIONS_PER_CONNECTION {
            return Err(RpcError::BadRequest(format!(
                "{MAX_OPERATIONS_PER_CONNECTION} operations are open on this connection; \
                 close some (CloseOperation) before starting more"
            )));
        }
        let key = match c.scopes.get(&guid) {
            Some(scope) => self.cache_key(&c.route, scope, call, &msg)?,
            None => None,
        };
        if let Some(k) = &key {
            if let Some(e) = Box::pin(self.meta.get(k)).await {
                if let Some((reply, replay)) = self.meta.answer(&e, call.seqid, guid)? {
                    if let Some((op, r)) = replay {
                        c.replays.insert(op, r);
                    }
                    return Ok(Out::Reply(reply));
                }
            }
        }
        let (ddl, sql) = self.statement_begins(&c.route, call, &msg);
        if let Some(sql) = sql {
            match c.scopes.get(&guid).and_then(|s| s.after(&sql)) {
                Some(after) => c.scopes.insert(guid, after),
                None => c.scopes.remove(&guid),
            };
        }
        let generation = self.meta.generation(&c.route.name);
        if creates || key.is_some() {
            // small, and read whole: the new operation handle is in it
            let reply = timed(upstream, link.call(msg.clone())).await?;
            let h = check_reply(&reply, call, &c.route.target, &link).await?;
            let op = match creates {
                true => tcli::reply_operation_guid(&reply, &h)
                    .map_err(|e| malformed(&c.route.target, e))?,
                false => None,
            };
            if let Some(op) = op {
                c.operations.insert(op, guid);
            }
            match (ddl, op) {
                (Some(d), Some(op)) if tcli::reply_succeeded(&reply) => {
                    c.ddl.insert(op, d);
                }
                (Some(d), _) => d.refused(),
                (None, _) => {}
            }
            if let (Some(k), Some(ttl)) = (key, c.route.cache_ttl) {
                match op {
                    Some(op) => {
                        if let Some(rec) = self.meta.record(k, ttl, &reply, generation) {
                            c.recordings.insert(op, rec);
                        }
                    }
                    None => Box::pin(self.meta.store_whole(k, ttl, &reply, generation)).await,
                }
            }
            return Ok(Out::Reply(reply));
        }
        if let Some(rec) = c.recordings.get_mut(&guid).filter(|r| r.wanted()) {
            if call.method == "CloseOperation" {
                if let Some(rec) = c.recordings.remove(&guid) {
                    Box::pin(self.finish_recording(&link, &c.route.target, rec, upstream)).await;
                }
            } else {
                // read whole while recording: the rows are kept
                let reply = timed(upstream, link.call(msg.clone())).await?;
                check_reply(&reply, call, &c.route.target, &link).await?;
                rec.observe(call, &msg, &reply);
                if rec.complete() {
                    if let Some(rec) = c.recordings.remove(&guid) {
                        Box::pin(self.meta.store(rec)).await;
                    }
                }
                return Ok(Out::Reply(reply));
            }
        }
        if call.method == "CloseSession" && self.warm.enabled(&c.route.name) {
            // a route with warm sessions answers at once: the client is done
            // with the session, and the upstream's cleanup (a few ms on a
            // Spark Thrift Server) runs in the background; its place under
            // the governor is held until the upstream has closed it
            if let Some((_, secret)) = c.sessions.iter().find(|(s, _)| *s == guid).cloned() {
                let place = c.permits.remove(&guid);
                let link = link.clone();
                tokio::spawn(async move {
                    close_upstream_session(&link, &guid, &secret).await;
                    drop(place);
                });
                self.forget_session(c, guid);
                return Ok(Out::Reply(Bytes::from(tcli::status_reply(
                    call.method,
                    call.seqid,
                ))));
            }
        }
        let out = relay_call(&link, call, msg, sink, &c.route.target, upstream).await?;
        match call.method {
            "GetOperationStatus" if c.ddl.contains_key(&guid) => {
                if matches!(&out, Out::Reply(r) if metacache::operation_ended(r)) {
                    c.ddl.remove(&guid);
                }
            }
            "CloseOperation" => {
                c.operations.remove(&guid);
                c.recordings.remove(&guid);
                c.ddl.remove(&guid);
            }
            "CloseSession" => self.forget_session(c, guid),
            _ => {}
        }
        Ok(out)
    }

    /// A binary client's session is closed: forget it and everything of it.
    fn forget_session(&self, c: &mut BinaryClient, guid: Guid) {
        let before = c.sessions.len();
        c.sessions.retain(|(s, _)| *s != guid);
        let ops = &mut c.operations;
        c.recordings.retain(|op, _| ops.get(op) != Some(&guid));
        c.ddl.retain(|op, _| ops.get(op) != Some(&guid));
        ops.retain(|_, session| *session != guid);
        c.replays.retain(|_, r| r.session != guid);
        c.scopes.remove(&guid);
        if c.sessions.len() < before {
            self.metrics.session_closed(&c.route.name, c.user());
            self.counts.release(c.user());
            c.permits.remove(&guid);
        }
    }

    /// The metadata cache's key for this call, if the route caches it.
    fn cache_key(
        &self,
        route: &Route,
        scope: &SessionScope,
        call: &Call,
        msg: &[u8],
    ) -> Result<Option<metacache::Key>, RpcError> {
        if route.cache_ttl.is_none() || !metacache::cacheable(call.method) {
            return Ok(None);
        }
        Ok(Some(metacache::Key::of(&route.name, scope, call, msg)?))
    }

    /// An ExecuteStatement as the metadata cache sees it: a statement that
    /// may change metadata begins (held until it ends; see
    /// [`MetaCache::ddl_begin`]), and its text, for the session's scope
    /// ([`SessionScope::after`]).
    fn statement_begins(
        &self,
        route: &Route,
        call: &Call,
        msg: &[u8],
    ) -> (Option<Ddl>, Option<String>) {
        if call.method != "ExecuteStatement" || route.cache_ttl.is_none() {
            return (None, None);
        }
        let sql = tcli::read_statement(msg).unwrap_or_default();
        let ddl = metacache::changes_metadata(&sql).then(|| self.meta.ddl_begin(&route.name));
        (ddl, Some(sql))
    }

    /// The client closes a recorded operation: the broker reads what it
    /// left (metadata, remaining rows) and stores the answer. A failure
    /// here only means the answer is not cached.
    async fn finish_recording(
        &self,
        link: &Link,
        target: &Target,
        mut rec: Recording,
        upstream: &mut Duration,
    ) {
        // each request either completes a part or spoils the recording; a
        // client that read little of a long answer is not worth waiting for
        for _ in 0..64 {
            let Some(req) = rec.next_request() else { break };
            let Ok(call) = Call::parse(&req) else { break };
            match timed(upstream, link.call(req.clone())).await {
                Ok(reply) if check_reply(&reply, &call, target, link).await.is_ok() => {
                    rec.observe_own(&call, &req, &reply)
                }
                _ => {
                    rec.give_up();
                    break;
                }
            }
        }
        self.meta.store(rec).await;
    }

    /// The handle a binary client's request names, if this connection
    /// opened it; otherwise the request is refused before it is forwarded.
    fn owned_by_connection(
        &self,
        c: &BinaryClient,
        call: &Call,
        guid: Guid,
    ) -> Result<(), RpcError> {
        let session = || c.sessions.iter().any(|(s, _)| *s == guid);
        let operation = || c.operations.contains_key(&guid);
        let (owned, what) = match call.scope {
            Scope::Operation => (operation(), "operation"),
            Scope::Unknown if operation() => (true, "operation"),
            _ => (session(), "session"),
        };
        if owned {
            return Ok(());
        }
        Err(self.refuse_handle(&c.route, c.user(), c.peer, call, what))
    }

    /// A request naming a handle its client does not own: counted, audited,
    /// and answered as an unknown handle (it tells nothing about others').
    fn refuse_handle(
        &self,
        route: &Route,
        user: &str,
        peer: std::net::SocketAddr,
        call: &Call,
        what: &'static str,
    ) -> RpcError {
        let user = crate::edge::loggable(user);
        info!(target: "audit", event = "handle_refused", route = %route.name, %user, %peer, method = call.wire_name(), what, "audit: handle refused");
        self.metrics.handle_refused(&route.name);
        RpcError::UnknownHandle(what)
    }

    /// OpenSession from a binary client: a NOSASL client is authenticated
    /// here by the user and password in this request (parsed once), and
    /// the connection's link is reused for further sessions.
    async fn open_binary(
        &self,
        c: &mut BinaryClient,
        call: &Call,
        msg: Bytes,
        upstream: &mut Duration,
    ) -> Result<Bytes, RpcError> {
        let info = tcli::read_open_session(&msg)?;
        if c.identity.is_none() {
            c.claimed = info.username.clone().unwrap_or_default();
            let password = Secret::new(info.password.clone().unwrap_or_default());
            let t0 = Instant::now();
            let checked = c
                .auth
                .authenticate(&c.claimed, password, c.peer, c.cert.as_deref())
                .await;
            c.login = Some((t0.elapsed(), checked.is_ok()));
            c.identity = Some(checked?);
        }
        let identity = c.identity.as_ref().expect("authenticated above");
        let reuse = match &c.link {
            Some(l) if l.is_usable().await => Some(l.clone()),
            _ => None,
        };
        let permit = self.admit(&c.route, &identity.user, c.peer).await?;
        let o = match self
            .open_upstream(&c.route, identity, info, None, &msg, reuse, call, upstream)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                self.counts.release(&identity.user);
                return Err(e);
            }
        };
        match o.handle {
            Some(h) => {
                self.metrics.session_opened(&c.route.name, &identity.user);
                c.scopes.insert(h.0, o.scope);
                c.permits.insert(h.0, permit);
                c.sessions.push(h);
            }
            None => self.counts.release(&identity.user),
        }
        c.link = Some(o.link);
        Ok(o.reply)
    }

    /// One call from an HTTP client; the time spent on the upstream is added
    /// to `upstream`. A big FetchResults reply comes back as it arrives
    /// ([`HttpOut::Stream`]), for the listener to stream into its response.
    pub async fn call_http(
        &self,
        c: &HttpClient<'_>,
        call: &Call,
        msg: Bytes,
        upstream: &mut Duration,
    ) -> Result<HttpOut, RpcError> {
        if call.scope == Scope::OpenSession {
            let info = tcli::read_open_session(&msg)?;
            let user = &c.identity.user;
            let permit = self.admit(c.route, user, c.identity.addr).await?;
            let opened = self
                .open_upstream(
                    c.route,
                    c.identity,
                    info,
                    c.do_as.as_deref(),
                    &msg,
                    None,
                    call,
                    upstream,
                )
                .await;
            let o = match opened {
                Ok(o) if o.handle.is_some() => o,
                other => {
                    self.counts.release(user);
                    return other.map(|o| HttpOut::Reply(o.reply));
                }
            };
            // released by the cache's eviction listener, whatever removes it
            if let Some((guid, secret)) = o.handle {
                self.metrics.session_opened(&c.route.name, &c.identity.user);
                let owned = Owned {
                    link: o.link,
                    route: c.route.name.clone(),
                    user: c.identity.user.clone(),
                    secret,
                    scope: std::sync::Mutex::new(Some(o.scope)),
                    permit,
                };
                self.sessions.insert(guid, Arc::new(owned)).await;
            }
            return Ok(HttpOut::Reply(o.reply));
        }
        let guid = handle_of(call, &msg)?;
        if call.scope != Scope::Session {
            if let Some(r) = self.replays.get(&guid).await {
                if r.user != c.identity.user || *r.route != *c.route.name {
                    let (user, peer) = (&c.identity.user, c.identity.addr);
                    return Err(self.refuse_handle(c.route, user, peer, call, "operation"));
                }
                let reply = r
                    .replay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .serve(call, &msg)?;
                if call.method == "CloseOperation" {
                    self.replays.invalidate(&guid).await;
                }
                return Ok(HttpOut::Reply(reply));
            }
        }
        let session = self.lookup(c, call, guid).await?;
        let scope = session
            .scope
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let key = match scope {
            Some(scope) => self.cache_key(c.route, &scope, call, &msg)?,
            None => None,
        };
        if let Some(k) = &key {
            if let Some(e) = self.meta.get(k).await {
                if let Some((reply, replay)) = self.meta.answer(&e, call.seqid, guid)? {
                    if let Some((op, r)) = replay {
                        let shared = SharedReplay {
                            route: c.route.name.clone(),
                            user: c.identity.user.clone(),
                            session: guid,
                            replay: std::sync::Mutex::new(r),
                        };
                        self.replays.insert(op, Arc::new(shared)).await;
                    }
                    return Ok(HttpOut::Reply(reply));
                }
            }
        }
        let (ddl, sql) = self.statement_begins(c.route, call, &msg);
        if let Some(sql) = sql {
            let mut scope = session.scope.lock().unwrap_or_else(|p| p.into_inner());
            *scope = scope.as_ref().and_then(|s| s.after(&sql));
        }
        let generation = self.meta.generation(&c.route.name);
        let recording = match call.scope {
            Scope::Session => None,
            _ => self.recordings.get(&guid).await,
        };
        // rows nobody records, of a call that opens or ends nothing
        let streams =
            call.method == "FetchResults" && recording.is_none() && key.is_none() && ddl.is_none();
        if call.method == "CloseOperation" {
            let taken =
                recording.and_then(|r| r.rec.lock().unwrap_or_else(|p| p.into_inner()).take());
            if let Some(rec) = taken.filter(|r| r.wanted()) {
                self.finish_recording(&session.link, &c.route.target, rec, upstream)
                    .await;
            }
            self.recordings.invalidate(&guid).await;
        }
        if call.method == "CloseSession" && self.warm.enabled(&c.route.name) {
            // answered at once, closed upstream in the background (see
            // call_binary); the link is closed after that CloseSession
            let (link, secret) = (session.link.clone(), session.secret.clone());
            tokio::spawn(async move {
                close_upstream_session(&link, &guid, &secret).await;
                link.close().await;
            });
            let reply = Bytes::from(tcli::status_reply(call.method, call.seqid));
            self.track_handles(c, call, guid, &session, &reply).await?;
            return Ok(HttpOut::Reply(reply));
        }
        let target = &c.route.target;
        let reply = match streams {
            true => match call_streaming(&session.link, call, msg.clone(), target, upstream).await?
            {
                Streamed::Whole(reply) => reply,
                Streamed::Partial(p) => return Ok(HttpOut::Stream(p)),
            },
            false => timed(upstream, session.link.call(msg.clone())).await?,
        };
        self.track_handles(c, call, guid, &session, &reply).await?;
        match (ddl, call.method) {
            (Some(d), _) => {
                let h = peek_header(&reply)?;
                match tcli::reply_operation_guid(&reply, &h).ok().flatten() {
                    Some(op) if tcli::reply_succeeded(&reply) => {
                        self.ddl_ops.insert(op, Arc::new((guid, d))).await;
                    }
                    _ => d.refused(),
                }
            }
            (None, "CloseOperation") => self.ddl_ops.invalidate(&guid).await,
            (None, "GetOperationStatus") if metacache::operation_ended(&reply) => {
                self.ddl_ops.invalidate(&guid).await
            }
            _ => {}
        }
        if let Some(r) = self.recordings.get(&guid).await {
            let done = {
                let mut slot = r.rec.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(rec) = slot.as_mut() {
                    rec.observe(call, &msg, &reply);
                }
                match slot.as_ref().is_some_and(Recording::complete) {
                    true => slot.take(),
                    false => None,
                }
            };
            if let Some(rec) = done {
                self.recordings.invalidate(&guid).await;
                self.meta.store(rec).await;
            }
        }
        if let (Some(k), Some(ttl)) = (key, c.route.cache_ttl) {
            match tcli::creates_operation(call.method) {
                true => {
                    let h = peek_header(&reply)?;
                    let op = tcli::reply_operation_guid(&reply, &h).ok().flatten();
                    let rec = self.meta.record(k, ttl, &reply, generation);
                    if let (Some(op), Some(rec)) = (op, rec) {
                        let shared = SharedRecording {
                            session: guid,
                            rec: std::sync::Mutex::new(Some(rec)),
                        };
                        self.recordings.insert(op, Arc::new(shared)).await;
                    }
                }
                false => self.meta.store_whole(k, ttl, &reply, generation).await,
            }
        }
        Ok(HttpOut::Reply(reply))
    }

    /// A place for one more upstream session of `user` on `route`: under
    /// `server.max_sessions_per_user` (refused at once), then under the
    /// route's governor (waited for, up to its `queue_timeout`). The permit
    /// is dropped on every failed open; `counts` is released by the caller.
    async fn admit(
        &self,
        route: &Route,
        user: &str,
        peer: std::net::SocketAddr,
    ) -> Result<Permit, RpcError> {
        self.counts.reserve(user, route, peer)?;
        if route.governor.route_full() {
            self.warm.shed(&route.name);
        }
        match route.governor.acquire(user).await {
            Ok(p) => Ok(p),
            Err(e) => {
                self.counts.release(user);
                let (limit, reason) = (e.limit, e.cap.key());
                let user = crate::edge::loggable(user);
                info!(target: "audit", event = "cap_refused", route = %route.name, reason, client = %peer.ip(), %user, limit);
                Err(e.into())
            }
        }
    }

    /// Opens (or reuses) an upstream link as the client's mapped identity and
    /// sends it the rewritten OpenSession.
    #[allow(clippy::too_many_arguments)]
    async fn open_upstream(
        &self,
        route: &Arc<Route>,
        identity: &ClientIdentity,
        info: OpenSessionInfo,
        do_as: Option<&str>,
        msg: &[u8],
        reuse: Option<Link>,
        call: &Call,
        upstream: &mut Duration,
    ) -> Result<Opened, RpcError> {
        let user = crate::edge::loggable(&identity.user);
        let peer = identity.addr;
        let up = match upstream_credential(route, identity) {
            Ok(up) => up,
            Err(e) => {
                info!(target: "audit", event = "mapping_refused", route = %route.name, %user, %peer, "audit: no account mapping");
                return Err(e.into());
            }
        };
        let kerberos = up.credential.kerberos.is_some();
        info!(target: "audit", event = "mapping", route = %route.name, %user, %peer, upstream_user = %up.credential.user, kerberos, "audit: upstream identity chosen");
        let cred = up.credential;
        let target = &route.target;
        let mut client_conf = info.configuration;
        if let Some(d) = do_as {
            // the key both HiveServer2 and Kyuubi read
            client_conf.push((mapping::IMPERSONATION_KEYS[0].to_string(), d.to_string()));
        }
        let mut forced = up.forced;
        forced.push((
            mapping::CLIENT_IP_KEY.to_string(),
            identity.addr.ip().to_string(),
        ));
        let (conf, stripped) = mapping::session_conf(&route.policy, &client_conf, &forced);
        let who = cache_identity(&cred.user, &conf);
        for key in stripped {
            warn!(user = %crate::edge::loggable(&identity.user), key = %crate::edge::loggable(&key), peer = %identity.addr, "stripped a client-supplied setting: possible spoofing attempt");
        }
        // The request's username/password are always replaced: a NOSASL
        // upstream reads the mapped account there; any other upstream gets
        // the mapped user and no password, so a NOSASL client's own password
        // never leaves the broker.
        let nosasl_upstream =
            target.transport == Transport::Binary && target.sasl == UpstreamSasl::Nosasl;
        let password = if nosasl_upstream {
            cred.password.expose().to_string()
        } else {
            String::new()
        };
        let edit = OpenSessionEdit {
            credentials: Some((cred.user.clone(), password)),
            configuration: Some(conf),
        };
        let msg = Bytes::from(tcli::rewrite_open_session(msg, &edit)?);
        let kind = match (&reuse, self.warm.enabled(&route.name)) {
            (None, true) => WarmKey::new(&self.warm, &route.name, &cred, identity.addr.ip(), &msg),
            _ => None,
        };
        let warm = match kind {
            Some(k) => {
                let recipe = Recipe {
                    target: target.clone(),
                    cred: cred.clone(),
                    pool: route.pool.clone(),
                    client_ip: identity.addr.ip(),
                    governor: route.governor.clone(),
                };
                self.warm.take(&k, recipe).await
            }
            None => None,
        };
        let (link, reply) = match (warm, reuse) {
            (Some(w), _) => (w.link, Bytes::from(tcli::with_seqid(&w.reply, call.seqid)?)),
            (None, Some(l)) => {
                let reply = timed(upstream, l.call(msg)).await?;
                (l, reply)
            }
            (None, None) => {
                let t0 = Instant::now();
                let l = Link::open(target, &cred, &route.pool, identity.addr.ip()).await;
                *upstream += t0.elapsed();
                let l = l?;
                let reply = timed(upstream, l.call(msg)).await?;
                (l, reply)
            }
        };
        let h = check_reply(&reply, call, target, &link).await?;
        let handle = tcli::reply_session_handle(&reply, &h).map_err(|e| malformed(target, e))?;
        if handle.is_some() {
            info!(user = %crate::edge::loggable(&identity.user), upstream_user = %cred.user, route = %route.name, "session opened");
        }
        let protocol = match crate::wire::thrift::find_field(&reply, h.body_offset, &[0, 2]) {
            Ok(Some((crate::wire::thrift::ttype::I32, mut r))) => r.i32().unwrap_or(-1),
            _ => -1,
        };
        Ok(Opened {
            link,
            reply,
            handle,
            scope: SessionScope {
                protocol,
                who,
                database: None,
            },
        })
    }

    /// HTTP clients: the session that owns the handle in this request, and
    /// the handle's GUID.
    async fn lookup(
        &self,
        c: &HttpClient<'_>,
        call: &Call,
        guid: Guid,
    ) -> Result<Arc<Owned>, RpcError> {
        let (found, what) = match call.scope {
            Scope::Operation => (self.operations.get(&guid).await, "operation"),
            Scope::Unknown => match self.operations.get(&guid).await {
                Some(o) => (Some(o), "operation"),
                None => (self.sessions.get(&guid).await, "session"),
            },
            _ => (self.sessions.get(&guid).await, "session"),
        };
        // Handles are bearer secrets; still, never let one user drive
        // another's session, nor reach one opened on another route.
        let owned = match found {
            Some(o) if c.identity.user == o.user && *c.route.name == *o.route => o,
            _ => {
                let (user, peer) = (&c.identity.user, c.identity.addr);
                return Err(self.refuse_handle(c.route, user, peer, call, what));
            }
        };
        Ok(owned)
    }

    /// HTTP clients: remember new operation handles (they share their
    /// session's entry) and forget closed ones. Closing a session drops its
    /// operations too, which releases the upstream link.
    async fn track_handles(
        &self,
        c: &HttpClient<'_>,
        call: &Call,
        guid: Guid,
        session: &Arc<Owned>,
        reply: &[u8],
    ) -> Result<(), RpcError> {
        let target = &c.route.target;
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
                let _ = self
                    .replays
                    .invalidate_entries_if(move |_, r| r.session == guid);
                let _ = self
                    .recordings
                    .invalidate_entries_if(move |_, r| r.session == guid);
                let _ = self.ddl_ops.invalidate_entries_if(move |_, d| d.0 == guid);
                // compare by address: a captured Arc would keep the link alive
                let closed = Arc::as_ptr(session) as usize;
                // only fails if closures were not enabled at build time
                let _ = self
                    .operations
                    .invalidate_entries_if(move |_, v| Arc::as_ptr(v) as usize == closed);
                // the link belongs to this session alone: close it now
                // rather than when the cache lets go of the entry (on a
                // route with warm sessions, after the background close)
                if !self.warm.enabled(&c.route.name) {
                    session.link.close().await;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A binary client went away: close the sessions it left open upstream.
    /// Binary upstreams close them when the TCP connection drops; HTTP
    /// upstreams need an explicit CloseSession.
    pub async fn binary_gone(&self, c: &mut BinaryClient) {
        for _ in 0..c.sessions.len() {
            self.metrics.session_closed(&c.route.name, c.user());
            self.counts.release(c.user());
        }
        // given back once the sessions are closed upstream, not before
        let _permits = std::mem::take(&mut c.permits);
        let Some(link) = c.link.take() else { return };
        match link {
            Link::Http(_) => {
                for (guid, secret) in c.sessions.drain(..) {
                    close_upstream_session(&link, &guid, &secret).await;
                }
            }
            // the upstream ends a binary link's sessions with its connection
            Link::Binary(_) => link.close().await,
        }
    }

    /// On shutdown: close every session HTTP clients left open.
    pub async fn close_all_sessions(&self) {
        self.warm.close_all().await;
        let live: Vec<(Arc<Guid>, Arc<Owned>)> = self.sessions.iter().collect();
        for (guid, owned) in live {
            close_upstream_session(&owned.link, &guid, &owned.secret).await;
            self.sessions.invalidate(guid.as_ref()).await;
        }
    }
}

/// Who a session is upstream, for the metadata cache: the user (or
/// principal) and every setting it was opened with (impersonated user,
/// database, catalog, engine, client address, ...): answers for one never
/// reach another. Settings that cannot change an answer would only split
/// the cache more finely; none is left out.
fn cache_identity(user: &str, conf: &[(String, String)]) -> Arc<str> {
    let mut who = user.to_string();
    let mut all: Vec<&(String, String)> = conf.iter().collect();
    all.sort();
    for (k, v) in all {
        who.push('\0');
        who.push_str(k);
        who.push('=');
        who.push_str(v);
    }
    who.into()
}

/// The handle GUID a session- or operation-scoped request names.
fn handle_of(call: &Call, msg: &[u8]) -> Result<Guid, RpcError> {
    let h = peek_header(msg)?;
    tcli::request_guid(msg, &h)?
        .ok_or_else(|| RpcError::BadRequest(format!("{} without a handle", call.wire_name())))
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

/// A binary client's call: a big reply from a binary upstream is relayed to
/// the client as it arrives (after its header is checked), the rest go whole.
async fn relay_call(
    link: &Link,
    call: &Call,
    msg: Bytes,
    sink: &mut ReplySink<'_>,
    target: &Target,
    upstream: &mut Duration,
) -> Result<Out, RpcError> {
    let streamed = if sink.can_relay() {
        call_streaming(link, call, msg, target, upstream).await?
    } else {
        Streamed::Whole(timed(upstream, link.call(msg)).await?)
    };
    match streamed {
        Streamed::Whole(reply) => {
            check_reply(&reply, call, target, link).await?;
            Ok(Out::Reply(reply))
        }
        // boxed: a relay's state is large and only big replies need it
        Streamed::Partial(p) => Box::pin(timed(upstream, p.relay_to(sink)))
            .await
            .map(Out::Relayed),
    }
}

/// [`Link::call_streaming`], with a partial reply's head checked: it must
/// answer `call` (a whole reply is the caller's to check).
async fn call_streaming(
    link: &Link,
    call: &Call,
    msg: Bytes,
    target: &Target,
    upstream: &mut Duration,
) -> Result<Streamed, RpcError> {
    let streamed = timed(upstream, link.call_streaming(msg, RELAY_ABOVE)).await?;
    if let Streamed::Partial(p) = &streamed {
        // dropping `p` on a mismatch closes the link: it is mid-frame
        answers(p.head(), call).map_err(|e| malformed(target, e))?;
    }
    Ok(streamed)
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

/// The reply's header, if the reply answers this call: same method and
/// sequence id.
fn answers<'a>(reply: &'a [u8], call: &Call) -> Result<MessageHeader<'a>, String> {
    match peek_header(reply) {
        Err(e) => Err(e.to_string()),
        Ok(h)
            if h.name == call.wire_name()
                && h.seqid == call.seqid
                && matches!(h.kind, MessageType::Reply | MessageType::Exception) =>
        {
            Ok(h)
        }
        Ok(h) => Err(format!(
            "reply {} #{} does not answer {} #{}",
            h.name.escape_default(),
            h.seqid,
            call.wire_name(),
            call.seqid
        )),
    }
}

/// As [`answers`]; if the reply does not answer the call, the stream is out
/// of step and the link is closed.
async fn check_reply<'a>(
    reply: &'a [u8],
    call: &Call,
    target: &Target,
    link: &Link,
) -> Result<MessageHeader<'a>, RpcError> {
    match answers(reply, call) {
        Ok(h) => Ok(h),
        Err(problem) => {
            link.close().await;
            Err(malformed(target, problem))
        }
    }
}
