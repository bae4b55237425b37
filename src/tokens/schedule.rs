//! The rotation loop inside `serve`: rotate at a fraction of the token
//! lifetime (clamped to a min/max interval), retire old tokens after their
//! grace, and treat failures as something to log, retry with backoff and
//! show in status — never as a reason to stop serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Clock, Lifecycle, Reconciled, TokenError, TokenState};

#[derive(Debug, Clone)]
pub struct Schedule {
    /// How long a token lives (its auto-expiry).
    pub lifetime: Duration,
    /// Rotate after this share of the lifetime.
    pub fraction: f64,
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// How long a replaced token keeps working before it is deleted.
    pub grace: Duration,
}

impl Schedule {
    pub fn interval(&self) -> Duration {
        self.lifetime
            .mul_f64(self.fraction)
            .clamp(self.min_interval, self.max_interval)
    }
}

/// Visible in status; never holds a token value.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RotationStatus {
    pub active_token_id: Option<String>,
    pub active_since_ms: Option<i64>,
    pub expires_ms: Option<i64>,
    pub rotations: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(5 * 2u64.pow(failures.min(6))).min(Duration::from_secs(300))
}

/// What the loop drives: [`Lifecycle`] against the management API, or an
/// in-memory fake in the tests below (real I/O and paused time do not mix:
/// the paused clock jumps ahead while a task waits on a socket).
pub(crate) trait Rotator {
    /// The clock `created_ms` and `delete_after_ms` are stamped with; the
    /// loop schedules by the same one.
    fn clock(&self) -> Clock;
    fn state(&self) -> &TokenState;
    async fn reconcile(&mut self, grace: Duration) -> Result<Reconciled, TokenError>;
    async fn rotate(&mut self, grace: Duration) -> Result<String, TokenError>;
    async fn retire_due(&mut self) -> Result<Vec<String>, TokenError>;
}

impl Rotator for Lifecycle {
    fn clock(&self) -> Clock {
        Lifecycle::clock(self)
    }
    fn state(&self) -> &TokenState {
        Lifecycle::state(self)
    }
    async fn reconcile(&mut self, grace: Duration) -> Result<Reconciled, TokenError> {
        Lifecycle::reconcile(self, grace).await
    }
    async fn rotate(&mut self, grace: Duration) -> Result<String, TokenError> {
        Lifecycle::rotate(self, grace).await
    }
    async fn retire_due(&mut self) -> Result<Vec<String>, TokenError> {
        Lifecycle::retire_due(self).await
    }
}

/// Runs until `stop` is cancelled.
pub(crate) async fn run<R: Rotator>(
    mut lc: R,
    schedule: Schedule,
    status: Arc<Mutex<RotationStatus>>,
    stop: CancellationToken,
) {
    let clock = lc.clock();
    let now_ms = || clock.now_ms();
    let set = |lc: &R, f: &dyn Fn(&mut RotationStatus)| {
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        s.active_token_id = lc.state().active.as_ref().map(|t| t.token_id.clone());
        s.active_since_ms = lc.state().active.as_ref().map(|t| t.created_ms);
        s.expires_ms = lc.state().active.as_ref().and_then(|t| t.expires_ms);
        f(&mut s);
    };
    match lc.reconcile(schedule.grace).await {
        Ok(r) => info!(?r, "token state reconciled"),
        Err(e) => {
            warn!(error = %e, "token reconcile failed; serving with the recorded token and retrying");
            set(&lc, &|s| s.last_error = Some(e.to_string()));
        }
    }
    set(&lc, &|_| {});
    let mut failures = 0u32;
    let mut retry_at: Option<i64> = None;
    loop {
        let st = lc.state();
        let rotate_at = match (&st.intent, &st.active) {
            (Some(_), _) | (_, None) => now_ms(),
            (None, Some(t)) => t.created_ms + schedule.interval().as_millis() as i64,
        };
        let rotate_at = retry_at.unwrap_or(rotate_at);
        let retire_at = st
            .retiring
            .iter()
            .map(|r| r.delete_after_ms)
            .min()
            .unwrap_or(i64::MAX);
        let wake = rotate_at.min(retire_at);
        let wait = Duration::from_millis((wake - now_ms()).max(0) as u64);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let now = now_ms();
        let result = async {
            if lc.state().intent.is_some() {
                lc.reconcile(schedule.grace).await?;
            }
            if now >= rotate_at {
                lc.rotate(schedule.grace).await?;
                set(&lc, &|s| s.rotations += 1);
            }
            lc.retire_due().await?;
            Ok::<_, TokenError>(())
        }
        .await;
        match result {
            Ok(()) => {
                failures = 0;
                retry_at = None;
                set(&lc, &|s| {
                    s.consecutive_failures = 0;
                    s.last_error = None;
                });
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures);
                warn!(error = %e, failures, "token rotation step failed; retrying in {wait:?}");
                retry_at = Some(now_ms() + wait.as_millis() as i64);
                let msg = e.to_string();
                set(&lc, &|s| {
                    s.consecutive_failures = failures;
                    s.last_error = Some(msg.clone());
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{OwnedToken, Retiring};

    /// The fake's wall clock at the start of each test.
    const T0: i64 = 1_700_000_000_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn hours(h: u64) -> Duration {
        secs(h * 3600)
    }

    fn ms(d: Duration) -> i64 {
        d.as_millis() as i64
    }

    /// What the fake management API saw, as milliseconds after T0, and the
    /// failures to inject.
    #[derive(Default)]
    struct Api {
        created: Vec<(i64, String)>,
        deleted: Vec<(i64, String)>,
        failed_creates: Vec<i64>,
        failed_deletes: Vec<i64>,
        /// Fail this many of the next creates.
        fail_creates: u32,
        /// Refuse this many of the next deletes (the token stays retiring).
        fail_deletes: u32,
        /// Fail writing the state after this many of the next deletes: the
        /// token is gone, but the step fails, as `Lifecycle::retire_due`
        /// does when its `save` fails.
        fail_saves_after_delete: u32,
    }

    /// An in-memory [`Rotator`]: tokens `tk-1`, `tk-2`, … stamped with the
    /// paused tokio clock, as [`Lifecycle`] stamps them.
    struct Fake {
        clock: Clock,
        state: TokenState,
        api: Arc<Mutex<Api>>,
        next: u32,
    }

    impl Rotator for Fake {
        fn clock(&self) -> Clock {
            self.clock
        }
        fn state(&self) -> &TokenState {
            &self.state
        }
        async fn reconcile(&mut self, _grace: Duration) -> Result<Reconciled, TokenError> {
            // the fake never leaves an intent or an orphan behind
            let retired = self.retire_due().await?;
            Ok(Reconciled {
                retired,
                ..Reconciled::default()
            })
        }
        async fn rotate(&mut self, grace: Duration) -> Result<String, TokenError> {
            let now = self.clock.now_ms();
            let mut api = self.api.lock().unwrap();
            if api.fail_creates > 0 {
                api.fail_creates -= 1;
                api.failed_creates.push(now - T0);
                return Err(TokenError::Refused("injected create failure".into()));
            }
            self.next += 1;
            let id = format!("tk-{}", self.next);
            api.created.push((now - T0, id.clone()));
            let new = OwnedToken {
                token_id: id.clone(),
                name: format!("{}{}", self.state.prefix(), self.next),
                value: "v".repeat(32),
                created_ms: now,
                expires_ms: None,
            };
            if let Some(old) = self.state.active.replace(new) {
                self.state.retiring.push(Retiring {
                    token: old,
                    delete_after_ms: now + ms(grace),
                });
            }
            Ok(id)
        }
        async fn retire_due(&mut self) -> Result<Vec<String>, TokenError> {
            let now = self.clock.now_ms();
            let mut api = self.api.lock().unwrap();
            let mut done = Vec::new();
            while let Some(i) = self
                .state
                .retiring
                .iter()
                .position(|r| r.delete_after_ms <= now)
            {
                if api.fail_deletes > 0 {
                    api.fail_deletes -= 1;
                    api.failed_deletes.push(now - T0);
                    return Err(TokenError::Refused("injected delete failure".into()));
                }
                let id = self.state.retiring.remove(i).token.token_id;
                api.deleted.push((now - T0, id.clone()));
                if api.fail_saves_after_delete > 0 {
                    api.fail_saves_after_delete -= 1;
                    return Err(TokenError::Refused("injected state write failure".into()));
                }
                done.push(id);
            }
            Ok(done)
        }
    }

    /// Lifetime 2 h at fraction 0.5: a rotation every hour; grace 10 min.
    fn hourly() -> Schedule {
        Schedule {
            lifetime: hours(2),
            fraction: 0.5,
            min_interval: secs(60),
            max_interval: hours(24),
            grace: secs(600),
        }
    }

    struct Running {
        api: Arc<Mutex<Api>>,
        status: Arc<Mutex<RotationStatus>>,
        base: tokio::time::Instant,
        _stop: tokio_util::sync::DropGuard,
    }

    impl Running {
        /// Lets paused time run to `d` after T0. Every check sits a second
        /// off the loop's own wake-ups, so the loop has finished its step.
        async fn at(&self, d: Duration) {
            tokio::time::sleep_until(self.base + d).await;
        }
        fn api(&self) -> std::sync::MutexGuard<'_, Api> {
            self.api.lock().unwrap()
        }
        fn status(&self) -> RotationStatus {
            self.status.lock().unwrap().clone()
        }
    }

    /// Starts the loop at T0 with token `tk-0`, created at T0, active.
    fn start(schedule: Schedule) -> Running {
        let clock = Clock::tokio(T0);
        let mut state = TokenState::fresh();
        state.active = Some(OwnedToken {
            token_id: "tk-0".into(),
            name: format!("{}0", state.prefix()),
            value: "v".repeat(32),
            created_ms: T0,
            expires_ms: None,
        });
        let api = Arc::new(Mutex::new(Api::default()));
        let fake = Fake {
            clock,
            state,
            api: api.clone(),
            next: 0,
        };
        let status = Arc::new(Mutex::new(RotationStatus::default()));
        let stop = CancellationToken::new();
        tokio::spawn(run(fake, schedule, status.clone(), stop.clone()));
        Running {
            api,
            status,
            base: tokio::time::Instant::now(),
            _stop: stop.drop_guard(),
        }
    }

    fn created(r: &Running) -> Vec<(i64, String)> {
        r.api().created.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn rotations_happen_once_per_interval() {
        let r = start(hourly());
        r.at(hours(3) + secs(1)).await;
        assert_eq!(
            created(&r),
            vec![
                (ms(hours(1)), "tk-1".to_string()),
                (ms(hours(2)), "tk-2".to_string()),
                (ms(hours(3)), "tk-3".to_string()),
            ]
        );
        let st = r.status();
        assert_eq!(st.rotations, 3);
        assert_eq!(st.active_token_id.as_deref(), Some("tk-3"));
        assert_eq!(st.active_since_ms, Some(T0 + ms(hours(3))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_token_is_retired_only_after_its_grace() {
        let r = start(hourly());
        r.at(hours(1) + secs(599)).await;
        assert_eq!(created(&r).len(), 1, "tk-1 replaced tk-0 at 1 h");
        assert!(r.api().deleted.is_empty(), "tk-0 is still in its grace");
        r.at(hours(1) + secs(601)).await;
        assert_eq!(
            r.api().deleted,
            vec![(ms(hours(1) + secs(600)), "tk-0".to_string())]
        );
    }

    #[test]
    fn interval_is_a_fraction_of_the_lifetime_clamped() {
        let mut s = Schedule {
            lifetime: Duration::from_secs(7 * 86400),
            fraction: 0.5,
            min_interval: Duration::from_secs(3600),
            max_interval: Duration::from_secs(2 * 86400),
            grace: Duration::from_secs(600),
        };
        assert_eq!(s.interval(), Duration::from_secs(2 * 86400));
        s.lifetime = Duration::from_secs(3600);
        assert_eq!(
            s.interval(),
            Duration::from_secs(3600),
            "clamped up to the minimum"
        );
        s.lifetime = Duration::from_secs(3 * 86400);
        assert_eq!(s.interval(), Duration::from_secs(129_600));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }
}
