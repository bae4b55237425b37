//! Acceptor and initiator on top of `libgssapi`, and the SASL GSSAPI
//! (RFC 4752) exchange for both sides. GSS calls may read keytabs or talk to
//! the KDC, so every context step runs on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext, ServerCtx};
use libgssapi::credential::Cred;
use libgssapi::name::Name;
use libgssapi::oid::{GSS_MECH_KRB5, GSS_MECH_SPNEGO, GSS_NT_KRB5_PRINCIPAL};

use super::ffi::{self, Usage};
use super::layer::{self, Qop};
use super::KerberosError;
use crate::wire::io::SecurityLayer;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("GSS call panicked")
}

fn gss(what: &str, e: libgssapi::error::Error) -> KerberosError {
    KerberosError::Gss(format!("{what}: {e}"))
}

/// Who authenticated: the full principal, and its local user name.
#[derive(Debug, Clone)]
pub struct Peer {
    pub principal: String,
    pub user: String,
}

fn peer_of(ctx: &impl SecurityContext) -> Result<Peer, KerberosError> {
    let name = ctx
        .source_name()
        .map_err(|e| gss("reading the client name", e))?;
    let principal = name
        .display_name()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| gss("reading the client name", e))?;
    // auth_to_local from krb5.conf; by default it strips the default realm
    let user = name
        .local_name(Some(GSS_MECH_KRB5))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|_| {
            KerberosError::Refused(format!(
                "principal {principal} has no local user name (see auth_to_local in krb5.conf)"
            ))
        })?;
    Ok(Peer { principal, user })
}

/// Frames wrapped and unwrapped by an established context (auth-int/conf).
struct GssLayer<C> {
    ctx: C,
    encrypt: bool,
}

impl<C: SecurityContext + Send> SecurityLayer for GssLayer<C> {
    fn wrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.ctx
            .wrap(self.encrypt, msg)
            .map(|b| b.to_vec())
            .map_err(|e| format!("GSS wrap: {e}"))
    }
    fn unwrap(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        self.ctx
            .unwrap(frame)
            .map(|b| b.to_vec())
            .map_err(|e| format!("GSS unwrap: {e}"))
    }
}

fn layer_for<C: SecurityContext + Send + 'static>(
    ctx: C,
    qop: Qop,
) -> Option<Box<dyn SecurityLayer>> {
    match qop {
        Qop::Auth => None,
        Qop::AuthInt => Some(Box::new(GssLayer {
            ctx,
            encrypt: false,
        })),
        Qop::AuthConf => Some(Box::new(GssLayer { ctx, encrypt: true })),
    }
}

/// The broker's own service credentials, from its keytab.
pub struct Acceptor {
    cred: Cred,
    /// For messages to clients: the principal, or "any principal in the
    /// listener's keytab" (never the keytab's path).
    pub describe: String,
    pub qop: Vec<Qop>,
}

impl Acceptor {
    pub fn from_keytab(
        keytab: &Path,
        principal: Option<&str>,
        qop: Vec<Qop>,
    ) -> Result<Acceptor, KerberosError> {
        let kt = format!("FILE:{}", keytab.display());
        let cred =
            ffi::acquire_from(principal, Usage::Accept, &[("keytab", &kt)]).map_err(|e| {
                KerberosError::Config(format!("acceptor keytab {}: {e}", keytab.display()))
            })?;
        Ok(Acceptor {
            cred,
            describe: principal
                .map(str::to_string)
                .unwrap_or_else(|| "any principal in the listener's keytab".into()),
            qop,
        })
    }

    pub fn sasl_server(&self) -> SaslServer {
        SaslServer {
            ctx: Some(ServerCtx::new(Some(self.cred.clone()))),
            stage: ServerStage::Context,
            offered: self.qop.clone(),
        }
    }

    /// One SPNEGO leg (RFC 4559): the client's token in, the identity and
    /// the optional mutual-auth token out. Multi-leg exchanges are refused,
    /// as HTTP carries no context between requests.
    pub async fn spnego(&self, token: Vec<u8>) -> Result<(Peer, Option<Vec<u8>>), KerberosError> {
        let mut ctx = ServerCtx::new(Some(self.cred.clone()));
        blocking(move || {
            let out = ctx
                .step(&token, None)
                .map_err(|e| gss("SPNEGO token refused", e))?;
            if !ctx.is_complete() {
                return Err(KerberosError::Refused(
                    "SPNEGO needs more than one round trip; use Kerberos (not NTLM)".into(),
                ));
            }
            Ok((peer_of(&ctx)?, out.map(|b| b.to_vec())))
        })
        .await
    }
}

enum ServerStage {
    Context,
    /// The last context token went out; the client answers with nothing.
    AwaitEmpty,
    AwaitLayer,
}

/// What the server sends next.
pub enum ServerOut {
    /// Send this in an OK message and wait for the client.
    Challenge(Vec<u8>),
    /// Authenticated: send COMPLETE, then frames through `layer` if any.
    Done {
        peer: Peer,
        qop: Qop,
        layer: Option<Box<dyn SecurityLayer>>,
    },
}

/// The server side of SASL GSSAPI, one client message at a time.
pub struct SaslServer {
    ctx: Option<ServerCtx>,
    stage: ServerStage,
    offered: Vec<Qop>,
}

impl SaslServer {
    pub async fn step(&mut self, token: Vec<u8>) -> Result<ServerOut, KerberosError> {
        let mut ctx = self.ctx.take().ok_or(KerberosError::Refused(
            "SASL GSSAPI exchange already failed".into(),
        ))?;
        let offered = self.offered.clone();
        let stage = std::mem::replace(&mut self.stage, ServerStage::Context);
        let (ctx, stage, out) = blocking(move || {
            let r = server_step(&mut ctx, stage, &token, &offered);
            match r {
                Ok((stage, out)) => (Some(ctx), stage, Ok(out)),
                Err(e) => (None, ServerStage::Context, Err(e)),
            }
        })
        .await;
        let out = out?;
        self.stage = stage;
        match out {
            Step::Send(t) => {
                self.ctx = ctx;
                Ok(ServerOut::Challenge(t))
            }
            Step::Done(peer, qop) => {
                let ctx = ctx.expect("context kept on success");
                Ok(ServerOut::Done {
                    peer,
                    qop,
                    layer: layer_for(ctx, qop),
                })
            }
        }
    }
}

enum Step {
    Send(Vec<u8>),
    Done(Peer, Qop),
}

fn server_step(
    ctx: &mut ServerCtx,
    stage: ServerStage,
    token: &[u8],
    offered: &[Qop],
) -> Result<(ServerStage, Step), KerberosError> {
    let offer = |ctx: &mut ServerCtx| -> Result<Vec<u8>, KerberosError> {
        let o = layer::offer(offered);
        Ok(ctx
            .wrap(false, &o)
            .map_err(|e| gss("wrapping the security layer offer", e))?
            .to_vec())
    };
    match stage {
        ServerStage::Context => {
            let out = ctx.step(token, None).map_err(|e| {
                KerberosError::Refused(format!("GSSAPI authentication failed: {e}"))
            })?;
            match (ctx.is_complete(), out) {
                (false, out) => Ok((
                    ServerStage::Context,
                    Step::Send(out.map(|b| b.to_vec()).unwrap_or_default()),
                )),
                (true, Some(t)) => Ok((ServerStage::AwaitEmpty, Step::Send(t.to_vec()))),
                (true, None) => Ok((ServerStage::AwaitLayer, Step::Send(offer(ctx)?))),
            }
        }
        ServerStage::AwaitEmpty => {
            if !token.is_empty() {
                return Err(KerberosError::Refused(
                    "expected an empty response after the GSSAPI context was established".into(),
                ));
            }
            Ok((ServerStage::AwaitLayer, Step::Send(offer(ctx)?)))
        }
        ServerStage::AwaitLayer => {
            let msg = ctx
                .unwrap(token)
                .map_err(|e| gss("unwrapping the client's security layer choice", e))?;
            let (bits, _maxbuf, authzid) = layer::parse(&msg).map_err(KerberosError::Refused)?;
            let qop = layer::chosen(bits, offered).map_err(KerberosError::Refused)?;
            let peer = peer_of(ctx)?;
            // an authorization id other than oneself is an impersonation request
            let authzid = String::from_utf8_lossy(authzid);
            if !authzid.is_empty() && authzid != peer.principal && authzid != peer.user {
                return Err(KerberosError::Refused(format!(
                    "{} may not act as '{authzid}'",
                    peer.principal
                )));
            }
            Ok((ServerStage::AwaitLayer, Step::Done(peer, qop)))
        }
    }
}

/// One upstream identity: a principal whose tickets come from its keytab into
/// its own in-memory credential cache. MIT refreshes them from the keytab
/// once half their lifetime has passed, so they never run out mid-use.
#[derive(Debug)]
pub struct Initiator {
    pub principal: String,
    keytab: PathBuf,
    ccache: String,
}

impl Initiator {
    pub fn new(principal: &str, keytab: &Path) -> Initiator {
        Initiator {
            principal: principal.to_string(),
            keytab: keytab.to_path_buf(),
            // per principal and keytab: a cache must never outlive a key change
            ccache: format!("MEMORY:kyuubi-broker/{principal}/{}", keytab.display()),
        }
    }

    fn cred(&self) -> Result<Cred, KerberosError> {
        let kt = format!("FILE:{}", self.keytab.display());
        ffi::acquire_from(
            Some(&self.principal),
            Usage::Initiate,
            &[("client_keytab", &kt), ("ccache", &self.ccache)],
        )
        .map_err(|e| KerberosError::Gss(format!("credentials for {}: {e}", self.principal)))
    }

    /// Seconds the current credentials remain valid (fetching them if needed).
    pub async fn lifetime(self: &Arc<Self>) -> Result<std::time::Duration, KerberosError> {
        let me = self.clone();
        blocking(move || {
            me.cred()?
                .lifetime()
                .map_err(|e| gss("credential lifetime", e))
        })
        .await
    }

    fn context(&self, service: &str, spnego: bool) -> Result<ClientCtx, KerberosError> {
        let target = Name::new(service.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
            .map_err(|e| KerberosError::Config(format!("service principal '{service}': {e}")))?;
        let mech = if spnego {
            &GSS_MECH_SPNEGO
        } else {
            &GSS_MECH_KRB5
        };
        Ok(ClientCtx::new(
            Some(self.cred()?),
            target,
            CtxFlags::GSS_C_MUTUAL_FLAG
                | CtxFlags::GSS_C_SEQUENCE_FLAG
                | CtxFlags::GSS_C_CONF_FLAG
                | CtxFlags::GSS_C_INTEG_FLAG,
            Some(*mech),
        ))
    }

    /// A fresh SPNEGO token for `service` (one per request; no replay).
    pub async fn spnego_token(self: &Arc<Self>, service: String) -> Result<Vec<u8>, KerberosError> {
        let me = self.clone();
        blocking(move || {
            let mut ctx = me.context(&service, true)?;
            let tok = ctx.step(None, None).map_err(|e| {
                gss(
                    &format!("SPNEGO token for {service} as {}", me.principal),
                    e,
                )
            })?;
            Ok(tok.map(|b| b.to_vec()).unwrap_or_default())
        })
        .await
    }

    /// Starts SASL GSSAPI toward `service`; returns the client and the
    /// initial response to send after START.
    pub async fn sasl_client(
        self: &Arc<Self>,
        service: String,
        qop: Qop,
    ) -> Result<(SaslClient, Vec<u8>), KerberosError> {
        let me = self.clone();
        blocking(move || {
            let mut ctx = me.context(&service, false)?;
            let tok = ctx.step(None, None).map_err(|e| {
                gss(
                    &format!(
                        "GSSAPI to {service} as {} (is the service principal right?)",
                        me.principal
                    ),
                    e,
                )
            })?;
            Ok((
                SaslClient {
                    ctx: Some(ctx),
                    qop,
                    layer_phase: false,
                },
                tok.map(|b| b.to_vec()).unwrap_or_default(),
            ))
        })
        .await
    }
}

/// What the client sends next.
pub enum ClientOut {
    /// Send in an OK message.
    Response(Vec<u8>),
    /// Send in a COMPLETE message; then expect COMPLETE and use `layer`.
    Final {
        response: Vec<u8>,
        layer: Option<Box<dyn SecurityLayer>>,
    },
}

/// The client side of SASL GSSAPI.
pub struct SaslClient {
    ctx: Option<ClientCtx>,
    qop: Qop,
    layer_phase: bool,
}

impl SaslClient {
    pub async fn step(&mut self, challenge: Vec<u8>) -> Result<ClientOut, KerberosError> {
        let mut ctx = self.ctx.take().ok_or(KerberosError::Gss(
            "SASL GSSAPI exchange already finished".into(),
        ))?;
        let (qop, layer_phase) = (self.qop, self.layer_phase);
        let (ctx, r) = blocking(move || {
            let r = client_step(&mut ctx, layer_phase, qop, &challenge);
            (ctx, r)
        })
        .await;
        match r? {
            (true, response) => Ok(ClientOut::Final {
                response,
                layer: layer_for(ctx, qop),
            }),
            (false, response) => {
                self.layer_phase = ctx.is_complete();
                self.ctx = Some(ctx);
                Ok(ClientOut::Response(response))
            }
        }
    }
}

/// Returns (finished, response).
fn client_step(
    ctx: &mut ClientCtx,
    layer_phase: bool,
    qop: Qop,
    challenge: &[u8],
) -> Result<(bool, Vec<u8>), KerberosError> {
    if !layer_phase {
        let out = ctx
            .step(Some(challenge), None)
            .map_err(|e| gss("GSSAPI context with the upstream", e))?;
        return Ok((false, out.map(|b| b.to_vec()).unwrap_or_default()));
    }
    let offer = ctx
        .unwrap(challenge)
        .map_err(|e| gss("unwrapping the upstream's security layer offer", e))?;
    let (bits, _, _) = layer::parse(&offer).map_err(KerberosError::Gss)?;
    let choice = layer::choose(bits, qop).map_err(KerberosError::Gss)?;
    let wrapped = ctx
        .wrap(false, &choice)
        .map_err(|e| gss("wrapping the security layer choice", e))?;
    Ok((true, wrapped.to_vec()))
}
