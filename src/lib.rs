//! kyuubi-broker: a local connection broker and SQL gateway proxy for
//! HiveServer2 / Kyuubi (TCLIService), binary and HTTP on both sides.
//!
//! # One RPC, in data-flow order
//!
//! 1. [`listen`] accepts a client and, on a TLS listener, runs the TLS
//!    handshake in the connection's task ([`tls::server`]; the stream, plain
//!    or TLS, is a [`wire::stream::Stream`]). [`listen::binary`] runs the
//!    SASL PLAIN or GSSAPI handshake (sans-IO in [`wire::sasl`], GSS in
//!    [`kerberos`]) or
//!    recognises NOSASL by its first byte; [`listen::http`] checks Basic or
//!    SPNEGO credentials or its signed `hive.server2.auth` cookie. Both ask
//!    the listener's [`auth::Authenticator`] (built at startup by [`prepare`])
//!    to turn credentials into an [`identity::ClientIdentity`].
//! 2. [`wire::io`] reads one Thrift message (a SASL data frame, a bare NOSASL
//!    message, or an HTTP body), checking the size limit before allocating.
//!    Once logged in, each read and write is bounded by the connection's
//!    [`deadline`] (idle, write and upstream read timeouts), which a coarse
//!    tick checks: no timer is armed per message.
//! 3. [`tcli::Call::parse`] peeks the message header ([`wire::thrift`]):
//!    method, type, sequence id. Nothing else is decoded.
//! 4. [`session::Broker`] forwards it: a binary client's
//!    [`session::BinaryClient`] owns its upstream [`upstream::Link`]; an HTTP
//!    request ([`session::HttpClient`]) finds its link through the session or
//!    operation handle ([`tcli::request_guid`]). OpenSession is the one request
//!    rewritten ([`tcli::rewrite_open_session`]), with the upstream identity
//!    chosen by [`session::upstream_credential`] ([`mapping`]); a NOSASL
//!    client is authenticated there, from the same parse. Before it goes
//!    upstream it takes a place under the route's session caps, waiting its
//!    turn (round robin by user) when the route is full ([`governor`]); a
//!    session of a kind opened recently may be handed over ready
//!    ([`warm`]). A metadata call (GetTables, GetColumns, ...) that was
//!    answered before for the same identity is answered by the broker from
//!    [`metacache`], with handles of its own; otherwise its answer is
//!    recorded there as the client reads it.
//! 5. [`upstream`] sends the bytes unchanged (SASL PLAIN or GSSAPI, NOSASL, or
//!    HTTP POST with Basic or SPNEGO; over TLS verified by [`tls::client`]
//!    when the route says so) and returns the reply bytes; only
//!    OpenSession replies and new operation handles are read. A big reply
//!    from a binary or HTTP upstream is passed on as it arrives
//!    ([`upstream::Link::call_streaming`], [`upstream::Pending`]): written
//!    to a binary client's connection, or fed into an HTTP client's
//!    response body part by part (`listen::http::ReplyBody`), which
//!    finishes the exchange at the edge when it ends.
//! 6. Every outcome the client can see, success or failure, login or RPC, is
//!    finished at the [`edge`] (timed, counted in [`metrics`] by outcome,
//!    logged once) and answered by one function per transport
//!    (`listen::binary::answer`, `listen::http::respond`) from the one table
//!    in [`error::RpcError::answer`].
//!
//! [`run`] wires it together, serves the [`admin`] endpoints and drains
//! connections on shutdown; with `[cluster]` it registers the listeners in
//! ZooKeeper once they serve and takes them out first when draining
//! ([`cluster::discovery`]). Beside the data path: [`tokens`] rotates gateway
//! tokens through [`cloud`] (emulated by [`emulator`]), keeping its state in
//! a file on a single broker; in a fleet ([`cluster::fleet`]) one elected
//! broker runs the same rotation with its state in ZooKeeper, and every
//! broker takes the upstreams' token from there. [`loadgen`] drives
//! `kyuubi-broker bench`.
//!
//! # Module tree
//!
//! Modules depend downwards only (`tests/module_tree.rs` checks it from the
//! `use` lines):
//!
//! - bottom: [`secret`], [`percent`], [`metrics`], [`audit`], [`deadline`], [`wire`], then [`tcli`],
//!   [`kerberos`] and [`identity`] (who is on each side, as plain data);
//! - [`tls`] (certificates, reloads, verifiers over [`wire::stream`]);
//! - [`config`] (TOML, each section validating itself), [`cloud`];
//! - [`auth`], [`mapping`] and [`governor`] (a route's session caps and
//!   their fair queue), each with its own error type;
//! - [`metacache`] (recorded metadata answers, over [`tcli`]);
//! - [`error`] (every client-visible failure and how it is answered), then
//!   [`upstream`], [`warm`] (sessions opened ahead, over [`upstream`] and
//!   [`governor`]), [`edge`], [`session`];
//! - [`tokens`] (the rotation, its schedule and the state file, over
//!   [`cloud`]);
//! - [`cluster`] (ZooKeeper registration, and the fleet's election and
//!   token record, over [`tokens`], [`config`] and [`metrics`]);
//! - top: [`listen`], [`admin`], [`client`], [`loadgen`],
//!   [`commands`], `fuzzing` (what the fuzz targets in `fuzz/` call), and
//!   this crate root.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod client;
pub mod cloud;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod connstr;
pub mod deadline;
pub mod edge;
pub mod emulator;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod governor;
pub mod identity;
pub mod kerberos;
pub mod listen;
pub mod loadgen;
pub mod mapping;
pub mod metacache;
pub mod metrics;
pub mod percent;
pub mod secret;
pub mod session;
pub mod tcli;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod warm;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, Transport};
use crate::listen::Shared;
use crate::session::Broker;

/// Resolves on SIGTERM or SIGINT. The handlers are registered when this is
/// called (inside a runtime), not when the future is first polled.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// A listener socket already bound for the `[[listener]]` of this name.
pub struct BoundListener {
    pub name: String,
    pub tcp: TcpListener,
}

/// The name under which [`bind_all`] returns the admin listener's socket.
pub const ADMIN: &str = "admin";

/// Binds every configured listener, and the admin listener if configured.
pub async fn bind_all(config: &Config) -> std::io::Result<Vec<BoundListener>> {
    let mut out = Vec::new();
    if let Some(a) = &config.admin {
        let tcp = TcpListener::bind(a.bind).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("admin listener cannot bind {}: {e}", a.bind),
            )
        })?;
        out.push(BoundListener {
            name: ADMIN.to_string(),
            tcp,
        });
    }
    for l in &config.listeners {
        let tcp = TcpListener::bind(l.bind).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("listener '{}' cannot bind {}: {e}", l.name, l.bind),
            )
        })?;
        out.push(BoundListener {
            name: l.name.clone(),
            tcp,
        });
    }
    Ok(out)
}

/// A validated configuration with every listener's authenticator built:
/// what [`run`] serves.
pub struct Prepared {
    config: Config,
    /// One per `[[listener]]`, in order.
    auths: Vec<Arc<Authenticator>>,
    /// One per `[[listener]]`, in order: its certificate, when it serves TLS.
    tls: Vec<Option<Arc<tls::server::ServerTls>>>,
    /// By route: how its TLS upstream is verified.
    upstream_tls: std::collections::BTreeMap<String, tls::client::ClientTls>,
    /// A fleet rotating `[tokens]`: the key sealing its token values.
    fleet_key: Option<Arc<cluster::seal::FleetKey>>,
}

impl Prepared {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What is valid but unwise (printed by `check-config`, logged by `serve`).
    pub fn warnings(&self) -> Vec<String> {
        self.config
            .listeners
            .iter()
            .flat_map(|l| [l.plaintext_passwords_warning(), l.ldap_plaintext_warning()])
            .flatten()
            .collect()
    }
}

/// The second half of config validation: builds each listener's
/// authenticator (reading users files and keytabs), so a listener that could
/// not authenticate anyone stops startup with an error naming its key.
/// Set `KRB5_CONFIG` (from [`Config::krb5_conf`]) before calling this.
pub fn prepare(config: Config) -> Result<Prepared, ConfigError> {
    // one for all listeners: an address attacking two listeners is one attacker
    let guard = Arc::new(auth::Guard::new(&config.server));
    let auths = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Authenticator::from_config(l, &format!("listener[{i}]"), &guard).map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let tls = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| match &l.tls {
            None => Ok(None),
            Some(t) => tls::server::ServerTls::new(t, l.protocol == Transport::Http)
                .map(|t| Some(Arc::new(t)))
                .map_err(|e| {
                    config::invalid(
                        format!("listener[{i}].tls"),
                        e.to_string(),
                        "give a PEM certificate chain (leaf first) and its private key",
                    )
                }),
        })
        .collect::<Result<_, _>>()?;
    let mut upstream_tls = std::collections::BTreeMap::new();
    for (name, r) in &config.routes {
        if let Some(t) = r.upstream.client_tls(&format!("routes.{name}"))? {
            upstream_tls.insert(name.clone(), t);
        }
    }
    let fleet_key = match (&config.cluster, &config.tokens) {
        (Some(c), Some(_)) => Some(Arc::new(
            cluster::seal::FleetKey::load(c.token_key_file.as_deref()).map_err(|e| {
                config::invalid(
                    "cluster.token_key_file",
                    e.to_string(),
                    "`openssl rand -hex 32 > FILE; chmod 600 FILE`, and give every broker of the fleet that file",
                )
            })?,
        )),
        _ => None,
    };
    Ok(Prepared {
        config,
        auths,
        tls,
        upstream_tls,
        fleet_key,
    })
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight
/// RPCs finish (up to `server.shutdown_grace`) and closes the upstream
/// sessions clients left open.
pub async fn run(
    prepared: Prepared,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()>,
) {
    let Prepared {
        config,
        auths,
        tls,
        upstream_tls,
        fleet_key,
    } = prepared;
    for w in config
        .listeners
        .iter()
        .flat_map(|l| [l.plaintext_passwords_warning(), l.ldap_plaintext_warning()])
        .flatten()
    {
        warn!("{w}");
    }
    let rotation_stop = CancellationToken::new();
    // a fleet's token comes from its record in ZooKeeper, a single
    // broker's from its own rotation
    let fleet_live = (config.tokens.is_some() && config.cluster.is_some())
        .then(|| tokio::sync::watch::channel(None));
    let mut rotation = match (&config.tokens, &fleet_live) {
        (Some(t), None) => Some(tokens::start(t, rotation_stop.clone()).await),
        _ => None,
    };
    let live = match &fleet_live {
        Some((_, rx)) => Some(rx.clone()),
        None => rotation.as_ref().map(|r| r.live.clone()),
    };
    let broker = Arc::new(Broker::new(&config, live, &upstream_tls));
    let mut fleet = None;
    if let (Some((tx, _)), Some(t), Some(c)) = (fleet_live, &config.tokens, &config.cluster) {
        let inputs = cluster::fleet::Inputs {
            cluster: c,
            tokens: t,
            key: fleet_key.expect("prepared with the fleet"),
            me: cluster::fleet::member_name(
                c,
                listeners
                    .iter()
                    .find(|l| l.name == ADMIN)
                    .or(listeners.first())
                    .and_then(|l| l.tcp.local_addr().ok()),
            ),
            live: tx,
            metrics: broker.metrics.clone(),
        };
        match cluster::fleet::start(inputs).await {
            Ok((r, f)) => {
                rotation = Some(r);
                fleet = Some(f);
            }
            Err(e) => rotation = Some(tokens::Rotation::disabled(e.to_string(), None)),
        }
    }
    let shared = Arc::new(Shared {
        limits: listen::limits::Limits::new(&config.server, broker.metrics.clone()),
        broker,
        server: config.server.clone(),
        cancel: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let accept_loops = TaskTracker::new();
    {
        // idle sessions expire (and are closed upstream) within a quarter
        // of their idle time, even when no client touches the tables
        let (broker, stop) = (shared.broker.clone(), shared.cancel.clone());
        let every = (config.server.session_idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        accept_loops.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => broker.housekeep().await,
                }
            }
        });
    }
    let mut admin_socket = None;
    let mut up = Vec::new();
    let mut bound_addrs = Vec::new();
    for bound in listeners {
        if bound.name == ADMIN {
            admin_socket = Some(bound.tcp);
            continue;
        }
        let Some(i) = config.listeners.iter().position(|l| l.name == bound.name) else {
            warn!(listener = %bound.name, "no [[listener]] of this name; socket ignored");
            continue;
        };
        let lc = &config.listeners[i];
        let route = shared
            .broker
            .route(&lc.route)
            .expect("config validation: every listener's route exists");
        let l = listen::Listener::new(
            lc.clone(),
            auths[i].clone(),
            tls[i].clone(),
            route,
            &shared.broker,
            &config.server,
        );
        if let Ok(a) = bound.tcp.local_addr() {
            bound_addrs.push((lc.name.clone(), a));
        }
        let addr: String = bound
            .tcp
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        up.push(admin::ListenerInfo {
            name: lc.name.clone(),
            protocol: lc.protocol.as_str().to_string(),
            addr: addr.clone(),
            route: lc.route.clone(),
            auth: format!("{:?}", lc.auth).to_lowercase(),
            tls: lc.tls.is_some(),
        });
        let sh = shared.clone();
        let gate = listen::limits::Gate::new(&lc.name, lc.max_connections);
        match l.config.protocol {
            Transport::Binary => {
                let lc = Arc::new(l);
                info!(listener = %lc.config.name, %addr, route = %lc.config.route, "binary listener up");
                accept_loops.spawn(listen::accept_loop(
                    bound.tcp,
                    shared.clone(),
                    gate,
                    move |s, peer, admission| {
                        listen::binary::serve(s, peer, lc.clone(), sh.clone(), admission)
                    },
                ));
            }
            Transport::Http => {
                info!(listener = %lc.name, %addr, path = %lc.http_path, route = %lc.route, "HTTP listener up");
                let hl = listen::http::HttpListener::new(l);
                accept_loops.spawn(listen::accept_loop(
                    bound.tcp,
                    shared.clone(),
                    gate,
                    move |s, peer, admission| {
                        listen::http::serve(s, peer, hl.clone(), sh.clone(), admission)
                    },
                ));
            }
        }
    }
    let served_tls: Vec<(Arc<str>, Arc<tls::server::ServerTls>)> = config
        .listeners
        .iter()
        .zip(&tls)
        .filter_map(|(l, t)| Some((Arc::from(l.name.as_str()), t.clone()?)))
        .collect();
    {
        // registered here, before the admin listener is up, and with or
        // without TLS listeners: a SIGHUP once the broker answers is never
        // the default (fatal) one
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        accept_loops.spawn(reload_tls(
            served_tls.clone(),
            hup,
            shared.broker.metrics.clone(),
            shared.cancel.clone(),
        ));
    }
    // registered once every listener serves
    let discovery = match &config.cluster {
        Some(c) => {
            let regs = cluster::discovery::registrations(&config, &bound_addrs);
            match cluster::discovery::Discovery::start(c, regs, shared.broker.metrics.clone()) {
                Ok(d) => d,
                Err(e) => {
                    // checked by validation already; a file changed since
                    warn!("{e}; this broker is not registered in ZooKeeper");
                    None
                }
            }
        }
        None => None,
    };
    if let Some(tcp) = admin_socket {
        let state = Arc::new(admin::AdminState {
            tls: served_tls,
            broker: shared.broker.clone(),
            listeners: up,
            configured: config.listeners.len(),
            rotation: rotation.clone(),
            discovery: discovery.as_ref().map(|d| d.status()),
            started: std::time::Instant::now(),
        });
        let limits = admin::AdminLimits::new(config.admin.as_ref(), &config.server);
        accept_loops.spawn(admin::serve(tcp, state, limits, shared.cancel.clone()));
    }
    shutdown.await;
    if let Some(f) = fleet {
        // another broker rotates from now on; this one keeps its token
        info!("draining: stepping down from the fleet's rotation");
        f.stop(Duration::from_secs(5)).await;
    }
    if let (Some(d), Some(c)) = (discovery, &config.cluster) {
        // new clients go elsewhere first; those that read a znode just
        // before still get in during the grace
        info!("draining: leaving ZooKeeper discovery");
        d.deregister(Duration::from_secs(5)).await;
        tokio::time::sleep(c.deregister_grace).await;
    }
    info!("shutting down: no new connections; waiting for in-flight RPCs");
    rotation_stop.cancel();
    shared.cancel.cancel();
    accept_loops.close();
    accept_loops.wait().await;
    shared.tracker.close();
    let grace = config.server.shutdown_grace;
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!("connections still busy after {grace:?}; closing them");
    }
    if tokio::time::timeout(grace, shared.broker.close_all_sessions())
        .await
        .is_err()
    {
        warn!("closing upstream sessions took longer than {grace:?}");
    }
    info!("stopped");
}

/// Keeps TLS listeners' certificates current: on SIGHUP (`hup`), and whenever a
/// file's size or modification time changes (checked every few seconds, so a
/// certificate renewed by an ACME client or a secret mount is picked up
/// without a signal). A file that does not load keeps the served pair.
async fn reload_tls(
    listeners: Vec<(Arc<str>, Arc<tls::server::ServerTls>)>,
    mut hup: Option<tokio::signal::unix::Signal>,
    metrics: Arc<metrics::Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TLS_FILE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if force && listeners.is_empty() {
            info!("SIGHUP: no TLS listener, nothing to reload");
        }
        for (name, t) in &listeners {
            // reading PEM files is blocking I/O: off the async workers
            let t2 = t.clone();
            let r = tokio::task::spawn_blocking(move || t2.reload(force)).await;
            match r {
                Ok(Ok(false)) => {}
                Ok(Ok(true)) => {
                    metrics.tls_reloaded(name, "ok");
                    info!(listener = %name, "TLS certificate reloaded; new connections get it");
                }
                Ok(Err(e)) => {
                    metrics.tls_reloaded(name, "error");
                    warn!(listener = %name, error = %e, "TLS certificate not reloaded; still serving the previous one");
                }
                Err(e) => warn!(listener = %name, error = %e, "TLS reload task failed"),
            }
        }
    }
}

/// How often TLS listeners' files are checked for a change.
const TLS_FILE_CHECK: Duration = Duration::from_secs(2);
