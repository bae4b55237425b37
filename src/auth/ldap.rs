//! LDAP password check with the options Kyuubi offers: `user_dn_pattern`
//! (colon-separated, `%s` = user), `base_dn` + `guid_key`, or a search as
//! `bind_dn` (then bind as the DN found), plus an optional group membership
//! check. Successful checks are cached briefly as a salted hash.
//!
//! TLS (`ldaps://`, or `starttls` on `ldap://`) is verified with the
//! project's client config ([`crate::tls::client::config`]: `tls_ca`, or the
//! system's roots), built once; a TLS failure is "authentication service
//! unavailable" to the client, with the reason in the broker's log.

use std::sync::Arc;

use ldap3::{
    dn_escape, ldap_escape, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry,
};
use moka::future::Cache;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use super::AuthError;
use crate::config::LdapConfig;
use crate::secret::Secret;
use crate::tls::TlsError;

pub struct LdapAuth {
    cfg: LdapConfig,
    /// How the LDAP server's certificate is checked, when any URL is TLS.
    tls: Option<Arc<rustls::ClientConfig>>,
    salt: [u8; 16],
    /// user → salted hash of a password that bound successfully.
    cache: Cache<String, [u8; 32]>,
}

impl LdapAuth {
    /// Reads `tls_ca` (or the system's roots) now, when any URL is TLS, so a
    /// bad bundle stops startup instead of failing every login.
    pub fn new(cfg: LdapConfig) -> Result<LdapAuth, TlsError> {
        let tls = if cfg.uses_tls() {
            // no client certificate: the bind is the login
            Some(crate::tls::client::config(
                cfg.tls_ca.as_deref(),
                "ldap.tls_ca",
                None,
            )?)
        } else {
            None
        };
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        Ok(LdapAuth {
            cache: Cache::builder()
                .time_to_live(cfg.cache_ttl)
                .max_capacity(10_000)
                .build(),
            cfg,
            tls,
            salt,
        })
    }

    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether this password bound for `user` lately (the success cache).
    pub async fn remembered(&self, user: &str, password: &Secret) -> bool {
        let pw = password.expose();
        if pw.is_empty() || pw.starts_with('\0') {
            return false;
        }
        let d = self.digest(user, pw);
        match self.cache.get(user).await {
            Some(hit) => bool::from(hit.ct_eq(&d)),
            None => false,
        }
    }

    /// Binds as `user` and remembers a success.
    pub async fn verify(&self, user: &str, password: &Secret) -> Result<(), AuthError> {
        let pw = password.expose();
        // an empty password would be an anonymous bind, which LDAP "accepts"
        if pw.is_empty() || pw.starts_with('\0') {
            return Err(AuthError::Refused(user.to_string()));
        }
        // the caller asked `remembered` first: this is a real bind
        self.bind_check(user, pw).await?;
        self.cache
            .insert(user.to_string(), self.digest(user, pw))
            .await;
        Ok(())
    }

    /// The first URL that connects (and completes TLS, when it is TLS);
    /// `connect_timeout` covers the StartTLS exchange and handshake too.
    async fn connect(&self) -> Result<ldap3::Ldap, AuthError> {
        let mut settings = LdapConnSettings::new().set_conn_timeout(self.cfg.connect_timeout);
        if let Some(tls) = &self.tls {
            // ldap3 turns starttls off for ldaps:// URLs itself
            settings = settings
                .set_config(tls.clone())
                .set_starttls(self.cfg.starttls);
        }
        let mut last = String::new();
        for url in self.cfg.url.split_whitespace() {
            match LdapConnAsync::with_settings(settings.clone(), url).await {
                Ok((conn, ldap)) => {
                    ldap3::drive!(conn);
                    return Ok(ldap);
                }
                Err(e) => {
                    last = match self.why(&e) {
                        (true, why) => format!("TLS to the LDAP server failed ({url}: {why})"),
                        (false, why) => format!("LDAP server unreachable ({url}: {why})"),
                    }
                }
            }
        }
        Err(AuthError::Unavailable(last))
    }

    /// Why connecting failed, for the broker's log, and whether it was TLS
    /// that failed (certificate, handshake, StartTLS).
    fn why(&self, e: &LdapError) -> (bool, String) {
        let tls = |r: &rustls::Error| {
            let fix = match (r, &self.cfg.tls_ca) {
                (rustls::Error::InvalidCertificate(_), Some(_)) => "; check ldap.tls_ca",
                (rustls::Error::InvalidCertificate(_), None) => {
                    "; set ldap.tls_ca to a bundle of the CAs that sign it"
                }
                _ => "",
            };
            (true, format!("{}{fix}", crate::tls::explain_rustls(r)))
        };
        match e {
            LdapError::Io { source } => match source
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                Some(r) => tls(r),
                // slapd closes a plain port on a ClientHello
                None if self.tls.is_some()
                    && source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    (
                        true,
                        "the server closed the connection in the TLS handshake; if this port is plain LDAP, use ldap:// with starttls = true".into(),
                    )
                }
                None => (false, e.to_string()),
            },
            LdapError::Rustls { source } => tls(source),
            LdapError::DNSName { .. } => (
                true,
                "the URL's host is not a name a certificate can be checked against".into(),
            ),
            // StartTLS is the one operation before a connection is up
            LdapError::LdapResult { result } => (
                true,
                format!(
                    "the server refused StartTLS (rc {}: {})",
                    result.rc, result.text
                ),
            ),
            LdapError::Timeout { .. } => (
                false,
                format!(
                    "no connection within connect_timeout ({})",
                    humantime::format_duration(self.cfg.connect_timeout)
                ),
            ),
            _ => (false, e.to_string()),
        }
    }

    /// The DNs to try for `user`.
    async fn candidates(
        &self,
        ldap: &mut ldap3::Ldap,
        user: &str,
    ) -> Result<Vec<String>, AuthError> {
        let c = &self.cfg;
        if let Some(bind_dn) = &c.bind_dn {
            let pw = c
                .bind_password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            ldap.with_timeout(self.cfg.timeout)
                .simple_bind(bind_dn, &pw)
                .await
                .and_then(|r| r.success())
                .map_err(|e| {
                    AuthError::Unavailable(format!("LDAP service bind as {bind_dn} failed: {e}"))
                })?;
            let base = c.base_dn.as_deref().unwrap_or_default();
            let filter = format!(
                "(&({}={}){})",
                c.guid_key,
                ldap_escape(user),
                c.user_filter.as_deref().unwrap_or("")
            );
            let (entries, _) = ldap
                .with_timeout(self.cfg.timeout)
                .search(base, Scope::Subtree, &filter, vec!["1.1"])
                .await
                .and_then(|r| r.success())
                .map_err(|e| AuthError::Unavailable(format!("LDAP search failed: {e}")))?;
            return Ok(match entries.len() {
                1 => vec![SearchEntry::construct(entries.into_iter().next().expect("one")).dn],
                _ => Vec::new(), // none or ambiguous: refuse
            });
        }
        let user = dn_escape(user);
        if let Some(patterns) = &c.user_dn_pattern {
            return Ok(patterns
                .split(':')
                .map(|p| p.replace("%s", &user))
                .collect());
        }
        let base = c.base_dn.as_deref().unwrap_or_default();
        Ok(vec![format!("{}={user},{base}", c.guid_key)])
    }

    async fn bind_check(&self, user: &str, password: &str) -> Result<(), AuthError> {
        let mut ldap = self.connect().await?;
        let result = async {
            let mut bound = None;
            for dn in self.candidates(&mut ldap, user).await? {
                match ldap
                    .with_timeout(self.cfg.timeout)
                    .simple_bind(&dn, password)
                    .await
                {
                    Ok(r) if r.rc == 0 => {
                        bound = Some(dn);
                        break;
                    }
                    Ok(r) => debug!(%dn, rc = r.rc, "LDAP bind refused"),
                    Err(e) => return Err(AuthError::Unavailable(format!("LDAP bind failed: {e}"))),
                }
            }
            let dn = bound.ok_or_else(|| AuthError::Refused(user.to_string()))?;
            if let Some(group) = &self.cfg.group_dn {
                let filter = format!("({}={})", self.cfg.group_member_attribute, ldap_escape(&dn));
                let (entries, _) = ldap
                    .with_timeout(self.cfg.timeout)
                    .search(group, Scope::Base, &filter, vec!["1.1"])
                    .await
                    .and_then(|r| r.success())
                    .map_err(|e| {
                        AuthError::Unavailable(format!("LDAP group lookup failed: {e}"))
                    })?;
                if entries.is_empty() {
                    warn!(%user, %group, "LDAP user is not in the required group");
                    return Err(AuthError::Refused(user.to_string()));
                }
            }
            Ok(())
        }
        .await;
        let _ = ldap.with_timeout(self.cfg.timeout).unbind().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(toml: &str) -> LdapAuth {
        LdapAuth::new(toml::from_str(toml).unwrap()).unwrap()
    }

    #[test]
    fn plain_ldap_builds_no_tls_config_and_tls_ldap_does() {
        assert!(auth("url = \"ldap://127.0.0.1:3890\"").tls.is_none());
        assert!(auth("url = \"ldaps://localhost:6360\"").tls.is_some());
        assert!(auth("url = \"ldap://localhost\"\nstarttls = true")
            .tls
            .is_some());
    }

    #[test]
    fn tls_failures_read_as_tls_with_what_to_fix() {
        let a = auth("url = \"ldap://ldap.example.com\"\nstarttls = true");
        let cert = LdapError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(
            a.why(&cert),
            (
                true,
                "its certificate is not signed by a trusted CA; set ldap.tls_ca to a bundle of the CAs that sign it".into()
            )
        );
        let refused = LdapError::from(ldap3::LdapResult {
            rc: 2,
            matched: String::new(),
            text: "unsupported extended operation".into(),
            refs: Vec::new(),
            ctrls: Vec::new(),
        });
        assert_eq!(
            a.why(&refused),
            (
                true,
                "the server refused StartTLS (rc 2: unsupported extended operation)".into()
            )
        );
        let down = LdapError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!a.why(&down).0, "a refused connection is not a TLS failure");
    }
}
