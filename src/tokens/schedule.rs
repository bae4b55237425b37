//! The rotation loop inside `serve`: rotate at a fraction of the token
//! lifetime (clamped to a min/max interval), retire old tokens after their
//! grace, and treat failures as something to log, retry with backoff and
//! show in status — never as a reason to stop serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{now_ms, Lifecycle};

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

/// Runs until `stop` is cancelled.
pub async fn run(
    mut lc: Lifecycle,
    schedule: Schedule,
    status: Arc<Mutex<RotationStatus>>,
    stop: CancellationToken,
) {
    let set = |lc: &Lifecycle, f: &dyn Fn(&mut RotationStatus)| {
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
            Ok::<_, super::TokenError>(())
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
