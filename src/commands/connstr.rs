//! `kyuubi-broker connstr`: prints a JDBC URL on one line.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, Transport};
use crate::connstr::{build, Auth, ConnSpec, Tls};
use crate::secret::Secret;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("auth").args(["token", "token_file", "principal", "user"])))]
pub struct ConnstrArgs {
    /// Server host; with --zookeeper, the ensemble `h1:2181,h2:2181`.
    #[arg(long, required_unless_present = "local")]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Gateway token, placed in the HTTP path (port 80 by default).
    #[arg(long)]
    pub token: Option<String>,
    /// Read the token from this file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Kerberos server principal, e.g. kyuubi/_HOST@REALM.
    #[arg(long)]
    pub principal: Option<String>,
    /// User name (LDAP or plain); the password is given to the client, not put in the URL.
    #[arg(long)]
    pub user: Option<String>,
    /// Print the broker's own endpoints from --config instead.
    #[arg(long, requires = "config")]
    pub local: bool,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "cliservice")]
    pub http_path: String,
    /// Use HTTP transport (implied by --token).
    #[arg(long)]
    pub http: bool,
    #[arg(long)]
    pub db: Option<String>,
    /// TLS (`ssl=true`); with --token and no --port, port 443.
    #[arg(long)]
    pub ssl: bool,
    /// Java trust store for `sslTrustStore` (with --ssl, or --local for
    /// TLS listeners).
    #[arg(long)]
    pub truststore: Option<String>,
    /// Environment variable holding the trust store password.
    #[arg(long)]
    pub truststore_password_env: Option<String>,
    /// Discover servers through ZooKeeper.
    #[arg(long)]
    pub zookeeper: bool,
    #[arg(long, default_value = "kyuubi")]
    pub namespace: String,
    /// Extra `?key=value` configuration, repeatable.
    #[arg(long = "conf", value_parser = parse_kv)]
    pub conf: Vec<(String, String)>,
    /// Show secrets instead of `****`.
    #[arg(long)]
    pub show_secret: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not key=value"))
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(64)
}

pub fn run(a: ConnstrArgs) -> ExitCode {
    if a.local {
        return local(&a);
    }
    if !a.ssl && (a.truststore.is_some() || a.truststore_password_env.is_some()) {
        return fail("--truststore and --truststore-password-env need --ssl");
    }
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => return fail(format!("{}: {e}", f.display())),
        },
        _ => None,
    };
    let auth = match (token, &a.principal, &a.user) {
        (Some(t), _, _) => Auth::Token {
            value: Secret::new(t),
            http_path: a.http_path.clone(),
        },
        (None, Some(p), _) => Auth::Kerberos {
            principal: p.clone(),
        },
        (None, None, Some(u)) => Auth::User { name: u.clone() },
        _ => Auth::None,
    };
    let host = a.host.clone().unwrap_or_default();
    // a gateway: 80 through the internal (VPC) domain, 443 (HTTPS)
    // through the public one
    let default_port = match (&auth, a.zookeeper, a.ssl) {
        (_, true, _) => 2181,
        (Auth::Token { .. }, _, false) => 80,
        (Auth::Token { .. }, _, true) => 443,
        _ => 10009,
    };
    let hosts: Vec<String> = host
        .split(',')
        .map(|h| match (h.contains(':'), a.port) {
            (true, _) => h.to_string(),
            (false, p) => format!("{h}:{}", p.unwrap_or(default_port)),
        })
        .collect();
    let mut spec = ConnSpec::new(String::new(), auth);
    spec.hosts = hosts;
    spec.db = a.db.clone();
    if a.http && !matches!(spec.auth, Auth::Token { .. }) {
        spec.http_path = Some(a.http_path.clone());
    }
    if a.ssl {
        match tls(&a) {
            Ok(t) => spec.tls = Some(t),
            Err(e) => return fail(e),
        }
    }
    if a.zookeeper {
        spec.zookeeper_namespace = Some(a.namespace.clone());
    }
    spec.conf = a.conf.clone();
    match build(&spec, a.show_secret) {
        Ok(url) => {
            println!("{url}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `ssl=true` with the trust store options given.
fn tls(a: &ConnstrArgs) -> Result<Tls, String> {
    let password = match &a.truststore_password_env {
        Some(var) => match std::env::var(var) {
            Ok(v) => Some(Secret::new(v)),
            Err(_) => return Err(format!("environment variable {var} is not set")),
        },
        None => None,
    };
    Ok(Tls {
        trust_store: a.truststore.clone(),
        trust_store_password: password,
    })
}

/// The broker's own listeners as client URLs; a TLS listener's with
/// `ssl=true` (and the trust store given with --truststore).
fn local(a: &ConnstrArgs) -> ExitCode {
    let cfg = match Config::load(a.config.as_ref().expect("clap requires --config")) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let tls = match tls(a) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if a.zookeeper {
        return fleet(&cfg, a);
    }
    for l in &cfg.listeners {
        // a Kerberos listener is reached with its service principal
        let principal = l.kerberos.as_ref().and_then(|k| k.principal.clone());
        let mut spec = ConnSpec::new(
            l.bind.to_string(),
            match (principal, &a.user) {
                (Some(p), _) => Auth::Kerberos { principal: p },
                (None, Some(u)) => Auth::User { name: u.clone() },
                (None, None) => Auth::None,
            },
        );
        if l.protocol == Transport::Http {
            spec.http_path = Some(l.http_path.clone());
        }
        if l.tls.is_some() {
            spec.tls = Some(tls.clone());
        }
        match build(&spec, a.show_secret) {
            Ok(url) => {
                // the listener decides the computing resource; say which
                eprintln!("listener {} -> computing resource {}", l.name, l.route);
                println!("{url}");
            }
            Err(e) => return fail(e),
        }
    }
    ExitCode::SUCCESS
}

/// `--local --zookeeper`: the fleet's discovery URLs, one per namespace the
/// config's listeners register in (binary and HTTP apart). The transport,
/// port and path come from the znode; a Kerberos listener's principal goes
/// in the URL, as the driver needs it before it connects.
fn fleet(cfg: &Config, a: &ConnstrArgs) -> ExitCode {
    let Some(cluster) = &cfg.cluster else {
        return fail("--zookeeper with --local needs a [cluster] table in the config");
    };
    let mut seen = std::collections::BTreeSet::new();
    for (l, ns) in cfg.discovered() {
        if !seen.insert(ns.clone()) {
            continue;
        }
        let principal = l.kerberos.as_ref().and_then(|k| k.principal.clone());
        let mut spec = ConnSpec::new(
            String::new(),
            match (principal, &a.user) {
                (Some(p), _) => Auth::Kerberos { principal: p },
                (None, Some(u)) => Auth::User { name: u.clone() },
                (None, None) => Auth::None,
            },
        );
        spec.hosts = cluster
            .zookeeper
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        spec.zookeeper_namespace = Some(ns.clone());
        match build(&spec, a.show_secret) {
            Ok(url) => {
                eprintln!(
                    "namespace {ns}: {} listeners (first: {})",
                    l.protocol.as_str(),
                    l.name
                );
                println!("{url}");
            }
            Err(e) => return fail(e),
        }
    }
    if seen.is_empty() {
        return fail("no listener registers in ZooKeeper (all have discovery = false)");
    }
    ExitCode::SUCCESS
}
