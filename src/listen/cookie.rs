//! The `hive.server2.auth` cookie for HTTP clients: signed with a key made at
//! startup, naming a server-side entry that holds the identity, so drivers
//! need not resend credentials on every call. A cookie from before a restart
//! fails the check; drivers then resend credentials once.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use moka::future::Cache;
use rand::RngCore;
use sha2::Sha256;

use crate::identity::ClientIdentity;

pub const NAME: &str = "hive.server2.auth";

pub struct CookieJar {
    key: [u8; 32],
    issued: Cache<u64, ClientIdentity>,
    max_age: Duration,
    /// On TLS listeners: the browser-style `Secure` flag, so a client never
    /// sends the cookie over plaintext.
    secure: bool,
}

impl CookieJar {
    pub fn new(max_age: Duration, secure: bool) -> CookieJar {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        CookieJar {
            key,
            issued: Cache::builder()
                .time_to_live(max_age)
                .max_capacity(100_000)
                .build(),
            max_age,
            secure,
        }
    }

    fn sign(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// The `s=` part of a cookie whose payload is `payload`.
    pub(crate) fn signature(&self, payload: &str) -> String {
        B64.encode(self.sign(payload).finalize().into_bytes())
    }

    /// Records `id` and returns the Set-Cookie header value.
    pub async fn issue(&self, id: ClientIdentity) -> String {
        let rn = rand::rngs::OsRng.next_u64();
        let payload = format!("cu={}&rn={rn}", B64.encode(&id.user));
        let sig = self.signature(&payload);
        self.issued.insert(rn, id).await;
        format!(
            "{NAME}={payload}&s={sig}; Max-Age={}; Path=/; HttpOnly{}",
            self.max_age.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The identity behind a valid cookie in a `Cookie` header.
    pub async fn check(&self, header: &str) -> Option<ClientIdentity> {
        let value = header
            .split(';')
            .map(str::trim)
            .find_map(|c| c.strip_prefix(NAME)?.strip_prefix('='))?;
        let (payload, sig) = value.rsplit_once("&s=")?;
        let sig = B64.decode(sig).ok()?;
        // constant-time comparison
        self.sign(payload).verify_slice(&sig).ok()?;
        let mut user = None;
        let mut rn = None;
        for kv in payload.split('&') {
            match kv.split_once('=')? {
                ("cu", v) => user = String::from_utf8(B64.decode(v).ok()?).ok(),
                ("rn", v) => rn = v.parse::<u64>().ok(),
                _ => return None,
            }
        }
        let id = self.issued.get(&rn?).await?;
        (Some(&id.user) == user.as_ref()).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn alice() -> ClientIdentity {
        ClientIdentity {
            user: "alice".into(),
            password: Secret::new("pw"),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn issued_cookie_is_honoured_among_other_cookies() {
        let jar = CookieJar::new(Duration::from_secs(60), false);
        let set = jar.issue(alice()).await;
        assert!(set.contains("HttpOnly") && set.contains("Max-Age=60"));
        assert!(
            !set.contains("Secure"),
            "a plaintext listener's cookie: {set}"
        );
        let header = format!("other=1; {}", cookie_pair(&set));
        assert_eq!(jar.check(&header).await.unwrap().user, "alice");
    }

    #[tokio::test]
    async fn a_tls_listeners_cookie_is_marked_secure() {
        let jar = CookieJar::new(Duration::from_secs(60), true);
        let set = jar.issue(alice()).await;
        assert!(set.ends_with("; HttpOnly; Secure"), "{set}");
    }

    #[tokio::test]
    async fn tampered_or_foreign_cookies_are_refused() {
        let jar = CookieJar::new(Duration::from_secs(60), false);
        let pair = cookie_pair(&jar.issue(alice()).await);
        let forged = pair.replace(&B64.encode("alice"), &B64.encode("admin"));
        assert!(jar.check(&forged).await.is_none());
        let other_broker = CookieJar::new(Duration::from_secs(60), false);
        assert!(other_broker.check(&pair).await.is_none());
        assert!(jar.check("hive.server2.auth=garbage").await.is_none());
    }

    #[tokio::test]
    async fn password_never_appears_in_the_cookie() {
        let jar = CookieJar::new(Duration::from_secs(60), false);
        let set = jar.issue(alice()).await;
        assert!(!set.contains(&B64.encode("pw")));
    }
}
