//! Client authentication at the broker: turns presented credentials into a
//! [`ClientIdentity`]. Every listener calls [`authenticate`], whatever the
//! transport.

use std::net::SocketAddr;

use crate::config::ClientAuth;
use crate::secret::Secret;
use crate::session::ClientIdentity;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// One message for every refusal, so a caller cannot tell a wrong
    /// password from an unknown user.
    #[error("authentication failed for user '{0}'")]
    Refused(String),
}

pub async fn authenticate(
    mode: ClientAuth,
    user: &str,
    password: Secret,
    addr: SocketAddr,
) -> Result<ClientIdentity, AuthError> {
    if user.is_empty() {
        return Err(AuthError::Refused(String::new()));
    }
    match mode {
        // Config validation allows this on loopback listeners only.
        ClientAuth::None => Ok(ClientIdentity {
            user: user.to_string(),
            password,
            addr,
        }),
    }
}
