use std::net::SocketAddr;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// The admin listener: /metrics, /healthz, /readyz, /status.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// Required to bind anywhere but loopback: /status names users and routes.
    #[serde(default)]
    pub allow_remote: bool,
    /// Admin connections served at once (scrapers and operators are few).
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
}

fn default_admin_connections() -> usize {
    16
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10019))
}

impl AdminConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.bind.ip().is_loopback() && !self.allow_remote {
            return Err(invalid(
                "admin.bind",
                format!("{} is not a loopback address", self.bind),
                "bind 127.0.0.1:10019, or set allow_remote = true to expose metrics and status",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid(
                "admin.max_connections",
                "must be at least 1",
                "remove it to use 16",
            ));
        }
        Ok(())
    }
}
