//! The concurrency governor of a route: at most `max_upstream_sessions`
//! upstream sessions at once, and `max_upstream_sessions_per_user` for one
//! client user. Above a cap an OpenSession waits for a [`Permit`], up to
//! `queue_timeout`; then it is refused with [`QueueTimeout`].
//!
//! A gateway serves a bounded number of sessions well; past it every
//! session slows down. A FIFO queue in front of it would let one user who
//! opens fifty sessions at once push everyone else back by fifty places, so
//! places are handed out round robin by user (and FIFO within a user): a
//! user who arrives with one OpenSession waits at most one turn per other
//! waiting user.
//!
//! All decisions are made under one short lock (never held across an
//! `.await`): a place freed is handed straight to the next waiter, so a
//! newcomer cannot overtake the queue, and a waiter that gives up (timeout,
//! or its client gone) either leaves the queue or hands its place on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
// tokio's clock: paused in the unit tests, std's otherwise
use tokio::time::Instant;

use crate::metrics::{GovernorSeries, Sketch};

/// Which cap an OpenSession waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// `max_upstream_sessions`: the route is full.
    Route,
    /// `max_upstream_sessions_per_user`: this user's share is full.
    PerUser,
}

impl Cap {
    /// The route key that sets it.
    pub fn key(self) -> &'static str {
        match self {
            Cap::Route => "max_upstream_sessions",
            Cap::PerUser => "max_upstream_sessions_per_user",
        }
    }

    fn whose(self) -> &'static str {
        match self {
            Cap::Route => "all",
            Cap::PerUser => "this user's",
        }
    }
}

/// No place came free within `queue_timeout`: retryable, and the text
/// names the route, the cap and its key, so whoever reads it knows which
/// setting (or which gateway size) is the bottleneck.
#[derive(Debug, thiserror::Error)]
#[error(
    "route '{route}': {} {limit} upstream sessions ({}) are in use and none came free within queue_timeout {}; retry later",
    .cap.whose(),
    .cap.key(),
    humantime::format_duration(*.queue_timeout)
)]
pub struct QueueTimeout {
    pub route: Arc<str>,
    pub cap: Cap,
    pub limit: usize,
    pub queue_timeout: Duration,
}

/// What `/status` shows of one route's governor.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GovernorStatus {
    /// `None`: unlimited.
    pub max_upstream_sessions: Option<usize>,
    pub max_upstream_sessions_per_user: Option<usize>,
    /// Places held: upstream sessions open or being opened.
    pub in_use: usize,
    /// OpenSessions waiting for a place.
    pub queued: usize,
    /// Waits of the OpenSessions admitted since start (no wait counts as 0).
    pub wait_p50_us: u64,
    pub wait_p99_us: u64,
    pub last_wait_us: u64,
    /// OpenSessions refused after `queue_timeout`.
    pub timeouts: u64,
}

/// One waiting OpenSession. `granted` is only read and written under the
/// governor's lock; `wake` tells the waiter to look.
#[derive(Default)]
struct Waiter {
    granted: AtomicBool,
    wake: Notify,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Places held, by user (users at 0 are removed).
    by_user: HashMap<String, usize>,
    /// Waiters by user, oldest first.
    waiting: HashMap<String, VecDeque<Arc<Waiter>>>,
    /// The users with waiters, in the order they get their next turn.
    turns: VecDeque<String>,
    queued: usize,
}

pub struct Governor {
    route: Arc<str>,
    max: Option<usize>,
    per_user: Option<usize>,
    queue_timeout: Duration,
    state: Mutex<State>,
    series: GovernorSeries,
    waits: Sketch,
    last_wait_us: AtomicU64,
}

impl Governor {
    /// `None` caps are unlimited (the governor then only counts).
    pub fn new(
        route: Arc<str>,
        max: Option<usize>,
        per_user: Option<usize>,
        queue_timeout: Duration,
        series: GovernorSeries,
    ) -> Arc<Governor> {
        Arc::new(Governor {
            route,
            max,
            per_user,
            queue_timeout,
            state: Mutex::new(State::default()),
            series,
            waits: Sketch::default(),
            last_wait_us: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn user_fits(&self, s: &State, user: &str) -> bool {
        self.per_user
            .is_none_or(|p| s.by_user.get(user).copied().unwrap_or(0) < p)
    }

    fn route_fits(&self, s: &State) -> bool {
        self.max.is_none_or(|m| s.in_use < m)
    }

    fn take(s: &mut State, user: &str) {
        s.in_use += 1;
        *s.by_user.entry(user.to_string()).or_default() += 1;
    }

    /// Hands free places to waiters: the first user in turn order whose own
    /// share has room gets one, then goes to the back of the turns.
    fn dispatch(&self, s: &mut State) {
        while self.route_fits(s) {
            let by_user = &s.by_user;
            let fits = |u: &String| {
                self.per_user
                    .is_none_or(|p| by_user.get(u).copied().unwrap_or(0) < p)
            };
            let Some(i) = s.turns.iter().position(fits) else {
                return;
            };
            let user = s.turns.remove(i).expect("position is in range");
            let queue = s.waiting.get_mut(&user).expect("a user in turns waits");
            let w = queue.pop_front().expect("a user in turns waits");
            if queue.is_empty() {
                s.waiting.remove(&user);
            } else {
                s.turns.push_back(user.clone());
            }
            s.queued -= 1;
            Self::take(s, &user);
            w.granted.store(true, Ordering::Relaxed);
            // stored if the waiter is not polling yet: no lost wake-up
            w.wake.notify_one();
        }
    }

    fn publish(&self, s: &State) {
        self.series.sessions.set(s.in_use as i64);
        self.series.queue_length.set(s.queued as i64);
    }

    fn admitted(self: &Arc<Self>, user: &str, since: Instant) -> Permit {
        let waited = since.elapsed();
        self.waits.record(waited);
        self.last_wait_us.store(
            waited.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        self.series.wait.observe(waited.as_secs_f64());
        Permit {
            gov: self.clone(),
            user: user.to_string(),
            held: AtomicBool::new(true),
        }
    }

    /// A place for one upstream session of `user`: at once if the caps
    /// allow and nobody waits, else in turn, within `queue_timeout`.
    /// Dropping the future gives up the place in the queue.
    pub async fn acquire(self: &Arc<Self>, user: &str) -> Result<Permit, QueueTimeout> {
        let since = Instant::now();
        let waiter = {
            let mut s = self.lock();
            if s.queued == 0 && self.route_fits(&s) && self.user_fits(&s, user) {
                Self::take(&mut s, user);
                self.publish(&s);
                drop(s);
                return Ok(self.admitted(user, since));
            }
            let w = Arc::new(Waiter::default());
            let queue = s.waiting.entry(user.to_string()).or_default();
            queue.push_back(w.clone());
            if queue.len() == 1 {
                s.turns.push_back(user.to_string());
            }
            s.queued += 1;
            // someone may be waiting only on their own share while this
            // user fits: the place is theirs to take now
            self.dispatch(&mut s);
            self.publish(&s);
            w
        };
        let mut waiting = Waiting {
            gov: self,
            user,
            waiter: Some(waiter.clone()),
        };
        let _ = tokio::time::timeout(self.queue_timeout, waiter.wake.notified()).await;
        let mut s = self.lock();
        waiting.waiter = None;
        if waiter.granted.load(Ordering::Relaxed) {
            drop(s);
            return Ok(self.admitted(user, since));
        }
        Self::leave(&mut s, user, &waiter);
        self.publish(&s);
        let cap = if self.user_fits(&s, user) {
            Cap::Route
        } else {
            Cap::PerUser
        };
        drop(s);
        self.series.timeouts.inc();
        Err(QueueTimeout {
            route: self.route.clone(),
            cap,
            limit: match cap {
                Cap::Route => self.max,
                Cap::PerUser => self.per_user,
            }
            .unwrap_or(0),
            queue_timeout: self.queue_timeout,
        })
    }

    /// A place only if one is free and nobody waits: for sessions the
    /// broker opens ahead (warm sessions), which must never take a place a
    /// client is queued for. Not counted as a wait.
    /// The per-user cap does not apply: the place is the broker's own.
    pub fn try_acquire(self: &Arc<Self>, user: &str) -> Option<Permit> {
        let mut s = self.lock();
        if s.queued > 0 || !self.route_fits(&s) {
            return None;
        }
        Self::take(&mut s, user);
        self.publish(&s);
        Some(Permit {
            gov: self.clone(),
            user: user.to_string(),
            held: AtomicBool::new(true),
        })
    }

    /// Whether an OpenSession would wait now for want of a place on the
    /// route (not for the user's own share: freeing a route place would
    /// not help that).
    pub fn route_full(&self) -> bool {
        let s = self.lock();
        s.queued > 0 || !self.route_fits(&s)
    }

    /// Whether an OpenSession waits for a place now.
    pub fn has_waiters(&self) -> bool {
        self.lock().queued > 0
    }

    /// Takes a waiter that was not granted out of the queue.
    fn leave(s: &mut State, user: &str, waiter: &Arc<Waiter>) {
        let Some(queue) = s.waiting.get_mut(user) else {
            return;
        };
        let before = queue.len();
        queue.retain(|w| !Arc::ptr_eq(w, waiter));
        s.queued -= before - queue.len();
        if queue.is_empty() {
            s.waiting.remove(user);
            s.turns.retain(|u| u != user);
        }
    }

    fn release(&self, user: &str) {
        let mut s = self.lock();
        s.in_use = s.in_use.saturating_sub(1);
        if let Some(n) = s.by_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                s.by_user.remove(user);
            }
        }
        self.dispatch(&mut s);
        self.publish(&s);
    }

    pub fn status(&self) -> GovernorStatus {
        let s = self.lock();
        GovernorStatus {
            max_upstream_sessions: self.max,
            max_upstream_sessions_per_user: self.per_user,
            in_use: s.in_use,
            queued: s.queued,
            wait_p50_us: self.waits.quantile(0.50),
            wait_p99_us: self.waits.quantile(0.99),
            last_wait_us: self.last_wait_us.load(Ordering::Relaxed),
            timeouts: self.series.timeouts.get(),
        }
    }
}

/// A waiter's place in the queue while its future is pending: if the
/// future is dropped (the client went away), the place is left, or, if it
/// was granted meanwhile, handed on.
struct Waiting<'a> {
    gov: &'a Arc<Governor>,
    user: &'a str,
    waiter: Option<Arc<Waiter>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(w) = self.waiter.take() else { return };
        let granted = {
            let mut s = self.gov.lock();
            let granted = w.granted.load(Ordering::Relaxed);
            if !granted {
                Governor::leave(&mut s, self.user, &w);
                self.gov.publish(&s);
            }
            granted
        };
        if granted {
            self.gov.release(self.user);
        }
    }
}

/// One upstream session's place under the caps; given back when dropped
/// (or at [`Permit::release`], for a record shared by several owners).
pub struct Permit {
    gov: Arc<Governor>,
    user: String,
    held: AtomicBool,
}

impl Permit {
    /// Gives the place back now; later calls and the drop do nothing.
    pub fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.gov.release(&self.user);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("route", &self.gov.route)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn governor(max: Option<usize>, per_user: Option<usize>, timeout: Duration) -> Arc<Governor> {
        let m = Metrics::new();
        let route: Arc<str> = "r".into();
        Governor::new(route.clone(), max, per_user, timeout, m.governor(&route))
    }

    const LONG: Duration = Duration::from_secs(3600);

    /// Starts `user`'s OpenSession as a task and waits until it is queued
    /// (the queue length says so): arrival order is then exact.
    async fn queue(
        g: &Arc<Governor>,
        user: &str,
        order: &tokio::sync::mpsc::UnboundedSender<(String, Permit)>,
    ) {
        let before = g.status().queued;
        let (g2, u, tx) = (g.clone(), user.to_string(), order.clone());
        tokio::spawn(async move {
            let p = g2.acquire(&u).await.unwrap();
            let _ = tx.send((u, p));
        });
        while g.status().queued == before {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn freed_places_go_round_robin_by_user_and_fifo_within_a_user() {
        let g = governor(Some(2), None, LONG);
        let held = [g.acquire("x").await.unwrap(), g.acquire("x").await.unwrap()];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // alice floods the queue first; bob and carol come after her
        for who in ["alice", "alice", "alice", "alice", "bob", "bob", "carol"] {
            queue(&g, who, &tx).await;
        }
        assert_eq!(g.status().queued, 7);
        drop(held);
        let mut order = Vec::new();
        for _ in 0..7 {
            // each admitted session ends at once, freeing its place
            let (user, permit) = rx.recv().await.unwrap();
            order.push(user);
            drop(permit);
        }
        assert_eq!(
            order,
            ["alice", "bob", "carol", "alice", "bob", "alice", "alice"],
            "one turn per waiting user, in order of arrival"
        );
        assert_eq!((g.status().in_use, g.status().queued), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn within_a_user_the_first_to_wait_is_the_first_admitted() {
        let g = governor(Some(1), None, LONG);
        let held = g.acquire("x").await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Permit)>();
        for i in 0..5 {
            let before = g.status().queued;
            let (g2, tx) = (g.clone(), tx.clone());
            tokio::spawn(async move {
                let p = g2.acquire("alice").await.unwrap();
                let _ = tx.send((i, p));
            });
            while g.status().queued == before {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for want in 0..5 {
            let (i, p) = rx.recv().await.unwrap();
            assert_eq!(i, want);
            drop(p);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_user_cap_lets_other_users_past_a_user_at_their_share() {
        let g = governor(Some(3), Some(1), LONG);
        let a = g.acquire("alice").await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // alice's second waits on her own share while the route has room
        queue(&g, "alice", &tx).await;
        // bob is not held up behind her
        let b = tokio::time::timeout(Duration::from_secs(1), g.acquire("bob"))
            .await
            .expect("bob fits: not queued behind alice")
            .unwrap();
        assert_eq!((g.status().in_use, g.status().queued), (2, 1));
        drop(a);
        let (user, _a2) = rx.recv().await.unwrap();
        assert_eq!(user, "alice");
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_beyond_queue_timeout_is_refused_naming_the_route_and_the_cap() {
        let g = governor(Some(1), Some(5), Duration::from_secs(30));
        let _held = g.acquire("alice").await.unwrap();
        let t0 = tokio::time::Instant::now();
        let e = g.acquire("bob").await.unwrap_err();
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_secs(30) && waited < Duration::from_secs(31));
        assert_eq!(
            e.to_string(),
            "route 'r': all 1 upstream sessions (max_upstream_sessions) are in use and none \
             came free within queue_timeout 30s; retry later"
        );
        let s = g.status();
        assert_eq!((s.queued, s.timeouts), (0, 1));
        let g = governor(Some(10), Some(1), Duration::from_secs(2));
        let _held = g.acquire("alice").await.unwrap();
        let e = g.acquire("alice").await.unwrap_err();
        assert_eq!(e.cap, Cap::PerUser);
        assert!(
            e.to_string()
                .contains("this user's 1 upstream sessions (max_upstream_sessions_per_user)"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_metrics_show_places_queue_waits_and_timeouts_by_route() {
        let m = Metrics::new();
        let route: Arc<str> = "sts".into();
        let g = Governor::new(
            route.clone(),
            Some(1),
            None,
            Duration::from_secs(1),
            m.governor(&route),
        );
        let text = m.render();
        assert!(
            text.contains("kyuubi_broker_governor_sessions{route=\"sts\"} 0"),
            "{text}"
        );
        let held = g.acquire("alice").await.unwrap();
        let _ = g.acquire("bob").await.unwrap_err();
        let g2 = g.clone();
        let waiting = tokio::spawn(async move { g2.acquire("carol").await.map(drop) });
        while g.status().queued == 0 {
            tokio::task::yield_now().await;
        }
        let text = m.render();
        for needle in [
            "kyuubi_broker_governor_sessions{route=\"sts\"} 1",
            "kyuubi_broker_governor_queue_length{route=\"sts\"} 1",
            "kyuubi_broker_governor_timeouts_total{route=\"sts\"} 1",
            "kyuubi_broker_governor_wait_seconds_count{route=\"sts\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        drop(held);
        waiting.await.unwrap().unwrap();
        assert!(m
            .render()
            .contains("kyuubi_broker_governor_wait_seconds_count{route=\"sts\"} 2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_the_queue_and_loses_no_place() {
        let g = governor(Some(1), None, LONG);
        let held = g.acquire("alice").await.unwrap();
        let g2 = g.clone();
        let gone = tokio::spawn(async move { g2.acquire("bob").await.map(drop) });
        while g.status().queued == 0 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(g.status().queued, 0);
        drop(held);
        assert_eq!(g.status().in_use, 0);
        // granted and then dropped before it was polled: the place comes back
        let held = g.acquire("alice").await.unwrap();
        let g2 = g.clone();
        let late = tokio::spawn(async move { g2.acquire("bob").await.map(drop) });
        while g.status().queued == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        late.abort();
        let _ = late.await;
        assert_eq!((g.status().in_use, g.status().queued), (0, 0));
        g.acquire("carol").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn release_is_idempotent_and_the_drop_after_it_frees_nothing_more() {
        let g = governor(Some(2), None, LONG);
        let p = g.acquire("alice").await.unwrap();
        let q = g.acquire("bob").await.unwrap();
        p.release();
        p.release();
        assert_eq!(g.status().in_use, 1);
        drop(p);
        assert_eq!(g.status().in_use, 1);
        drop(q);
        assert_eq!(g.status().in_use, 0);
    }

    #[tokio::test]
    async fn an_unlimited_route_admits_at_once_and_only_counts() {
        let g = governor(None, None, Duration::ZERO);
        let mut held = Vec::new();
        for i in 0..100 {
            held.push(g.acquire(&format!("u{}", i % 7)).await.unwrap());
        }
        assert_eq!((g.status().in_use, g.status().queued), (100, 0));
        drop(held);
        assert_eq!(g.status().in_use, 0);
    }
}
