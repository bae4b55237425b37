//! One token rotation for a fleet of brokers.
//!
//! Every broker with management-API credentials stands for election under
//! `/kyuubi-broker-fleet/<namespace>/leader` (ZooKeeper's ephemeral-
//! sequential recipe: the lowest sequence leads, each other candidate
//! watches the one before it). The leader runs the same [`Lifecycle`] a
//! single broker runs, but its state (intent, active and retiring tokens)
//! lives in the record `/kyuubi-broker-fleet/<namespace>/tokens`, the token
//! values sealed with the fleet's key. Every write is one ZooKeeper
//! transaction: "my election znode still exists" and "the record is still
//! at the version I read". So a broker that lost its leadership, or whose
//! view is stale, cannot overwrite the record: it steps down and, if it
//! leads again, reloads and reconciles, as a single broker does at startup.
//!
//! Every broker (the leader too) watches the record and switches its
//! upstream traffic to the active token as soon as it changes. A broker
//! losing ZooKeeper keeps serving with the token it has; a leader losing
//! it pauses the rotation until it is back (another broker may be elected
//! meanwhile, once the leader's session expires).
//!
//! Nothing of the fleet's lives under a discovery namespace: Hive JDBC
//! takes any child of its namespace for a server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroize::Zeroize;
use zookeeper_client as zk;

use super::seal::FleetKey;
use super::{read_digest, Backoff, ClusterError, CALL_TIMEOUT};
use crate::config::{ClusterConfig, TokensConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::tokens::schedule::{self, RotationStatus};
use crate::tokens::{
    Holder, Lifecycle, Management, Rotation, StateError, StateLock, StateStore, TokenState,
};

/// Where a fleet keeps its election and its record.
pub const ROOT: &str = "/kyuubi-broker-fleet";
/// How long `start` waits for the record before the listeners serve, so a
/// broker joining a running fleet has its token from the first request.
const FIRST_READ: Duration = Duration::from_secs(5);
/// The record's format.
const FORMAT: u32 = 1;
/// How long a rotation step under way may take to finish when a term ends
/// (API calls are bounded well below this).
const STEP_FINISH: Duration = Duration::from_secs(20);

/// The znodes of the fleet of `namespace`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: String,
    pub leader: String,
    pub record: String,
}

impl Paths {
    pub fn new(namespace: &str) -> Paths {
        let root = format!("{ROOT}/{namespace}");
        Paths {
            leader: format!("{root}/leader"),
            record: format!("{root}/tokens"),
            root,
        }
    }
}

/// The record as it is in ZooKeeper: who wrote it, when, and the token
/// state with every value sealed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// The fingerprint of the key the values are sealed with.
    pub key_id: String,
    /// The broker that wrote it (the leader at that time).
    pub leader: String,
    pub written_ms: i64,
    pub state: TokenState,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the fleet's token record is not valid JSON: {0}")]
    Json(String),
    #[error("the fleet's token record has format {0}; this broker reads format {FORMAT} (a newer broker wrote it?)")]
    Format(u32),
    #[error(
        "the fleet's token record is sealed with key {record}, this broker has key {ours}: \
         give every broker of the fleet the same cluster.token_key_file"
    )]
    OtherKey { record: String, ours: String },
    #[error(transparent)]
    Open(#[from] super::seal::OpenError),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Applies `f` to every token value of `st` (the active, the retiring and
/// the intended token's), with the token's name; the value replaced is
/// wiped.
fn map_values(
    st: &TokenState,
    mut f: impl FnMut(&str, &str) -> Result<String, super::seal::OpenError>,
) -> Result<TokenState, super::seal::OpenError> {
    let mut out = st.clone();
    let mut swap = |value: &mut String, name: &str| {
        let mut old = std::mem::replace(value, f(value, name)?);
        old.zeroize();
        Ok::<_, super::seal::OpenError>(())
    };
    if let Some(t) = out.active.as_mut() {
        swap(&mut t.value, &t.name.clone())?;
    }
    for r in out.retiring.iter_mut() {
        swap(&mut r.token.value, &r.token.name.clone())?;
    }
    if let Some(i) = out.intent.as_mut() {
        swap(&mut i.value, &i.name.clone())?;
    }
    Ok(out)
}

/// The record's bytes for `st`, written by `leader`.
pub fn encode(st: &TokenState, key: &FleetKey, leader: &str) -> Vec<u8> {
    let sealed = map_values(st, |v, name| Ok(key.seal(v, name))).expect("sealing cannot fail");
    let rec = Record {
        format: FORMAT,
        key_id: key.id().to_string(),
        leader: leader.to_string(),
        written_ms: now_ms(),
        state: sealed,
    };
    serde_json::to_vec_pretty(&rec).expect("the record serialises")
}

/// The record in `bytes`, its values opened with `key`.
pub fn decode(bytes: &[u8], key: &FleetKey) -> Result<Record, RecordError> {
    let mut rec: Record =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
    if rec.format != FORMAT {
        return Err(RecordError::Format(rec.format));
    }
    if rec.key_id != key.id() {
        return Err(RecordError::OtherKey {
            record: rec.key_id,
            ours: key.id().to_string(),
        });
    }
    rec.state = map_values(&rec.state, |v, name| key.open(v, name))?;
    Ok(rec)
}

/// The leader's [`StateStore`]: each save is one transaction that checks
/// the election znode and the record's version.
struct FleetStore {
    client: zk::Client,
    /// This broker's election znode.
    lock: String,
    record: String,
    /// The record's version as last read or written; `None` while there is
    /// no record.
    version: Option<i32>,
    acls: zk::Acls<'static>,
    key: Arc<FleetKey>,
    me: String,
    /// Cancelled when a write finds this broker no longer leads, or the
    /// record changed under it: its term is over.
    lost: CancellationToken,
    /// Cancelled when a write's outcome is unknown (no answer, connection
    /// lost): the term reloads the record before going on.
    stale: CancellationToken,
}

impl FleetStore {
    /// Maps a failed transaction: who may go on, and the error to return.
    fn failed(&self, e: zk::CheckWriteError) -> StateError {
        let fail = |m: String| StateError::Fleet(m);
        match e {
            zk::CheckWriteError::CheckFailed { .. } => {
                self.lost.cancel();
                fail("this broker's election znode is gone: it no longer leads the fleet".into())
            }
            zk::CheckWriteError::OperationFailed {
                source: zk::Error::BadVersion | zk::Error::NodeExists | zk::Error::NoNode,
                ..
            } => {
                self.lost.cancel();
                fail(
                    "the record changed under this broker (another leader wrote it, or it was \
                     removed); stepping down to reload it"
                        .into(),
                )
            }
            e => {
                self.stale.cancel();
                fail(e.to_string())
            }
        }
    }
}

impl StateStore for FleetStore {
    fn save<'a>(
        &'a mut self,
        state: &'a TokenState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StateError>> + Send + 'a>>
    {
        Box::pin(async move {
            let data = encode(state, &self.key, &self.me);
            let fail = |m: String| StateError::Fleet(m);
            let mut w = self
                .client
                .new_check_writer(&self.lock, None)
                .map_err(|e| fail(e.to_string()))?;
            let op = match self.version {
                Some(v) => w.add_set_data(&self.record, &data, Some(v)),
                None => w.add_create(
                    &self.record,
                    &data,
                    &zk::CreateMode::Persistent.with_acls(self.acls),
                ),
            };
            op.map_err(|e| fail(e.to_string()))?;
            let done = match tokio::time::timeout(CALL_TIMEOUT, w.commit()).await {
                Ok(r) => r,
                Err(_) => {
                    self.stale.cancel();
                    return Err(fail(format!("no answer within {CALL_TIMEOUT:?}")));
                }
            };
            match done {
                Ok(results) => {
                    self.version = Some(match results.first() {
                        Some(zk::MultiWriteResult::SetData { stat }) => stat.version,
                        _ => 0,
                    });
                    Ok(())
                }
                Err(e) => Err(self.failed(e)),
            }
        })
    }

    fn fence(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StateError>> + Send + '_>>
    {
        Box::pin(async move {
            let fail = |m: String| StateError::Fleet(m);
            let Some(version) = self.version else {
                return Err(fail("no record written yet; not deleting".into()));
            };
            let mut w = self
                .client
                .new_check_writer(&self.lock, None)
                .map_err(|e| fail(e.to_string()))?;
            w.add_check_version(&self.record, version)
                .map_err(|e| fail(e.to_string()))?;
            match tokio::time::timeout(CALL_TIMEOUT, w.commit()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(self.failed(e)),
                Err(_) => {
                    self.stale.cancel();
                    Err(fail(format!("no answer within {CALL_TIMEOUT:?}")))
                }
            }
        })
    }
}

/// The fleet task; [`Fleet::stop`] ends it.
pub struct Fleet {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Fleet {
    /// Steps down (deleting the election znode, so another broker takes
    /// over at once) and ends the task, within `limit`. The token last
    /// followed stays in use.
    pub async fn stop(self, limit: Duration) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            warn!("fleet: stepping down took longer than {limit:?}; the session's end does it");
            task.abort();
        }
    }
}

/// How this broker is named in the election and the record: where its
/// admin listener (else its first listener) is reached, and its pid.
pub fn member_name(cluster: &ClusterConfig, addr: Option<std::net::SocketAddr>) -> String {
    match addr {
        Some(a) => format!(
            "{}:{} (pid {})",
            super::discovery::advertised_host(cluster, a),
            a.port(),
            std::process::id()
        ),
        None => format!("pid {}", std::process::id()),
    }
}

/// What `start` needs.
pub struct Inputs<'a> {
    pub cluster: &'a ClusterConfig,
    pub tokens: &'a TokensConfig,
    pub key: Arc<FleetKey>,
    /// How this broker is named in the election and the record.
    pub me: String,
    /// Where the followed token goes (the upstreams read the other end).
    pub live: watch::Sender<Option<Secret>>,
    pub metrics: Arc<Metrics>,
}

/// Joins the fleet: follows its record, and stands for election when this
/// broker has management-API credentials. Returns once the record was read
/// (or after a few seconds without ZooKeeper: serving starts anyway).
pub async fn start(inp: Inputs<'_>) -> Result<(Rotation, Fleet), ClusterError> {
    let digest = read_digest(inp.cluster)?;
    if digest.is_none() {
        warn!("fleet: no cluster.digest_file: anyone who reaches ZooKeeper can rewrite or remove the fleet's token record (its values stay sealed); set digest_file on every broker");
    }
    let usr1 = crate::tokens::sigusr1();
    let status = Arc::new(Mutex::new(RotationStatus {
        role: Some("follower"),
        ..Default::default()
    }));
    let management = match Management::resolve(inp.tokens).await {
        Ok(m) => Some(m),
        Err(e) => {
            warn!("this broker cannot lead the fleet's rotation (management API credentials: {e}); it follows");
            status.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(e);
            None
        }
    };
    let (rotate_now, asked) = mpsc::channel(1);
    let (first_tx, first_rx) = oneshot::channel();
    let stop = CancellationToken::new();
    let member = Member {
        ensemble: inp.cluster.zookeeper.clone(),
        session_timeout: inp.cluster.session_timeout,
        paths: Paths::new(&inp.cluster.namespace),
        digest: digest.is_some(),
        auth: digest,
        key: inp.key,
        me: inp.me,
        live: inp.live.clone(),
        status: status.clone(),
        metrics: inp.metrics,
        management: Mutex::new(management),
        tokens: inp.tokens.clone(),
        import: inp.tokens.state_file.clone(),
        imported: Default::default(),
        unreadable: Default::default(),
    };
    let task = tokio::spawn(member.run(asked, stop.clone(), first_tx));
    if tokio::time::timeout(FIRST_READ, first_rx).await.is_err() {
        warn!("fleet: the token record was not read within {FIRST_READ:?}; serving starts, and the token follows once ZooKeeper answers");
    }
    let rotation = Rotation::new(inp.live.subscribe(), status, rotate_now);
    rotation.on_sigusr1(usr1, stop.child_token());
    Ok((rotation, Fleet { stop, task }))
}

/// How a term as leader ended.
enum Term {
    /// Another broker leads, or may: stand again.
    Lost,
    /// The session ended: a new one is needed.
    SessionOver,
    /// The broker is stopping.
    Stopped,
}

/// Why the rotation loop of a term stopped.
enum Ended {
    Term(Term),
    /// The connection dropped; the session (and the leadership) may live on.
    Paused,
    /// A write's outcome is unknown: reload the record, still leading.
    Reload,
}

struct Member {
    ensemble: String,
    session_timeout: Duration,
    paths: Paths,
    digest: bool,
    auth: Option<Secret>,
    key: Arc<FleetKey>,
    me: String,
    live: watch::Sender<Option<Secret>>,
    status: Arc<Mutex<RotationStatus>>,
    metrics: Arc<Metrics>,
    /// Resolved at start, or later by the campaign.
    management: Mutex<Option<Management>>,
    tokens: TokensConfig,
    /// A single broker's state file, imported when the fleet has no record.
    import: Option<std::path::PathBuf>,
    imported: AtomicBool,
    /// The last record read could not be opened (its error is in status).
    unreadable: AtomicBool,
}

/// A ZooKeeper call, bounded; a timeout reads as [`zk::Error::Timeout`].
async fn call<T>(
    f: impl std::future::Future<Output = Result<T, zk::Error>>,
) -> Result<T, zk::Error> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or(Err(zk::Error::Timeout))
}

fn terminal(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

impl Member {
    fn set(&self, f: impl FnOnce(&mut RotationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Directories: anyone may read; with a digest user, only it may write.
    fn dir_acls(&self) -> zk::Acls<'static> {
        static READ_ALL: [zk::Acl; 2] = [
            zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
            zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
        ];
        match self.digest {
            true => zk::Acls::new(&READ_ALL),
            false => zk::Acls::anyone_all(),
        }
    }

    /// The record: with a digest user, nobody else may even read it.
    fn record_acls(&self) -> zk::Acls<'static> {
        match self.digest {
            true => zk::Acls::creator_all(),
            false => zk::Acls::anyone_all(),
        }
    }

    async fn run(
        self,
        mut asked: mpsc::Receiver<()>,
        stop: CancellationToken,
        first: oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut backoff = Backoff::new();
        loop {
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                c = super::connect(&self.ensemble, self.session_timeout, self.auth.as_ref()) => c,
            };
            let client = match connected {
                Ok(c) => c,
                Err(e) => {
                    if backoff.failed() {
                        warn!(zookeeper = %self.ensemble, "fleet: {e}; serving with the current token, retrying");
                    }
                    self.set(|s| s.last_error = Some(format!("ZooKeeper: {e}")));
                    if !backoff.pause(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            if backoff.succeeded() {
                // the outage's error, shown until now
                self.set(|s| s.last_error = None);
            }
            if self.session(&client, &mut asked, &stop, &mut first).await {
                return;
            }
            warn!(zookeeper = %self.ensemble, "fleet: ZooKeeper session over; joining again");
        }
    }

    /// One ZooKeeper session: follow the record and stand for election
    /// until the session ends (`false`) or the broker stops (`true`).
    async fn session(
        &self,
        client: &zk::Client,
        asked: &mut mpsc::Receiver<()>,
        stop: &CancellationToken,
        first: &mut Option<oneshot::Sender<()>>,
    ) -> bool {
        let mut states = client.state_watcher();
        let ended = async {
            loop {
                if states.changed().await.is_terminated() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = ended => false,
            _ = self.follow(client, first) => false,
            stopped = self.campaign(client, asked, stop) => stopped,
        }
    }

    /// Reads the record at every change and switches the live token.
    async fn follow(&self, client: &zk::Client, first: &mut Option<oneshot::Sender<()>>) {
        let mut failing = false;
        loop {
            match call(client.get_and_watch_data(&self.paths.record)).await {
                Ok((data, _stat, watcher)) => {
                    failing = false;
                    self.apply(&data);
                    if let Some(f) = first.take() {
                        let _ = f.send(());
                    }
                    let ev = watcher.changed().await;
                    if ev.session_state.is_terminated() {
                        return;
                    }
                }
                Err(zk::Error::NoNode) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(());
                    }
                    match call(client.check_and_watch_stat(&self.paths.record)).await {
                        Ok((Some(_), _)) => continue,
                        Ok((None, watcher)) => {
                            if watcher.changed().await.session_state.is_terminated() {
                                return;
                            }
                        }
                        Err(e) if terminal(&e) => return,
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
                Err(e) if terminal(&e) => return,
                Err(e) => {
                    if !failing {
                        warn!("fleet: reading the token record: {e}; keeping the current token, retrying");
                    }
                    failing = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Makes the record's active token the live one.
    fn apply(&self, data: &[u8]) {
        let rec = match decode(data, &self.key) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.fleet_error();
                warn!(error = %e, "fleet: the token record cannot be read; keeping the current token");
                self.set(|s| s.last_error = Some(e.to_string()));
                self.unreadable.store(true, Ordering::Relaxed);
                return;
            }
        };
        if self.unreadable.swap(false, Ordering::Relaxed) {
            info!("fleet: the token record reads again");
            self.set(|s| s.last_error = None);
        }
        let active = rec.state.active.as_ref();
        let value = active.map(|t| t.value.as_str());
        let switched = self.live.send_if_modified(|cur| {
            if cur.as_ref().map(|s| s.expose()) == value || value.is_none() {
                return false;
            }
            *cur = value.map(Secret::new);
            true
        });
        let lag = now_ms() - rec.written_ms;
        if switched {
            self.metrics.fleet_token_update();
            info!(
                token_id = active.map(|t| t.token_id.as_str()),
                leader = %rec.leader,
                lag_ms = lag,
                "fleet: now using the token the leader published"
            );
        }
        self.set(|s| {
            s.active_token_id = active.map(|t| t.token_id.clone());
            s.active_since_ms = active.map(|t| t.created_ms);
            s.expires_ms = active.and_then(|t| t.expires_ms);
            s.leader = Some(rec.leader.clone());
            if switched {
                s.last_switch_lag_ms = Some(lag);
            }
        });
    }

    /// The management API, resolved again every 30 s until it is (a
    /// metadata service down at boot must not make a follower for life);
    /// `None` when the broker stops first.
    async fn management(
        &self,
        asked: &mut mpsc::Receiver<()>,
        stop: &CancellationToken,
    ) -> Option<Management> {
        let mut warned = false;
        loop {
            if let Some(m) = self
                .management
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Some(m);
            }
            if !warned {
                warn!(
                    "fleet: no management API credentials; following, and trying again every 30 s"
                );
                warned = true;
            }
            let again = tokio::time::sleep(Duration::from_secs(30));
            tokio::pin!(again);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = &mut again => break,
                    Some(()) = asked.recv() => warn!("fleet: this broker has no management API credentials and cannot rotate; ask the leader"),
                }
            }
            match Management::resolve(&self.tokens).await {
                Ok(m) => {
                    *self.management.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
                    self.set(|s| s.last_error = None);
                }
                Err(e) => self.set(|s| s.last_error = Some(e)),
            }
        }
    }

    /// Stands for election, leads while elected, and stands again. Returns
    /// `true` when the broker stops, `false` when the session is over.
    async fn campaign(
        &self,
        client: &zk::Client,
        asked: &mut mpsc::Receiver<()>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(m) = self.management(asked, stop).await else {
            return true;
        };
        loop {
            // a broker that cannot read the record (another key, a damaged
            // record) must not lead: it would hold the office it cannot use
            while self.unreadable.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = stop.cancelled() => return true,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    Some(()) = asked.recv() => warn!("fleet: rotate-now asked, but this broker cannot read the fleet's record"),
                }
            }
            let options = match zk::LockOptions::new(self.dir_acls())
                .with_ancestor_options(zk::CreateMode::Persistent.with_acls(self.dir_acls()))
            {
                Ok(o) => o,
                Err(e) => unreachable!("persistent directory options: {e}"),
            };
            let prefix = zk::LockPrefix::new_curator(&self.paths.leader, "leader-")
                .expect("a valid election path");
            let elected = client.lock(prefix, self.me.as_bytes(), options);
            tokio::pin!(elected);
            let lock = loop {
                tokio::select! {
                    _ = stop.cancelled() => return true,
                    r = &mut elected => break r,
                    Some(()) = asked.recv() => {
                        let leader = self.status.lock().unwrap_or_else(|p| p.into_inner()).leader.clone();
                        warn!(leader = leader.as_deref().unwrap_or("unknown"), "fleet: rotate-now asked of a follower; ask the leader");
                    }
                }
            };
            let lock = match lock {
                Ok(l) => l.into_owned(),
                Err(e) if terminal(&e) => return false,
                Err(e) => {
                    warn!("fleet: standing for election: {e}; again in 1 s");
                    tokio::select! {
                        _ = stop.cancelled() => return true,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let term = self.lead(client, lock.lock_path(), &m, asked, stop).await;
            let unreadable = self.unreadable.load(Ordering::Relaxed);
            self.set(|s| {
                s.role = Some("follower");
                // the term's failures were its own (they are in the log);
                // a record this broker cannot read stays shown
                s.consecutive_failures = 0;
                if !unreadable {
                    s.last_error = None;
                }
            });
            self.metrics.fleet_leader(false);
            match term {
                Term::Stopped => {
                    // at once, so another broker leads before this one is gone
                    if let Err(e) = call(client.delete(lock.lock_path(), None)).await {
                        warn!("fleet: could not delete the election znode ({e}); the session's end does");
                    }
                    info!("fleet: stepped down");
                    return true;
                }
                Term::SessionOver => return false,
                Term::Lost => {}
            }
            // dropping `lock` deletes the election znode (again, harmlessly,
            // after a stop)
        }
    }

    /// Reads the record: its state and version, or the state to start it
    /// with (imported from a single broker's file, once, or fresh).
    async fn load(&self, client: &zk::Client) -> Result<(TokenState, Option<i32>), String> {
        match call(client.get_data(&self.paths.record)).await {
            Ok((data, stat)) => {
                let rec = decode(&data, &self.key).map_err(|e| e.to_string())?;
                Ok((rec.state, Some(stat.version)))
            }
            Err(zk::Error::NoNode) => {
                let import = self
                    .import
                    .as_ref()
                    .filter(|p| p.exists() && !self.imported.swap(true, Ordering::Relaxed));
                if let Some(p) = import {
                    // held while read: no `token` command rewrites it meanwhile
                    let _lock = StateLock::acquire(p, Holder::Broker).map_err(|e| e.to_string())?;
                    let st = TokenState::load(p).map_err(|e| e.to_string())?;
                    info!(file = %p.display(), "fleet: no record yet; starting it from this broker's state file (not written from now on)");
                    return Ok((st, None));
                }
                Ok((TokenState::fresh(), None))
            }
            Err(e) => Err(format!("reading the token record: {e}")),
        }
    }

    /// One or more terms as leader, until leadership is lost, the session
    /// ends or the broker stops. A lost connection pauses the rotation; if
    /// this broker still leads when it is back, it reloads the record and
    /// goes on. So does a write whose outcome is unknown.
    async fn lead(
        &self,
        client: &zk::Client,
        lock: &str,
        m: &Management,
        asked: &mut mpsc::Receiver<()>,
        stop: &CancellationToken,
    ) -> Term {
        let mut states = client.state_watcher();
        loop {
            let (state, version) = match self.load(client).await {
                Ok(x) => x,
                Err(e) => {
                    // step down: another broker may read it, or this one
                    // stands again once its follower reads the record
                    self.metrics.fleet_error();
                    warn!("fleet: elected, but {e}; stepping down");
                    self.set(|s| s.last_error = Some(e));
                    tokio::select! {
                        _ = stop.cancelled() => return Term::Stopped,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => return Term::Lost,
                    }
                }
            };
            let lost = CancellationToken::new();
            let stale = CancellationToken::new();
            let mut store = FleetStore {
                client: client.clone(),
                lock: lock.to_string(),
                record: self.paths.record.clone(),
                version,
                acls: self.record_acls(),
                key: self.key.clone(),
                me: self.me.clone(),
                lost: lost.clone(),
                stale: stale.clone(),
            };
            // the first write says who leads, and proves this broker may write
            if let Err(e) = store.save(&state).await {
                warn!("fleet: elected, but {e}");
                if lost.is_cancelled() {
                    return Term::Lost;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Term::Stopped,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            info!(leader = %self.me, "fleet: this broker leads the token rotation");
            self.set(|s| {
                s.role = Some("leader");
                s.leader = Some(self.me.clone());
            });
            self.metrics.fleet_leader(true);
            let lc = Lifecycle::with_store(
                m.api.clone(),
                m.kref.clone(),
                Box::new(store),
                state,
                m.expire_days,
                self.live.clone(),
            );
            let term = CancellationToken::new();
            let rotation = schedule::run(
                lc,
                m.schedule.clone(),
                self.status.clone(),
                asked,
                term.clone(),
            );
            tokio::pin!(rotation);
            let why = tokio::select! {
                _ = &mut rotation => Ended::Term(Term::Stopped),
                _ = stop.cancelled() => Ended::Term(Term::Stopped),
                _ = lost.cancelled() => Ended::Term(Term::Lost),
                _ = stale.cancelled() => Ended::Reload,
                over = disconnected(&mut states) => match over {
                    true => Ended::Term(Term::SessionOver),
                    false => Ended::Paused,
                },
            };
            // the step under way finishes (a CreateKyuubiToken already sent
            // would otherwise land unrecorded); its writes fail if it no
            // longer may make them
            term.cancel();
            if tokio::time::timeout(STEP_FINISH, &mut rotation)
                .await
                .is_err()
            {
                warn!("fleet: the rotation step under way did not finish within {STEP_FINISH:?}; abandoning it (the record's intent covers it)");
            }
            match why {
                Ended::Reload => {
                    warn!("fleet: a write to the token record may or may not have landed; reloading it");
                    tokio::select! {
                        _ = stop.cancelled() => return Term::Stopped,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
                Ended::Paused => {
                    warn!("fleet: ZooKeeper connection lost; the rotation pauses until it is back");
                    self.set(|s| s.role = Some("follower"));
                    self.metrics.fleet_leader(false);
                    loop {
                        let s = tokio::select! {
                            _ = stop.cancelled() => return Term::Stopped,
                            s = states.changed() => s,
                        };
                        if s.is_terminated() {
                            return Term::SessionOver;
                        }
                        if s == zk::SessionState::SyncConnected {
                            break;
                        }
                    }
                    match call(client.check_stat(lock)).await {
                        Ok(Some(st)) if st.ephemeral_owner == client.session_id().0 => {
                            info!("fleet: ZooKeeper is back and this broker still leads; resuming the rotation");
                            continue;
                        }
                        _ => return Term::Lost,
                    }
                }
                Ended::Term(Term::Lost) => {
                    warn!("fleet: leadership lost; standing again");
                    return Term::Lost;
                }
                Ended::Term(other) => return other,
            }
        }
    }
}

/// Waits for the connection to drop: `false` for a disconnection the
/// session may survive, `true` for the session's end.
async fn disconnected(states: &mut zk::StateWatcher) -> bool {
    loop {
        let s = states.changed().await;
        if s.is_terminated() {
            return true;
        }
        if s != zk::SessionState::SyncConnected {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{Intent, OwnedToken, Retiring};

    fn key(hex: char) -> FleetKey {
        FleetKey::from_hex(&hex.to_string().repeat(64)).unwrap()
    }

    fn token(n: u32) -> OwnedToken {
        OwnedToken {
            token_id: format!("tk-{n}"),
            name: format!("kyuubi-broker-ab12cd34-{n}"),
            value: format!("value{n}secret{}", "x".repeat(20)),
            created_ms: i64::from(n),
            expires_ms: Some(99),
        }
    }

    /// tk-2 active, tk-1 retiring.
    fn two_tokens() -> TokenState {
        let mut st = TokenState::fresh();
        st.active = Some(token(2));
        st.retiring.push(Retiring {
            token: token(1),
            delete_after_ms: 5,
        });
        st
    }

    #[test]
    fn the_record_round_trips_and_shows_ids_and_the_leader_but_no_value() {
        let k = key('a');
        let mut st = two_tokens();
        st.intent = Some(Intent {
            name: "kyuubi-broker-ab12cd34-3".into(),
            value: "value3secret".repeat(3),
            started_ms: 3,
            expires_ms: None,
        });
        let bytes = encode(&st, &k, "127.0.0.1:10019 (pid 7)");
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("tk-2") && text.contains("tk-1") && text.contains("pid 7"));
        let rec = decode(&bytes, &k).unwrap();
        assert_eq!(rec.state, st);
        assert_eq!(rec.leader, "127.0.0.1:10019 (pid 7)");
        let e = decode(&bytes, &key('b')).unwrap_err().to_string();
        assert!(e.contains("same cluster.token_key_file"), "{e}");
        assert!(!e.contains("secret"));
        assert!(decode(b"{", &k).is_err());
    }

    #[test]
    fn a_value_moved_to_another_tokens_entry_does_not_open() {
        let k = key('a');
        let st = two_tokens();
        let mut rec: Record = serde_json::from_slice(&encode(&st, &k, "x")).unwrap();
        let retiring_value = rec.state.retiring[0].token.value.clone();
        rec.state.active.as_mut().unwrap().value = retiring_value;
        let bytes = serde_json::to_vec(&rec).unwrap();
        let e = decode(&bytes, &k).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn the_fleet_lives_outside_every_discovery_namespace() {
        let p = Paths::new("kyuubi-broker");
        assert_eq!(p.root, "/kyuubi-broker-fleet/kyuubi-broker");
        assert_eq!(p.leader, "/kyuubi-broker-fleet/kyuubi-broker/leader");
        assert_eq!(p.record, "/kyuubi-broker-fleet/kyuubi-broker/tokens");
        assert!(!p.root.starts_with("/kyuubi-broker/"));
    }
}
