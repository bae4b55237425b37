use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    default_http_path, duration, invalid, normalize_path, read_env, readable, ConfigError,
    Transport,
};
use crate::secret::Secret;

/// A computing resource: where its clients go, as whom, with which session
/// settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub upstream: UpstreamConfig,
    /// Used when there is no `mapping`.
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Who each client user is upstream; unmapped users are refused.
    #[serde(default)]
    pub mapping: Option<MappingConfig>,
    #[serde(default)]
    pub session: SessionPolicy,
    /// Answer repeated metadata calls (GetTables, GetColumns, GetInfo, ...)
    /// from the broker's cache.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// How long a cached metadata answer is served; DDL through the broker
    /// clears the route's answers sooner.
    #[serde(default = "default_cache_ttl", with = "duration")]
    pub cache_ttl: Duration,
    /// Upstream sessions kept open ahead for each kind of OpenSession seen
    /// recently (same identity, address and settings); 0: none. Off by
    /// default: a gateway that bills or caps per session counts them.
    #[serde(default)]
    pub warm_sessions: usize,
    /// Warm sessions on this route over all kinds (default: 4 × warm_sessions).
    #[serde(default)]
    pub warm_sessions_max: Option<usize>,
    /// A kind not asked for this long is forgotten, and a warm session this
    /// old is closed rather than handed out.
    #[serde(default = "default_warm_idle", with = "duration")]
    pub warm_idle: Duration,
    /// Upstream sessions open at once on this route (none: unlimited).
    /// Above it, OpenSession waits its turn, round robin by user.
    #[serde(default)]
    pub max_upstream_sessions: Option<usize>,
    /// Upstream sessions one client user may hold at once on this route.
    #[serde(default)]
    pub max_upstream_sessions_per_user: Option<usize>,
    /// How long an OpenSession waits for a place before it is refused
    /// (retryable); "0s" refuses at once.
    #[serde(default = "default_queue_timeout", with = "duration")]
    pub queue_timeout: Duration,
}

fn default_warm_idle() -> Duration {
    Duration::from_secs(600)
}

fn default_true() -> bool {
    true
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingType {
    /// The upstream user is a name (the client's own, or a configured one).
    System,
    /// The upstream user is an LDAP account with its password.
    Ldap,
    /// The upstream user is a Kerberos principal with its keytab.
    Kerberos,
}

/// How a system-mapped name reaches the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carry {
    /// As the upstream SASL PLAIN / HTTP Basic user (password: the route's
    /// static credential, else the client's own).
    #[default]
    User,
    /// As `kyuubi.session.proxy.user` and `hive.server2.proxy.user`, while the
    /// broker authenticates with the route's `credentials`.
    ProxyUser,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    #[serde(rename = "type")]
    pub kind: MappingType,
    #[serde(default)]
    pub carry: Carry,
    /// System: client user → upstream user.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// System: users not listed keep their own name (instead of being refused).
    #[serde(default)]
    pub same_name_for_unlisted: bool,
    /// LDAP / Kerberos: client user → account.
    #[serde(default)]
    pub accounts: BTreeMap<String, Account>,
    /// Kerberos: the krb5.conf for this resource.
    #[serde(default)]
    pub krb5_conf: Option<std::path::PathBuf>,
}

/// An upstream account: `user` + `password` (LDAP) or `principal` +
/// `keytab` (Kerberos).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub keytab: Option<std::path::PathBuf>,
}

/// Session settings sent upstream in OpenSession.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPolicy {
    /// Sent unless the client sets the key itself: the engine version, the
    /// resource queue, ... under the keys your gateway reads.
    #[serde(default)]
    pub defaults: BTreeMap<String, String>,
    /// Global Spark properties.
    #[serde(default)]
    pub spark_conf: BTreeMap<String, String>,
    /// On a conflict, `spark_conf` wins over the client's own setting.
    #[serde(default)]
    pub global_takes_precedence: bool,
    /// Let clients ask for another user (`hive.server2.proxy.user`,
    /// `kyuubi.session.proxy.user`, `doAs`); otherwise those are stripped.
    #[serde(default)]
    pub allow_impersonation: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    /// Binary only: `plain` (SASL PLAIN) or `nosasl`.
    #[serde(default)]
    pub sasl: UpstreamSasl,
    /// HTTP only.
    #[serde(default = "default_http_path")]
    pub http_path: String,
    /// HTTP only: a gateway token placed in the path as `<http_path>/token/<token>`.
    #[serde(default)]
    pub token: Option<Secret>,
    /// HTTP only: read the token from this environment variable instead.
    #[serde(default)]
    pub token_env: Option<String>,
    /// HTTP only: use the token that `[tokens]` rotates.
    #[serde(default)]
    pub token_rotation: bool,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for one RPC's reply.
    #[serde(default = "default_read_timeout", with = "duration")]
    pub read_timeout: Duration,
    /// The upstream's Kerberos service principal, e.g. `hive/_HOST@REALM`
    /// (`_HOST` = `host`). When set, the broker authenticates with GSSAPI
    /// (binary) or SPNEGO (HTTP), as Hive JDBC does for `principal=`.
    #[serde(default)]
    pub principal: Option<String>,
    /// Binary + Kerberos: the SASL QOP to ask for.
    #[serde(default)]
    pub qop: crate::kerberos::Qop,
    /// Speak TLS to the upstream (HiveServer2's `hive.server2.use.SSL`, an
    /// `https://` gateway), verified against the system's roots or `tls_ca`.
    #[serde(default)]
    pub tls: bool,
    /// Trust only the CAs in this PEM bundle (a private gateway's CA).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The name checked against the certificate and sent as SNI, when it is
    /// not `host` (e.g. connecting by IP to a certificate for a name).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// A client certificate (PEM chain) and its key, for an upstream that
    /// asks for one (mutual TLS).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl UpstreamConfig {
    /// An upstream as a config file naming only these three keys gets it.
    pub fn new(transport: Transport, host: impl Into<String>, port: u16) -> UpstreamConfig {
        UpstreamConfig {
            transport,
            host: host.into(),
            port,
            sasl: UpstreamSasl::default(),
            http_path: default_http_path(),
            token: None,
            token_env: None,
            token_rotation: false,
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            principal: None,
            qop: Default::default(),
            tls: false,
            tls_ca: None,
            tls_server_name: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The name a TLS upstream's certificate must carry.
    pub fn tls_name(&self) -> &str {
        self.tls_server_name.as_deref().unwrap_or(&self.host)
    }

    /// How this upstream's certificate is checked, when it speaks TLS:
    /// reads `tls_ca` (or the system's roots).
    pub fn client_tls(
        &self,
        key: &str,
    ) -> Result<Option<crate::tls::client::ClientTls>, ConfigError> {
        if !self.tls {
            return Ok(None);
        }
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        let config =
            crate::tls::client::config(self.tls_ca.as_deref(), "upstream.tls_ca", identity)
                .map_err(|e| {
                    invalid(
                    format!("{key}.upstream"),
                    e.to_string(),
                    "give a PEM bundle of the CA certificates that sign the upstream's certificate",
                )
                })?;
        crate::tls::client::ClientTls::new(config, self.tls_name(), "upstream.tls_server_name")
            .map(Some)
            .map_err(|e| {
                invalid(
                    format!("{key}.upstream.tls_server_name"),
                    e.to_string(),
                    "set the host name the upstream's certificate names",
                )
            })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamSasl {
    #[default]
    Plain,
    Nosasl,
}

/// The identity the broker presents upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
pub enum CredentialsConfig {
    /// Forward the client's own user name and password.
    #[default]
    Passthrough,
    /// One fixed identity for every client of this route.
    Static {
        user: String,
        #[serde(default)]
        password: Option<Secret>,
        #[serde(default)]
        password_env: Option<String>,
    },
    /// The broker's own Kerberos principal (for system mappings that carry
    /// the user as a proxy user).
    Kerberos {
        principal: String,
        keytab: std::path::PathBuf,
    },
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(300)
}

/// One message for every way `token_rotation` can be misconfigured, whether
/// the route itself or the missing `[tokens]` section is at fault.
pub(super) fn token_rotation_refused(key: &str) -> ConfigError {
    invalid(
        format!("{key}.upstream.token_rotation"),
        "needs an HTTP upstream, no fixed token, and a [tokens] section",
        "set transport = \"http\", remove token/token_env, and configure [tokens]",
    )
}

impl RouteConfig {
    /// The rules of one route on its own; `key` is `routes.<name>`. A
    /// Kerberos mapping's krb5.conf goes into `krb5` for the one-per-process
    /// check.
    pub(super) fn validate(
        &mut self,
        key: &str,
        krb5: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ConfigError> {
        let kerberos_identity = matches!(self.credentials, CredentialsConfig::Kerberos { .. })
            || self
                .mapping
                .as_ref()
                .is_some_and(|m| m.kind == MappingType::Kerberos);
        self.upstream.validate(key, kerberos_identity)?;
        if self.warm_sessions > 64 {
            return Err(invalid(
                format!("{key}.warm_sessions"),
                format!("{} is more than 64", self.warm_sessions),
                "keep a few sessions warm per kind of OpenSession (e.g. 2), or 0 for none",
            ));
        }
        if let Some(max) = self.warm_sessions_max {
            if max < self.warm_sessions || max > 1024 {
                return Err(invalid(
                    format!("{key}.warm_sessions_max"),
                    format!(
                        "{max} is below warm_sessions ({}) or above 1024",
                        self.warm_sessions
                    ),
                    "set it between warm_sessions and 1024, or leave it out (4 × warm_sessions)",
                ));
            }
        }
        if self.warm_sessions > 0 && self.warm_idle < Duration::from_secs(1) {
            return Err(invalid(
                format!("{key}.warm_idle"),
                "is under one second",
                "use a duration such as \"10m\" (the default)",
            ));
        }
        if self.cache
            && (self.cache_ttl < Duration::from_secs(1)
                || self.cache_ttl > Duration::from_secs(86_400))
        {
            return Err(invalid(
                format!("{key}.cache_ttl"),
                format!("{:?} is out of range", self.cache_ttl),
                "use a duration between \"1s\" and \"24h\" (default \"5m\"), or cache = false",
            ));
        }
        for (k, v) in [
            ("max_upstream_sessions", self.max_upstream_sessions),
            (
                "max_upstream_sessions_per_user",
                self.max_upstream_sessions_per_user,
            ),
        ] {
            if v == Some(0) {
                return Err(invalid(
                    format!("{key}.{k}"),
                    "is 0, which would refuse every session",
                    "remove it for no cap, or size it to the gateway (e.g. 20 for a 2C8G Kyuubi gateway)",
                ));
            }
        }
        if let CredentialsConfig::Kerberos { principal, keytab } = &self.credentials {
            if principal.is_empty() {
                return Err(invalid(
                    format!("{key}.credentials.principal"),
                    "is empty",
                    "set the broker's principal, e.g. kyuubi/localhost@EXAMPLE.COM",
                ));
            }
            readable(keytab, &format!("{key}.credentials.keytab"))?;
        }
        if let Some(m) = &mut self.mapping {
            m.validate(key, &self.credentials, krb5)?;
        }
        if let CredentialsConfig::Static {
            user,
            password,
            password_env,
        } = &mut self.credentials
        {
            if user.is_empty() {
                return Err(invalid(
                    format!("{key}.credentials.user"),
                    "is empty",
                    "set the upstream user name",
                ));
            }
            if let Some(var) = password_env.clone() {
                if password.is_some() {
                    return Err(invalid(
                        format!("{key}.credentials.password_env"),
                        "password and password_env are both set",
                        "keep one of them",
                    ));
                }
                *password = Some(read_env(&var, &format!("{key}.credentials.password_env"))?);
            }
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// `kerberos_identity`: the route's credentials or mapping are Kerberos,
    /// which a service principal must go with.
    fn validate(&mut self, key: &str, kerberos_identity: bool) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return Err(invalid(
                format!("{key}.upstream.host"),
                "is empty",
                "set the upstream host name or IP",
            ));
        }
        if self.port == 0 {
            return Err(invalid(
                format!("{key}.upstream.port"),
                "is 0",
                "set the upstream port, e.g. 10009",
            ));
        }
        if self.connect_timeout.is_zero() || self.read_timeout.is_zero() {
            return Err(invalid(
                format!("{key}.upstream"),
                "connect_timeout and read_timeout must be above zero",
                "use durations such as \"5s\" and \"300s\"",
            ));
        }
        self.http_path = normalize_path(&self.http_path);
        if let Some(var) = self.token_env.clone() {
            if self.token.is_some() {
                return Err(invalid(
                    format!("{key}.upstream.token_env"),
                    "token and token_env are both set",
                    "keep one of them",
                ));
            }
            self.token = Some(read_env(&var, &format!("{key}.upstream.token_env"))?);
        }
        if self.token.is_some() && self.transport != Transport::Http {
            return Err(invalid(
                format!("{key}.upstream.token"),
                "a token is carried in the HTTP path, but this upstream is binary",
                "set transport = \"http\" or remove the token",
            ));
        }
        // whether [tokens] exists is checked by Config::validate
        if self.token_rotation && (self.token.is_some() || self.transport != Transport::Http) {
            return Err(token_rotation_refused(key));
        }
        if let Some(t) = &self.token {
            if t.is_empty() || !t.expose().chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(invalid(
                    format!("{key}.upstream.token"),
                    "must be non-empty and only letters and digits (it goes into a URL path)",
                    "check the token value",
                ));
            }
        }
        if !self.tls {
            for (k, set) in [
                ("tls_ca", self.tls_ca.is_some()),
                ("tls_server_name", self.tls_server_name.is_some()),
                ("tls_cert", self.tls_cert.is_some()),
                ("tls_key", self.tls_key.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        format!("{key}.upstream.{k}"),
                        "is set but tls is not",
                        "add tls = true, or remove it",
                    ));
                }
            }
        }
        if let Some(ca) = &self.tls_ca {
            super::readable(ca, &format!("{key}.upstream.tls_ca"))?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                super::readable(c, &format!("{key}.upstream.tls_cert"))?;
                super::readable(k, &format!("{key}.upstream.tls_key"))?;
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    format!("{key}.upstream.tls_cert"),
                    "tls_cert and tls_key go together",
                    "set both (the client certificate and its key) or neither",
                ))
            }
        }
        match (&self.principal, kerberos_identity) {
            (Some(_), _) if self.sasl == UpstreamSasl::Nosasl => Err(invalid(
                format!("{key}.upstream.principal"),
                "Kerberos needs SASL, but sasl = \"nosasl\"",
                "remove sasl or the principal",
            )),
            (Some(_), false) => Err(invalid(
                format!("{key}.upstream.principal"),
                "a Kerberos upstream needs a Kerberos identity on the broker side",
                "add a mapping with type = \"kerberos\", or credentials with mode = \"kerberos\"",
            )),
            (None, true) => Err(invalid(
                format!("{key}.upstream.principal"),
                "the identity is Kerberos but the upstream's service principal is not set",
                "set principal = \"hive/_HOST@YOUR.REALM\" (as in the JDBC URL)",
            )),
            _ => Ok(()),
        }
    }
}

impl MappingConfig {
    /// `credentials` is the route's: carrying a proxy user needs the broker's
    /// own identity.
    fn validate(
        &mut self,
        key: &str,
        credentials: &CredentialsConfig,
        krb5: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ConfigError> {
        let kind = self.kind;
        for (client, acct) in self.accounts.iter_mut() {
            let akey = format!("{key}.mapping.accounts.{client}");
            if kind == MappingType::Kerberos {
                if acct.principal.is_empty()
                    || !acct.user.is_empty()
                    || acct.password.is_some()
                    || acct.password_env.is_some()
                {
                    return Err(invalid(
                        akey,
                        "a Kerberos account is a principal and a keytab",
                        "set principal and keytab only",
                    ));
                }
                let Some(kt) = &acct.keytab else {
                    return Err(invalid(
                        akey,
                        "has no keytab",
                        "set keytab = \"/path/to/user.keytab\"",
                    ));
                };
                readable(kt, &format!("{akey}.keytab"))?;
                continue;
            }
            if !acct.principal.is_empty() || acct.keytab.is_some() {
                return Err(invalid(
                    akey,
                    "principal/keytab belong to type = \"kerberos\"",
                    "use user and password_env for an LDAP account",
                ));
            }
            if acct.user.is_empty() {
                return Err(invalid(
                    akey,
                    "has no user",
                    "set the LDAP account name as user",
                ));
            }
            if let Some(var) = acct.password_env.clone() {
                acct.password = Some(read_env(&var, &format!("{akey}.password_env"))?);
            }
            if acct.password.is_none() {
                return Err(invalid(
                    akey,
                    "has no password",
                    "set password_env (or password)",
                ));
            }
        }
        if let Some(f) = &self.krb5_conf {
            if kind != MappingType::Kerberos {
                return Err(invalid(
                    format!("{key}.mapping.krb5_conf"),
                    "belongs to type = \"kerberos\"",
                    "remove it",
                ));
            }
            krb5.push((format!("{key}.mapping.krb5_conf"), f.clone()));
        }
        let accounts_only = self.kind != MappingType::System;
        if accounts_only
            && (!self.users.is_empty() || self.same_name_for_unlisted || self.carry != Carry::User)
        {
            return Err(invalid(
                format!("{key}.mapping"),
                "type = \"ldap\" and \"kerberos\" take accounts only",
                "move users/same_name_for_unlisted/carry to a system mapping",
            ));
        }
        if !accounts_only && !self.accounts.is_empty() {
            return Err(invalid(
                format!("{key}.mapping.accounts"),
                "accounts belong to type = \"ldap\"",
                "use users",
            ));
        }
        if self.carry == Carry::ProxyUser && matches!(credentials, CredentialsConfig::Passthrough) {
            return Err(invalid(
                format!("{key}.mapping.carry"),
                "proxy_user needs the broker's own upstream identity",
                "set [routes.<name>.credentials] mode = \"static\" (or \"kerberos\")",
            ));
        }
        Ok(())
    }
}
