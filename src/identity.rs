//! Who is on each side of the broker: the client as the listener
//! authenticated it, and the credential presented upstream for it. Plain
//! data with no behaviour, so that authentication, mapping, upstreams and the
//! session core can all name these types without depending on each other.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::kerberos::Initiator;
use crate::secret::Secret;

/// Who the client is, as established by the listener.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub user: String,
    /// Kept for passthrough credentials (the client's own password upstream);
    /// empty for Kerberos clients.
    pub password: Secret,
    pub addr: SocketAddr,
}

impl ClientIdentity {
    /// A client authenticated by its user name and password.
    pub fn new(user: &str, password: Secret, addr: SocketAddr) -> ClientIdentity {
        ClientIdentity {
            user: user.to_string(),
            password,
            addr,
        }
    }

    /// A client authenticated by a Kerberos ticket: there is no password
    /// to pass on.
    pub fn from_ticket(user: String, addr: SocketAddr) -> ClientIdentity {
        ClientIdentity {
            user,
            password: Secret::default(),
            addr,
        }
    }
}

/// The identity presented upstream.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The user name, or the principal for Kerberos.
    pub user: String,
    pub password: Secret,
    /// Set for Kerberos identities: whose tickets authenticate upstream.
    pub kerberos: Option<Arc<Initiator>>,
}
