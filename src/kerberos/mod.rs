//! Kerberos for both sides of the broker: an acceptor for clients (SASL
//! GSSAPI on binary, SPNEGO on HTTP) and one initiator per mapped principal
//! for upstreams. MIT krb5 reads a single krb5.conf per process
//! (`KRB5_CONFIG`), so the config check insists that every listener and
//! resource names the same file, and `serve` exports it before starting.
//!
//! Built with the `kerberos` feature (default). Without it the same types
//! exist but refuse to start, so configs fail with a clear message.

pub mod layer;

#[cfg(feature = "kerberos")]
mod ffi;
#[cfg(feature = "kerberos")]
mod gss;
#[cfg(feature = "kerberos")]
pub use gss::*;

#[cfg(not(feature = "kerberos"))]
mod disabled;
#[cfg(not(feature = "kerberos"))]
pub use disabled::*;

pub use layer::Qop;

#[derive(Debug, Clone, thiserror::Error)]
pub enum KerberosError {
    /// Keytab, principal or build problems: fix the configuration.
    #[error("Kerberos configuration: {0}")]
    Config(String),
    /// The peer's authentication was refused; safe to show it.
    #[error("{0}")]
    Refused(String),
    /// A GSS-API failure with its context (KDC unreachable, no key, ...).
    #[error("Kerberos: {0}")]
    Gss(String),
}

/// `hive/_HOST@REALM` with `_HOST` replaced by the host the broker dials,
/// as Hive JDBC does.
pub fn service_principal(pattern: &str, host: &str) -> String {
    pattern.replace("_HOST", &host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_placeholder_becomes_the_lowercased_upstream_host() {
        assert_eq!(
            super::service_principal("hive/_HOST@EXAMPLE.COM", "LocalHost"),
            "hive/localhost@EXAMPLE.COM"
        );
        assert_eq!(super::service_principal("hive/h1@R", "x"), "hive/h1@R");
    }
}
