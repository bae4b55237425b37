//! TLS with rustls and the ring provider (the process's only one: reqwest
//! and ldap3 are built without their aws-lc-rs defaults). [`server`] holds a
//! listener's certificate, reloaded when its files change, and checks client
//! certificates; [`client`] builds what upstreams and LDAP servers are
//! verified against. Every file error names the config key and the file;
//! none carries a byte of a key.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} = \"{}\": {detail}", path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{0}")]
    Setup(String),
}

fn file_err(key: &'static str, path: &Path, detail: impl Into<String>) -> TlsError {
    TlsError::File {
        key,
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The provider every TLS config here is built with, named explicitly so
/// nothing depends on which crate installed a process default first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2, nothing older (rustls has nothing older).
pub(crate) const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(key: &'static str, path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| file_err(key, path, format!("cannot read it: {e}")))
}

/// A PEM file's certificates, in file order (a chain: leaf first).
pub(crate) fn certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(key, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            key,
            path,
            "holds no \"BEGIN CERTIFICATE\" block; give the PEM certificate chain, leaf first",
        ));
    }
    Ok(certs)
}

/// A PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub(crate) fn private_key(
    key: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(key, path)?;
    // the parser's error never quotes the file, so it may be shown
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        file_err(
            key,
            path,
            format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"),
        )
    })
}

/// Trust anchors from a PEM bundle: only these, nothing from the system.
pub(crate) fn roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(key, path)? {
        store.add(c).map_err(|e| {
            file_err(
                key,
                path,
                format!("a certificate in it is not a usable CA: {e}"),
            )
        })?;
    }
    Ok(store)
}

/// Unix time at which a DER certificate stops being valid.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(c.validity().not_after.timestamp())
}

/// What a rustls failure inside an I/O error means, in words a user can act
/// on; `None` when the error is not a TLS one.
pub fn explain(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?;
    if let Some(r) = inner.downcast_ref::<rustls::Error>() {
        return Some(explain_rustls(r));
    }
    // hyper-rustls wraps tokio-rustls' error in another io::Error
    explain(inner.downcast_ref::<std::io::Error>()?)
}

pub fn explain_rustls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "its certificate is not signed by a trusted CA".into(),
            C::Expired | C::ExpiredContext { .. } => "its certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "its certificate is not valid yet (check the clock)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "its certificate is not valid for this host name".into()
            }
            C::Revoked => "its certificate is revoked".into(),
            C::BadSignature => "its certificate has a bad signature".into(),
            other => format!("its certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(a) => format!("the peer ended the TLS handshake ({a:?})"),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "the peer does not speak TLS here".into()
        }
        rustls::Error::NoCertificatesPresented => "no client certificate was presented".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_certificate_file_error_names_the_key_and_the_file() {
        let e = certs("listener.tls.cert", Path::new("/nonexistent/x.pem")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("listener.tls.cert = \"/nonexistent/x.pem\": cannot read it"),
            "{s}"
        );
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused_as_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let s = certs("tls_ca", &p).unwrap_err().to_string();
        assert!(s.contains("no \"BEGIN CERTIFICATE\" block"), "{s}");
        let s = private_key("listener.tls.key", &p).unwrap_err().to_string();
        assert!(s.contains("no PEM private key"), "{s}");
    }

    #[test]
    fn expired_unknown_issuer_and_wrong_name_read_as_what_to_fix() {
        use rustls::CertificateError as C;
        let say = |c| explain_rustls(&rustls::Error::InvalidCertificate(c));
        assert!(say(C::UnknownIssuer).contains("not signed by a trusted CA"));
        assert!(say(C::Expired).contains("expired"));
        assert!(say(C::NotValidForName).contains("not valid for this host name"));
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(C::Expired),
        );
        assert_eq!(explain(&io).as_deref(), Some("its certificate has expired"));
        let wrapped = std::io::Error::other(io);
        assert_eq!(
            explain(&wrapped).as_deref(),
            Some("its certificate has expired")
        );
        assert_eq!(explain(&std::io::Error::other("plain")), None);
    }
}
