//! Client authentication at the broker: turns presented credentials into a
//! [`ClientIdentity`]. Each listener builds one [`Authenticator`] at startup
//! ([`Authenticator::from_config`], whose errors name the config key); every
//! transport calls [`Authenticator::authenticate`].

mod guard;
mod ldap;
mod pool;

pub use self::guard::{Guard, Throttle};
use std::sync::Arc;

use std::net::SocketAddr;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;

use crate::config::{invalid, ClientAuth, ConfigError, ListenerConfig};
use crate::identity::ClientIdentity;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// One message for every refusal, so a caller cannot tell a wrong
    /// password from an unknown user.
    #[error("authentication failed for user '{0}'")]
    Refused(String),
    /// No usable credentials: missing, malformed, or of a mechanism this
    /// listener does not take. The text says which and is safe to show.
    #[error("{0}")]
    Unusable(String),
    /// The authentication service itself failed (not the user's fault).
    /// The detail is for the broker's log; clients are told only that the
    /// service is unavailable.
    #[error("authentication service unavailable: {0}")]
    Unavailable(String),
    /// Refused without a check after repeated failures ([`Guard`]).
    #[error("too many failed logins; try again in {retry_after} s")]
    Throttled { why: Throttle, retry_after: u64 },
}

/// One listener's way of checking credentials, with the process-wide
/// [`Guard`] (auth pool, backoff) in front of it.
pub struct Authenticator {
    check: Check,
    guard: Arc<Guard>,
}

enum Check {
    /// Any user name is accepted (loopback listeners with an explicit flag).
    AnyUser,
    Ldap(Arc<ldap::LdapAuth>),
    /// name → argon2 PHC hash.
    Static(Arc<Vec<(String, String)>>),
    /// GSSAPI / SPNEGO only; passwords are refused.
    Kerberos(Box<crate::kerberos::Acceptor>),
    /// The name in the client's verified TLS certificate.
    Certificate,
}

/// A well-formed argon2id string nobody knows a password for: unknown users
/// are checked against it, so they take as long as known ones.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$JuCaNUGxr9dcrAa7j9Ou9OcmJ3D+HvdfB1ak1tuPHHk";

impl Authenticator {
    /// Builds the authenticator of the listener at `key` (e.g. `listener[0]`):
    /// reads its users file or keytab now, so a broken one stops startup
    /// with an error naming the key instead of refusing every client later.
    pub fn from_config(
        l: &ListenerConfig,
        key: &str,
        guard: &Arc<Guard>,
    ) -> Result<Authenticator, ConfigError> {
        let bad = |k: &str, problem: String, fix: &str| invalid(format!("{key}.{k}"), problem, fix);
        let missing = |k: &str, what: &str| bad(k, format!("auth = \"{what}\" needs it"), "add it");
        let check = match l.auth {
            ClientAuth::None => Check::AnyUser,
            ClientAuth::Certificate => Check::Certificate,
            ClientAuth::Ldap => Check::Ldap(Arc::new(
                ldap::LdapAuth::new(l.ldap.clone().ok_or_else(|| missing("ldap", "ldap"))?)
                    .map_err(|e| {
                        bad(
                            "ldap.tls_ca",
                            e.to_string(),
                            "give a PEM bundle of the CA certificates that sign the LDAP server's certificate",
                        )
                    })?,
            )),
            ClientAuth::Static => {
                let f = l
                    .users_file
                    .as_deref()
                    .ok_or_else(|| missing("users_file", "static"))?;
                Check::Static(Arc::new(
                    load_users(f).map_err(|e| bad("users_file", e, "fix the file"))?,
                ))
            }
            ClientAuth::Kerberos => {
                let k = l
                    .kerberos
                    .as_ref()
                    .ok_or_else(|| missing("kerberos", "kerberos"))?;
                let a = crate::kerberos::Acceptor::from_keytab(
                    &k.keytab,
                    k.principal.as_deref(),
                    k.qop.clone(),
                )
                .map_err(|e| {
                    bad(
                        "kerberos.keytab",
                        e.to_string(),
                        "point keytab at a keytab holding the listener's service principal",
                    )
                })?;
                Check::Kerberos(Box::new(a))
            }
        };
        Ok(Authenticator {
            check,
            guard: guard.clone(),
        })
    }

    /// The acceptor, when this listener takes Kerberos.
    pub fn kerberos(&self) -> Option<&crate::kerberos::Acceptor> {
        match &self.check {
            Check::Kerberos(a) => Some(a),
            _ => None,
        }
    }

    /// Whether the client's certificate is its login (no password asked).
    pub fn by_certificate(&self) -> bool {
        matches!(self.check, Check::Certificate)
    }

    /// `cert`: the user name of the client's verified TLS certificate, on
    /// a listener with `auth = "certificate"`. There the name the client
    /// gives must be that one, empty or `anonymous`; the password is not
    /// checked, only carried (a passthrough route forwards it; without one,
    /// Hive JDBC's own default, `anonymous`, as a HiveServer2 without
    /// authentication still wants a non-empty password).
    pub async fn authenticate(
        &self,
        user: &str,
        password: Secret,
        addr: SocketAddr,
        cert: Option<&str>,
    ) -> Result<ClientIdentity, AuthError> {
        if let Check::Certificate = self.check {
            let Some(name) = cert else {
                return Err(AuthError::Unusable(
                    "this listener logs in by client certificate, and none names a user".into(),
                ));
            };
            if !(user.is_empty() || user == "anonymous" || user == name) {
                return Err(AuthError::Unusable(format!(
                    "the client certificate names '{name}'; log in as that user or without one"
                )));
            }
            let password = if password.is_empty() {
                Secret::new("anonymous")
            } else {
                password
            };
            return Ok(ClientIdentity::new(name, password, addr));
        }
        if user.is_empty() {
            return Err(AuthError::Refused(String::new()));
        }
        let check: Box<dyn FnOnce() -> Result<(), AuthError> + Send> = match &self.check {
            // one answer whatever the password: do not reveal whether it was right
            Check::Kerberos(_) => return Err(AuthError::Refused(user.to_string())),
            Check::Certificate => unreachable!("answered above"),
            Check::AnyUser => return Ok(ClientIdentity::new(user, password, addr)),
            // a password that bound lately: no pool, no LDAP round trip
            // (an HTTP client without cookies logs in on every request)
            Check::Ldap(l) if l.remembered(user, &password).await => {
                return Ok(ClientIdentity::new(user, password, addr))
            }
            Check::Ldap(l) => {
                let (l, u, pw) = (l.clone(), user.to_string(), password.clone());
                // ldap3 is async: it runs on a runtime of its own on the
                // blocking thread, so its I/O and BER work never lands on
                // the workers that serve RPCs
                Box::new(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| AuthError::Unavailable(format!("LDAP runtime: {e}")))?
                        .block_on(l.verify(&u, &pw))
                })
            }
            Check::Static(users) => {
                let (users, u, pw) = (users.clone(), user.to_string(), password.clone());
                Box::new(move || verify_static(&users, &u, &pw))
            }
        };
        self.guard.checked(user, addr.ip(), check).await?;
        Ok(ClientIdentity::new(user, password, addr))
    }
}

/// The argon2 check of a users file; unknown users are checked against a
/// dummy hash so they take as long as known ones.
fn verify_static(
    users: &[(String, String)],
    user: &str,
    password: &Secret,
) -> Result<(), AuthError> {
    let hash = users
        .iter()
        .find(|(u, _)| u == user)
        .map(|(_, h)| h.as_str());
    let parsed = PasswordHash::new(hash.unwrap_or(DUMMY_HASH))
        .map_err(|_| AuthError::Refused(user.into()))?;
    let ok = Argon2::default()
        .verify_password(password.expose().as_bytes(), &parsed)
        .is_ok();
    if !ok || hash.is_none() {
        return Err(AuthError::Refused(user.to_string()));
    }
    Ok(())
}

/// `name:$argon2id$...` per line; `#` starts a comment.
pub fn load_users(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("users_file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("users_file {}:{}: {why}", path.display(), i + 1);
        let (name, hash) = line
            .split_once(':')
            .ok_or_else(|| bad("expected name:hash"))?;
        PasswordHash::new(hash).map_err(|_| {
            bad("not an argon2 PHC hash (make one with `kyuubi-broker hash-password`)")
        })?;
        out.push((name.to_string(), hash.to_string()));
    }
    Ok(out)
}

/// An argon2id PHC hash of `password`, for users files.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test]
    async fn static_users_check_argon2_hashes_with_one_error_for_all_failures() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        std::fs::write(
            &f,
            format!("# users\nalice:{}\n", hash_password("alice-pw")),
        )
        .unwrap();
        let guard = Arc::new(Guard::new(&crate::config::ServerConfig::default()));
        let a = Authenticator {
            check: Check::Static(Arc::new(load_users(&f).unwrap())),
            guard,
        };
        assert_eq!(
            a.authenticate("alice", Secret::new("alice-pw"), addr(), None)
                .await
                .unwrap()
                .user,
            "alice"
        );
        let wrong = a
            .authenticate("alice", Secret::new("nope"), addr(), None)
            .await
            .unwrap_err()
            .to_string();
        let unknown = a
            .authenticate("mallory", Secret::new("nope"), addr(), None)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(wrong.replace("alice", "X"), unknown.replace("mallory", "X"));
    }

    #[test]
    fn a_bad_users_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        std::fs::write(&f, "alice:plaintext\n").unwrap();
        let e = load_users(&f).unwrap_err();
        assert!(e.contains(":1:") && e.contains("argon2"), "{e}");
    }

    #[test]
    fn dummy_hash_is_a_valid_phc_string() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
