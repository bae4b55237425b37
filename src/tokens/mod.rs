//! Kyuubi gateway token lifecycle: create, rotate, retire, reconcile.
//!
//! A rotation is: write an intent (name + value) → CreateKyuubiToken →
//! persist the new token as active (the old one becomes "retiring") → publish
//! the new value to live upstream traffic → after a grace period delete the
//! old token, checked first with GetKyuubiToken. Every step is persisted
//! before the next, and [`Lifecycle::reconcile`] (run at startup) finishes or
//! undoes whatever a crash interrupted, so no token is orphaned and the
//! working one is never lost. Only tokens whose name carries this broker's
//! instance prefix are ever deleted.

mod clock;
pub mod schedule;
mod state;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use clock::Clock;
pub use state::{
    lock_path, Holder, Intent, OwnedToken, Retiring, StateError, StateLock, TokenState,
};

use crate::cloud::client::{utc_timestamp, ApiClient, ApiError, TokenInfo};
use crate::cloud::request::{AutoExpire, KyuubiRef, TokenBody};
use crate::secret::Secret;

/// Every broker-created token's name starts with this, then the instance id.
pub const NAME_PREFIX: &str = "kyuubi-broker-";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Refused(String),
}

/// A new token value: 32 characters of `[a-z0-9]` from the OS CSPRNG.
pub fn generate_value() -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..36)] as char)
        .collect()
}

/// Test hook: `KYUUBI_BROKER_FAILPOINT=<step>` aborts the process at that
/// step, to prove recovery from a crash there. `<step>@<n>` waits for the
/// n-th time the step is reached; `<step>[@<n>]:hang` stops the thread
/// there instead (after saying so on stderr), for a test to `kill -9` the
/// process at exactly that point while the rest of it still runs.
fn failpoint(step: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HITS: AtomicU32 = AtomicU32::new(0);
    let Ok(spec) = std::env::var("KYUUBI_BROKER_FAILPOINT") else {
        return;
    };
    let (point, hang) = match spec.strip_suffix(":hang") {
        Some(p) => (p, true),
        None => (spec.as_str(), false),
    };
    let (name, nth) = match point.split_once('@') {
        Some((n, k)) => (n, k.parse::<u32>().unwrap_or(1)),
        None => (point, 1),
    };
    if name != step || HITS.fetch_add(1, Ordering::SeqCst) + 1 != nth {
        return;
    }
    if hang {
        eprintln!("failpoint {step}: hanging until killed");
        loop {
            std::thread::park();
        }
    }
    eprintln!("failpoint {step}: aborting");
    std::process::abort();
}

/// Where a [`Lifecycle`] persists its state before each step that depends
/// on it: the state file of a single broker, or the fleet's record in
/// ZooKeeper (`crate::cluster`). A save that fails stops the step: nothing
/// reaches the management API unless the state saying so was saved first.
pub trait StateStore: Send + Sync {
    fn save<'a>(
        &'a mut self,
        state: &'a TokenState,
    ) -> Pin<Box<dyn Future<Output = Result<(), StateError>> + Send + 'a>>;

    /// Checks, just before a token is deleted, that this writer is still
    /// the only one: a fleet's leader proves it still leads and the record
    /// is as it last wrote it (a deposed leader resuming from a stall must
    /// not delete what its successor made). A locked file needs nothing.
    fn fence(&mut self) -> Pin<Box<dyn Future<Output = Result<(), StateError>> + Send + '_>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The state file, locked for as long as the store lives: one writer.
pub struct FileStore {
    path: PathBuf,
    _lock: StateLock,
}

impl FileStore {
    /// Locks the state file for `holder` (refused, with what to do instead,
    /// while another process holds it) and loads it.
    pub fn open(path: PathBuf, holder: Holder) -> Result<(FileStore, TokenState), StateError> {
        let lock = StateLock::acquire(&path, holder)?;
        let state = TokenState::load(&path)?;
        Ok((FileStore { path, _lock: lock }, state))
    }
}

impl StateStore for FileStore {
    fn save<'a>(
        &'a mut self,
        state: &'a TokenState,
    ) -> Pin<Box<dyn Future<Output = Result<(), StateError>> + Send + 'a>> {
        // a small file, written and fsynced in well under a millisecond
        Box::pin(std::future::ready(state.save(&self.path)))
    }
}

/// What [`Lifecycle::reconcile`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: Option<String>,
    pub dropped_intent: bool,
    pub orphans_deleted: Vec<String>,
    pub retired: Vec<String>,
}

pub struct Lifecycle {
    api: ApiClient,
    kref: KyuubiRef,
    store: Box<dyn StateStore>,
    state: TokenState,
    /// Auto-expiry requested on created tokens.
    pub expire_days: Option<i32>,
    live: watch::Sender<Option<Secret>>,
    clock: Clock,
}

impl Lifecycle {
    /// Locks the state file for `holder` (refused, with what to do instead,
    /// while another process holds it), loads it and publishes the active
    /// token, if any. Call [`Lifecycle::reconcile`] before relying on it.
    pub fn open(
        api: ApiClient,
        kref: KyuubiRef,
        state_path: PathBuf,
        expire_days: Option<i32>,
        holder: Holder,
    ) -> Result<Lifecycle, TokenError> {
        let (store, state) = FileStore::open(state_path, holder)?;
        let (live, _) = watch::channel(None);
        Ok(Lifecycle::with_store(
            api,
            kref,
            Box::new(store),
            state,
            expire_days,
            live,
        ))
    }

    /// A lifecycle over `state`, persisted in `store`, publishing the
    /// active value to `live` (now, and after every rotation).
    pub fn with_store(
        api: ApiClient,
        kref: KyuubiRef,
        store: Box<dyn StateStore>,
        state: TokenState,
        expire_days: Option<i32>,
        live: watch::Sender<Option<Secret>>,
    ) -> Lifecycle {
        let lc = Lifecycle {
            api,
            kref,
            store,
            state,
            expire_days,
            live,
            clock: Clock::system(),
        };
        lc.publish();
        lc
    }

    /// Stamps `created_ms` and `delete_after_ms` from `clock` instead of
    /// the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Lifecycle {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The live token value, updated on every rotation.
    pub fn subscribe(&self) -> watch::Receiver<Option<Secret>> {
        self.live.subscribe()
    }

    pub fn state(&self) -> &TokenState {
        &self.state
    }

    async fn save(&mut self) -> Result<(), TokenError> {
        Ok(self.store.save(&self.state).await?)
    }

    /// Sends the active value to `live` unless it holds it already (a
    /// fleet's follower task may have sent it first, from the record).
    fn publish(&self) {
        let v = self.state.active.as_ref().map(|t| t.value.as_str());
        self.live.send_if_modified(|cur| {
            if cur.as_ref().map(|s| s.expose()) == v {
                return false;
            }
            *cur = v.map(Secret::new);
            true
        });
    }

    /// Brings the state file and the API into agreement after any crash.
    pub async fn reconcile(&mut self, grace: Duration) -> Result<Reconciled, TokenError> {
        let mut report = Reconciled::default();
        let listed = self.api.list_kyuubi_tokens(&self.kref).await?;
        if let Some(intent) = self.state.intent.clone() {
            match listed
                .iter()
                .find(|t| t.name.as_deref() == Some(intent.name.as_str()))
            {
                // created, then the broker stopped before recording it: adopt it
                Some(t) => {
                    info!(token_id = %t.token_id, "adopting the token created before a restart");
                    info!(target: "audit", event = "token_created", token_id = %t.token_id, name = %intent.name, adopted = true, "audit: token created");
                    report.adopted = Some(t.token_id.clone());
                    self.promote(t.token_id.clone(), &intent, grace);
                }
                None => report.dropped_intent = true,
            }
            self.state.intent = None;
            self.save().await?;
            self.publish();
        }
        // ours by name, but neither active nor retiring: nobody can use it
        let known: Vec<&str> = self
            .state
            .active
            .iter()
            .map(|t| t.token_id.as_str())
            .chain(
                self.state
                    .retiring
                    .iter()
                    .map(|r| r.token.token_id.as_str()),
            )
            .collect();
        let orphans: Vec<TokenInfo> = listed
            .into_iter()
            .filter(|t| t.name.as_deref().is_some_and(|n| self.state.owns_name(n)))
            .filter(|t| !known.contains(&t.token_id.as_str()))
            .collect();
        for o in orphans {
            if self.checked_delete(&o.token_id).await? {
                let name = o.name.as_deref().unwrap_or_default();
                info!(target: "audit", event = "token_retired", token_id = %o.token_id, name, reason = "orphan", "audit: token retired");
                report.orphans_deleted.push(o.token_id);
            }
        }
        report.retired = self.retire_due().await?;
        Ok(report)
    }

    fn promote(&mut self, token_id: String, intent: &Intent, grace: Duration) {
        let new = OwnedToken {
            token_id,
            name: intent.name.clone(),
            value: intent.value.clone(),
            created_ms: intent.started_ms,
            expires_ms: intent.expires_ms,
        };
        if let Some(old) = self.state.active.replace(new) {
            self.state.retiring.push(Retiring {
                token: old,
                delete_after_ms: self.clock.now_ms() + grace.as_millis() as i64,
            });
        }
    }

    /// Creates a new token, makes it active and live, and schedules the old
    /// one for deletion after `grace`. Returns the new token id.
    pub async fn rotate(&mut self, grace: Duration) -> Result<String, TokenError> {
        let r = self.rotate_steps(grace).await;
        if let Err(e) = &r {
            let name = self.state.intent.as_ref().map(|i| i.name.as_str());
            warn!(target: "audit", event = "token_rotation_failed", name, error = %e, "audit: token rotation failed");
        }
        r
    }

    async fn rotate_steps(&mut self, grace: Duration) -> Result<String, TokenError> {
        if self.state.intent.is_some() {
            return Err(TokenError::Refused(
                "an earlier rotation was interrupted; reconcile first".into(),
            ));
        }
        let started = self.clock.now_ms();
        let name = format!(
            "{}{}",
            self.state.prefix(),
            utc_timestamp(self.clock.now_system_time())
                .replace([':', '-'], "")
                .to_lowercase()
        );
        let intent = Intent {
            name: format!("{name}-{:04}", rand::thread_rng().gen_range(0..10_000)),
            value: generate_value(),
            started_ms: started,
            expires_ms: self
                .expire_days
                .map(|d| started + i64::from(d) * 86_400_000),
        };
        self.state.intent = Some(intent.clone());
        self.save().await?;
        failpoint("after_intent");
        let body = TokenBody {
            name: Some(intent.name.clone()),
            token: Some(intent.value.clone()),
            auto_expire_configuration: Some(AutoExpire {
                enable: self.expire_days.is_some(),
                expire_days: self.expire_days,
            }),
            member_arns: None,
        };
        let token_id = self.api.create_kyuubi_token(&self.kref, &body).await?;
        failpoint("after_create");
        self.promote(token_id.clone(), &intent, grace);
        self.state.intent = None;
        self.save().await?;
        failpoint("after_persist");
        self.publish();
        failpoint("after_swap");
        info!(%token_id, "token rotated");
        info!(target: "audit", event = "token_created", %token_id, name = %intent.name, adopted = false, "audit: token created");
        Ok(token_id)
    }

    /// Deletes retiring tokens whose grace has passed. Returns their ids.
    pub async fn retire_due(&mut self) -> Result<Vec<String>, TokenError> {
        let now = self.clock.now_ms();
        let due: Vec<Retiring> = self
            .state
            .retiring
            .iter()
            .filter(|r| r.delete_after_ms <= now)
            .cloned()
            .collect();
        let mut done = Vec::new();
        for r in due {
            self.checked_delete(&r.token.token_id).await?;
            failpoint("during_delete");
            self.state
                .retiring
                .retain(|x| x.token.token_id != r.token.token_id);
            self.save().await?;
            info!(target: "audit", event = "token_retired", token_id = %r.token.token_id, name = %r.token.name, reason = "grace_over", "audit: token retired");
            done.push(r.token.token_id.clone());
        }
        Ok(done)
    }

    /// Deletes a token after checking it still exists, is ours by name and
    /// is not the active one. Returns false if it was already gone.
    async fn checked_delete(&mut self, token_id: &str) -> Result<bool, TokenError> {
        if self
            .state
            .active
            .as_ref()
            .is_some_and(|a| a.token_id == token_id)
        {
            return Err(TokenError::Refused(format!(
                "{token_id} is the active token; not deleting it"
            )));
        }
        let t = match self.api.get_kyuubi_token(&self.kref, token_id).await {
            Ok(t) => t,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if !t.name.as_deref().is_some_and(|n| self.state.owns_name(n)) {
            warn!(%token_id, "not deleting a token this broker did not create");
            return Err(TokenError::Refused(format!(
                "{token_id} was not created by this broker"
            )));
        }
        self.store.fence().await?;
        match self.api.delete_kyuubi_token(&self.kref, token_id).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Everything `serve` needs from token rotation.
#[derive(Clone)]
pub struct Rotation {
    /// The live token value.
    pub live: watch::Receiver<Option<Secret>>,
    pub status: Arc<Mutex<schedule::RotationStatus>>,
    rotate_now: mpsc::Sender<()>,
}

impl Rotation {
    /// Asks the loop for a rotation now (what SIGUSR1 does). Requests made
    /// before that rotation ends count as one. With rotation disabled,
    /// nothing happens.
    pub fn rotate_now(&self) {
        // full: a rotation is already asked for, which answers this request too
        let _ = self.rotate_now.try_send(());
    }
}

/// Runs the rotation loop for `lc` (already opened, not yet reconciled:
/// the loop does that first) until `stop` is cancelled.
pub fn spawn(lc: Lifecycle, schedule: schedule::Schedule, stop: CancellationToken) -> Rotation {
    let status = Arc::new(Mutex::new(schedule::RotationStatus::default()));
    let (rotate_now, mut asked) = mpsc::channel(1);
    let live = lc.subscribe();
    let st = status.clone();
    tokio::spawn(async move { schedule::run(lc, schedule, st, &mut asked, stop).await });
    Rotation {
        live,
        status,
        rotate_now,
    }
}

/// What a rotating broker needs from `[tokens]`: the management API with
/// credentials, the service, and the schedule.
#[derive(Clone)]
pub struct Management {
    pub api: ApiClient,
    pub kref: KyuubiRef,
    /// Auto-expiry requested on created tokens.
    pub expire_days: Option<i32>,
    pub schedule: schedule::Schedule,
}

impl Management {
    /// Resolves the credentials (the standard chain) for `cfg`.
    pub async fn resolve(cfg: &crate::config::TokensConfig) -> Result<Management, String> {
        use crate::cloud::client::Endpoint;
        use crate::cloud::credentials::Chain;
        let endpoint = match &cfg.endpoint {
            Some(e) => Endpoint::parse(e).expect("validated at load"),
            None => Endpoint::regional(&cfg.region, cfg.vpc),
        };
        let cred = Chain::from_process()
            .resolve()
            .await
            .map_err(|e| e.to_string())?;
        info!(provider = %cred.provider, endpoint = %endpoint.base, "management API credentials found");
        let expire_days = (cfg.expire_days > 0).then_some(cfg.expire_days as i32);
        let lifetime = match expire_days {
            Some(d) => Duration::from_secs(u64::from(d.unsigned_abs()) * 86400),
            None => cfg.max_interval,
        };
        Ok(Management {
            api: ApiClient::new(endpoint, cred),
            kref: KyuubiRef {
                region: cfg.region.clone(),
                workspace: cfg.workspace.clone(),
                kyuubi_service: cfg.kyuubi_service.clone(),
            },
            expire_days,
            schedule: schedule::Schedule {
                lifetime,
                fraction: cfg.rotate_fraction,
                min_interval: cfg.min_interval,
                max_interval: cfg.max_interval,
                grace: cfg.grace,
            },
        })
    }
}

impl Rotation {
    /// A rotation whose loop (or loops, one per term as a fleet's leader)
    /// someone else runs: it reads `asked`'s other end.
    pub fn new(
        live: watch::Receiver<Option<Secret>>,
        status: Arc<Mutex<schedule::RotationStatus>>,
        rotate_now: mpsc::Sender<()>,
    ) -> Rotation {
        Rotation {
            live,
            status,
            rotate_now,
        }
    }

    /// No rotation (it could not start: `msg` says why), serving `live`.
    pub fn disabled(msg: String, live: Option<Secret>) -> Rotation {
        warn!("token rotation disabled: {msg}");
        let status = schedule::RotationStatus {
            last_error: Some(msg),
            ..Default::default()
        };
        // a receiver keeps the last value after its sender is gone
        let (_, rx) = watch::channel(live);
        Rotation::new(rx, Arc::new(Mutex::new(status)), mpsc::channel(1).0)
    }

    /// SIGUSR1 asks for a rotation now, until `stop`. Call
    /// [`sigusr1`] before anything names this process as the one to signal.
    pub fn on_sigusr1(&self, usr1: Option<tokio::signal::unix::Signal>, stop: CancellationToken) {
        let Some(mut usr1) = usr1 else { return };
        let r = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    Some(()) = usr1.recv() => {
                        info!("SIGUSR1: asking for a token rotation now");
                        r.rotate_now();
                    }
                }
            }
        });
    }
}

/// Handles SIGUSR1 from now on (its default action would kill the broker).
pub fn sigusr1() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::user_defined1())
        .inspect_err(
            |e| warn!(error = %e, "SIGUSR1 cannot be handled; rotate-now requests are off"),
        )
        .ok()
}

/// Starts the rotation loop for `[tokens]` on a single broker, holding the
/// state file's lock until `stop`; SIGUSR1 asks it for a rotation now.
/// Problems (no credentials, a damaged or locked state file, an unreachable
/// API) are logged and shown in status; serving goes on with whatever token
/// the state file holds.
pub async fn start(cfg: &crate::config::TokensConfig, stop: CancellationToken) -> Rotation {
    // before the lock file names this process: from then on an operator may
    // send SIGUSR1
    let usr1 = sigusr1();
    let state_file = cfg
        .state_file
        .clone()
        .expect("validated at load: a single broker has a state file");
    let recorded = || {
        TokenState::load(&state_file)
            .ok()
            // moved, not copied: the Secret wipes it
            .and_then(|s| {
                s.active
                    .map(|mut t| Secret::new(std::mem::take(&mut t.value)))
            })
    };
    let m = match Management::resolve(cfg).await {
        Ok(m) => m,
        Err(e) => return Rotation::disabled(e, recorded()),
    };
    let lc = match Lifecycle::open(
        m.api,
        m.kref,
        state_file.clone(),
        m.expire_days,
        Holder::Broker,
    ) {
        Ok(lc) => lc,
        // the file is sound, only in use (a token command): serve its token
        Err(e @ TokenError::State(StateError::Locked { .. })) => {
            return Rotation::disabled(e.to_string(), recorded())
        }
        Err(e) => return Rotation::disabled(e.to_string(), None),
    };
    let rotation = spawn(lc, m.schedule, stop.clone());
    rotation.on_sigusr1(usr1, stop);
    rotation
}

#[cfg(test)]
mod tests {
    use super::generate_value;

    #[test]
    fn generated_values_are_32_lowercase_alphanumerics_and_differ() {
        let a = generate_value();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(a, generate_value());
    }
}
