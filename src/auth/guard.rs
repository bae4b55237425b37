//! What stands between a flood of logins and the rest of the broker, shared
//! by every listener (one attacking address is one attacker whichever
//! listener it tries):
//!
//! - password checks (argon2, LDAP) run on the auth pool (`pool.rs`), at most
//!   `server.auth_threads` at a time with `server.auth_queue` waiting;
//!   beyond that a login is refused at once as "busy", so a flood of bad
//!   logins never occupies the async workers that serve everyone's RPCs;
//! - a (user, client address) pair gets `server.login_free_failures` free
//!   failures, then each attempt within a doubling delay (up to
//!   `server.login_backoff_max`) is refused without checking the password;
//! - one client address with more than `server.login_failures_per_ip`
//!   failures in `server.login_failure_window` is refused until the window
//!   ends.
//!
//! Both tables are bounded caches: an attacker cycling user names or
//! addresses evicts old entries instead of growing memory.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::pool::AuthPool;
use super::AuthError;
use crate::config::ServerConfig;

/// Entries kept per table.
const MAX_ENTRIES: u64 = 100_000;

pub struct Guard {
    pool: AuthPool,
    admitted: Arc<Semaphore>,
    free_failures: u32,
    backoff_max: Duration,
    per_ip: u32,
    window: Duration,
    pairs: Cache<(String, IpAddr), Backoff>,
    ips: Cache<IpAddr, Window>,
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    /// No attempt is checked before this.
    until: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Why a login was refused unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// This (user, address) pair failed too often lately.
    Pair,
    /// This address failed too often lately.
    Address,
}

impl Throttle {
    pub fn reason(self) -> &'static str {
        match self {
            Throttle::Pair => "user_and_address",
            Throttle::Address => "address",
        }
    }
}

impl Guard {
    pub fn new(s: &ServerConfig) -> Guard {
        Guard {
            pool: AuthPool::new(s.auth_threads),
            admitted: Arc::new(Semaphore::new(s.auth_threads + s.auth_queue)),
            free_failures: s.login_free_failures,
            backoff_max: s.login_backoff_max,
            per_ip: s.login_failures_per_ip,
            window: s.login_failure_window,
            pairs: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_idle(s.login_backoff_max * 2 + s.login_failure_window)
                .build(),
            ips: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_idle(s.login_failure_window)
                .build(),
        }
    }

    /// Refuses an attempt that must wait, saying for how long.
    async fn check(&self, user: &str, ip: IpAddr) -> Result<(), AuthError> {
        let now = Instant::now();
        if let Some(w) = self.ips.get(&ip).await {
            let ends = w.started + self.window;
            if w.failures >= self.per_ip && ends > now {
                return Err(throttled(Throttle::Address, ends - now));
            }
        }
        if let Some(b) = self.pairs.get(&(user.to_string(), ip)).await {
            if b.until > now {
                return Err(throttled(Throttle::Pair, b.until - now));
            }
        }
        Ok(())
    }

    /// A checked login: refused unchecked while `user` at `ip` must wait;
    /// otherwise charged as a failure before `check` runs on the pool (so
    /// concurrent attempts cannot all slip through the free ones), and the
    /// charge is given back if it passes.
    pub async fn checked(
        &self,
        user: &str,
        ip: IpAddr,
        check: impl FnOnce() -> Result<(), AuthError> + Send + 'static,
    ) -> Result<(), AuthError> {
        self.check(user, ip).await?;
        self.charge(user, ip).await;
        self.run(check).await??;
        self.succeeded(user, ip).await;
        Ok(())
    }

    /// A success resets the pair and gives the address its charge back.
    async fn succeeded(&self, user: &str, ip: IpAddr) {
        self.pairs.invalidate(&(user.to_string(), ip)).await;
        if let Some(w) = self.ips.get(&ip).await {
            let failures = w.failures.saturating_sub(1);
            self.ips.insert(ip, Window { failures, ..w }).await;
        }
    }

    /// Counts an attempt as a failure of the pair and of the address.
    async fn charge(&self, user: &str, ip: IpAddr) {
        let key = (user.to_string(), ip);
        let now = Instant::now();
        let failures = self.pairs.get(&key).await.map_or(0, |b| b.failures) + 1;
        let extra = failures.saturating_sub(self.free_failures);
        let delay = match extra {
            0 => Duration::ZERO,
            // 1 s, 2 s, 4 s, ... up to the cap
            n => Duration::from_secs(1u64 << (n - 1).min(20)).min(self.backoff_max),
        };
        self.pairs
            .insert(
                key,
                Backoff {
                    failures,
                    until: now + delay,
                },
            )
            .await;
        let w = match self.ips.get(&ip).await {
            Some(w) if w.started + self.window > now => Window {
                failures: w.failures + 1,
                ..w
            },
            _ => Window {
                started: now,
                failures: 1,
            },
        };
        self.ips.insert(ip, w).await;
    }

    /// Runs a password check on the auth pool, or refuses at once when
    /// the pool and its queue are full.
    async fn run<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let Ok(_admitted) = self.admitted.clone().try_acquire_owned() else {
            return Err(AuthError::Unavailable(
                "authentication busy: every password-check thread is taken and the queue is full"
                    .into(),
            ));
        };
        self.pool
            .run(check)
            .await
            .ok_or_else(|| AuthError::Unavailable("password check failed".into()))
    }
}

fn throttled(why: Throttle, wait: Duration) -> AuthError {
    AuthError::Throttled {
        why,
        retry_after: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        let s = ServerConfig {
            login_free_failures: 3,
            login_backoff_max: Duration::from_secs(30),
            login_failures_per_ip: 10,
            login_failure_window: Duration::from_secs(60),
            ..ServerConfig::default()
        };
        Guard::new(&s)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_free_ones_wait_a_doubling_delay_up_to_the_cap() {
        let g = guard();
        let mut waits = Vec::new();
        for _ in 0..9 {
            g.check("alice", IP).await.unwrap();
            g.charge("alice", IP).await;
            match g.check("alice", IP).await {
                Ok(()) => waits.push(0),
                Err(AuthError::Throttled { why, retry_after }) => {
                    assert_eq!(why, Throttle::Pair);
                    waits.push(retry_after);
                    tokio::time::advance(Duration::from_secs(retry_after)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // seconds to wait: 3 free failures, then 1, 2, 4, 8, 16, 30 (the cap)
        assert_eq!(waits, [0, 0, 0, 1, 2, 4, 8, 16, 30]);
        // another user from the same address is not held up by alice's pair
        g.check("bob", IP).await.unwrap();
        // a success resets the pair
        g.succeeded("alice", IP).await;
        g.check("alice", IP).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_over_its_failure_budget_is_refused_until_the_window_ends() {
        let g = guard();
        for i in 0..10 {
            // each a different user: only the address budget applies
            g.check(&format!("u{i}"), IP).await.unwrap();
            g.charge(&format!("u{i}"), IP).await;
        }
        match g.check("someone-else", IP).await {
            Err(AuthError::Throttled { why, retry_after }) => {
                assert_eq!(why, Throttle::Address);
                assert!(retry_after <= 61, "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        g.check("someone-else", other).await.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        g.check("someone-else", IP).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn password_checks_run_off_the_async_workers_and_a_full_queue_refuses_at_once() {
        let s = ServerConfig {
            auth_threads: 1,
            auth_queue: 1,
            ..ServerConfig::default()
        };
        let g = Arc::new(Guard::new(&s));
        let worker = std::thread::current().name().map(str::to_string);
        let on = g
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert_ne!(on, worker, "ran on the test's async worker");
        // one running, one queued: the third is refused without waiting
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let g = g.clone();
            tokio::spawn(async move { g.run(move || rx.recv().ok()).await })
        };
        let queued = {
            let g = g.clone();
            tokio::spawn(async move { g.run(|| ()).await })
        };
        while g.admitted.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        match g.run(|| ()).await {
            Err(AuthError::Unavailable(m)) => assert!(m.contains("busy"), "{m}"),
            other => panic!("{other:?}"),
        }
        tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
    }
}
