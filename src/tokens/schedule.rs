//! The rotation loop inside `serve`: rotate at a fraction of the token
//! lifetime (clamped to a min/max interval), retire old tokens after their
//! grace, and treat failures as something to log, retry with backoff and
//! show in status — never as a reason to stop serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
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
    /// In a fleet (`[cluster]`): "leader" or "follower".
    pub role: Option<&'static str>,
    /// In a fleet: the broker that wrote the token record last.
    pub leader: Option<String>,
    /// In a fleet: from the leader writing the active token to this broker
    /// using it, at the last switch.
    pub last_switch_lag_ms: Option<i64>,
}

/// Wait before retry number `failures` (1-based): 5 s doubling, capped at 5 min.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * 2u64.pow(doublings)).min(Duration::from_secs(300))
}

/// The failure streak of one kind of step. Rotation and retirement keep one
/// each: sharing it let a failed delete bring the next rotation forward, and
/// a successful delete cut a failing rotation's backoff short.
#[derive(Default)]
struct Retry {
    failures: u32,
    /// No attempt before this.
    not_before_ms: Option<i64>,
    /// When the last failure happened, and what it was.
    last_error: Option<(i64, String)>,
}

impl Retry {
    fn succeeded(&mut self) {
        *self = Retry::default();
    }

    fn failed(&mut self, now: i64, e: &TokenError) -> Duration {
        self.failures += 1;
        let wait = backoff(self.failures);
        self.not_before_ms = Some(now + wait.as_millis() as i64);
        self.last_error = Some((now, e.to_string()));
        wait
    }

    /// When a step due at `due` may run.
    fn delay(&self, due: i64) -> i64 {
        self.not_before_ms.map_or(due, |t| t.max(due))
    }
}

fn rotate_at(st: &TokenState, schedule: &Schedule, rotation: &Retry, now: i64) -> i64 {
    let due = match (&st.intent, &st.active) {
        (Some(_), _) | (_, None) => now,
        (None, Some(t)) => t.created_ms + schedule.interval().as_millis() as i64,
    };
    rotation.delay(due)
}

fn retire_at(st: &TokenState, retirement: &Retry) -> i64 {
    match st.retiring.iter().map(|r| r.delete_after_ms).min() {
        Some(due) => retirement.delay(due),
        // a failed pass left nothing retiring: one more (empty) pass ends the streak
        None => retirement.not_before_ms.unwrap_or(i64::MAX),
    }
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

/// Runs until `stop` is cancelled. A message on `rotate_now` rotates at
/// once, whatever the schedule or a failure's backoff says. Requests made
/// before a rotation ends are answered by it (the channel holds one, and
/// the loop empties it after each rotation), so a burst of requests makes
/// one token, not a burst of them.
pub(crate) async fn run<R: Rotator>(
    mut lc: R,
    schedule: Schedule,
    status: Arc<Mutex<RotationStatus>>,
    rotate_now: &mut mpsc::Receiver<()>,
    stop: CancellationToken,
) {
    let clock = lc.clock();
    let set = |lc: &R, f: &dyn Fn(&mut RotationStatus)| {
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        s.active_token_id = lc.state().active.as_ref().map(|t| t.token_id.clone());
        s.active_since_ms = lc.state().active.as_ref().map(|t| t.created_ms);
        s.expires_ms = lc.state().active.as_ref().and_then(|t| t.expires_ms);
        f(&mut s);
    };
    let failures = |s: &mut RotationStatus, rotation: &Retry, retirement: &Retry| {
        s.consecutive_failures = rotation.failures.max(retirement.failures);
        s.last_error = [rotation, retirement]
            .into_iter()
            .filter_map(|r| r.last_error.as_ref())
            .max_by_key(|(at, _)| *at)
            .map(|(_, msg)| msg.clone());
    };
    match lc.reconcile(schedule.grace).await {
        Ok(r) => info!(?r, "token state reconciled"),
        Err(e) => {
            warn!(error = %e, "token reconcile failed; serving with the recorded token and retrying");
            set(&lc, &|s| s.last_error = Some(e.to_string()));
        }
    }
    set(&lc, &|_| {});
    let mut rotation = Retry::default();
    let mut retirement = Retry::default();
    loop {
        let now = clock.now_ms();
        let rotate_at = rotate_at(lc.state(), &schedule, &rotation, now);
        let wake = rotate_at.min(retire_at(lc.state(), &retirement));
        let wait = Duration::from_millis((wake - now).max(0) as u64);
        let asked = tokio::select! {
            // a step that ended as `stop` came is the last one: never
            // start another because its timer is ready too
            biased;
            _ = stop.cancelled() => return,
            Some(()) = rotate_now.recv() => true,
            _ = tokio::time::sleep(wait) => false,
        };
        if asked {
            info!("rotating the token now, as asked");
        }
        if asked || clock.now_ms() >= rotate_at {
            let step = async {
                if lc.state().intent.is_some() {
                    lc.reconcile(schedule.grace).await?;
                }
                lc.rotate(schedule.grace).await
            }
            .await;
            let rotated = step.is_ok();
            match step {
                Ok(_) => rotation.succeeded(),
                Err(e) => {
                    let wait = rotation.failed(clock.now_ms(), &e);
                    let n = rotation.failures;
                    warn!(error = %e, failures = n, "token rotation failed; retrying in {wait:?}");
                }
            }
            // whoever asked meanwhile has their new token (or its failure)
            while rotate_now.try_recv().is_ok() {}
            set(&lc, &|s| {
                s.rotations += u64::from(rotated);
                failures(s, &rotation, &retirement);
            });
        }
        // read afresh: with no grace the rotation just made the old token due
        if clock.now_ms() >= retire_at(lc.state(), &retirement) {
            match lc.retire_due().await {
                Ok(_) => retirement.succeeded(),
                Err(e) => {
                    let wait = retirement.failed(clock.now_ms(), &e);
                    let n = retirement.failures;
                    warn!(error = %e, failures = n, "retiring an old token failed; retrying in {wait:?}");
                }
            }
            set(&lc, &|s| failures(s, &rotation, &retirement));
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
                let id = self.state.retiring.remove(i).token.token_id.clone();
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
        rotate_now: mpsc::Sender<()>,
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
        let (rotate_now, mut asked) = mpsc::channel(1);
        let (status2, stop2) = (status.clone(), stop.clone());
        tokio::spawn(async move { run(fake, schedule, status2, &mut asked, stop2).await });
        Running {
            api,
            status,
            rotate_now,
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

    #[tokio::test(start_paused = true)]
    async fn a_failed_rotation_is_retried_with_backoff_and_shown_in_status() {
        let r = start(hourly());
        r.api().fail_creates = 8;
        // 5 s doubling, capped at 300 s
        let gaps = [5, 10, 20, 40, 80, 160, 300, 300];
        let mut attempt = hours(1);
        let mut attempts = vec![ms(attempt)];
        for (n, gap) in gaps.iter().enumerate() {
            r.at(attempt + secs(1)).await;
            let st = r.status();
            assert_eq!(st.consecutive_failures, n as u32 + 1, "{st:?}");
            assert_eq!(st.last_error.as_deref(), Some("injected create failure"));
            assert_eq!(st.active_token_id.as_deref(), Some("tk-0"), "still serving");
            attempt += secs(*gap);
            attempts.push(ms(attempt));
        }
        r.at(attempt + secs(1)).await;
        attempts.pop();
        assert_eq!(r.api().failed_creates, attempts);
        assert_eq!(created(&r), vec![(ms(attempt), "tk-1".to_string())]);
        let st = r.status();
        assert_eq!((st.consecutive_failures, st.last_error), (0, None));
        assert_eq!(st.rotations, 1);
        // the next rotation counts from the token that was made
        r.at(attempt + hours(1) + secs(1)).await;
        assert_eq!(created(&r)[1], (ms(attempt + hours(1)), "tk-2".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_retirement_is_retried_with_backoff_and_creates_no_token() {
        let r = start(hourly());
        r.api().fail_deletes = 3;
        let due = hours(1) + secs(600);
        r.at(due + secs(1)).await;
        let st = r.status();
        assert_eq!(st.consecutive_failures, 1, "{st:?}");
        assert_eq!(st.last_error.as_deref(), Some("injected delete failure"));
        // retried after 5, 10 and 20 s; only deletes, never a new token
        r.at(due + secs(36)).await;
        assert_eq!(
            created(&r),
            vec![(ms(hours(1)), "tk-1".to_string())],
            "a retirement retry must not rotate"
        );
        assert_eq!(
            r.api().failed_deletes,
            vec![ms(due), ms(due + secs(5)), ms(due + secs(15))]
        );
        assert_eq!(r.api().deleted, vec![(ms(due + secs(35)), "tk-0".into())]);
        let st = r.status();
        assert_eq!((st.consecutive_failures, st.last_error), (0, None));
        assert_eq!(st.rotations, 1);
        // and the rotation schedule is where it was
        r.at(hours(2) + secs(1)).await;
        assert_eq!(created(&r).len(), 2);
        assert_eq!(created(&r)[1], (ms(hours(2)), "tk-2".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_retirement_does_not_make_the_next_wake_up_rotate() {
        let r = start(hourly());
        r.api().fail_saves_after_delete = 1;
        let due = hours(1) + secs(600);
        r.at(due + secs(1)).await;
        assert_eq!(r.api().deleted, vec![(ms(due), "tk-0".to_string())]);
        let st = r.status();
        assert_eq!(st.consecutive_failures, 1, "{st:?}");
        assert_eq!(
            st.last_error.as_deref(),
            Some("injected state write failure")
        );
        // its retry finds nothing left to retire, which ends the streak
        r.at(due + secs(6)).await;
        let st = r.status();
        assert_eq!((st.consecutive_failures, st.last_error), (0, None));
        // and up to the next rotation, no token is made
        r.at(hours(2) - secs(1)).await;
        assert_eq!(
            created(&r),
            vec![(ms(hours(1)), "tk-1".to_string())],
            "a retirement failure must not create a token"
        );
        r.at(hours(2) + secs(1)).await;
        assert_eq!(created(&r)[1..], [(ms(hours(2)), "tk-2".to_string())]);
        assert_eq!(r.status().rotations, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_rotation_and_a_due_retirement_keep_their_own_schedules() {
        // grace as long as the interval: tk-0's deletion is due at 2 h,
        // exactly when the rotation after tk-1 is
        let r = start(Schedule {
            grace: hours(1),
            ..hourly()
        });
        r.at(hours(1) + secs(1)).await;
        r.api().fail_creates = 2;
        r.at(hours(2) + secs(1)).await;
        assert_eq!(
            r.api().deleted,
            vec![(ms(hours(2)), "tk-0".to_string())],
            "deleted on time despite the failed rotation"
        );
        assert_eq!(
            r.api().failed_creates,
            vec![ms(hours(2))],
            "the retirement's success does not cut the rotation's backoff short"
        );
        assert_eq!(r.status().consecutive_failures, 1);
        r.at(hours(2) + secs(16)).await;
        assert_eq!(
            r.api().failed_creates,
            vec![ms(hours(2)), ms(hours(2) + secs(5))]
        );
        assert_eq!(
            created(&r)[1..],
            [(ms(hours(2) + secs(15)), "tk-2".to_string())]
        );
        assert_eq!(r.status().consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_rotate_now_requests_makes_one_token_and_the_schedule_restarts_from_it() {
        let r = start(hourly());
        r.at(secs(600)).await;
        for _ in 0..3 {
            let _ = r.rotate_now.try_send(());
        }
        r.at(secs(601)).await;
        assert_eq!(created(&r), vec![(ms(secs(600)), "tk-1".to_string())]);
        assert_eq!(r.status().rotations, 1);
        // no scheduled rotation at 1 h: the next is an hour after tk-1
        r.at(hours(1) + secs(599)).await;
        assert_eq!(created(&r).len(), 1);
        r.at(hours(1) + secs(601)).await;
        assert_eq!(
            created(&r)[1..],
            [(ms(hours(1) + secs(600)), "tk-2".to_string())]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotate_now_does_not_wait_out_a_failed_rotations_backoff() {
        let r = start(hourly());
        r.api().fail_creates = 7;
        // failures at 1 h, +5, +10, +20, +40, +80 s; the next is due 160 s later
        r.at(hours(1) + secs(156)).await;
        assert_eq!(r.api().failed_creates.len(), 6);
        r.api().fail_creates = 0;
        let _ = r.rotate_now.try_send(());
        r.at(hours(1) + secs(157)).await;
        assert_eq!(
            created(&r),
            vec![(ms(hours(1) + secs(156)), "tk-1".to_string())]
        );
        assert_eq!(r.status().consecutive_failures, 0);
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
    fn backoff_is_5_s_doubling_capped_at_5_min() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
