//! LDAP password check with the options Kyuubi offers: `user_dn_pattern`
//! (colon-separated, `%s` = user), `base_dn` + `guid_key`, or a search as
//! `bind_dn` (then bind as the DN found), plus an optional group membership
//! check. Successful checks are cached briefly as a salted hash.

use ldap3::{dn_escape, ldap_escape, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use moka::future::Cache;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use super::AuthError;
use crate::config::LdapConfig;
use crate::secret::Secret;

pub struct LdapAuth {
    cfg: LdapConfig,
    salt: [u8; 16],
    /// user → salted hash of a password that bound successfully.
    cache: Cache<String, [u8; 32]>,
}

impl LdapAuth {
    pub fn new(cfg: LdapConfig) -> LdapAuth {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        LdapAuth {
            cache: Cache::builder()
                .time_to_live(cfg.cache_ttl)
                .max_capacity(10_000)
                .build(),
            cfg,
            salt,
        }
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

    async fn connect(&self) -> Result<ldap3::Ldap, AuthError> {
        let settings = LdapConnSettings::new().set_conn_timeout(self.cfg.connect_timeout);
        let mut last = String::new();
        for url in self.cfg.url.split_whitespace() {
            match LdapConnAsync::with_settings(settings.clone(), url).await {
                Ok((conn, ldap)) => {
                    ldap3::drive!(conn);
                    return Ok(ldap);
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(AuthError::Unavailable(format!(
            "LDAP server unreachable ({last})"
        )))
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
