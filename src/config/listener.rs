use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    default_http_path, duration, invalid, normalize_path, read_env, readable, ConfigError,
    Transport,
};
use crate::secret::Secret;

/// How clients authenticate to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Any user name is accepted as the identity: loopback listeners only,
    /// and only with `allow_any_user = true`.
    None,
    /// Bind against an LDAP server (`[listener.ldap]`).
    Ldap,
    /// A local users file of argon2 hashes (`users_file`).
    Static,
    /// SASL GSSAPI (binary) / SPNEGO (HTTP) with the broker's keytab
    /// (`[listener.kerberos]`).
    Kerberos,
    /// The client's TLS certificate, verified against
    /// `[listener.tls].client_ca`, names the user (`[listener.tls].identity`);
    /// no password is asked for.
    Certificate,
}

/// The broker as a Kerberos service for its clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KerberosListenerConfig {
    pub keytab: std::path::PathBuf,
    /// e.g. `kyuubi/localhost@EXAMPLE.COM`; unset accepts any key in the keytab.
    #[serde(default)]
    pub principal: Option<String>,
    /// Binary only: the SASL QOP levels offered.
    #[serde(default = "default_qop")]
    pub qop: Vec<crate::kerberos::Qop>,
    #[serde(default)]
    pub krb5_conf: Option<std::path::PathBuf>,
}

fn default_qop() -> Vec<crate::kerberos::Qop> {
    vec![crate::kerberos::Qop::Auth]
}

/// LDAP options, as Kyuubi names them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// One or more space-separated URLs, e.g. `ldap://127.0.0.1:3890`.
    pub url: String,
    /// Colon-separated DN patterns; `%s` is the user name.
    #[serde(default)]
    pub user_dn_pattern: Option<String>,
    /// With `guid_key`: users are `<guid_key>=<user>,<base_dn>`; with
    /// `bind_dn`: the search base.
    #[serde(default)]
    pub base_dn: Option<String>,
    #[serde(default = "default_guid_key")]
    pub guid_key: String,
    /// Search for the user's DN as this account, then bind as the user.
    #[serde(default)]
    pub bind_dn: Option<String>,
    #[serde(default)]
    pub bind_password: Option<Secret>,
    #[serde(default)]
    pub bind_password_env: Option<String>,
    /// Extra filter ANDed into the user search, e.g. `(objectClass=inetOrgPerson)`.
    #[serde(default)]
    pub user_filter: Option<String>,
    /// The user must be a member of this group.
    #[serde(default)]
    pub group_dn: Option<String>,
    #[serde(default = "default_member_attribute")]
    pub group_member_attribute: String,
    /// How long a successful check is remembered.
    #[serde(default = "default_cache_ttl", with = "duration")]
    pub cache_ttl: Duration,
    /// Connecting to an LDAP server, per URL tried.
    #[serde(default = "default_ldap_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Each LDAP operation (bind, search); an LDAP server slower than this
    /// is "authentication service unavailable".
    #[serde(default = "default_ldap_timeout", with = "duration")]
    pub timeout: Duration,
    /// StartTLS on each `ldap://` URL before any bind (not with `ldaps://`,
    /// which is TLS from the first byte).
    #[serde(default)]
    pub starttls: bool,
    /// PEM bundle of the CAs the LDAP server's certificate must chain to
    /// (only these); unset: the system's roots. Only with TLS (an `ldaps://`
    /// URL or `starttls`).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

/// The schemes an LDAP URL may have.
const LDAP_SCHEMES: [&str; 3] = ["ldap", "ldaps", "ldapi"];

impl LdapConfig {
    /// Each URL of `url` with its scheme (lowercase) and host (as written,
    /// without port or brackets; empty for ldapi or an empty host).
    fn urls(&self) -> impl Iterator<Item = (&str, String, String)> {
        self.url.split_whitespace().map(|u| {
            let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            let host = match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(""),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
            };
            (u, scheme.to_ascii_lowercase(), host.to_string())
        })
    }

    /// Whether any connection is TLS: an `ldaps://` URL, or StartTLS.
    pub fn uses_tls(&self) -> bool {
        self.starttls || self.urls().any(|(_, scheme, _)| scheme == "ldaps")
    }

    /// The URLs' schemes and the TLS keys; `key` is `listener[i]`.
    fn validate_tls(&self, key: &str) -> Result<(), ConfigError> {
        if self.urls().next().is_none() {
            return Err(invalid(
                format!("{key}.ldap.url"),
                "is empty",
                "give the LDAP server, e.g. \"ldaps://ldap.example.com:636\"",
            ));
        }
        if let Some((u, _, _)) = self
            .urls()
            .find(|(_, scheme, _)| !LDAP_SCHEMES.contains(&scheme.as_str()))
        {
            return Err(invalid(
                format!("{key}.ldap.url"),
                format!("\"{u}\" is not an ldap://, ldaps:// or ldapi:// URL"),
                "write e.g. \"ldaps://ldap.example.com:636\" (several URLs separated by spaces)",
            ));
        }
        if self.starttls {
            if let Some((u, _, _)) = self.urls().find(|(_, scheme, _)| scheme == "ldaps") {
                return Err(invalid(
                    format!("{key}.ldap.starttls"),
                    format!("is true, but {u} is TLS already (ldaps://)"),
                    "remove starttls to use ldaps://, or use ldap:// URLs with starttls = true",
                ));
            }
        }
        if let Some(ca) = &self.tls_ca {
            if !self.uses_tls() {
                return Err(invalid(
                    format!("{key}.ldap.tls_ca"),
                    "is set, but no URL is ldaps:// and starttls is false: no LDAP server is asked for a certificate",
                    "use an ldaps:// URL or set starttls = true, or remove tls_ca",
                ));
            }
            readable(ca, &format!("{key}.ldap.tls_ca"))?;
        }
        Ok(())
    }

    /// The URLs whose binds (users' passwords) would cross a network in
    /// clear: `ldap://` without StartTLS to a host that is not loopback.
    fn plaintext_urls(&self) -> Vec<&str> {
        if self.starttls {
            return Vec::new();
        }
        self.urls()
            .filter(|(_, scheme, host)| scheme == "ldap" && !is_loopback_host(host))
            .map(|(u, _, _)| u)
            .collect()
    }
}

/// `localhost`, an empty host (ldap3 connects to localhost), or a loopback
/// address.
fn is_loopback_host(host: &str) -> bool {
    host.is_empty()
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_ldap_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_guid_key() -> String {
    "uid".into()
}
fn default_member_attribute() -> String {
    "member".into()
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Transport,
    pub bind: SocketAddr,
    pub route: String,
    pub auth: ClientAuth,
    /// Required with `auth = "none"`: say that any user name is trusted.
    #[serde(default)]
    pub allow_any_user: bool,
    #[serde(default)]
    pub ldap: Option<LdapConfig>,
    #[serde(default)]
    pub kerberos: Option<KerberosListenerConfig>,
    /// `auth = "static"`: lines of `name:<argon2 PHC hash>`.
    #[serde(default)]
    pub users_file: Option<std::path::PathBuf>,
    /// Binary only: also accept raw (NOSASL) Thrift, detected by its first byte.
    #[serde(default = "yes")]
    pub allow_nosasl: bool,
    /// HTTP only: the Thrift endpoint; any sub-path is accepted too.
    #[serde(default = "default_http_path")]
    pub http_path: String,
    /// HTTP only: lifetime of the `hive.server2.auth` cookie.
    #[serde(default = "default_cookie_age", with = "duration")]
    pub cookie_max_age: Duration,
    /// Client connections this listener serves at once (within
    /// `server.max_connections`); unset: no cap of its own.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Serve TLS (binary: TLS first, then SASL or NOSASL, as HiveServer2
    /// with `hive.server2.use.SSL`; HTTP: HTTPS).
    #[serde(default)]
    pub tls: Option<crate::tls::server::ListenerTls>,
    /// With `[cluster]`: register this listener in ZooKeeper (default).
    #[serde(default = "yes")]
    pub discovery: bool,
    /// With `[cluster]`: the namespace to register in, instead of
    /// `cluster.namespace` (binary) or `cluster.http_namespace` (HTTP).
    #[serde(default)]
    pub zookeeper_namespace: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_cookie_age() -> Duration {
    Duration::from_secs(86400)
}

impl ListenerConfig {
    /// A listener that takes passwords in clear from other machines: worth
    /// a warning at startup and in `check-config`.
    pub fn plaintext_passwords_warning(&self) -> Option<String> {
        let passwords = matches!(self.auth, ClientAuth::Ldap | ClientAuth::Static);
        (passwords && self.tls.is_none() && !self.bind.ip().is_loopback()).then(|| {
            format!(
                "listener '{}' on {} takes passwords ({}) without TLS: they cross the network in clear; add [listener.tls]",
                self.name,
                self.bind,
                if self.protocol == Transport::Http { "HTTP Basic" } else { "SASL PLAIN" }
            )
        })
    }

    /// An `auth = "ldap"` listener whose LDAP binds (its users' passwords)
    /// go to a non-loopback server in clear: a warning at startup and in
    /// `check-config`.
    pub fn ldap_plaintext_warning(&self) -> Option<String> {
        let ld = self
            .ldap
            .as_ref()
            .filter(|_| self.auth == ClientAuth::Ldap)?;
        let urls = ld.plaintext_urls();
        (!urls.is_empty()).then(|| {
            format!(
                "listener '{}' checks passwords against {} without TLS: they cross the network in clear; use ldaps:// or set starttls = true in [listener.ldap]",
                self.name,
                urls.join(" ")
            )
        })
    }

    /// The rules of one listener on its own; `key` is `listener[i]`. Its
    /// krb5.conf goes into `krb5` for the one-per-process check.
    pub(super) fn validate(
        &mut self,
        key: &str,
        krb5: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ConfigError> {
        match self.auth {
            ClientAuth::None if !self.bind.ip().is_loopback() => {
                return Err(invalid(
                    format!("{key}.auth"),
                    format!(
                        "'none' trusts any user name, but {} is not a loopback address",
                        self.bind
                    ),
                    "bind this listener to 127.0.0.1 or ::1, or use ldap or static",
                ))
            }
            ClientAuth::None if !self.allow_any_user => {
                return Err(invalid(
                    format!("{key}.auth"),
                    "'none' trusts any user name the client sends",
                    "add allow_any_user = true to this listener to accept that",
                ))
            }
            ClientAuth::Ldap => {
                let Some(ld) = self.ldap.as_mut() else {
                    return Err(invalid(
                        format!("{key}.ldap"),
                        "auth = \"ldap\" but no [listener.ldap] table",
                        "add url and user_dn_pattern (or base_dn, or bind_dn + base_dn)",
                    ));
                };
                if ld.user_dn_pattern.is_none() && ld.base_dn.is_none() {
                    return Err(invalid(
                        format!("{key}.ldap"),
                        "no way to find a user's DN",
                        "set user_dn_pattern, or base_dn (with guid_key, or with bind_dn to search)",
                    ));
                }
                if let Some(var) = ld.bind_password_env.clone() {
                    ld.bind_password =
                        Some(read_env(&var, &format!("{key}.ldap.bind_password_env"))?);
                }
                if ld.bind_dn.is_some() && ld.base_dn.is_none() {
                    return Err(invalid(
                        format!("{key}.ldap.base_dn"),
                        "bind_dn needs a search base",
                        "set base_dn",
                    ));
                }
                ld.validate_tls(key)?;
            }
            ClientAuth::Static => {
                // The file's contents are checked when the authenticator is
                // built from it: parsing it here would make config depend on
                // the auth module.
                if self.users_file.is_none() {
                    return Err(invalid(
                        format!("{key}.users_file"),
                        "auth = \"static\" but no users_file",
                        "point users_file at lines of name:<argon2 hash>",
                    ));
                }
            }
            ClientAuth::Kerberos => {
                let Some(k) = &self.kerberos else {
                    return Err(invalid(
                        format!("{key}.kerberos"),
                        "auth = \"kerberos\" but no [listener.kerberos] table",
                        "add keytab (and principal, e.g. \"kyuubi/localhost@EXAMPLE.COM\")",
                    ));
                };
                readable(&k.keytab, &format!("{key}.kerberos.keytab"))?;
                if k.qop.is_empty() {
                    return Err(invalid(
                        format!("{key}.kerberos.qop"),
                        "is empty",
                        "offer at least [\"auth\"]",
                    ));
                }
                if let Some(f) = &k.krb5_conf {
                    krb5.push((format!("{key}.kerberos.krb5_conf"), f.clone()));
                }
            }
            ClientAuth::Certificate => match &self.tls {
                Some(t) if t.client_ca.is_some() => {
                    if t.client_cert == Some(crate::tls::server::ClientCert::Optional) {
                        return Err(invalid(
                            format!("{key}.tls.client_cert"),
                            "is \"optional\", but with auth = \"certificate\" the certificate is the login",
                            "remove client_cert (required is the default)",
                        ));
                    }
                }
                _ => {
                    return Err(invalid(
                        format!("{key}.tls.client_ca"),
                        "auth = \"certificate\" needs client certificates checked against a CA",
                        "add [listener.tls] with cert, key and client_ca",
                    ))
                }
            },
            ClientAuth::None => {}
        }
        if let Some(t) = &self.tls {
            for (k, set) in [
                ("client_cert", t.client_cert.is_some()),
                ("identity", t.identity.is_some()),
            ] {
                if set && t.client_ca.is_none() {
                    return Err(invalid(
                        format!("{key}.tls.{k}"),
                        "is set but client_ca is not, so no client certificate is asked for",
                        "add client_ca (the CA bundle client certificates are checked against)",
                    ));
                }
            }
            if t.identity.is_some() && self.auth != ClientAuth::Certificate {
                return Err(invalid(
                    format!("{key}.tls.identity"),
                    "names the certificate's user, but auth is not \"certificate\"",
                    "set auth = \"certificate\", or remove identity",
                ));
            }
            readable(&t.cert, &format!("{key}.tls.cert"))?;
            readable(&t.key, &format!("{key}.tls.key"))?;
            if let Some(ca) = &t.client_ca {
                readable(ca, &format!("{key}.tls.client_ca"))?;
            }
        }
        if self.kerberos.is_some() && self.auth != ClientAuth::Kerberos {
            return Err(invalid(
                format!("{key}.kerberos"),
                "is set but auth is not \"kerberos\"",
                "set auth = \"kerberos\" or remove the table",
            ));
        }
        if self.max_connections == Some(0) {
            return Err(invalid(
                format!("{key}.max_connections"),
                "must be at least 1",
                "remove it to leave this listener to server.max_connections",
            ));
        }
        if let Some(ld) = &self.ldap {
            for (k, d) in [
                ("connect_timeout", ld.connect_timeout),
                ("timeout", ld.timeout),
            ] {
                if d.is_zero() {
                    return Err(invalid(
                        format!("{key}.ldap.{k}"),
                        "must be longer than 0s",
                        "remove it to use 5s",
                    ));
                }
            }
        }
        self.http_path = normalize_path(&self.http_path);
        if self.protocol == Transport::Http && self.http_path.is_empty() {
            return Err(invalid(
                format!("{key}.http_path"),
                "is empty",
                "use e.g. \"cliservice\"",
            ));
        }
        Ok(())
    }
}
