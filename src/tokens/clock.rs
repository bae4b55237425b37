//! Where token timestamps (`created_ms`, `delete_after_ms`, the rotation
//! schedule) come from: milliseconds since the Unix epoch, read either from
//! the system clock or from tokio's clock, so the schedule can be tested
//! under paused time without waiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub struct Clock(Source);

#[derive(Debug, Clone, Copy)]
enum Source {
    System,
    Tokio {
        origin_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// The system clock, read at every call. Production uses it: timestamps
    /// are persisted, compared after restarts and against the API's own
    /// expiry, so they must stay right across a suspend or a clock step,
    /// which an offset from a monotonic start would not.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// `origin_ms` now, then advancing exactly as tokio's clock does (and so
    /// jumping ahead when a paused test runtime auto-advances).
    pub fn tokio(origin_ms: i64) -> Clock {
        Clock(Source::Tokio {
            origin_ms,
            start: tokio::time::Instant::now(),
        })
    }

    pub fn now_ms(&self) -> i64 {
        match self.0 {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64,
            Source::Tokio { origin_ms, start } => origin_ms + start.elapsed().as_millis() as i64,
        }
    }

    /// [`Clock::now_ms`] as a `SystemTime`, for names that carry the time.
    pub fn now_system_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_ms().max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time_only() {
        let c = Clock::tokio(1_000);
        assert_eq!(c.now_ms(), 1_000);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(c.now_ms(), 1_000 + 3_600_000);
    }
}
