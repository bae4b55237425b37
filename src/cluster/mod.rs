//! A fleet of brokers on ZooKeeper (`[cluster]`).
//!
//! [`discovery`] registers every listener where stock Hive JDBC, Kyuubi's
//! JDBC driver and Knox look for HiveServer2 instances, and takes the
//! registrations away first when the broker drains. [`fleet`] elects one
//! broker to rotate the gateway token for all and keeps the rotation's
//! record in ZooKeeper, the token values sealed with [`seal`]'s key; every
//! broker follows the record.

pub mod discovery;
pub mod fleet;
pub mod seal;

use std::time::Duration;

use zookeeper_client as zk;

use crate::config::ClusterConfig;
use crate::secret::Secret;

/// Each ZooKeeper call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// A reconnection attempt costs one refused TCP connect, and every second
/// of it is a second of the fleet unregistered or without a leader after
/// ZooKeeper returns.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Reconnection attempts: a doubling wait from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`], and whether an outage is already reported (logged once,
/// not at every retry).
pub(crate) struct Backoff {
    wait: Duration,
    failing: bool,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            wait: BACKOFF_MIN,
            failing: false,
        }
    }

    /// Records a failed attempt; `true` for the first of an outage.
    pub(crate) fn failed(&mut self) -> bool {
        !std::mem::replace(&mut self.failing, true)
    }

    /// Records a success; `true` if it ends an outage.
    pub(crate) fn succeeded(&mut self) -> bool {
        self.wait = BACKOFF_MIN;
        std::mem::replace(&mut self.failing, false)
    }

    /// Waits before the next attempt; `false` if `stop` came first.
    pub(crate) async fn pause(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        let wait = self.wait;
        self.wait = (self.wait * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.digest_file {path}: {reason}")]
    Digest { path: String, reason: String },
    #[error(transparent)]
    Key(#[from] seal::KeyError),
}

/// A new session with `ensemble`, within `session_timeout`.
pub(crate) async fn connect(
    ensemble: &str,
    session_timeout: Duration,
    digest: Option<&Secret>,
) -> Result<zk::Client, String> {
    let mut c = zk::Client::connector()
        .with_session_timeout(session_timeout)
        .with_fail_eagerly();
    if let Some(d) = digest {
        c = c.with_auth("digest", d.expose().as_bytes());
    }
    match tokio::time::timeout(session_timeout, c.connect(ensemble)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(format!("connecting to {ensemble}: {e}")),
        Err(_) => Err(format!(
            "connecting to {ensemble}: no session within {session_timeout:?}"
        )),
    }
}

/// `user:password` from the digest file, checked now so a bad file fails
/// the start, not a later reconnect.
pub(crate) fn read_digest(cluster: &ClusterConfig) -> Result<Option<Secret>, ClusterError> {
    let Some(path) = &cluster.digest_file else {
        return Ok(None);
    };
    let bad = |reason: String| ClusterError::Digest {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let line = text.trim();
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() && !p.is_empty() && !line.contains('\n') => {
            Ok(Some(Secret::new(line.to_string())))
        }
        _ => Err(bad("must hold one line, user:password".into())),
    }
}

pub(crate) async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, zk::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}
