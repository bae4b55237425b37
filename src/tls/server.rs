//! A listener's TLS: its certificate and key (reloaded without a restart
//! when the files change or on SIGHUP; a bad new file keeps the old pair),
//! optional client certificates checked against a CA bundle, and the user
//! name a client certificate stands for (`auth = "certificate"`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{StoresServerSessions, WebPkiClientVerifier};
use rustls::ServerConfig;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::{certs, file_err, private_key, provider, roots, TlsError, VERSIONS};
use crate::wire::stream::Stream;

/// `[listener.tls]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (RSA, ECDSA or Ed25519).
    pub key: PathBuf,
    /// Verify client certificates against this PEM CA bundle.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate
    /// (default: required).
    #[serde(default)]
    pub client_cert: Option<ClientCert>,
    /// With `auth = "certificate"`: which name in the client's certificate
    /// is its user name (default: the common name).
    #[serde(default)]
    pub identity: Option<CertIdentity>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CertIdentity {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS name among the subject alternative names.
    SanDns,
    /// The first e-mail address among the subject alternative names (whole:
    /// map it in the route if the upstream wants the local part).
    SanEmail,
}

/// The user name a client's (already verified) leaf certificate stands
/// for; `None` if it has no such name, or one no log line could carry.
pub fn cert_identity(
    cert: &rustls::pki_types::CertificateDer<'_>,
    from: CertIdentity,
) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let name = match from {
        CertIdentity::Cn => c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        CertIdentity::SanDns | CertIdentity::SanEmail => {
            let san = c.subject_alternative_name().ok()??;
            san.value
                .general_names
                .iter()
                .find_map(|g| match (from, g) {
                    (CertIdentity::SanDns, GeneralName::DNSName(d)) => Some(d.to_string()),
                    (CertIdentity::SanEmail, GeneralName::RFC822Name(m)) => Some(m.to_string()),
                    _ => None,
                })
        }
    };
    // a conservative alphabet: no look-alike or invisible characters can
    // make two upstream users of one name, or spoof a log line
    name.filter(|n| {
        !n.is_empty()
            && n.len() <= 255
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@+".contains(c))
    })
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientCert {
    #[default]
    Required,
    /// A client without a certificate logs in as the listener's `auth` says.
    Optional,
}

/// Why a client's TLS handshake failed, as counted in
/// `kyuubi_broker_tls_handshake_failures_total{reason}`.
#[derive(Debug)]
pub enum HandshakeError {
    /// The client closed before finishing the handshake.
    Closed,
    /// No client certificate, or one the CA bundle does not vouch for.
    ClientCertificate(String),
    /// Anything else the TLS layer refused (versions, ciphers, alerts).
    Protocol(String),
}

impl HandshakeError {
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Closed => "closed",
            HandshakeError::ClientCertificate(_) => "client_certificate",
            HandshakeError::Protocol(_) => "protocol",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            HandshakeError::Closed => "closed during the TLS handshake".into(),
            HandshakeError::ClientCertificate(d) | HandshakeError::Protocol(d) => d.clone(),
        }
    }
}

/// First byte of a TLS handshake record: a client whose first byte is
/// anything else speaks plaintext.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A digest of each file's contents, to notice a change (a renewed
/// certificate often has the same length, and a copy may keep the mtime).
type Stamp = Vec<Option<[u8; 32]>>;

struct Loaded {
    config: Arc<ServerConfig>,
    stamp: Stamp,
    not_after: Option<i64>,
}

pub struct ServerTls {
    files: ListenerTls,
    alpn: Vec<Vec<u8>>,
    /// Shared by every config this listener loads, so a reload does not
    /// forget the sessions clients may resume.
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// `http`: offer ALPN `http/1.1` (HTTP listeners).
    pub fn new(files: &ListenerTls, http: bool) -> Result<ServerTls, TlsError> {
        let sessions = rustls::server::ServerSessionMemoryCache::new(4096);
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError::Setup(format!("TLS session tickets: {e}")))?;
        let alpn = if http {
            vec![b"http/1.1".to_vec()]
        } else {
            Vec::new()
        };
        let loaded = load(files, &alpn, sessions.clone(), ticketer.clone())?;
        Ok(ServerTls {
            files: files.clone(),
            alpn,
            sessions,
            ticketer,
            current: RwLock::new(loaded),
        })
    }

    /// The rule naming a client certificate's user.
    pub fn identity(&self) -> CertIdentity {
        self.files.identity.unwrap_or_default()
    }

    /// Unix time the served certificate expires.
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .not_after
    }

    /// Loads the files again if any changed since the last load (or always,
    /// with `force`) and swaps them in when they are valid. `Ok(false)`:
    /// nothing changed. On an error the served pair stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        // stamped before reading: a write racing the read shows up at the
        // next check, and no file is read under the write lock
        let stamped = stamp(&self.files);
        let unchanged = stamped == self.current.read().unwrap_or_else(|p| p.into_inner()).stamp;
        if unchanged && !force {
            return Ok(false);
        }
        let fresh = load(
            &self.files,
            &self.alpn,
            self.sessions.clone(),
            self.ticketer.clone(),
        );
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        match fresh {
            Ok(l) => {
                *cur = Loaded {
                    stamp: stamped,
                    ..l
                };
                Ok(true)
            }
            Err(e) => {
                // retried when the files change again, not at every check
                cur.stamp = stamped;
                Err(e)
            }
        }
    }

    /// The server side of a TLS handshake on an accepted connection. The
    /// caller bounds it in time (the handshake timeout) and tells a
    /// plaintext client by its first byte ([`TLS_HANDSHAKE`]) beforehand.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Stream, HandshakeError> {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone();
        match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
            Ok(s) => Ok(Stream::Server(Box::new(s))),
            Err(e) => Err(classify(e)),
        }
    }
}

fn classify(e: std::io::Error) -> HandshakeError {
    use rustls::Error as E;
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => HandshakeError::Closed,
            _ => HandshakeError::Protocol(e.to_string()),
        };
    };
    let text = super::explain_rustls(inner);
    match inner {
        E::NoCertificatesPresented | E::InvalidCertificate(_) => {
            HandshakeError::ClientCertificate(text)
        }
        _ => HandshakeError::Protocol(text),
    }
}

fn stamp(files: &ListenerTls) -> Stamp {
    use sha2::Digest;
    let mut paths: Vec<&Path> = vec![&files.cert, &files.key];
    if let Some(ca) = &files.client_ca {
        paths.push(ca);
    }
    paths
        .into_iter()
        .map(|p| {
            let bytes = zeroize::Zeroizing::new(std::fs::read(p).ok()?);
            Some(sha2::Sha256::digest(&*bytes).into())
        })
        .collect()
}

fn load(
    files: &ListenerTls,
    alpn: &[Vec<u8>],
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Loaded, TlsError> {
    let stamped = stamp(files);
    let chain = certs("listener.tls.cert", &files.cert)?;
    let key = private_key("listener.tls.key", &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = Arc::new(roots("listener.tls.client_ca", ca)?);
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let v = match files.client_cert.unwrap_or_default() {
                ClientCert::Required => v,
                ClientCert::Optional => v.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| file_err("listener.tls.client_ca", ca, e.to_string()))?,
            )
        }
    };
    let not_after = super::not_after(&chain[0]);
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        file_err(
            "listener.tls.key",
            &files.key,
            format!("does not go with listener.tls.cert: {e}"),
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    if files.client_ca.is_none() {
        config.session_storage = sessions;
        config.ticketer = ticketer;
    } else {
        // a resumed session brings its client certificate back unchecked:
        // a CA since removed from client_ca, or an expired certificate,
        // would still log in. Every connection verifies its certificate.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Loaded {
        config: Arc::new(config),
        stamp: stamped,
        not_after,
    })
}
