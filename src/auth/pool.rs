//! The threads that check passwords. argon2 is CPU work by design and an
//! LDAP bind blocks; both stay off the async workers. The threads run at a
//! lower scheduling priority (nice +10): a flood of wrong passwords then gets
//! the CPU time the RPC path leaves over, instead of an equal share of it.
//! With tokio's shared blocking pool it got an equal share, and on a 2-core
//! machine a logged-in client's p99 rose thirtyfold during a flood.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use tracing::warn;

/// How much lower than the broker's other threads password checks run.
const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of `kyuubi-auth-<n>` threads taking jobs in arrival order.
/// The queue is not bounded here: the caller admits at most as many jobs
/// as it allows to wait.
pub struct AuthPool {
    tx: Sender<Job>,
}

impl AuthPool {
    pub fn new(threads: usize) -> AuthPool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("kyuubi-auth-{n}"))
                .spawn(move || serve(&rx))
                .expect("spawning a password-check thread");
        }
        AuthPool { tx }
    }

    /// Runs `f` on a pool thread; `None` if it panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // a panic drops `done`: the caller sees None, the thread lives on
            if let Ok(v) = catch_unwind(AssertUnwindSafe(f)) {
                let _ = done.send(v);
            }
        });
        self.tx.send(job).ok()?;
        result.await.ok()
    }
}

fn serve(rx: &Mutex<Receiver<Job>>) {
    // Linux nice values are per thread: this lowers this thread only
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), NICE) {
        warn!(error = %e, "password-check thread keeps normal priority");
    }
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_thread(name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if comm.trim_end() == name {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // fields after the parenthesised name; nice is field 19
                let rest = &stat[stat.rfind(')')? + 2..];
                return rest.split(' ').nth(16)?.parse().ok();
            }
        }
        None
    }

    #[tokio::test]
    async fn jobs_run_on_lower_priority_threads_and_a_panic_is_contained() {
        let pool = AuthPool::new(1);
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("kyuubi-auth-0"));
        assert_eq!(nice_of_thread("kyuubi-auth-0"), Some(NICE));
        assert_eq!(pool.run(|| panic!("boom")).await, None::<()>);
        // the one thread survived its job's panic
        assert_eq!(pool.run(|| 7).await, Some(7));
    }
}
