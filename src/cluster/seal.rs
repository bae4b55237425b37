//! The fleet's key, and token values sealed with it (AES-256-GCM) for the
//! record in ZooKeeper: whoever can read the znode (an operator with
//! `zkCli`, a backup of ZooKeeper's snapshots) learns token ids and ages,
//! never a usable value.
//!
//! A sealed value is `gcm1:<base64 of nonce ‖ ciphertext ‖ tag>`. The nonce
//! is 96 random bits: a fleet seals a few values per rotation, far below
//! the 2^32 messages random nonces are good for under one key. The token's
//! name is the associated data, so a value cannot be moved onto another
//! token's entry unnoticed.

use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::Digest;
use zeroize::Zeroizing;

/// Where the key comes from when `cluster.token_key_file` is not set.
pub const KEY_ENV: &str = "KYUUBI_BROKER_FLEET_KEY";
const PREFIX: &str = "gcm1:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{source_name}: {reason}")]
    Bad { source_name: String, reason: String },
    #[error(
        "a fleet rotating [tokens] needs its token key: set cluster.token_key_file \
         or the environment variable {KEY_ENV} (64 hex digits, the same on every broker; \
         `scripts/fixture.sh fleet-key` writes one)"
    )]
    Missing,
}

/// A sealed value that would not open: a different key, or a changed text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

/// The 256-bit fleet key. Its bytes never leave this type.
pub struct FleetKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetKey").field("id", &self.id).finish()
    }
}

impl FleetKey {
    /// From `file` (which group and others must not be able to read), else
    /// from [`KEY_ENV`].
    pub fn load(file: Option<&Path>) -> Result<FleetKey, KeyError> {
        match file {
            Some(p) => {
                use std::os::unix::fs::PermissionsExt;
                let name = format!("cluster.token_key_file {}", p.display());
                let bad = |reason: String| KeyError::Bad {
                    source_name: name.clone(),
                    reason,
                };
                use std::io::Read;
                // the mode checked is the one of the file read (fstat)
                let f = std::fs::File::open(p).map_err(|e| bad(e.to_string()))?;
                let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(bad(format!(
                        "is readable by group or others (mode {mode:03o}); chmod 600 it"
                    )));
                }
                let mut text = Zeroizing::new(String::new());
                f.take(4096)
                    .read_to_string(&mut text)
                    .map_err(|e| bad(e.to_string()))?;
                FleetKey::from_hex(&text).map_err(bad)
            }
            None => match std::env::var(KEY_ENV) {
                Ok(v) => {
                    let v = Zeroizing::new(v);
                    FleetKey::from_hex(&v).map_err(|reason| KeyError::Bad {
                        source_name: KEY_ENV.into(),
                        reason,
                    })
                }
                Err(_) => Err(KeyError::Missing),
            },
        }
    }

    /// 64 hex digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<FleetKey, String> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "must hold 64 hex digits (32 bytes), not {} characters; e.g. `openssl rand -hex 32`",
                t.len()
            ));
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        let digest = sha2::Sha256::new()
            .chain_update(b"kyuubi-broker fleet key id\0")
            .chain_update(raw.as_slice())
            .finalize();
        let id = crate::cloud::sign::hex(&digest[..4]);
        let key =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw.as_slice()).expect("32 bytes"));
        Ok(FleetKey { key, id })
    }

    /// A short fingerprint (8 hex digits of a hash of the key) written
    /// beside sealed values, so a broker with another key says so instead
    /// of failing to open every value.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `value` for the token called `name`.
    pub fn seal(&self, value: &str, name: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut buf = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .expect("a token value is far below the AES-GCM size limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    /// Opens what [`FleetKey::seal`] sealed for `name`.
    pub fn open(&self, sealed: &str, name: &str) -> Result<String, OpenError> {
        let b64 = sealed.strip_prefix(PREFIX).ok_or_else(|| {
            OpenError(format!(
                "the value of token '{name}' is not sealed ({PREFIX}…)"
            ))
        })?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| OpenError(format!("the sealed value of token '{name}' is not base64")))?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError(format!(
                "the sealed value of token '{name}' is truncated"
            )));
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let mut buf = Zeroizing::new(ct.to_vec());
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("NONCE_LEN bytes");
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| {
                OpenError(format!(
                    "the sealed value of token '{name}' does not open with this broker's key ({}); \
                     it was sealed with another key or changed",
                    self.id
                ))
            })?;
        String::from_utf8(plain.to_vec())
            .map_err(|_| OpenError(format!("the value of token '{name}' is not text")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const K2: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn a_sealed_value_opens_with_the_same_key_and_name_only() {
        let k = FleetKey::from_hex(K1).unwrap();
        let sealed = k.seal("secretvalue0123456789abcdefghijk", "kyuubi-broker-ab-1");
        assert!(sealed.starts_with("gcm1:"));
        assert!(!sealed.contains("secretvalue"));
        assert_eq!(
            k.open(&sealed, "kyuubi-broker-ab-1").unwrap(),
            "secretvalue0123456789abcdefghijk"
        );
        // the same value seals differently every time (random nonce)
        assert_ne!(
            sealed,
            k.seal("secretvalue0123456789abcdefghijk", "kyuubi-broker-ab-1")
        );
        // moved onto another token's entry
        let e = k
            .open(&sealed, "kyuubi-broker-ab-2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not open") && e.contains(k.id()), "{e}");
        // another fleet's key
        let other = FleetKey::from_hex(K2).unwrap();
        assert_ne!(other.id(), k.id());
        assert!(other.open(&sealed, "kyuubi-broker-ab-1").is_err());
        // one bit flipped
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&sealed[5..])
            .unwrap();
        raw[14] ^= 1;
        let flipped = format!(
            "gcm1:{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        assert!(k.open(&flipped, "kyuubi-broker-ab-1").is_err());
        for junk in ["plain", "gcm1:!!", "gcm1:AAAA"] {
            let e = k.open(junk, "n").unwrap_err().to_string();
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn a_key_file_must_be_private_and_hold_64_hex_digits_and_errors_never_show_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.key");
        std::fs::write(&p, format!("{K1}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = FleetKey::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = FleetKey::load(Some(&p)).unwrap();
        assert_eq!(k.id(), FleetKey::from_hex(K1).unwrap().id());
        assert!(!format!("{k:?}").contains("0011"));
        std::fs::write(&p, &K1[..40]).unwrap();
        let e = FleetKey::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("64 hex digits") && !e.contains(&K1[..40]), "{e}");
        let e = FleetKey::from_hex(&"zz".repeat(32)).unwrap_err();
        assert!(!e.contains("zzzz"), "{e}");
    }
}
