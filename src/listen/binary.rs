//! Binary TCLIService listener: SASL PLAIN or GSSAPI handshake (or NOSASL,
//! recognised by its first byte), then one message at a time through the
//! broker.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use super::{Listener, Shared};
use crate::error::RpcError;
use crate::session::{Call, ClientConn, ClientIdentity, ClientKind, Out, Sink};
use crate::tcli::Scope;
use crate::wire::io::{FrameError, Framing, MessageIo};
use crate::wire::sasl::{self, SaslError, ServerHandshake, ServerStep};
use crate::wire::thrift::peek_header;

const SASL_START: u8 = 1;
/// First byte of a strict TBinaryProtocol message.
const THRIFT_STRICT: u8 = 0x80;

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let _open = shared.broker.metrics.connection(&listener.config.name);
    let span = tracing::info_span!("conn", listener = %listener.config.name, %peer);
    connection(stream, peer, listener, shared)
        .instrument(span)
        .await;
    drop(permit);
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
) {
    let mut io = MessageIo::new(stream, shared.server.max_message_bytes);
    let handshake = timeout(
        shared.server.handshake_timeout,
        Box::pin(handshake(&mut io, peer, &listener)),
    );
    let (framing, identity) = match handshake.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            match e {
                FrameError::Eof => debug!("closed before the handshake (health check?)"),
                e => warn!(error = %e, "handshake failed; connection closed"),
            }
            return;
        }
        Err(_) => {
            warn!(
                "no complete handshake within {:?}; connection closed",
                shared.server.handshake_timeout
            );
            return;
        }
    };
    let mut conn = ClientConn::new(ClientKind::Binary, listener.route.clone(), identity);
    loop {
        let msg = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            m = io.read_message(framing) => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(FrameError::Eof) => break,
            Err(e) => {
                warn!(error = %e, "bad frame from client; connection closed");
                break;
            }
        };
        // A call we cannot parse gets a Thrift exception if its header is
        // readable, then the connection is closed: the stream may be out of sync.
        let call = match Call::parse(&msg) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "malformed call; connection closed");
                if let Ok(h) = peek_header(&msg) {
                    let _ = io
                        .write_message(framing, &e.to_thrift_reply(h.name, h.seqid))
                        .await;
                }
                break;
            }
        };
        // NOSASL clients name themselves in OpenSession: check them there
        if conn.identity.is_none() && call.scope == Scope::OpenSession {
            if let Err(e) = nosasl_login(&mut conn, &msg, &listener, peer).await {
                let reply = e.to_thrift_reply(call.wire_name(), call.seqid);
                if io.write_message(framing, &reply).await.is_err() {
                    break;
                }
                continue;
            }
        }
        // boxed: an idle connection's task then holds only this small loop,
        // not the state of the largest RPC path (it shows at 10k connections)
        let sink = Sink {
            io: &mut io,
            framing,
        };
        let reply =
            match Box::pin(shared.broker.forward_to(&mut conn, &call, msg, Some(sink))).await {
                Ok(Out::Reply(r)) => r,
                Ok(Out::Relayed(_)) => continue,
                Err(e @ RpcError::RelayBroken(_)) => {
                    // the client holds part of a frame: nothing sensible can follow
                    warn!(error = %e, "closing the client connection");
                    break;
                }
                Err(e) => e.to_thrift_reply(call.wire_name(), call.seqid).into(),
            };
        if let Err(e) = io.write_message(framing, &reply).await {
            debug!(error = %e, "client went away while we replied");
            break;
        }
    }
    shared.broker.client_gone(&mut conn).await;
}

/// Runs the SASL handshake, or recognises NOSASL. Refusals are sent to the
/// client as a SASL BAD/ERROR message before the error is returned.
async fn handshake(
    io: &mut MessageIo,
    peer: SocketAddr,
    listener: &Listener,
) -> Result<(Framing, Option<ClientIdentity>), FrameError> {
    let kerberos = listener.auth.kerberos();
    let allow_nosasl = listener.config.allow_nosasl && kerberos.is_none();
    match io.peek_byte().await? {
        SASL_START => {}
        THRIFT_STRICT if allow_nosasl => return Ok((Framing::Bare, None)),
        THRIFT_STRICT => {
            return Err(FrameError::Malformed(
                "NOSASL client on a listener that needs SASL (allow_nosasl = false or Kerberos)".into(),
            ))
        }
        b'G' | b'P' | b'H' => {
            return Err(FrameError::Malformed(
                "looks like HTTP; this is the binary listener (use the HTTP listener for transportMode=http)".into(),
            ))
        }
        b => return Err(FrameError::Malformed(format!("not a HiveServer2 client (first byte {b:#04x})"))),
    }
    if let Some(acceptor) = kerberos {
        return gssapi_handshake(io, peer, acceptor).await;
    }
    let mut hs = ServerHandshake::default();
    loop {
        let msg = match io.read_sasl().await {
            Ok(m) => m,
            Err(FrameError::Eof) => return Err(FrameError::Truncated),
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed(_))) => {
                let _ = io
                    .write_sasl(sasl::Status::Error, e.to_string().as_bytes())
                    .await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let step = hs.on_message(msg);
        let creds = match step {
            Ok(ServerStep::Continue) => continue,
            Ok(ServerStep::Verify(c)) => c,
            Err(e) => {
                let (status, text) = match &e {
                    SaslError::Rejected(r) => (sasl::Status::Bad, r.clone()),
                    SaslError::PeerFailure(_) => return Err(FrameError::Malformed(e.to_string())),
                    other => (sasl::Status::Error, other.to_string()),
                };
                let _ = io.write_sasl(status, text.as_bytes()).await;
                return Err(FrameError::Malformed(e.to_string()));
            }
        };
        let user = creds.user.clone();
        return match listener
            .auth
            .authenticate(&creds.user, creds.password, peer)
            .await
        {
            Ok(identity) => {
                io.write_sasl(sasl::Status::Complete, b"").await?;
                info!(%user, "client authenticated (SASL PLAIN)");
                Ok((Framing::Sasl, Some(identity)))
            }
            Err(e) => {
                let _ = io
                    .write_sasl(sasl::Status::Bad, e.to_string().as_bytes())
                    .await;
                Err(FrameError::Malformed(e.to_string()))
            }
        };
    }
}

async fn read_negotiation(io: &mut MessageIo) -> Result<sasl::Message, FrameError> {
    match io.read_sasl().await {
        Ok(m) if matches!(m.status, sasl::Status::Bad | sasl::Status::Error) => {
            Err(FrameError::Malformed(format!(
                "client gave up: {}",
                String::from_utf8_lossy(&m.payload)
            )))
        }
        Ok(m) => Ok(m),
        Err(FrameError::Eof) => Err(FrameError::Truncated),
        Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed(_))) => {
            let _ = io
                .write_sasl(sasl::Status::Error, e.to_string().as_bytes())
                .await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// SASL GSSAPI (RFC 4752) with the listener's keytab; with QOP auth-int or
/// auth-conf every later frame goes through the context's wrap/unwrap.
async fn gssapi_handshake(
    io: &mut MessageIo,
    peer: SocketAddr,
    acceptor: &crate::kerberos::Acceptor,
) -> Result<(Framing, Option<ClientIdentity>), FrameError> {
    let start = read_negotiation(io).await?;
    if start.status != sasl::Status::Start || start.payload != b"GSSAPI" {
        let why = format!(
            "this listener takes Kerberos only (SASL GSSAPI, service {}); add ;principal=<that principal> to the JDBC URL",
            acceptor.describe
        );
        let _ = io.write_sasl(sasl::Status::Bad, why.as_bytes()).await;
        return Err(FrameError::Malformed(why));
    }
    let mut server = acceptor.sasl_server();
    loop {
        let msg = read_negotiation(io).await?;
        match server.step(msg.payload).await {
            Ok(crate::kerberos::ServerOut::Challenge(t)) => {
                io.write_sasl(sasl::Status::Ok, &t).await?;
            }
            Ok(crate::kerberos::ServerOut::Done {
                peer: who,
                qop,
                layer,
            }) => {
                io.write_sasl(sasl::Status::Complete, b"").await?;
                io.set_layer(layer);
                info!(principal = %who.principal, user = %who.user, qop = qop.as_str(), "client authenticated (SASL GSSAPI)");
                return Ok((
                    Framing::Sasl,
                    Some(ClientIdentity::from_ticket(who.user, peer)),
                ));
            }
            Err(e) => {
                let _ = io
                    .write_sasl(sasl::Status::Bad, e.to_string().as_bytes())
                    .await;
                return Err(FrameError::Malformed(e.to_string()));
            }
        }
    }
}

/// Authenticates a NOSASL client by the user name and password in its
/// OpenSession request.
async fn nosasl_login(
    conn: &mut ClientConn,
    msg: &[u8],
    listener: &Listener,
    peer: SocketAddr,
) -> Result<(), RpcError> {
    let info = crate::tcli::read_open_session(msg)?;
    let user = info.username.unwrap_or_default();
    let password = crate::secret::Secret::new(info.password.unwrap_or_default());
    let id = listener.auth.authenticate(&user, password, peer).await?;
    info!(user = %id.user, "client authenticated (NOSASL OpenSession)");
    conn.identity = Some(id);
    Ok(())
}
