//! The broker as a TLS client of an upstream or an LDAP server: verified
//! against the system's roots (rustls-platform-verifier, the verifier
//! reqwest already uses for the management API, so one trust store serves
//! both), or against a pinned CA bundle and nothing else. There is no
//! "accept anything" mode.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::{certs, private_key, provider, roots, TlsError, VERSIONS};
use crate::wire::stream::Stream;

/// How a TLS peer is verified; one per upstream, kept for its lifetime so
/// that reconnects resume their TLS sessions (rustls' in-memory cache).
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// `ca_key` names the config key of `ca` in errors; `identity` is a client
/// certificate chain and key to present (PEM files). No ALPN is set: the
/// HTTP connector adds `http/1.1` itself.
pub fn config(
    ca: Option<&Path>,
    ca_key: &'static str,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match ca {
        Some(ca) => builder.with_root_certificates(roots(ca_key, ca)?),
        None => {
            let v = rustls_platform_verifier::Verifier::new(provider()).map_err(|e| {
                TlsError::Setup(format!(
                    "the system's CA certificates cannot be loaded ({e}); set {ca_key} to a PEM CA bundle"
                ))
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(v))
        }
    };
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs("upstream.tls_cert", cert)?;
            let k = private_key("upstream.tls_key", key)?;
            builder.with_client_auth_cert(chain, k).map_err(|e| {
                super::file_err(
                    "upstream.tls_key",
                    key,
                    format!("does not go with tls_cert: {e}"),
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

impl ClientTls {
    /// `name`: the host name checked against the certificate and sent as
    /// SNI (an IP address is checked as one, without SNI).
    pub fn new(
        config: Arc<ClientConfig>,
        name: &str,
        name_key: &'static str,
    ) -> Result<ClientTls, TlsError> {
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            TlsError::Setup(format!(
                "{name_key} = \"{name}\" is not a host name or IP address"
            ))
        })?;
        Ok(ClientTls {
            config,
            server_name,
        })
    }

    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let c = tokio_rustls::TlsConnector::from(self.config.clone());
        let s = c.connect(self.server_name.clone(), tcp).await?;
        Ok(Stream::Client(Box::new(s)))
    }
}
