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
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes < 1024 || self.max_message_bytes > 1 << 31 {
            return Err(invalid(
                "server.max_message_bytes",
                format!("{} is out of range", self.max_message_bytes),
                "use a value between 1024 and 2147483648 (default 104857600 = 100 MiB)",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1",
                "remove it to use 4096",
            ));
        }
        Ok(())
    }
}
