//! Per-exchange measurement. The client edge (`edge::Edge::finish`) calls
//! [`Metrics::observe`] once per RPC with the total time, the upstream time
//! (only the upstream exchange) and the overhead (total minus upstream, never
//! negative since the upstream time is measured inside the total), and
//! [`Metrics::login`] once per login; failures not caused by the upstream are
//! counted by listener in `client_errors_total`.
//! Prometheus metrics are exported by the admin listener; a per-method
//! latency sketch feeds `/status` and `kyuubi-broker stats`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

// Label values are static strings and the route's shared name: observing
// an RPC allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    route: Arc<str>,
    client_transport: &'static str,
    upstream_transport: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    listener: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    listener: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    listener: Arc<str>,
    mechanism: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MechanismLabels {
    listener: Arc<str>,
    mechanism: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientErrorLabels {
    listener: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

/// The handles one RPC label set observes into.
struct RpcSeries {
    duration: Histogram,
    upstream: Histogram,
    overhead: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    method: Arc<MethodStats>,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 10 µs to about 11 minutes, doubling: microseconds to minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 2.0, 27))
}

/// 64 bytes to 1 GiB, ×4.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(64.0, 4.0, 13))
}

/// One finished RPC.
pub struct Observation<'a> {
    pub method: &'static str,
    pub route: &'a Arc<str>,
    pub client_transport: &'static str,
    pub upstream_transport: &'static str,
    /// "ok" or the error kind.
    pub outcome: &'static str,
    pub total: Duration,
    pub upstream: Duration,
    pub request_bytes: usize,
    pub response_bytes: usize,
    /// Set for failures caused by the upstream (connect, timeout, ...).
    pub upstream_error: Option<&'static str>,
}

pub struct Metrics {
    registry: Registry,
    duration: Histograms<RpcLabels>,
    upstream: Histograms<RpcLabels>,
    overhead: Histograms<RpcLabels>,
    request_bytes: Histograms<MethodLabels>,
    response_bytes: Histograms<MethodLabels>,
    upstream_errors: Family<ErrorLabels, Counter>,
    logins: Histograms<LoginLabels>,
    auth_failures: Family<MechanismLabels, Counter>,
    client_errors: Family<ClientErrorLabels, Counter>,
    handles_refused: Family<RouteLabels, Counter>,
    logins_throttled: Family<RefusedLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    timed_out: Family<RefusedLabels, Counter>,
    tls_handshake_failures: Family<RefusedLabels, Counter>,
    tls_handshakes: Family<KindLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_cert_expiry: Family<ListenerLabels, Gauge<f64, AtomicU64>>,
    audit_dropped: Counter,
    sessions: Family<RouteLabels, Gauge>,
    governor_queue: Family<RouteLabels, Gauge>,
    governor_sessions: Family<RouteLabels, Gauge>,
    governor_wait: Histograms<RouteLabels>,
    governor_timeouts: Family<RouteLabels, Counter>,
    token_age: Gauge<f64, AtomicU64>,
    token_expiry: Gauge<f64, AtomicU64>,
    discovery_znodes: Gauge,
    discovery_registrations: Counter,
    discovery_failures: Counter,
    fleet_leader: Gauge,
    fleet_token_updates: Counter,
    fleet_errors: Counter,
    methods: RwLock<HashMap<&'static str, Arc<MethodStats>>>,
    /// The series one RPC's labels land in, resolved once per label set:
    /// one lookup per RPC instead of one per family.
    series: RwLock<HashMap<RpcLabels, Arc<RpcSeries>>>,
    /// (route, user) → live sessions, for `/status`.
    live: Mutex<HashMap<(String, String), i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kyuubi_broker");
        let duration =
            Histograms::<RpcLabels>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let upstream =
            Histograms::<RpcLabels>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let overhead =
            Histograms::<RpcLabels>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let request_bytes =
            Histograms::<MethodLabels>::new_with_constructor(bytes_histogram as fn() -> Histogram);
        let response_bytes =
            Histograms::<MethodLabels>::new_with_constructor(bytes_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "rpc_duration",
            "Time from a client RPC's arrival to its reply, as seen by the broker",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register_with_unit(
            "rpc_upstream_duration",
            "Time spent waiting on the upstream for an RPC (connect and SASL included when OpenSession opens a link)",
            Unit::Seconds,
            upstream.clone(),
        );
        registry.register_with_unit(
            "rpc_overhead",
            "Time the broker itself added to an RPC: total minus upstream",
            Unit::Seconds,
            overhead.clone(),
        );
        registry.register_with_unit(
            "rpc_request_size",
            "Size of RPC requests (Thrift message bytes)",
            Unit::Bytes,
            request_bytes.clone(),
        );
        registry.register_with_unit(
            "rpc_response_size",
            "Size of RPC replies (Thrift message bytes)",
            Unit::Bytes,
            response_bytes.clone(),
        );
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "RPCs that failed because of the upstream, by kind",
            upstream_errors.clone(),
        );
        let logins =
            Histograms::<LoginLabels>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "login_duration",
            "Time to authenticate a client (SASL handshake, or an HTTP request's credentials), by outcome",
            Unit::Seconds,
            logins.clone(),
        );
        let auth_failures = Family::<MechanismLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Client logins refused, unusable or not checkable (authentication service down), by mechanism",
            auth_failures.clone(),
        );
        let client_errors = Family::<ClientErrorLabels, Counter>::default();
        registry.register(
            "client_errors",
            "Client exchanges that failed for a reason other than the upstream (bad input, refused login, timeout, unknown handle, shutdown), by kind",
            client_errors.clone(),
        );
        let handles_refused = Family::<RouteLabels, Counter>::default();
        registry.register(
            "handles_refused",
            "Requests naming a session or operation handle their client did not open, refused before the upstream, by route",
            handles_refused.clone(),
        );
        let logins_throttled = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "logins_throttled",
            "Logins refused unchecked after repeated failures (per user and address, or per address), by listener and reason",
            logins_throttled.clone(),
        );
        let connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "client_connections",
            "Open client connections (binary) or in-flight requests' connections (HTTP), by listener",
            connections.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections refused at a cap or by the deny list, by listener and reason (denied, global, listener, per_ip, per_user)",
            refused.clone(),
        );
        let timed_out = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_timed_out",
            "Logged-in client connections closed by a timeout, by listener and reason (idle: no request within server.client_idle_timeout; write: a reply not taken within server.client_write_timeout)",
            timed_out.clone(),
        );
        let tls_handshake_failures = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed, by listener and reason (plaintext: a client without TLS; closed; client_certificate: none or not trusted; protocol; timeout)",
            tls_handshake_failures.clone(),
        );
        let tls_handshakes = Family::<KindLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Client TLS handshakes completed, by listener and kind (full, or resumed: a session resumed by ticket or id)",
            tls_handshakes.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Certificate reloads of a TLS listener, by listener and result (ok, error: the old certificate stays)",
            tls_reloads.clone(),
        );
        let tls_cert_expiry = Family::<ListenerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "tls_cert_expiry",
            "Time until the certificate a TLS listener serves expires (negative: expired)",
            Unit::Seconds,
            tls_cert_expiry.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_events_dropped",
            "Audit events lost because the audit file's writer could not keep up (server.audit_log)",
            audit_dropped.clone(),
        );
        let sessions = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "sessions",
            "Open client sessions, by route",
            sessions.clone(),
        );
        let governor_queue = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "governor_queue_length",
            "OpenSessions waiting for a place under the route's max_upstream_sessions or max_upstream_sessions_per_user, by route",
            governor_queue.clone(),
        );
        let governor_sessions = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "governor_sessions",
            "Places held under the route's governor: upstream sessions open or being opened, by route",
            governor_sessions.clone(),
        );
        let governor_wait =
            Histograms::<RouteLabels>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "governor_wait",
            "Time an admitted OpenSession waited for its place under the route's caps (0 when there was room), by route",
            Unit::Seconds,
            governor_wait.clone(),
        );
        let governor_timeouts = Family::<RouteLabels, Counter>::default();
        registry.register(
            "governor_timeouts",
            "OpenSessions refused because no place came free within the route's queue_timeout, by route",
            governor_timeouts.clone(),
        );
        let token_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "token_age",
            "Age of the active gateway token",
            Unit::Seconds,
            token_age.clone(),
        );
        let token_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "token_time_to_expiry",
            "Time until the active gateway token expires",
            Unit::Seconds,
            token_expiry.clone(),
        );
        let discovery_znodes = Gauge::default();
        registry.register(
            "discovery_znodes",
            "Znodes this broker has registered in ZooKeeper for its listeners now (0 while ZooKeeper is out of reach)",
            discovery_znodes.clone(),
        );
        let discovery_registrations = Counter::default();
        registry.register(
            "discovery_registrations",
            "Times this broker registered its listeners in ZooKeeper (once per ZooKeeper session)",
            discovery_registrations.clone(),
        );
        let discovery_failures = Counter::default();
        registry.register(
            "discovery_failures",
            "Failed attempts to reach ZooKeeper or register there, and lost ZooKeeper sessions",
            discovery_failures.clone(),
        );
        let fleet_leader = Gauge::default();
        registry.register(
            "fleet_leader",
            "1 while this broker leads its fleet's token rotation, else 0",
            fleet_leader.clone(),
        );
        let fleet_token_updates = Counter::default();
        registry.register(
            "fleet_token_updates",
            "Times this broker switched to a token read from the fleet's record in ZooKeeper",
            fleet_token_updates.clone(),
        );
        let fleet_errors = Counter::default();
        registry.register(
            "fleet_errors",
            "Fleet token records that could not be read or opened (another key, damage), and failed leader reads",
            fleet_errors.clone(),
        );
        Metrics {
            registry,
            duration,
            upstream,
            overhead,
            request_bytes,
            response_bytes,
            upstream_errors,
            logins,
            auth_failures,
            client_errors,
            handles_refused,
            logins_throttled,
            connections,
            refused,
            timed_out,
            tls_handshake_failures,
            tls_handshakes,
            tls_reloads,
            tls_cert_expiry,
            audit_dropped,
            sessions,
            governor_queue,
            governor_sessions,
            governor_wait,
            governor_timeouts,
            token_age,
            token_expiry,
            discovery_znodes,
            discovery_registrations,
            discovery_failures,
            fleet_leader,
            fleet_token_updates,
            fleet_errors,
            methods: RwLock::new(HashMap::new()),
            series: RwLock::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn observe(&self, o: &Observation<'_>) {
        let overhead = o.total.saturating_sub(o.upstream);
        let labels = RpcLabels {
            method: o.method,
            route: o.route.clone(),
            client_transport: o.client_transport,
            upstream_transport: o.upstream_transport,
            outcome: o.outcome,
        };
        let s = self.series_of(labels);
        s.duration.observe(o.total.as_secs_f64());
        s.upstream.observe(o.upstream.as_secs_f64());
        s.overhead.observe(overhead.as_secs_f64());
        s.request_bytes.observe(o.request_bytes as f64);
        s.response_bytes.observe(o.response_bytes as f64);
        if let Some(kind) = o.upstream_error {
            self.upstream_errors
                .get_or_create(&ErrorLabels {
                    route: o.route.clone(),
                    kind,
                })
                .inc();
        }
        s.method.record(o.total, o.upstream, o.outcome != "ok");
    }

    fn series_of(&self, labels: RpcLabels) -> Arc<RpcSeries> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&labels)
        {
            return s.clone();
        }
        let ml = MethodLabels {
            method: labels.method,
            route: labels.route.clone(),
        };
        // the families hand out shared handles: a clone observes into the
        // series /metrics encodes
        let s = Arc::new(RpcSeries {
            duration: self.duration.get_or_create(&labels).clone(),
            upstream: self.upstream.get_or_create(&labels).clone(),
            overhead: self.overhead.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&ml).clone(),
            response_bytes: self.response_bytes.get_or_create(&ml).clone(),
            method: self.method(labels.method),
        });
        self.series
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels)
            .or_insert(s)
            .clone()
    }

    /// One login attempt on `listener` with `mechanism` (plain, gssapi,
    /// nosasl, basic, spnego).
    pub fn login(
        &self,
        listener: &Arc<str>,
        mechanism: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        self.logins
            .get_or_create(&LoginLabels {
                listener: listener.clone(),
                mechanism,
                outcome,
            })
            .observe(took.as_secs_f64());
    }

    pub fn auth_failure(&self, listener: &Arc<str>, mechanism: &'static str) {
        self.auth_failures
            .get_or_create(&MechanismLabels {
                listener: listener.clone(),
                mechanism,
            })
            .inc();
    }

    /// A connection refused by a cap or the deny list.
    pub fn connection_refused(&self, listener: &Arc<str>, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    /// A logged-in connection closed by `server.client_idle_timeout` or
    /// `server.client_write_timeout`.
    pub fn connection_timed_out(&self, listener: &Arc<str>, reason: &'static str) {
        self.timed_out
            .get_or_create(&RefusedLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn tls_handshake_failed(&self, listener: &Arc<str>, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&RefusedLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    /// A completed client handshake: `full` or `resumed`.
    pub fn tls_handshake(&self, listener: &Arc<str>, kind: &'static str) {
        self.tls_handshakes
            .get_or_create(&KindLabels {
                listener: listener.clone(),
                kind,
            })
            .inc();
    }

    /// `ok`: the new certificate is served; `error`: the old one stays.
    pub fn tls_reloaded(&self, listener: &Arc<str>, result: &'static str) {
        self.tls_reloads
            .get_or_create(&ResultLabels {
                listener: listener.clone(),
                result,
            })
            .inc();
    }

    /// Set when `/metrics` is rendered, from the certificate's not-after.
    pub fn set_tls_cert_expiry(&self, listener: &str, seconds: f64) {
        self.tls_cert_expiry
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .set(seconds);
    }

    pub fn client_error(&self, listener: &Arc<str>, kind: &'static str) {
        self.client_errors
            .get_or_create(&ClientErrorLabels {
                listener: listener.clone(),
                kind,
            })
            .inc();
    }

    fn method(&self, name: &'static str) -> Arc<MethodStats> {
        if let Some(m) = self
            .methods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return m.clone();
        }
        self.methods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }

    /// A client connection opened; the gauge drops when the guard does.
    pub fn connection(&self, listener: &str) -> ConnectionGuard {
        let g = self
            .connections
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .clone();
        g.inc();
        ConnectionGuard(g)
    }

    pub fn session_opened(&self, route: &Arc<str>, user: &str) {
        self.sessions
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .inc();
        *self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), user.to_string()))
            .or_default() += 1;
    }

    pub fn handle_refused(&self, route: &Arc<str>) {
        self.handles_refused
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .inc();
    }

    pub fn login_throttled(&self, listener: &Arc<str>, reason: &'static str) {
        self.logins_throttled
            .get_or_create(&RefusedLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn session_closed(&self, route: &Arc<str>, user: &str) {
        self.sessions
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .dec();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let key = (route.to_string(), user.to_string());
        if let Some(n) = live.get_mut(&key) {
            *n -= 1;
            if *n <= 0 {
                live.remove(&key);
            }
        }
    }

    /// A route's governor series, created now so they show (at 0) before
    /// the first OpenSession; the handles update the registry's values.
    pub fn governor(&self, route: &Arc<str>) -> GovernorSeries {
        let l = RouteLabels {
            route: route.clone(),
        };
        GovernorSeries {
            queue_length: self.governor_queue.get_or_create(&l).clone(),
            sessions: self.governor_sessions.get_or_create(&l).clone(),
            wait: self.governor_wait.get_or_create(&l).clone(),
            timeouts: self.governor_timeouts.get_or_create(&l).clone(),
        }
    }

    /// Sets the token gauges from the rotation status (at scrape time).
    pub fn set_token(&self, age: Option<Duration>, to_expiry: Option<Duration>) {
        self.token_age.set(age.map_or(0.0, |d| d.as_secs_f64()));
        self.token_expiry
            .set(to_expiry.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// ZooKeeper registration: `Some(n)` registered `n` znodes now,
    /// `None` a failed attempt or a lost session.
    pub fn discovery(&self, registered: Option<usize>) {
        match registered {
            Some(n) => {
                self.discovery_znodes.set(n as i64);
                if n > 0 {
                    self.discovery_registrations.inc();
                }
            }
            None => {
                self.discovery_znodes.set(0);
                self.discovery_failures.inc();
            }
        }
    }

    pub fn fleet_leader(&self, leads: bool) {
        self.fleet_leader.set(i64::from(leads));
    }

    pub fn fleet_token_update(&self) {
        self.fleet_token_updates.inc();
    }

    pub fn fleet_error(&self) {
        self.fleet_errors.inc();
    }

    /// The Prometheus text exposition (OpenMetrics).
    /// For parts that keep their own metrics (the metadata cache), before
    /// the broker shares this.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn render(&self) -> String {
        // the audit writer counts in a static of its own (it has no Metrics)
        let (lost, shown) = (crate::audit::dropped(), self.audit_dropped.get());
        if lost > shown {
            self.audit_dropped.inc_by(lost - shown);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Per-method latency summary, slowest p99 first.
    pub fn table(&self) -> Vec<MethodRow> {
        let methods = self.methods.read().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<MethodRow> = methods.iter().map(|(m, s)| s.row(m)).collect();
        rows.sort_by(|a, b| b.p99_us.cmp(&a.p99_us).then(a.method.cmp(&b.method)));
        rows
    }

    /// Live sessions per (route, user).
    pub fn live_sessions(&self) -> Vec<LiveSessions> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<LiveSessions> = live
            .iter()
            .map(|((route, user), n)| LiveSessions {
                route: route.clone(),
                user: user.clone(),
                sessions: *n,
            })
            .collect();
        v.sort_by(|a, b| (&a.route, &a.user).cmp(&(&b.route, &b.user)));
        v
    }
}

pub struct ConnectionGuard(Gauge);

/// One route's `governor_*` series (see [`Metrics::governor`]).
pub struct GovernorSeries {
    pub queue_length: Gauge,
    pub sessions: Gauge,
    pub wait: Histogram,
    pub timeouts: Counter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LiveSessions {
    pub route: String,
    pub user: String,
    pub sessions: i64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MethodRow {
    pub method: String,
    pub count: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub overhead_p50_us: u64,
    pub overhead_p99_us: u64,
}

#[derive(Default)]
struct MethodStats {
    total: Sketch,
    overhead: Sketch,
    errors: AtomicU64,
}

impl MethodStats {
    fn record(&self, total: Duration, upstream: Duration, failed: bool) {
        self.total.record(total);
        self.overhead.record(total.saturating_sub(upstream));
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn row(&self, method: &str) -> MethodRow {
        MethodRow {
            method: method.to_string(),
            count: self.total.count(),
            errors: self.errors.load(Ordering::Relaxed),
            p50_us: self.total.quantile(0.50),
            p95_us: self.total.quantile(0.95),
            p99_us: self.total.quantile(0.99),
            max_us: self.total.max_us.load(Ordering::Relaxed),
            overhead_p50_us: self.overhead.quantile(0.50),
            overhead_p99_us: self.overhead.quantile(0.99),
        }
    }
}

/// Buckets per doubling: about 9 % relative error on quantiles.
const SUB: f64 = 8.0;
/// 2^34 µs ≈ 4.8 hours at the top.
const BUCKETS: usize = 34 * 8 + 1;

/// A lock-free log-scale histogram of microseconds.
pub struct Sketch {
    counts: Box<[AtomicU64]>,
    max_us: AtomicU64,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Sketch {
    fn index(us: u64) -> usize {
        (((us as f64 + 1.0).log2() * SUB) as usize).min(BUCKETS - 1)
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        (2f64.powf((i as f64 + 1.0) / SUB) - 1.0).floor() as u64
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.counts[Self::index(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// An upper estimate of quantile `q` in µs (never above the maximum).
    pub fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Self::upper(i).min(self.max_us.load(Ordering::Relaxed));
            }
        }
        self.max_us.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_quantiles_are_within_ten_percent() {
        let s = Sketch::default();
        for us in 1..=10_000u64 {
            s.record(Duration::from_micros(us));
        }
        for (q, want) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = s.quantile(q) as f64;
            assert!(
                (got - want).abs() / want < 0.10,
                "q{q}: got {got}, want about {want}"
            );
        }
        assert_eq!(s.quantile(1.0), 10_000);
        assert_eq!(Sketch::default().quantile(0.5), 0);
    }

    #[test]
    fn overhead_is_total_minus_upstream_and_never_negative() {
        let m = Metrics::new();
        let route: Arc<str> = "r".into();
        let obs = |total, upstream| Observation {
            method: "ExecuteStatement",
            route: &route,
            client_transport: "binary",
            upstream_transport: "http",
            outcome: "ok",
            total: Duration::from_micros(total),
            upstream: Duration::from_micros(upstream),
            request_bytes: 100,
            response_bytes: 200,
            upstream_error: None,
        };
        m.observe(&obs(1_000, 900));
        // an upstream time above the total (clock quirks) must not go negative
        m.observe(&obs(1_000, 2_000));
        let row = &m.table()[0];
        assert_eq!(row.count, 2);
        assert!(row.overhead_p99_us <= 100, "{row:?}");
        let text = m.render();
        for needle in [
            "kyuubi_broker_rpc_duration_seconds_bucket{",
            "kyuubi_broker_rpc_overhead_seconds_count{method=\"ExecuteStatement\",route=\"r\",client_transport=\"binary\",upstream_transport=\"http\",outcome=\"ok\"} 2",
            "kyuubi_broker_rpc_request_size_bytes_sum{method=\"ExecuteStatement\",route=\"r\"} 200.0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("overhead_seconds_sum{method=\"ExecuteStatement\",route=\"r\",client_transport=\"binary\",upstream_transport=\"http\",outcome=\"ok\"} -"));
    }

    #[test]
    fn live_sessions_follow_opens_and_closes() {
        let m = Metrics::new();
        let r: Arc<str> = "r".into();
        m.session_opened(&r, "alice");
        m.session_opened(&r, "alice");
        m.session_closed(&r, "alice");
        assert_eq!(m.live_sessions()[0].sessions, 1);
        m.session_closed(&r, "alice");
        assert!(m.live_sessions().is_empty());
        assert!(m.render().contains("kyuubi_broker_sessions{route=\"r\"} 0"));
    }
}
