//! Stand-ins when the crate is built without the `kerberos` feature: the
//! constructors fail, so a Kerberos config is refused at startup.

use std::path::Path;
use std::sync::Arc;

use super::{KerberosError, Qop};
use crate::wire::io::SecurityLayer;

fn disabled() -> KerberosError {
    KerberosError::Config(
        "this kyuubi-broker was built without Kerberos (rebuild with the default features)".into(),
    )
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub principal: String,
    pub user: String,
}

pub struct Acceptor {
    pub describe: String,
    pub qop: Vec<Qop>,
}

impl Acceptor {
    pub fn from_keytab(_: &Path, _: Option<&str>, _: Vec<Qop>) -> Result<Acceptor, KerberosError> {
        Err(disabled())
    }
    pub fn sasl_server(&self) -> SaslServer {
        SaslServer
    }
    pub async fn spnego(&self, _: Vec<u8>) -> Result<(Peer, Option<Vec<u8>>), KerberosError> {
        Err(disabled())
    }
}

pub enum ServerOut {
    Challenge(Vec<u8>),
    Done {
        peer: Peer,
        qop: Qop,
        layer: Option<Box<dyn SecurityLayer>>,
    },
}

pub struct SaslServer;

impl SaslServer {
    pub async fn step(&mut self, _: Vec<u8>) -> Result<ServerOut, KerberosError> {
        Err(disabled())
    }
}

#[derive(Debug)]
pub struct Initiator {
    pub principal: String,
}

impl Initiator {
    pub fn new(principal: &str, _: &Path) -> Initiator {
        Initiator {
            principal: principal.to_string(),
        }
    }
    pub async fn lifetime(self: &Arc<Self>) -> Result<std::time::Duration, KerberosError> {
        Err(disabled())
    }
    pub async fn spnego_token(self: &Arc<Self>, _: String) -> Result<Vec<u8>, KerberosError> {
        Err(disabled())
    }
    pub async fn sasl_client(
        self: &Arc<Self>,
        _: String,
        _: Qop,
    ) -> Result<(SaslClient, Vec<u8>), KerberosError> {
        Err(disabled())
    }
}

pub enum ClientOut {
    Response(Vec<u8>),
    Final {
        response: Vec<u8>,
        layer: Option<Box<dyn SecurityLayer>>,
    },
}

pub struct SaslClient;

impl SaslClient {
    pub async fn step(&mut self, _: Vec<u8>) -> Result<ClientOut, KerberosError> {
        Err(disabled())
    }
}
