//! TOML configuration: parsed with serde (unknown keys refused), then
//! validated as a whole. Every error names the key and says how to fix it.
//!
//! Each section validates its own keys; `Config::validate` adds the rules
//! that span sections.

mod admin;
mod cluster;
mod listener;
mod route;
mod server;
mod tokens;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::admin::AdminConfig;
pub use self::cluster::ClusterConfig;
pub use self::listener::{ClientAuth, KerberosListenerConfig, LdapConfig, ListenerConfig};
pub use self::route::{
    Account, Carry, CredentialsConfig, MappingConfig, MappingType, RouteConfig, SessionPolicy,
    UpstreamConfig, UpstreamSasl,
};
pub use self::server::{canonical_ip, IpBlock, ServerConfig};
pub use self::tokens::TokensConfig;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {problem}; {fix}")]
    Invalid {
        key: String,
        problem: String,
        fix: String,
    },
}

/// An error naming the config key at fault, for checks made outside this
/// module too (e.g. when a listener's authenticator is built).
pub fn invalid(
    key: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// Gateway token rotation through the management API.
    #[serde(default)]
    pub tokens: Option<TokensConfig>,
    /// Metrics and status endpoints.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// A fleet on ZooKeeper: listeners register for discovery.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Binary,
    Http,
}

impl Transport {
    /// As written in config files, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Binary => "binary",
            Transport::Http => "http",
        }
    }
}

fn default_http_path() -> String {
    "cliservice".into()
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The krb5.conf the Kerberos listeners and resources name. Validation
    /// has made sure they all name the same file (MIT reads one per process).
    pub fn krb5_conf(&self) -> Option<&Path> {
        let listeners = self
            .listeners
            .iter()
            .filter_map(|l| l.kerberos.as_ref()?.krb5_conf.as_deref());
        let routes = self
            .routes
            .values()
            .filter_map(|r| r.mapping.as_ref()?.krb5_conf.as_deref());
        listeners.chain(routes).next()
    }

    /// Checks cross-key rules and resolves `*_env` secrets.
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.server.validate()?;
        if self.listeners.is_empty() {
            return Err(invalid(
                "listener",
                "no listener is configured",
                "add a [[listener]] table with name, protocol, bind, route and auth",
            ));
        }
        if self.routes.is_empty() {
            return Err(invalid(
                "routes",
                "no route is configured",
                "add a [routes.<name>.upstream] table",
            ));
        }
        let mut names = std::collections::HashSet::new();
        // (key, file) of every krb5.conf named; they must all agree
        let mut krb5: Vec<(String, PathBuf)> = Vec::new();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let key = format!("listener[{i}]");
            if l.name.is_empty() || l.name == "admin" || !names.insert(l.name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("'{}' is empty or used twice", l.name),
                    "give every listener a unique name (\"admin\" is reserved for [admin])",
                ));
            }
            if !self.routes.contains_key(&l.route) {
                return Err(invalid(
                    format!("{key}.route"),
                    format!("route '{}' is not defined", l.route),
                    format!(
                        "define [routes.{}] or use one of: {}",
                        l.route,
                        self.routes.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            l.validate(&key, &mut krb5)?;
        }
        for (name, r) in self.routes.iter_mut() {
            let key = format!("routes.{name}");
            r.validate(&key, &mut krb5)?;
            if r.upstream.token_rotation && self.tokens.is_none() {
                return Err(route::token_rotation_refused(&key));
            }
        }
        if let Some(a) = &self.admin {
            a.validate()?;
        }
        if let Some((first_key, first)) = krb5.first() {
            if let Some((k, f)) = krb5.iter().find(|(_, f)| f != first) {
                return Err(invalid(
                    k.as_str(),
                    format!(
                        "{} differs from {first_key} = {}; MIT Kerberos reads one krb5.conf per process",
                        f.display(),
                        first.display()
                    ),
                    "name the same file everywhere (merge the realms into it), or run one broker per krb5.conf",
                ));
            }
            readable(first, first_key)?;
        }
        if let Some(t) = &self.tokens {
            t.validate()?;
            if t.state_file.is_none() && self.cluster.is_none() {
                return Err(invalid(
                    "tokens.state_file",
                    "is missing",
                    "name the file where the broker keeps its tokens, e.g. state_file = \"/var/lib/kyuubi-broker/tokens.json\" (a fleet with [cluster] keeps them in ZooKeeper instead)",
                ));
            }
        }
        match &self.cluster {
            Some(c) => {
                c.validate()?;
                if let Some(f) = &c.digest_file {
                    readable(f, "cluster.digest_file")?;
                }
                if let Some(f) = &c.token_key_file {
                    readable(f, "cluster.token_key_file")?;
                }
                for (i, l) in self.listeners.iter().enumerate() {
                    if let Some(ns) = &l.zookeeper_namespace {
                        cluster::check_namespace(
                            &format!("listener[{i}].zookeeper_namespace"),
                            ns,
                        )?;
                    }
                }
            }
            None => {
                if let Some((i, _)) = self
                    .listeners
                    .iter()
                    .enumerate()
                    .find(|(_, l)| l.zookeeper_namespace.is_some())
                {
                    return Err(invalid(
                        format!("listener[{i}].zookeeper_namespace"),
                        "is set but there is no [cluster]",
                        "add [cluster] with zookeeper = \"host:2181\", or remove the key",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The listeners that register in ZooKeeper, each with its namespace.
    pub fn discovered(&self) -> Vec<(&ListenerConfig, String)> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        self.listeners
            .iter()
            .filter(|l| l.discovery)
            .map(|l| {
                let ns = l
                    .zookeeper_namespace
                    .clone()
                    .unwrap_or_else(|| c.namespace_for(l.protocol));
                (l, ns)
            })
            .collect()
    }
}

/// Keytabs and krb5.conf are read later by the GSS library, whose errors
/// would not name the config key: check they can be opened now.
fn readable(path: &Path, key: &str) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        invalid(
            key,
            format!("{} cannot be read: {e}", path.display()),
            "point it at an existing file the broker's user can read",
        )
    })
}

fn read_env(var: &str, key: &str) -> Result<Secret, ConfigError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
        _ => Err(invalid(
            key,
            format!("environment variable {var} is not set or empty"),
            format!("export {var} before starting the broker"),
        )),
    }
}

/// `/cliservice/` → `cliservice`.
fn normalize_path(p: &str) -> String {
    p.trim_matches('/').to_string()
}

/// Durations written as "30s", "5m", "6h", "250ms".
mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration '{s}' ({e}); write e.g. \"30s\", \"5m\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MINIMAL: &str = r#"
        [[listener]]
        name = "bin"
        protocol = "binary"
        bind = "127.0.0.1:10009"
        route = "sts"
        auth = "none"
        allow_any_user = true

        [routes.sts.upstream]
        transport = "binary"
        host = "127.0.0.1"
        port = 10000
    "#;

    fn err_of(toml: &str) -> String {
        Config::from_toml(toml, "test.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.server.max_message_bytes, 104_857_600);
        let r = &c.routes["sts"];
        assert_eq!(r.upstream.sasl, UpstreamSasl::Plain);
        assert_eq!(r.upstream.connect_timeout, Duration::from_secs(5));
        assert!(matches!(r.credentials, CredentialsConfig::Passthrough));
        assert!(c.listeners[0].allow_nosasl);
    }

    /// MINIMAL with a Kerberos mapping to a Kerberos upstream; the files
    /// exist (they are only opened, not parsed, by validation).
    fn kerberos_route(dir: &Path, principal: &str) -> String {
        let f = |n: &str| {
            let p = dir.join(n);
            std::fs::write(&p, "x").unwrap();
            p.display().to_string()
        };
        format!(
            "{MINIMAL}{principal}\n[routes.sts.mapping]\ntype = \"kerberos\"\nkrb5_conf = \"{}\"\n\
             [routes.sts.mapping.accounts.alice]\nprincipal = \"bob@R\"\nkeytab = \"{}\"\n",
            f("krb5.conf"),
            f("bob.keytab")
        )
    }

    #[test]
    fn kerberos_mapping_needs_the_upstream_principal_and_a_readable_keytab() {
        let dir = tempfile::tempdir().unwrap();
        let ok = kerberos_route(dir.path(), "principal = \"hive/_HOST@R\"");
        let c = Config::from_toml(&ok, "t").unwrap();
        assert_eq!(c.krb5_conf(), Some(dir.path().join("krb5.conf").as_path()));
        let e = err_of(&kerberos_route(dir.path(), ""));
        assert!(e.contains("routes.sts.upstream.principal"), "{e}");
        let e = err_of(&ok.replace("bob.keytab", "missing.keytab"));
        assert!(
            e.contains("routes.sts.mapping.accounts.alice.keytab") && e.contains("cannot be read"),
            "{e}"
        );
        let e = err_of(&ok.replace("principal = \"bob@R\"", "user = \"bob\""));
        assert!(e.contains("principal and a keytab"), "{e}");
    }

    #[test]
    fn a_kerberos_upstream_without_a_kerberos_identity_is_refused() {
        let e =
            err_of(&MINIMAL.replace("port = 10000", "port = 10000\nprincipal = \"hive/_HOST@R\""));
        assert!(
            e.contains("routes.sts.upstream.principal") && e.contains("kerberos"),
            "{e}"
        );
    }

    #[test]
    fn two_different_krb5_conf_files_are_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = kerberos_route(dir.path(), "principal = \"hive/_HOST@R\"");
        let other = dir.path().join("other.conf");
        std::fs::write(&other, "x").unwrap();
        t = t.replace(
            "auth = \"none\"\n        allow_any_user = true",
            &format!(
                "auth = \"kerberos\"\n[listener.kerberos]\nkeytab = \"{}\"\nkrb5_conf = \"{}\"",
                dir.path().join("bob.keytab").display(),
                other.display()
            ),
        );
        let e = err_of(&t);
        assert!(
            e.contains("krb5_conf") && e.contains("one krb5.conf per process"),
            "{e}"
        );
    }

    #[test]
    fn a_kerberos_listener_needs_its_table() {
        let e = err_of(&MINIMAL.replace(
            "auth = \"none\"\n        allow_any_user = true",
            "auth = \"kerberos\"",
        ));
        assert!(e.contains("listener[0].kerberos"), "{e}");
    }

    #[test]
    fn upstream_tls_keys_without_tls_are_refused_by_key() {
        for k in ["tls_ca = \"/etc/ca.pem\"", "tls_server_name = \"gw\""] {
            let e = err_of(&MINIMAL.replace("port = 10000", &format!("port = 10000\n{k}")));
            let key = k.split(' ').next().unwrap();
            assert!(
                e.contains(&format!("routes.sts.upstream.{key}")) && e.contains("add tls = true"),
                "{e}"
            );
        }
        let e = err_of(&MINIMAL.replace(
            "port = 10000",
            "port = 10000\ntls = true\ntls_ca = \"/nonexistent/ca.pem\"",
        ));
        assert!(
            e.contains("routes.sts.upstream.tls_ca") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn a_listener_tls_certificate_that_cannot_be_read_is_named() {
        let e = err_of(&MINIMAL.replace(
            "allow_any_user = true",
            "allow_any_user = true\n[listener.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"",
        ));
        assert!(
            e.contains("listener[0].tls.cert") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn certificate_login_needs_a_client_ca_and_required_client_certificates() {
        let cert = MINIMAL.replace(
            "auth = \"none\"\n        allow_any_user = true",
            "auth = \"certificate\"",
        );
        let e = err_of(&cert);
        assert!(
            e.contains("listener[0].tls.client_ca") && e.contains("auth = \"certificate\""),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.pem");
        std::fs::write(&f, "x").unwrap();
        let toml = cert.replace(
            "auth = \"certificate\"",
            &format!(
                "auth = \"certificate\"\n        [listener.tls]\n        cert = \"{0}\"\n        key = \"{0}\"\n        client_ca = \"{0}\"\n        client_cert = \"optional\"",
                f.display()
            ),
        );
        let e = err_of(&toml);
        assert!(
            e.contains("listener[0].tls.client_cert") && e.contains("optional"),
            "{e}"
        );
    }

    #[test]
    fn client_certificate_keys_without_a_client_ca_are_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.pem");
        std::fs::write(&f, "x").unwrap();
        for (k, v) in [("client_cert", "\"required\""), ("identity", "\"cn\"")] {
            let toml = MINIMAL.replace(
                "allow_any_user = true",
                &format!(
                    "allow_any_user = true\n        [listener.tls]\n        cert = \"{0}\"\n        key = \"{0}\"\n        {k} = {v}",
                    f.display()
                ),
            );
            let e = err_of(&toml);
            assert!(
                e.contains(&format!("listener[0].tls.{k}")) && e.contains("add client_ca"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err_of(&MINIMAL.replace("port = 10000", "port = 10000\nprot = 1"));
        assert!(e.contains("prot"), "{e}");
    }

    #[test]
    fn undefined_route_names_key_and_fix() {
        let e = err_of(&MINIMAL.replace("route = \"sts\"", "route = \"nope\""));
        assert!(
            e.contains("listener[0].route") && e.contains("define [routes.nope]"),
            "{e}"
        );
    }

    #[test]
    fn auth_none_off_loopback_is_refused() {
        let e = err_of(&MINIMAL.replace("127.0.0.1:10009", "0.0.0.0:10009"));
        assert!(
            e.contains("listener[0].auth") && e.contains("loopback"),
            "{e}"
        );
    }

    #[test]
    fn missing_password_env_names_the_variable() {
        let t = format!(
            "{MINIMAL}\n[routes.sts.credentials]\nmode = \"static\"\nuser = \"etl\"\npassword_env = \"KB_TEST_SURELY_UNSET_VAR\"\n"
        );
        let e = err_of(&t);
        assert!(
            e.contains("KB_TEST_SURELY_UNSET_VAR") && e.contains("password_env"),
            "{e}"
        );
    }

    #[test]
    fn auth_none_needs_the_explicit_flag() {
        let e = err_of(&MINIMAL.replace("        allow_any_user = true\n", ""));
        assert!(
            e.contains("listener[0].auth") && e.contains("allow_any_user = true"),
            "{e}"
        );
    }

    #[test]
    fn ldap_auth_needs_a_way_to_find_users() {
        let t = MINIMAL.replace(
            "        auth = \"none\"\n        allow_any_user = true\n",
            "        auth = \"ldap\"\n        [listener.ldap]\n        url = \"ldap://127.0.0.1:3890\"\n",
        );
        assert!(err_of(&t).contains("user_dn_pattern"), "{}", err_of(&t));
    }

    /// MINIMAL with `auth = "ldap"` and a `[listener.ldap]` of `url` and
    /// `extra` lines.
    fn ldap_listener(url: &str, extra: &str) -> String {
        MINIMAL.replace(
            "        auth = \"none\"\n        allow_any_user = true\n",
            &format!(
                "        auth = \"ldap\"\n        [listener.ldap]\n        url = \"{url}\"\n        user_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\"\n{extra}\n"
            ),
        )
    }

    #[test]
    fn ldap_tls_is_off_by_default() {
        let c = Config::from_toml(&ldap_listener("ldap://127.0.0.1:3890", ""), "t").unwrap();
        let ld = c.listeners[0].ldap.as_ref().unwrap();
        assert!(!ld.starttls && ld.tls_ca.is_none() && !ld.uses_tls());
        let c = Config::from_toml(&ldap_listener("ldaps://ldap.example.com", ""), "t").unwrap();
        assert!(c.listeners[0].ldap.as_ref().unwrap().uses_tls());
    }

    #[test]
    fn ldap_starttls_with_an_ldaps_url_is_refused_naming_the_key() {
        let e = err_of(&ldap_listener(
            "ldap://a.example.com ldaps://b.example.com:636",
            "starttls = true",
        ));
        assert!(
            e.starts_with(
                "listener[0].ldap.starttls: is true, but ldaps://b.example.com:636 is TLS already"
            ) && e.contains("remove starttls"),
            "{e}"
        );
        Config::from_toml(
            &ldap_listener("ldap://a.example.com", "starttls = true"),
            "t",
        )
        .unwrap();
    }

    #[test]
    fn ldap_tls_ca_needs_tls_and_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let tls_ca = format!("tls_ca = \"{}\"", ca.display());
        let e = err_of(&ldap_listener("ldap://ldap.example.com", &tls_ca));
        assert!(
            e.starts_with(
                "listener[0].ldap.tls_ca: is set, but no URL is ldaps:// and starttls is false"
            ) && e.contains("set starttls = true"),
            "{e}"
        );
        // with TLS either way it is taken (its contents are read when the
        // authenticator is built)
        Config::from_toml(&ldap_listener("ldaps://ldap.example.com", &tls_ca), "t").unwrap();
        let starttls = format!("{tls_ca}\nstarttls = true");
        Config::from_toml(&ldap_listener("ldap://ldap.example.com", &starttls), "t").unwrap();
        let e = err_of(&ldap_listener(
            "ldaps://ldap.example.com",
            "tls_ca = \"/nonexistent/ca.pem\"",
        ));
        assert!(
            e.starts_with("listener[0].ldap.tls_ca: /nonexistent/ca.pem cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn ldap_urls_need_an_ldap_scheme() {
        for url in ["", "ldap.example.com:389", "ldap://a ldsp://b"] {
            let e = err_of(&ldap_listener(url, ""));
            assert!(e.starts_with("listener[0].ldap.url: "), "{url}: {e}");
        }
    }

    #[test]
    fn ldap_in_clear_to_another_host_is_a_warning_naming_the_urls() {
        let warning = |url: &str, extra: &str| {
            Config::from_toml(&ldap_listener(url, extra), "t")
                .unwrap()
                .listeners[0]
                .ldap_plaintext_warning()
        };
        let w = warning(
            "ldap://ldap.example.com:389 ldaps://b.example.com ldap://127.0.0.1",
            "",
        )
        .expect("a warning");
        assert!(
            w.starts_with(
                "listener 'bin' checks passwords against ldap://ldap.example.com:389 without TLS"
            ) && w.contains("starttls = true"),
            "{w}"
        );
        for (url, extra) in [
            ("ldap://ldap.example.com", "starttls = true"),
            ("ldaps://ldap.example.com", ""),
            (
                "ldap://127.0.0.1:3890 ldap://localhost ldap://[::1]:389 ldap:///",
                "",
            ),
            ("ldapi://%2Frun%2Fslapd%2Fldapi", ""),
        ] {
            assert_eq!(warning(url, extra), None, "{url} {extra}");
        }
    }

    #[test]
    fn proxy_user_mapping_needs_the_brokers_own_credentials() {
        let t =
            format!("{MINIMAL}\n[routes.sts.mapping]\ntype = \"system\"\ncarry = \"proxy_user\"\n");
        assert!(err_of(&t).contains("routes.sts.mapping.carry"));
    }

    #[test]
    fn token_rotation_needs_a_tokens_section_and_an_http_upstream() {
        let t = MINIMAL.replace("port = 10000", "port = 10000\ntoken_rotation = true");
        assert!(
            err_of(&t).contains("routes.sts.upstream.token_rotation"),
            "{}",
            err_of(&t)
        );
    }

    #[test]
    fn token_rotation_on_an_http_upstream_still_needs_a_tokens_section() {
        let t = MINIMAL.replace(
            "transport = \"binary\"",
            "transport = \"http\"\ntoken_rotation = true",
        );
        let e = err_of(&t);
        assert!(
            e.contains("routes.sts.upstream.token_rotation") && e.contains("[tokens]"),
            "{e}"
        );
    }

    #[test]
    fn static_auth_needs_a_users_file_which_config_does_not_read() {
        let stat = |rest: &str| {
            MINIMAL.replace(
                "auth = \"none\"\n        allow_any_user = true",
                &format!("auth = \"static\"{rest}"),
            )
        };
        let e = err_of(&stat(""));
        assert!(e.contains("listener[0].users_file"), "{e}");
        // read when the authenticator is built, not by config
        Config::from_toml(&stat("\nusers_file = \"/nonexistent/users\""), "t").unwrap();
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let t = MINIMAL.replace("port = 10000", "port = 10000\nread_timeout = \"soon\"");
        assert!(err_of(&t).contains("30s"));
    }

    #[test]
    fn governor_caps_default_to_unlimited_and_a_cap_of_zero_is_refused_by_key() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        let r = &c.routes["sts"];
        assert_eq!(
            (r.max_upstream_sessions, r.max_upstream_sessions_per_user),
            (None, None)
        );
        assert_eq!(r.queue_timeout, Duration::from_secs(30));
        let capped = |keys: &str| format!("{MINIMAL}\n[routes.sts]\n{keys}\n");
        let c = Config::from_toml(
            &capped("max_upstream_sessions = 20\nmax_upstream_sessions_per_user = 5\nqueue_timeout = \"2m\""),
            "t",
        )
        .unwrap();
        let r = &c.routes["sts"];
        assert_eq!(
            (
                r.max_upstream_sessions,
                r.max_upstream_sessions_per_user,
                r.queue_timeout
            ),
            (Some(20), Some(5), Duration::from_secs(120))
        );
        for key in ["max_upstream_sessions", "max_upstream_sessions_per_user"] {
            let e = err_of(&capped(&format!("{key} = 0")));
            assert!(e.starts_with(&format!("routes.sts.{key}: is 0")), "{e}");
        }
        assert!(err_of(&capped("queue_timeout = \"later\"")).contains("30s"));
    }

    #[test]
    fn token_on_binary_upstream_is_refused() {
        let t = MINIMAL.replace("port = 10000", "port = 10000\ntoken = \"abc\"");
        assert!(err_of(&t).contains("routes.sts.upstream.token"));
    }

    #[test]
    fn every_shipped_config_file_parses_and_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "toml") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    // (what the file names, what the fixture writes for it)
                    let fixtures = [
                        ("/tmp/hs2-kdc/", "/tmp/hs2-kdc/krb5.conf"),
                        ("/tmp/kb-fleet.key", "/tmp/kb-fleet.key"),
                    ];
                    let missing = fixtures
                        .iter()
                        .any(|(named, made)| text.contains(named) && !Path::new(made).exists());
                    if missing {
                        // validation opens the fixture's keytabs or fleet key:
                        // without them, check that the file deserializes
                        // (tests/fleet.rs checks the fleet examples in full)
                        toml::from_str::<Config>(&text)
                            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    } else {
                        Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    }
                    seen += 1;
                }
            }
        }
        assert!(seen >= 3, "expected the shipped configs, found {seen}");
    }
}
