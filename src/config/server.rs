use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest Thrift message or SASL frame accepted, in bytes.
    pub max_message_bytes: usize,
    /// Time a new client has to finish its SASL handshake.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// On shutdown, how long in-flight RPCs may take to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Session and operation handles unused this long are forgotten.
    #[serde(with = "duration")]
    pub session_idle_timeout: Duration,
    /// Client connections served at once, over all listeners.
    pub max_connections: usize,
    /// RPCs slower than this are logged at WARN with their statement
    /// (truncated); "0s" turns the slow-RPC log off.
    #[serde(with = "duration")]
    pub slow_rpc_threshold: Duration,
    /// Runtime worker threads; 0 = one per CPU. One thread saves a cross-
    /// thread wake-up per RPC (lower latency) at the cost of parallelism.
    pub worker_threads: usize,

    // ---- before login: nothing unbounded (issue 10) ----
    /// Largest message accepted before a client is authenticated: a SASL
    /// negotiation message, a NOSASL client's first OpenSession, an HTTP
    /// request's headers and body before its credentials are checked.
    pub handshake_max_bytes: usize,
    /// Failed logins a (user, client address) pair gets before each further
    /// attempt waits for a doubling delay.
    pub login_free_failures: u32,
    /// The longest such delay.
    #[serde(with = "duration")]
    pub login_backoff_max: Duration,
    /// Failed logins one client address may have within
    /// `login_failure_window` before all its logins are refused until the
    /// window ends.
    pub login_failures_per_ip: u32,
    #[serde(with = "duration")]
    pub login_failure_window: Duration,
    /// Password checks (argon2, LDAP) run on this many dedicated threads,
    /// never on the async workers.
    pub auth_threads: usize,
    /// Password checks waiting for a thread; beyond this a login is refused
    /// at once as "authentication service busy" (retryable).
    pub auth_queue: usize,

    // ---- connection caps (names after Kyuubi's kyuubi.server.limit.connections.*) ----
    /// Client connections from one address, over all listeners.
    pub max_connections_per_ip: usize,
    /// Client connections authenticated as one user, over all listeners.
    pub max_connections_per_user: usize,
    /// Live upstream sessions one user may hold, over all listeners and
    /// routes (binary and HTTP clients alike); an OpenSession beyond it is
    /// refused before it reaches the upstream.
    pub max_sessions_per_user: usize,
    /// Client addresses or CIDR blocks refused at accept, e.g.
    /// `["192.0.2.7", "10.1.0.0/16", "2001:db8::/32"]`.
    pub deny_clients: Vec<String>,

    /// Time an HTTP client has to send a request body once its headers are in.
    #[serde(with = "duration")]
    pub http_body_timeout: Duration,
    /// A logged-in binary client's connection is closed when no complete
    /// request arrives for this long. A client waiting on a long query
    /// polls (GetOperationStatus) or waits for a reply, so it never trips
    /// this; time spent waiting on the upstream does not count.
    #[serde(with = "duration")]
    pub client_idle_timeout: Duration,
    /// A reply (or one part of a relayed one) the client does not take
    /// within this long closes its connection: a client that stops reading
    /// holds no upstream link and no buffered reply for ever.
    #[serde(with = "duration")]
    pub client_write_timeout: Duration,
    /// Security events (logins, mapping decisions, refused handles, cap
    /// refusals, token lifecycle) as JSON lines, appended to this file
    /// (created with mode 0600). Unset: they stay in the ordinary log only.
    pub audit_log: Option<std::path::PathBuf>,
    /// Bytes for cached metadata answers over all routes (one answer may
    /// take an eighth; recordings in flight count too).
    pub metadata_cache_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message_bytes: 100 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            session_idle_timeout: Duration::from_secs(6 * 3600),
            max_connections: 4096,
            slow_rpc_threshold: Duration::from_secs(10),
            worker_threads: 0,
            handshake_max_bytes: 64 * 1024,
            login_free_failures: 3,
            login_backoff_max: Duration::from_secs(30),
            login_failures_per_ip: 50,
            login_failure_window: Duration::from_secs(60),
            auth_threads: 2,
            auth_queue: 64,
            max_connections_per_ip: 1024,
            max_connections_per_user: 1024,
            max_sessions_per_user: 256,
            deny_clients: Vec::new(),
            http_body_timeout: Duration::from_secs(60),
            client_idle_timeout: Duration::from_secs(3600),
            client_write_timeout: Duration::from_secs(120),
            audit_log: None,
            metadata_cache_bytes: 64 * 1024 * 1024,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.metadata_cache_bytes < 1 << 20 || self.metadata_cache_bytes > 1 << 34 {
            return Err(invalid(
                "server.metadata_cache_bytes",
                format!("{} is out of range", self.metadata_cache_bytes),
                "use a value between 1048576 (1 MiB) and 17179869184 (16 GiB), default 67108864 (64 MiB); turn the cache off per route with cache = false",
            ));
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > 1 << 31 {
            return Err(invalid(
                "server.max_message_bytes",
                format!("{} is out of range", self.max_message_bytes),
                "use a value between 1024 and 2147483648 (default 104857600 = 100 MiB)",
            ));
        }
        let at_least_one = [
            ("server.max_connections", self.max_connections, "4096"),
            (
                "server.max_connections_per_ip",
                self.max_connections_per_ip,
                "1024",
            ),
            (
                "server.max_connections_per_user",
                self.max_connections_per_user,
                "1024",
            ),
            (
                "server.max_sessions_per_user",
                self.max_sessions_per_user,
                "256",
            ),
            ("server.auth_threads", self.auth_threads, "2"),
            ("server.auth_queue", self.auth_queue, "64"),
            (
                "server.login_failures_per_ip",
                self.login_failures_per_ip as usize,
                "50",
            ),
        ];
        for (key, v, default) in at_least_one {
            if v == 0 {
                return Err(invalid(
                    key,
                    "must be at least 1",
                    format!("remove it to use {default}"),
                ));
            }
        }
        if self.handshake_max_bytes < 1024 || self.handshake_max_bytes > self.max_message_bytes {
            return Err(invalid(
                "server.handshake_max_bytes",
                format!("{} is out of range", self.handshake_max_bytes),
                "use a value between 1024 and server.max_message_bytes (default 65536)",
            ));
        }
        let positive = [
            ("server.handshake_timeout", self.handshake_timeout),
            ("server.login_failure_window", self.login_failure_window),
            ("server.http_body_timeout", self.http_body_timeout),
            ("server.client_idle_timeout", self.client_idle_timeout),
            ("server.client_write_timeout", self.client_write_timeout),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return Err(invalid(
                    key,
                    "must be longer than 0s",
                    "remove it to use the default",
                ));
            }
        }
        for (i, c) in self.deny_clients.iter().enumerate() {
            if IpBlock::parse(c).is_none() {
                return Err(invalid(
                    format!("server.deny_clients[{i}]"),
                    format!("'{c}' is not an address or CIDR block"),
                    "write e.g. \"192.0.2.7\", \"10.1.0.0/16\" or \"2001:db8::/32\"",
                ));
            }
        }
        Ok(())
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address, so one client is one
/// client whichever socket family accepted it.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address or CIDR block of `server.deny_clients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    net: std::net::IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or one with `/n`.
    pub fn parse(s: &str) -> Option<IpBlock> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (s.trim(), None),
        };
        let net: std::net::IpAddr = addr.parse().ok()?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(IpBlock { net, prefix })
    }

    /// Whether `ip` is in this block; an IPv4-mapped IPv6 address counts
    /// as its IPv4 address.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = canonical_ip(ip);
        let (a, b, bits) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl ServerConfig {
    /// The parsed deny list (validated at startup).
    pub fn deny_blocks(&self) -> Vec<IpBlock> {
        self.deny_clients
            .iter()
            .filter_map(|c| IpBlock::parse(c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_blocks_match_addresses_and_cidr_ranges() {
        let b = |s| IpBlock::parse(s).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(b("10.1.0.0/16").contains(ip("10.1.200.3")));
        assert!(!b("10.1.0.0/16").contains(ip("10.2.0.1")));
        assert!(b("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!b("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(b("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(b("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(b("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!b("2001:db8::/32").contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(IpBlock::parse(bad).is_none(), "{bad}");
        }
    }
}
