//! `[cluster]`: a fleet of brokers on ZooKeeper. Each listener registers
//! where stock Hive JDBC and Kyuubi clients look (`serviceDiscoveryMode=
//! zooKeeper`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError, Transport};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The ensemble, `h1:2181,h2:2181` (as in a JDBC URL's authority).
    pub zookeeper: String,
    /// Where binary listeners register: `/<namespace>`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Where HTTP listeners register; default `<namespace>-http`, so that
    /// one discovery URL always picks one transport.
    #[serde(default)]
    pub http_namespace: Option<String>,
    #[serde(default = "default_session_timeout", with = "duration")]
    pub session_timeout: Duration,
    /// The host name or address clients are told to connect to; default:
    /// the listener's bind address, or this machine's host name when it
    /// binds a wildcard address.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// A file holding `user:password` for ZooKeeper digest auth (never the
    /// config text). With it, the broker's znodes are writable by that
    /// user only and readable by anyone (clients read them unauthenticated).
    #[serde(default)]
    pub digest_file: Option<PathBuf>,
    /// The fleet's key sealing the token values in ZooKeeper (AES-256-GCM):
    /// a file of 64 hex digits, mode 0600, the same on every broker. Without
    /// it, `KYUUBI_BROKER_FLEET_KEY` holds the hex digits. Never the config
    /// text: configs get copied around, keys must not.
    #[serde(default)]
    pub token_key_file: Option<PathBuf>,
    /// After SIGTERM, how long the broker still accepts once its znodes are
    /// gone: for clients that read them just before.
    #[serde(default = "default_deregister_grace", with = "duration")]
    pub deregister_grace: Duration,
}

fn default_namespace() -> String {
    "kyuubi-broker".into()
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_deregister_grace() -> Duration {
    Duration::from_secs(1)
}

impl ClusterConfig {
    /// The namespace a listener of `protocol` registers in, unless it names
    /// its own.
    pub fn namespace_for(&self, protocol: Transport) -> String {
        match protocol {
            Transport::Binary => self.namespace.clone(),
            Transport::Http => self
                .http_namespace
                .clone()
                .unwrap_or_else(|| format!("{}-http", self.namespace)),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let hosts: Vec<&str> = self.zookeeper.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty() || !h.contains(':')) {
            return Err(invalid(
                "cluster.zookeeper",
                "must list host:port pairs separated by commas",
                "e.g. zookeeper = \"zk1:2181,zk2:2181\"",
            ));
        }
        if self.zookeeper.contains('/') {
            return Err(invalid(
                "cluster.zookeeper",
                "must not carry a chroot path (Hive JDBC URLs cannot express one)",
                "put the path in cluster.namespace instead",
            ));
        }
        for (key, ns) in [
            ("cluster.namespace", Some(&self.namespace)),
            ("cluster.http_namespace", self.http_namespace.as_ref()),
        ] {
            if let Some(ns) = ns {
                check_namespace(key, ns)?;
            }
        }
        if self.namespace_for(Transport::Binary) == self.namespace_for(Transport::Http) {
            return Err(invalid(
                "cluster.http_namespace",
                "is the same as cluster.namespace",
                "give HTTP listeners a namespace of their own: a client picks a random child of a namespace, and Hive JDBC keeps the first server's port when it fails over",
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(600)).contains(&self.session_timeout) {
            return Err(invalid(
                "cluster.session_timeout",
                "must be between 2 s and 10 min",
                "e.g. \"30s\" (ZooKeeper also bounds it by its min/maxSessionTimeout)",
            ));
        }
        if self.deregister_grace > Duration::from_secs(60) {
            return Err(invalid(
                "cluster.deregister_grace",
                "must be at most 60 s",
                "e.g. \"1s\"",
            ));
        }
        if let Some(h) = &self.advertise_host {
            if h.is_empty() || h.contains([';', '=', '/', ' ']) {
                return Err(invalid(
                    "cluster.advertise_host",
                    "must be a host name or address",
                    "e.g. advertise_host = \"broker1.example.com\"",
                ));
            }
        }
        Ok(())
    }
}

/// A namespace is one znode name under the root: Hive JDBC strips a
/// leading and trailing `/`, and its znode data cannot hold `;` or `=`.
pub(super) fn check_namespace(key: &str, ns: &str) -> Result<(), ConfigError> {
    let bad = ns.is_empty()
        || ns.contains(['/', ';', '=', ' ', ','])
        || ns == "zookeeper"
        || ns.starts_with('.');
    if bad {
        return Err(invalid(
            key,
            "must be one znode name (no '/', ';', '=', ',' or spaces; not 'zookeeper')",
            "e.g. \"kyuubi-broker\"",
        ));
    }
    Ok(())
}
