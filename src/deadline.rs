//! Per-connection deadlines checked by one coarse tick, so that a timeout
//! costs nothing per message on the forwarding path.
//!
//! `tokio::time::timeout` around every read and write registers a timer
//! entry per message; arming one that is due sooner than the timer driver's
//! next wake-up makes the runtime write to its eventfd, one more syscall per
//! small RPC (strace showed 7 per GetInfo through the broker against
//! HAProxy's 6). Here, arming is an atomic store of an instant; a single
//! thread (`kyuubi-deadlines`) wakes every [`TICK`], and for each deadline
//! that has passed, marks it fired and wakes the task waiting on it. A
//! timeout therefore fires between its due time and one tick later, never
//! early, which is what HAProxy-style client, server and idle timeouts of
//! seconds to hours need.
//!
//! The ticker is a thread, not a task: deadlines work the same in every
//! runtime (each test has its own), and a blocked runtime cannot delay them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often due deadlines are looked for: the most a timeout fires late.
pub const TICK: Duration = Duration::from_millis(50);

/// `at` of a deadline that is not armed.
const OFF: u64 = u64::MAX;
/// `at` of a deadline the ticker found passed, until it is armed again.
const FIRED: u64 = u64::MAX - 1;

struct Entry {
    /// Due time in microseconds since the wheel's epoch, or OFF / FIRED.
    at: AtomicU64,
    notify: Notify,
}

struct Wheel {
    epoch: Instant,
    entries: Mutex<HashMap<u64, Weak<Entry>>>,
    next_id: AtomicU64,
}

impl Wheel {
    fn global() -> &'static Wheel {
        static WHEEL: OnceLock<&'static Wheel> = OnceLock::new();
        WHEEL.get_or_init(|| {
            let wheel: &'static Wheel = Box::leak(Box::new(Wheel {
                epoch: Instant::now(),
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }));
            std::thread::Builder::new()
                .name("kyuubi-deadlines".into())
                .spawn(move || loop {
                    std::thread::sleep(TICK);
                    wheel.fire_due();
                })
                .expect("spawn the deadline thread");
            wheel
        })
    }

    fn micros(&self, t: Instant) -> u64 {
        // saturates well below FIRED: u64 microseconds last 584,000 years
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(FIRED - 1)
    }

    fn fire_due(&self) {
        let now = self.micros(Instant::now());
        let mut due = Vec::new();
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            for e in entries.values().filter_map(Weak::upgrade) {
                let at = e.at.load(Ordering::Acquire);
                // a compare-exchange, so a deadline re-armed since the load
                // (the operation finished, the next began) is not fired
                if at <= now
                    && e.at
                        .compare_exchange(at, FIRED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    due.push(e);
                }
            }
        }
        // woken outside the lock: a woken task may register or drop a deadline
        for e in due {
            e.notify.notify_waiters();
        }
    }
}

/// The time an operation was given, returned when it ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed(pub Duration);

/// One connection's deadline: at most one operation at a time is bounded
/// by it (a connection reads or writes, then waits for the other side).
pub struct Deadline {
    entry: Arc<Entry>,
    id: u64,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline::new()
    }
}

impl Deadline {
    pub fn new() -> Deadline {
        let wheel = Wheel::global();
        let entry = Arc::new(Entry {
            at: AtomicU64::new(OFF),
            notify: Notify::new(),
        });
        let id = wheel.next_id.fetch_add(1, Ordering::Relaxed);
        wheel
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::downgrade(&entry));
        Deadline { entry, id }
    }

    /// Runs `op` for at most `limit` (plus up to one [`TICK`]). If `op` ends
    /// first, no timer was armed or cancelled: two atomic stores.
    pub async fn within<F: Future>(&self, limit: Duration, op: F) -> Result<F::Output, Elapsed> {
        let wheel = Wheel::global();
        let at = wheel.micros(Instant::now() + limit).min(FIRED - 1);
        self.entry.at.store(at, Ordering::Release);
        let r = tokio::select! {
            biased;
            r = op => Ok(r),
            () = self.fired() => Err(Elapsed(limit)),
        };
        self.entry.at.store(OFF, Ordering::Release);
        r
    }

    async fn fired(&self) {
        loop {
            let notified = self.entry.notify.notified();
            tokio::pin!(notified);
            // registered before the check, so a fire between them wakes us
            notified.as_mut().enable();
            if self.entry.at.load(Ordering::Acquire) == FIRED {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        Wheel::global()
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_operation_that_outlives_its_limit_is_stopped_within_a_tick() {
        let d = Deadline::new();
        let t0 = Instant::now();
        let r = d
            .within(Duration::from_millis(100), std::future::pending::<()>())
            .await;
        let took = t0.elapsed();
        assert_eq!(r, Err(Elapsed(Duration::from_millis(100))));
        assert!(took >= Duration::from_millis(100), "fired early: {took:?}");
        // a tick late at most, with room for a loaded 2-core machine
        assert!(took < Duration::from_millis(100) + TICK * 10, "{took:?}");
    }

    #[tokio::test]
    async fn an_operation_that_ends_in_time_is_not_fired_later() {
        let d = Deadline::new();
        let r = d.within(Duration::from_millis(60), async { 7 }).await;
        assert_eq!(r, Ok(7));
        // the disarmed deadline must not fire into the next operation
        tokio::time::sleep(Duration::from_millis(60) + TICK * 3).await;
        let r = d
            .within(
                Duration::from_secs(30),
                tokio::time::sleep(Duration::from_millis(20)),
            )
            .await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn re_arming_after_a_timeout_gives_the_next_operation_its_whole_limit() {
        let d = Deadline::new();
        let r = d
            .within(Duration::from_millis(50), std::future::pending::<()>())
            .await;
        assert!(r.is_err());
        let r = d
            .within(Duration::from_secs(5), tokio::time::sleep(TICK * 4))
            .await;
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn a_dropped_deadline_leaves_the_wheel() {
        let d = Deadline::new();
        let id = d.id;
        assert!(Wheel::global().entries.lock().unwrap().contains_key(&id));
        drop(d);
        assert!(!Wheel::global().entries.lock().unwrap().contains_key(&id));
    }
}
