//! Listener registration in ZooKeeper, as HiveServer2 and Kyuubi do it.
//!
//! Each listener gets an ephemeral-sequential znode
//! `/<namespace>/serverUri=<host>:<port>;version=<v>;sequence=<n>` whose
//! data is HiveServer2's published configuration (`k=v;` pairs). A JDBC
//! client with `serviceDiscoveryMode=zooKeeper` lists the namespace's
//! children, picks one at random and connects where its data says.
//!
//! ZooKeeper being away never stops serving: the task reconnects with a
//! backoff and registers again, and a lost (expired) session is replaced by
//! a new one with new znodes. Draining deletes the znodes before the
//! listeners stop accepting.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zookeeper_client as zk;

use super::{bounded, read_digest, Backoff, ClusterError};
use crate::config::{ClientAuth, ClusterConfig, Config, ListenerConfig, Transport};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// The version in the znode name (Kyuubi writes its own version there).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One listener's znode, before ZooKeeper appends its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub listener: String,
    pub namespace: String,
    /// `/<namespace>/serverUri=host:port;version=v;sequence=`
    pub prefix: String,
    /// HiveServer2's published configuration.
    pub data: String,
}

/// What the listeners registered: for `/status` and the drain.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiscoveryStatus {
    pub zookeeper: String,
    pub connected: bool,
    /// Full znode paths registered now.
    pub znodes: Vec<String>,
    pub last_error: Option<String>,
}

/// The registration task; [`Discovery::deregister`] ends it.
pub struct Discovery {
    stop: CancellationToken,
    task: JoinHandle<()>,
    status: Arc<Mutex<DiscoveryStatus>>,
}

/// The znodes of `config`'s discovered listeners, with the addresses they
/// were bound to (a port of 0 in the config is the bound one here).
pub fn registrations(config: &Config, bound: &[(String, SocketAddr)]) -> Vec<Registration> {
    let Some(cluster) = &config.cluster else {
        return Vec::new();
    };
    config
        .discovered()
        .into_iter()
        .filter_map(|(l, namespace)| {
            let addr = bound.iter().find(|(n, _)| *n == l.name)?.1;
            let host = advertised_host(cluster, addr);
            let port = addr.port();
            Some(Registration {
                listener: l.name.clone(),
                prefix: format!("/{namespace}/serverUri={host}:{port};version={VERSION};sequence="),
                data: znode_data(l, &host, port),
                namespace,
            })
        })
        .collect()
}

/// Where clients are told to connect: the configured host, else the bound
/// address, else (a wildcard bind) this machine's host name.
pub(crate) fn advertised_host(cluster: &ClusterConfig, addr: SocketAddr) -> String {
    if let Some(h) = &cluster.advertise_host {
        return h.clone();
    }
    if !addr.ip().is_unspecified() {
        return addr.ip().to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// HiveServer2's published configuration for one listener, which Hive JDBC
/// applies (`ZooKeeperHiveClientHelper.applyConfs`) and Knox's
/// `HS2ZookeeperURLManager` reads.
fn znode_data(l: &ListenerConfig, host: &str, port: u16) -> String {
    let auth = match l.auth {
        ClientAuth::None => "NONE",
        ClientAuth::Ldap => "LDAP",
        ClientAuth::Kerberos => "KERBEROS",
        // a users file or a client certificate: HiveServer2's pluggable kind
        ClientAuth::Static | ClientAuth::Certificate => "CUSTOM",
    };
    let mut kv: Vec<(&str, String)> = vec![
        ("hive.server2.thrift.bind.host", host.to_string()),
        (
            "hive.server2.transport.mode",
            l.protocol.as_str().to_string(),
        ),
        // Hive JDBC sets the port from thrift.port unconditionally but from
        // thrift.http.port only while it has none: on failover it would keep
        // the first server's. So HTTP listeners publish both, the same port.
        ("hive.server2.thrift.port", port.to_string()),
    ];
    match l.protocol {
        Transport::Binary => {
            let qop = l
                .kerberos
                .as_ref()
                .filter(|_| l.auth == ClientAuth::Kerberos)
                .and_then(|k| k.qop.first())
                .map_or("auth", |q| q.as_str());
            kv.push(("hive.server2.thrift.sasl.qop", qop.to_string()));
        }
        Transport::Http => {
            kv.push(("hive.server2.thrift.http.port", port.to_string()));
            kv.push(("hive.server2.thrift.http.path", l.http_path.clone()));
        }
    }
    kv.push(("hive.server2.authentication", auth.to_string()));
    kv.push(("hive.server2.use.SSL", l.tls.is_some().to_string()));
    if let Some(p) = l
        .kerberos
        .as_ref()
        .filter(|_| l.auth == ClientAuth::Kerberos)
        .and_then(|k| k.principal.as_ref())
    {
        kv.push(("hive.server2.authentication.kerberos.principal", p.clone()));
    }
    kv.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

impl Discovery {
    /// Starts registering `regs` (none: nothing to do, `Ok(None)`).
    pub fn start(
        cluster: &ClusterConfig,
        regs: Vec<Registration>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Discovery>, ClusterError> {
        if regs.is_empty() {
            return Ok(None);
        }
        let digest = read_digest(cluster)?;
        let status = Arc::new(Mutex::new(DiscoveryStatus {
            zookeeper: cluster.zookeeper.clone(),
            ..Default::default()
        }));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Registrar {
                ensemble: cluster.zookeeper.clone(),
                session_timeout: cluster.session_timeout,
                digest,
                regs,
                metrics,
                status: status.clone(),
            }
            .run(stop.clone()),
        );
        Ok(Some(Discovery { stop, task, status }))
    }

    pub fn status(&self) -> Arc<Mutex<DiscoveryStatus>> {
        self.status.clone()
    }

    /// Deletes the znodes and ends the ZooKeeper session; bounded by
    /// `limit`, after which the session's end removes them anyway.
    pub async fn deregister(self, limit: Duration) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            warn!("ZooKeeper: deregistering took longer than {limit:?}; the session's end removes the znodes");
            task.abort();
        }
    }
}

struct Registrar {
    ensemble: String,
    session_timeout: Duration,
    digest: Option<Secret>,
    regs: Vec<Registration>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<DiscoveryStatus>>,
}

impl Registrar {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let attempt = async {
                let client = self.connect().await?;
                let paths = self.register(&client).await?;
                Ok::<_, String>((client, paths))
            };
            let (client, paths) = tokio::select! {
                _ = stop.cancelled() => return,
                r = attempt => match r {
                    Ok(ok) => ok,
                    Err(e) => {
                        self.metrics.discovery(None);
                        self.set(|s| {
                            s.connected = false;
                            s.znodes.clear();
                            s.last_error = Some(e.clone());
                        });
                        if backoff.failed() {
                            warn!(zookeeper = %self.ensemble, "ZooKeeper: cannot register the listeners ({e}); still serving, retrying");
                        }
                        if !backoff.pause(&stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            backoff.succeeded();
            self.metrics.discovery(Some(paths.len()));
            self.set(|s| {
                s.connected = true;
                s.znodes = paths.clone();
                s.last_error = None;
            });
            info!(zookeeper = %self.ensemble, znodes = ?paths, "registered in ZooKeeper");
            if self.hold(&client, &paths, &stop).await {
                return;
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut DiscoveryStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn connect(&self) -> Result<zk::Client, String> {
        super::connect(&self.ensemble, self.session_timeout, self.digest.as_ref()).await
    }

    /// Creates the namespaces (persistent) and the listeners' znodes
    /// (ephemeral-sequential); returns their paths.
    async fn register(&self, client: &zk::Client) -> Result<Vec<String>, String> {
        // anyone may read (clients are not authenticated); with a digest
        // user, only this user may change or delete
        let read_all = [
            zk::Acl::new(zk::Permission::READ, zk::AuthId::anyone()),
            zk::Acl::new(zk::Permission::ALL, zk::AuthId::authed()),
        ];
        let acls = match self.digest {
            Some(_) => zk::Acls::new(&read_all),
            None => zk::Acls::anyone_all(),
        };
        let call = |what: String| move |e: String| format!("{what}: {e}");
        let mut paths = Vec::new();
        for r in &self.regs {
            let ns = format!("/{}", r.namespace);
            // the namespace stays open to other brokers of the fleet
            let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
            bounded(client.mkdir(&ns, &dir))
                .await
                .map_err(call(format!("creating {ns}")))?;
            let mode = zk::CreateMode::EphemeralSequential.with_acls(acls);
            let (_, seq) = bounded(client.create(&r.prefix, r.data.as_bytes(), &mode))
                .await
                .map_err(call(format!("registering listener '{}'", r.listener)))?;
            paths.push(format!("{}{seq}", r.prefix));
        }
        Ok(paths)
    }

    /// Holds the registration until `stop` (deletes the znodes: `true`) or
    /// the session is lost (`false`: register again).
    async fn hold(&self, client: &zk::Client, paths: &[String], stop: &CancellationToken) -> bool {
        let mut states = client.state_watcher();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    for p in paths {
                        if let Err(e) = bounded(client.delete(p, None)).await {
                            warn!(znode = %p, "ZooKeeper: could not delete ({e}); the session's end removes it");
                        }
                    }
                    self.metrics.discovery(Some(0));
                    self.set(|s| s.znodes.clear());
                    info!(zookeeper = %self.ensemble, "deregistered from ZooKeeper");
                    return true;
                }
                state = states.changed() => {
                    if state.is_terminated() {
                        // the znodes went with the session: a new session
                        // registers them again
                        warn!(zookeeper = %self.ensemble, ?state, "ZooKeeper session lost; registering again");
                        self.metrics.discovery(None);
                        self.set(|s| {
                            s.connected = false;
                            s.znodes.clear();
                            s.last_error = Some(format!("session {state:?}"));
                        });
                        return false;
                    }
                    let connected = state == zk::SessionState::SyncConnected;
                    if !connected {
                        warn!(zookeeper = %self.ensemble, ?state, "ZooKeeper disconnected; the znodes stay while the session lives");
                    } else {
                        info!(zookeeper = %self.ensemble, "ZooKeeper connection back");
                    }
                    self.set(|s| s.connected = connected);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test").unwrap()
    }

    const BASE: &str = r#"
[cluster]
zookeeper = "127.0.0.1:2181"
[[listener]]
name = "b"
protocol = "binary"
bind = "127.0.0.1:10009"
route = "r"
auth = "none"
allow_any_user = true
[[listener]]
name = "h"
protocol = "http"
bind = "127.0.0.1:10010"
route = "r"
auth = "none"
allow_any_user = true
http_path = "cliservice"
[[listener]]
name = "hidden"
protocol = "binary"
bind = "127.0.0.1:10011"
route = "r"
auth = "none"
allow_any_user = true
discovery = false
[routes.r.upstream]
transport = "binary"
host = "127.0.0.1"
port = 10000
"#;

    fn bound() -> Vec<(String, SocketAddr)> {
        vec![
            ("b".into(), "127.0.0.1:10009".parse().unwrap()),
            ("h".into(), "127.0.0.1:10010".parse().unwrap()),
            ("hidden".into(), "127.0.0.1:10011".parse().unwrap()),
        ]
    }

    #[test]
    fn binary_listeners_register_as_hiveserver2_does_and_http_ones_in_their_own_namespace() {
        let regs = registrations(&config(BASE), &bound());
        assert_eq!(regs.len(), 2, "discovery = false is not registered");
        assert_eq!(regs[0].namespace, "kyuubi-broker");
        assert_eq!(
            regs[0].prefix,
            format!("/kyuubi-broker/serverUri=127.0.0.1:10009;version={VERSION};sequence=")
        );
        assert_eq!(
            regs[0].data,
            "hive.server2.thrift.bind.host=127.0.0.1;hive.server2.transport.mode=binary;\
             hive.server2.thrift.port=10009;hive.server2.thrift.sasl.qop=auth;\
             hive.server2.authentication=NONE;hive.server2.use.SSL=false"
        );
        assert_eq!(regs[1].namespace, "kyuubi-broker-http");
        assert_eq!(
            regs[1].data,
            "hive.server2.thrift.bind.host=127.0.0.1;hive.server2.transport.mode=http;\
             hive.server2.thrift.port=10010;hive.server2.thrift.http.port=10010;\
             hive.server2.thrift.http.path=cliservice;hive.server2.authentication=NONE;\
             hive.server2.use.SSL=false"
        );
    }

    #[test]
    fn the_advertised_host_replaces_the_bind_address() {
        let text = BASE.replace(
            "zookeeper = \"127.0.0.1:2181\"",
            "zookeeper = \"127.0.0.1:2181\"\nadvertise_host = \"broker1.example.com\"\nnamespace = \"fleet\"\nhttp_namespace = \"fleet-h\"",
        );
        let regs = registrations(&config(&text), &bound());
        assert!(regs[0]
            .prefix
            .starts_with("/fleet/serverUri=broker1.example.com:10009;"));
        assert!(regs[0]
            .data
            .starts_with("hive.server2.thrift.bind.host=broker1.example.com;"));
        assert_eq!(regs[1].namespace, "fleet-h");
    }

    #[test]
    fn cluster_keys_are_checked_at_startup_naming_the_key() {
        for (from, to, key) in [
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"127.0.0.1\"",
                "cluster.zookeeper",
            ),
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"h:2181/chroot\"",
                "cluster.zookeeper",
            ),
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"h:2181\"\nnamespace = \"a/b\"",
                "cluster.namespace",
            ),
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"h:2181\"\nhttp_namespace = \"kyuubi-broker\"",
                "cluster.http_namespace",
            ),
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"h:2181\"\nsession_timeout = \"100ms\"",
                "cluster.session_timeout",
            ),
            (
                "zookeeper = \"127.0.0.1:2181\"",
                "zookeeper = \"h:2181\"\ndigest_file = \"/nonexistent/kb-digest\"",
                "cluster.digest_file",
            ),
        ] {
            let text = BASE.replace(from, to);
            let e = Config::from_toml(&text, "test").unwrap_err().to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
        let text = BASE.replace("[cluster]\nzookeeper = \"127.0.0.1:2181\"\n", "");
        let text = text.replace("discovery = false", "zookeeper_namespace = \"x\"");
        let e = Config::from_toml(&text, "test").unwrap_err().to_string();
        assert!(
            e.contains("zookeeper_namespace") && e.contains("[cluster]"),
            "{e}"
        );
    }

    #[test]
    fn a_digest_file_must_hold_user_colon_password() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("digest");
        let mut c = config(BASE).cluster.unwrap();
        c.digest_file = Some(f.clone());
        std::fs::write(&f, "no-colon\n").unwrap();
        let e = read_digest(&c).unwrap_err().to_string();
        assert!(
            e.contains("user:password") && !e.contains("no-colon"),
            "{e}"
        );
        std::fs::write(&f, "broker:s3cret\n").unwrap();
        assert_eq!(read_digest(&c).unwrap().unwrap().expose(), "broker:s3cret");
    }
}
