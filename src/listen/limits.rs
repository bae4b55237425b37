//! Connection caps and the deny list (names after Kyuubi's
//! `kyuubi.server.limit.connections.*`). [`Limits::admit`] decides at accept:
//! the deny list, then the global, listener and per-address caps; a client
//! admitted holds a [`Slot`] that gives its places back when dropped.
//! [`Limits::user_slot`] is the per-user cap, taken once a connection has
//! authenticated. A refused client is told why by its transport, never left
//! waiting in the backlog.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::info;

use crate::config::{canonical_ip, IpBlock, ServerConfig};
use crate::error::{Cap, RpcError};
use crate::metrics::Metrics;

/// Refused connections answered at once; beyond this a refused client is
/// closed without an answer. Each answer ends within the handshake timeout,
/// so a flood of refused clients costs at most this many small tasks.
const ANSWERING: usize = 256;

/// The caps every listener shares.
pub struct Limits {
    deny: Vec<IpBlock>,
    global: Counter,
    per_ip: Keyed<IpAddr>,
    per_user: Keyed<String>,
    answering: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// One listener's own cap (`max_connections` of its `[[listener]]`).
pub struct Gate {
    pub name: Arc<str>,
    count: Option<Counter>,
}

impl Gate {
    pub fn new(name: &str, max: Option<usize>) -> Arc<Gate> {
        Arc::new(Gate {
            name: name.into(),
            count: max.map(Counter::new),
        })
    }
}

/// The places an admitted connection holds; released on drop.
pub struct Slot {
    _global: Held,
    _listener: Option<Held>,
    _ip: KeyHeld<IpAddr>,
}

/// A connection counted against its user's cap; released on drop.
pub struct UserSlot {
    user: KeyHeld<String>,
}

impl UserSlot {
    pub fn user(&self) -> &str {
        &self.user.key
    }
}

/// A connection refused at accept, to be answered with `error` (once, by
/// its transport, under the handshake timeout and size cap).
pub struct Refusal {
    pub error: RpcError,
    _answering: OwnedSemaphorePermit,
}

/// What [`Limits::admit`] decided.
pub enum Admission {
    Admitted(Slot),
    Refused(Refusal),
    /// Denied, or refused while too many refusals are being answered:
    /// close without reading.
    Close,
}

impl Limits {
    pub fn new(server: &ServerConfig, metrics: Arc<Metrics>) -> Arc<Limits> {
        Arc::new(Limits {
            deny: server.deny_blocks(),
            global: Counter::new(server.max_connections),
            per_ip: Keyed::new(server.max_connections_per_ip),
            per_user: Keyed::new(server.max_connections_per_user),
            answering: Arc::new(Semaphore::new(ANSWERING)),
            metrics,
        })
    }

    /// The decision at accept for a client at `ip` on `gate`'s listener.
    pub fn admit(&self, gate: &Gate, ip: IpAddr) -> Admission {
        let ip = canonical_ip(ip);
        if self.deny.iter().any(|b| b.contains(ip)) {
            self.refused(&gate.name, "denied", ip, None, 0);
            return Admission::Close;
        }
        let slot = self.take(gate, ip);
        match slot {
            Ok(s) => Admission::Admitted(s),
            Err((cap, limit)) => {
                self.refused(&gate.name, cap.reason(), ip, None, limit);
                match self.answering.clone().try_acquire_owned() {
                    Ok(p) => Admission::Refused(Refusal {
                        error: RpcError::Limit { cap, limit },
                        _answering: p,
                    }),
                    Err(_) => Admission::Close,
                }
            }
        }
    }

    fn take(&self, gate: &Gate, ip: IpAddr) -> Result<Slot, (Cap, usize)> {
        let global = self.global.take().ok_or((Cap::Global, self.global.max))?;
        let listener = match &gate.count {
            Some(c) => Some(c.take().ok_or((Cap::Listener, c.max))?),
            None => None,
        };
        let ip = self.per_ip.take(ip).ok_or((Cap::PerIp, self.per_ip.max))?;
        Ok(Slot {
            _global: global,
            _listener: listener,
            _ip: ip,
        })
    }

    /// Counts a connection of `listener` authenticated as `user`, or
    /// refuses it at `server.max_connections_per_user`.
    pub fn user_slot(
        &self,
        listener: &Arc<str>,
        user: &str,
        ip: IpAddr,
    ) -> Result<UserSlot, RpcError> {
        match self.per_user.take(user.to_string()) {
            Some(user) => Ok(UserSlot { user }),
            None => {
                let limit = self.per_user.max;
                self.refused(listener, Cap::PerUser.reason(), ip, Some(user), limit);
                Err(RpcError::Limit {
                    cap: Cap::PerUser,
                    limit,
                })
            }
        }
    }

    fn refused(
        &self,
        listener: &Arc<str>,
        reason: &'static str,
        ip: IpAddr,
        user: Option<&str>,
        limit: usize,
    ) {
        self.metrics.connection_refused(listener, reason);
        info!(target: "audit", event = "cap_refused", listener = %listener, reason,
            client = %canonical_ip(ip), user = user.unwrap_or(""), limit);
    }

    /// Connections open over all listeners (for tests and status).
    pub fn open(&self) -> usize {
        self.global.count.load(Ordering::Relaxed)
    }

    /// Addresses with a connection open: the per-address map holds no
    /// others.
    pub fn tracked_addresses(&self) -> usize {
        self.per_ip.len()
    }
}

struct Counter {
    count: Arc<AtomicUsize>,
    max: usize,
}

impl Counter {
    fn new(max: usize) -> Counter {
        Counter {
            count: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    fn take(&self) -> Option<Held> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Held(self.count.clone()))
    }
}

struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts per key; a key's entry is removed when its count returns to 0,
/// so the map holds only keys with a connection open.
struct Keyed<K> {
    map: Arc<Mutex<HashMap<K, usize>>>,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Keyed<K> {
    fn new(max: usize) -> Keyed<K> {
        Keyed {
            map: Arc::new(Mutex::new(HashMap::new())),
            max,
        }
    }

    fn take(&self, key: K) -> Option<KeyHeld<K>> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyHeld {
            map: self.map.clone(),
            key,
        })
    }

    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

struct KeyHeld<K: std::hash::Hash + Eq> {
    map: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: std::hash::Hash + Eq> Drop for KeyHeld<K> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(toml: &str) -> Arc<Limits> {
        let server: ServerConfig = toml::from_str(toml).unwrap();
        Limits::new(&server, Arc::new(Metrics::new()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn refused_by(a: Admission) -> Cap {
        match a {
            Admission::Refused(Refusal {
                error: RpcError::Limit { cap, .. },
                ..
            }) => cap,
            _ => panic!("expected a cap refusal"),
        }
    }

    #[test]
    fn each_cap_refuses_at_its_limit_and_frees_its_place_on_drop() {
        let l = limits("max_connections = 3\nmax_connections_per_ip = 2");
        let gate = Gate::new("b", Some(10));
        let a = ip("10.0.0.1");
        let s1 = l.admit(&gate, a);
        let s2 = l.admit(&gate, a);
        assert_eq!(refused_by(l.admit(&gate, a)), Cap::PerIp);
        let s3 = l.admit(&gate, ip("10.0.0.2"));
        assert_eq!(refused_by(l.admit(&gate, ip("10.0.0.3"))), Cap::Global);
        assert_eq!(l.open(), 3, "a refusal holds no place");
        drop((s1, s2));
        assert_eq!((l.open(), l.tracked_addresses()), (1, 1));
        drop(s3);
        assert_eq!((l.open(), l.tracked_addresses()), (0, 0));
        let small = Gate::new("h", Some(1));
        let _k = l.admit(&small, a);
        assert_eq!(refused_by(l.admit(&small, a)), Cap::Listener);
    }

    #[test]
    fn a_denied_address_is_closed_and_an_ipv4_mapped_one_counts_as_ipv4() {
        let l = limits("deny_clients = [\"192.0.2.0/24\"]\nmax_connections_per_ip = 1");
        let gate = Gate::new("b", None);
        assert!(matches!(
            l.admit(&gate, ip("::ffff:192.0.2.9")),
            Admission::Close
        ));
        let _held = l.admit(&gate, ip("10.0.0.1"));
        assert_eq!(
            refused_by(l.admit(&gate, ip("::ffff:10.0.0.1"))),
            Cap::PerIp
        );
    }

    #[test]
    fn the_user_cap_counts_over_listeners_and_forgets_users_with_none_open() {
        let l = limits("max_connections_per_user = 1");
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = l.user_slot(&a, "alice", ip("10.0.0.1")).unwrap();
        let e = l.user_slot(&b, "alice", ip("10.0.0.2")).err().unwrap();
        assert!(matches!(
            e,
            RpcError::Limit {
                cap: Cap::PerUser,
                limit: 1
            }
        ));
        assert!(l.user_slot(&b, "bob", ip("10.0.0.2")).is_ok());
        drop(first);
        assert!(l.per_user.len() == 0);
        assert!(l.user_slot(&b, "alice", ip("10.0.0.2")).is_ok());
    }
}
