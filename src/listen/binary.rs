//! Binary TCLIService listener: SASL PLAIN or GSSAPI handshake (or NOSASL,
//! recognised by its first byte), then one message at a time through the
//! broker. Every outcome the client sees, from the handshake on, is written
//! by `answer`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, Instrument};

use super::limits::{Refusal, Slot};
use super::{Listener, Shared, Tls};
use crate::auth::AuthError;
use crate::edge::{Exchange, Kind};
use crate::error::RpcError;
use crate::identity::ClientIdentity;
use crate::session::{BinaryClient, Out};
use crate::tcli::Call;
use crate::wire::io::{FrameError, Framing, MessageIo, ReplySink, SecurityLayer};
use crate::wire::sasl::{self, SaslError, ServerHandshake, ServerStep};
use crate::wire::stream::Stream;
use crate::wire::thrift::peek_header;

const SASL_START: u8 = 1;
/// First byte of a strict TBinaryProtocol message.
const THRIFT_STRICT: u8 = 0x80;

/// An admitted connection keeps its slot for its lifetime; a refused one
/// (a cap) is told why in its own protocol, then closed.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    admission: Result<Slot, Refusal>,
) {
    let _open = shared.broker.metrics.connection(&listener.config.name);
    // debug level, as on HTTP listeners: the edge's lines name listener and
    // peer themselves, and an enabled span costs an enter and exit on every
    // poll of the connection (about 2% of a small RPC's CPU when measured)
    let span = tracing::debug_span!("conn", listener = %listener.config.name, %peer);
    async move {
        let limit = shared.server.handshake_timeout;
        let stream = match super::tls_handshake(stream, peer, &listener, &shared).await {
            Tls::Ready(s) => s,
            Tls::Plaintext(tcp, _) => {
                let e = RpcError::TlsRequired;
                let _ = timeout(limit, refuse(tcp.into(), peer, &listener, &shared, e)).await;
                return;
            }
            Tls::Failed => return,
        };
        match admission {
            Ok(slot) => {
                connection(stream, peer, listener, shared).await;
                drop(slot);
            }
            Err(r) => {
                let _ = timeout(limit, refuse(stream, peer, &listener, &shared, r.error)).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Answers a connection refused at accept: reads its first message (under
/// the handshake cap) and answers it with `error`, a SASL BAD or a Thrift
/// error reply, whichever its client speaks.
async fn refuse(
    stream: Stream,
    peer: SocketAddr,
    listener: &Listener,
    shared: &Shared,
    error: RpcError,
) {
    let mut io = MessageIo::new(stream, shared.server.handshake_max_bytes);
    let started = Instant::now();
    let ex = Exchange::new(Kind::Login, peer, "", "unknown", started);
    match io.peek_byte().await {
        Ok(SASL_START) if io.read_sasl().await.is_ok() => {
            let stage = Stage::Handshake { sasl: true };
            answer(&mut io, stage, listener, &ex, Err(error)).await;
        }
        Ok(THRIFT_STRICT) => {
            if let Ok(msg) = io.read_message(Framing::Bare).await {
                if let Ok(h) = peek_header(&msg) {
                    let stage = Stage::Rpc {
                        framing: Framing::Bare,
                        reply_to: Some((h.name, h.seqid)),
                    };
                    answer(&mut io, stage, listener, &ex, Err(error)).await;
                }
            }
        }
        _ => {}
    }
}

/// Where a connection is, which decides how an outcome is written.
#[derive(Clone, Copy)]
enum Stage<'a> {
    /// During the handshake. `sasl`: the client is waiting for our SASL
    /// answer (it sent a complete message); otherwise nothing is written
    /// (a non-SASL peer, a stalled or vanished one).
    Handshake { sasl: bool },
    /// After the handshake. `reply_to`: the method and sequence id to answer,
    /// when the call's header could be read.
    Rpc {
        framing: Framing,
        reply_to: Option<(&'a str, i32)>,
    },
}

/// What a successful exchange leaves to write.
enum Done {
    LoggedIn,
    Reply(Bytes),
    Relayed(usize),
}

impl From<Out> for Done {
    fn from(o: Out) -> Done {
        match o {
            Out::Reply(r) => Done::Reply(r),
            Out::Relayed(n) => Done::Relayed(n),
        }
    }
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// The one way out for every outcome on a binary connection: finishes the
/// exchange at the edge (time, metrics, log) and writes the answer in the
/// form this stage of the connection calls for.
async fn answer(
    io: &mut MessageIo,
    stage: Stage<'_>,
    listener: &Listener,
    ex: &Exchange<'_>,
    result: Result<Done, RpcError>,
) -> Flow {
    let size = |d: &Done| match d {
        Done::LoggedIn => 0,
        Done::Reply(r) => r.len(),
        Done::Relayed(n) => *n,
    };
    listener.edge.finish(ex, result.as_ref().map(size));
    let written = match (result, stage) {
        (Ok(Done::LoggedIn), Stage::Handshake { .. }) => {
            io.write_sasl(sasl::Status::Complete, b"").await
        }
        (Ok(Done::Reply(r)), Stage::Rpc { framing, .. }) => io.write_message(framing, &r).await,
        // relayed: already written; a login has no RPC reply and vice versa
        (Ok(_), _) => Ok(()),
        (Err(e), stage) => {
            let a = e.answer();
            let sent = match stage {
                Stage::Handshake { sasl: true } => io.write_sasl(a.sasl, a.text.as_bytes()).await,
                Stage::Handshake { sasl: false } => Ok(()),
                // the client holds part of a frame: nothing sensible can follow
                _ if matches!(e, RpcError::RelayBroken { .. }) => Ok(()),
                Stage::Rpc {
                    framing,
                    reply_to: Some((method, seqid)),
                } => {
                    io.write_message(framing, &e.to_thrift_reply(method, seqid))
                        .await
                }
                Stage::Rpc { reply_to: None, .. } => Ok(()),
            };
            if a.close || matches!(stage, Stage::Handshake { .. }) {
                return Flow::Close;
            }
            sent
        }
    };
    match written {
        Ok(()) => Flow::Continue,
        Err(FrameError::TimedOut { after, .. }) => {
            listener.edge.timed_out(ex.peer, ex.user, "write", after);
            Flow::Close
        }
        Err(e) => {
            debug!(error = %e, "client went away while we answered");
            Flow::Close
        }
    }
}

async fn connection(
    stream: Stream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
) {
    let cert = listener.cert_user(&stream);
    // nothing big is accepted from a client that has not logged in yet
    let mut io = MessageIo::new(stream, shared.server.handshake_max_bytes);
    let started = Instant::now();
    let limit = shared.server.handshake_timeout;
    let mut progress = Progress::default();
    let outcome = timeout(
        limit,
        Box::pin(handshake(
            &mut io,
            peer,
            &listener,
            cert.as_deref(),
            &mut progress,
        )),
    )
    .await
    .unwrap_or(Err(HandshakeEnd::Failed(RpcError::HandshakeTimeout(limit))));
    let login = |user| Exchange::new(Kind::Login, peer, user, progress.mechanism, started);
    // counts this connection against its user's cap while it lives
    let mut user_slot = None;
    let (framing, identity) = match outcome {
        Ok(Authenticated::Nosasl) => {
            // reading its login is bounded by `login_by` below
            io.set_limits(None, Some(shared.server.client_write_timeout));
            (Framing::Bare, None)
        }
        Ok(Authenticated::Sasl { identity, layer }) => {
            let ex = login(identity.user.as_str());
            let stage = Stage::Handshake { sasl: true };
            let slot = shared
                .limits
                .user_slot(&listener.edge.listener, &identity.user, peer.ip());
            match slot {
                Ok(s) => user_slot = Some(s),
                Err(e) => {
                    answer(&mut io, stage, &listener, &ex, Err(e)).await;
                    return;
                }
            }
            if answer(&mut io, stage, &listener, &ex, Ok(Done::LoggedIn)).await == Flow::Close {
                return;
            }
            // COMPLETE goes out unwrapped; every later frame through the layer
            io.set_layer(layer);
            io.set_max(shared.server.max_message_bytes);
            io.set_limits(
                Some(shared.server.client_idle_timeout),
                Some(shared.server.client_write_timeout),
            );
            (Framing::Sasl, Some(identity))
        }
        Err(HandshakeEnd::Closed) => {
            debug!("closed before the handshake (health check?)");
            return;
        }
        // a client that connects and never says anything (a pre-opened or
        // forgotten connection) did not fail a login: no login failure, no
        // audit event, only the timeout count
        Err(HandshakeEnd::Failed(RpcError::HandshakeTimeout(after))) if !progress.spoke => {
            listener.edge.unused(peer, after);
            return;
        }
        Err(HandshakeEnd::Failed(e)) => {
            let ex = login(progress.user.as_str());
            let stage = Stage::Handshake {
                sasl: progress.awaits_answer,
            };
            answer(&mut io, stage, &listener, &ex, Err(e)).await;
            return;
        }
    };
    let mechanism = progress.mechanism;
    // A NOSASL client logs in with its first message, an OpenSession, which
    // must arrive within the handshake's time (one timer per connection,
    // before login only; none on the RPC path after it).
    let mut login_by =
        (framing == Framing::Bare).then(|| tokio::time::Instant::from_std(started + limit));
    let mut client = BinaryClient::new(
        listener.route.clone(),
        listener.auth.clone(),
        identity,
        peer,
        cert,
    );
    // registered once: a fresh `cancelled()` per message takes the token's
    // lock twice per RPC
    let cancelled = shared.cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let msg = match login_by {
            None => tokio::select! {
                biased;
                _ = &mut cancelled => break,
                m = io.read_message(framing) => m,
            },
            Some(deadline) => tokio::select! {
                biased;
                _ = &mut cancelled => break,
                m = io.read_message(framing) => m,
                _ = tokio::time::sleep_until(deadline) => {
                    let ex = Exchange::new(Kind::Login, peer, "", mechanism, started);
                    let stage = Stage::Handshake { sasl: false };
                    let e = RpcError::HandshakeTimeout(limit);
                    answer(&mut io, stage, &listener, &ex, Err(e)).await;
                    break;
                }
            },
        };
        let started = Instant::now();
        let msg = match msg {
            Ok(m) => m,
            Err(FrameError::Eof) => break,
            Err(FrameError::TimedOut { after, .. }) => {
                listener.edge.timed_out(peer, client.user(), "idle", after);
                break;
            }
            Err(e) => {
                let ex = Exchange::new(Kind::Unparsed, peer, client.user(), mechanism, started);
                let stage = Stage::Rpc {
                    framing,
                    reply_to: None,
                };
                answer(&mut io, stage, &listener, &ex, Err(e.into())).await;
                break;
            }
        };
        let call = match Call::parse(&msg) {
            Ok(c) => c,
            Err(e) => {
                // answered if its header is readable, then closed: the stream
                // may be out of step
                let h = peek_header(&msg).ok();
                let ex = Exchange::new(Kind::Unparsed, peer, client.user(), mechanism, started);
                let stage = Stage::Rpc {
                    framing,
                    reply_to: h.as_ref().map(|h| (h.name, h.seqid)),
                };
                let e = RpcError::Malformed(e.to_string());
                answer(&mut io, stage, &listener, &ex, Err(e)).await;
                break;
            }
        };
        if login_by.is_some() && call.scope != crate::tcli::Scope::OpenSession {
            let ex = Exchange::new(Kind::Call(&call), peer, "", mechanism, started);
            let stage = Stage::Rpc {
                framing,
                reply_to: Some((call.wire_name(), call.seqid)),
            };
            let e = RpcError::Auth(AuthError::Unusable(format!(
                "{} before OpenSession: a NOSASL client logs in with its first message, an OpenSession",
                call.wire_name()
            )));
            answer(&mut io, stage, &listener, &ex, Err(e)).await;
            break;
        }
        let request_bytes = msg.len();
        let statement = listener.edge.statement_of(&call, &msg);
        let mut upstream = Duration::ZERO;
        // boxed: an idle connection's task then holds only this small loop,
        // not the state of the largest RPC path (it shows at 10k connections)
        let (result, write_timed_out) = {
            let mut sink = ReplySink::new(&mut io, framing);
            let r = Box::pin(shared.broker.call_binary(
                &mut client,
                &call,
                msg,
                &mut sink,
                &mut upstream,
            ))
            .await;
            (r, sink.timed_out())
        };
        if let Some(after) = write_timed_out {
            listener.edge.timed_out(peer, client.user(), "write", after);
        }
        let mut refused = false;
        if let Some((took, passed)) = client.take_login() {
            let outcome = match &result {
                Err(e) if !passed => e.kind(),
                _ => "ok",
            };
            listener
                .edge
                .nosasl_login(peer, client.user(), took, outcome);
            if passed {
                login_by = None;
                io.set_max(shared.server.max_message_bytes);
                io.set_limits(
                    Some(shared.server.client_idle_timeout),
                    Some(shared.server.client_write_timeout),
                );
                match shared
                    .limits
                    .user_slot(&listener.edge.listener, client.user(), peer.ip())
                {
                    Ok(s) => user_slot = Some(s),
                    // over the user's cap: the session just opened is
                    // closed with the connection (binary_gone)
                    Err(e) => {
                        let ex =
                            Exchange::new(Kind::Login, peer, client.user(), mechanism, started);
                        let stage = Stage::Rpc {
                            framing,
                            reply_to: Some((call.wire_name(), call.seqid)),
                        };
                        answer(&mut io, stage, &listener, &ex, Err(e)).await;
                        break;
                    }
                }
            }
            // a refused login ends the connection: no second guess on it
            refused = !passed;
        }
        let ex = Exchange {
            upstream,
            request_bytes,
            statement,
            ..Exchange::new(Kind::Call(&call), peer, client.user(), mechanism, started)
        };
        let stage = Stage::Rpc {
            framing,
            reply_to: Some((call.wire_name(), call.seqid)),
        };
        if answer(&mut io, stage, &listener, &ex, result.map(Done::from)).await == Flow::Close
            || refused
        {
            break;
        }
    }
    shared.broker.binary_gone(&mut client).await;
    io.shutdown().await;
    drop(user_slot);
}

/// What the handshake has learned so far, kept outside its future so that a
/// timeout can still say which mechanism and user it was.
struct Progress {
    mechanism: &'static str,
    user: String,
    /// The client sent a complete SASL message and waits for the answer.
    awaits_answer: bool,
    /// The client sent at least one byte.
    spoke: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            mechanism: "unknown",
            user: String::new(),
            awaits_answer: false,
            spoke: false,
        }
    }
}

enum Authenticated {
    /// The client authenticates in its OpenSession.
    Nosasl,
    Sasl {
        identity: ClientIdentity,
        layer: Option<Box<dyn SecurityLayer>>,
    },
}

enum HandshakeEnd {
    /// The peer closed before sending anything (a TCP health check).
    Closed,
    Failed(RpcError),
}

impl From<FrameError> for HandshakeEnd {
    fn from(e: FrameError) -> Self {
        HandshakeEnd::Failed(e.into())
    }
}

fn unusable(why: impl Into<String>) -> HandshakeEnd {
    HandshakeEnd::Failed(RpcError::Auth(AuthError::Unusable(why.into())))
}

/// Reads one SASL message of the handshake. A size refusal is answered
/// (the client is still sending and waits for us).
async fn read_sasl(io: &mut MessageIo, p: &mut Progress) -> Result<sasl::Message, HandshakeEnd> {
    p.awaits_answer = false;
    match io.read_sasl().await {
        Ok(m) => {
            p.awaits_answer = true;
            Ok(m)
        }
        Err(FrameError::Eof) => Err(FrameError::Truncated.into()),
        Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed(_))) => {
            p.awaits_answer = true;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the SASL handshake, or recognises NOSASL. Challenges are written
/// here; the final answer, success or refusal, is [`answer`]'s.
async fn handshake(
    io: &mut MessageIo,
    peer: SocketAddr,
    listener: &Listener,
    cert: Option<&str>,
    p: &mut Progress,
) -> Result<Authenticated, HandshakeEnd> {
    let kerberos = listener.auth.kerberos();
    let allow_nosasl = listener.config.allow_nosasl && kerberos.is_none();
    let first = match io.peek_byte().await {
        Ok(b) => b,
        Err(FrameError::Eof) => return Err(HandshakeEnd::Closed),
        Err(e) => return Err(e.into()),
    };
    p.spoke = true;
    match first {
        SASL_START => {}
        THRIFT_STRICT if allow_nosasl => {
            p.mechanism = "nosasl";
            return Ok(Authenticated::Nosasl);
        }
        THRIFT_STRICT => {
            p.mechanism = "nosasl";
            return Err(unusable(
                "NOSASL client on a listener that needs SASL (allow_nosasl = false or Kerberos)",
            ));
        }
        b'G' | b'P' | b'H' => {
            return Err(HandshakeEnd::Failed(RpcError::Malformed(
                "looks like HTTP; this is the binary listener (use the HTTP listener for transportMode=http)".into(),
            )))
        }
        b => {
            return Err(HandshakeEnd::Failed(RpcError::Malformed(format!(
                "not a HiveServer2 client (first byte {b:#04x})"
            ))))
        }
    }
    if let Some(acceptor) = kerberos {
        p.mechanism = "gssapi";
        return gssapi_handshake(io, peer, acceptor, p).await;
    }
    p.mechanism = "plain";
    let mut hs = ServerHandshake::default();
    loop {
        let msg = read_sasl(io, p).await?;
        let creds = match hs.on_message(msg) {
            Ok(ServerStep::Continue) => continue,
            Ok(ServerStep::Verify(c)) => c,
            Err(SaslError::Rejected(r)) => return Err(unusable(r)),
            Err(e @ SaslError::PeerFailure(_)) => {
                // the client gave up: it waits for nothing
                p.awaits_answer = false;
                return Err(HandshakeEnd::Failed(RpcError::Malformed(e.to_string())));
            }
            Err(e) => return Err(HandshakeEnd::Failed(RpcError::Malformed(e.to_string()))),
        };
        p.user = creds.user.clone();
        return match listener
            .auth
            .authenticate(&creds.user, creds.password, peer, cert)
            .await
        {
            Ok(identity) => Ok(Authenticated::Sasl {
                identity,
                layer: None,
            }),
            Err(e) => Err(HandshakeEnd::Failed(e.into())),
        };
    }
}

/// SASL GSSAPI (RFC 4752) with the listener's keytab; with QOP auth-int or
/// auth-conf every later frame goes through the context's wrap/unwrap.
async fn gssapi_handshake(
    io: &mut MessageIo,
    peer: SocketAddr,
    acceptor: &crate::kerberos::Acceptor,
    p: &mut Progress,
) -> Result<Authenticated, HandshakeEnd> {
    let gave_up = |p: &mut Progress, m: &sasl::Message| {
        p.awaits_answer = false;
        HandshakeEnd::Failed(RpcError::Malformed(format!(
            "client gave up: {}",
            String::from_utf8_lossy(&m.payload)
        )))
    };
    let start = read_sasl(io, p).await?;
    if matches!(start.status, sasl::Status::Bad | sasl::Status::Error) {
        return Err(gave_up(p, &start));
    }
    if start.status != sasl::Status::Start || start.payload != b"GSSAPI" {
        return Err(unusable(format!(
            "this listener takes Kerberos only (SASL GSSAPI, service {}); add ;principal=<that principal> to the JDBC URL",
            acceptor.describe
        )));
    }
    let mut server = acceptor.sasl_server();
    loop {
        let msg = read_sasl(io, p).await?;
        if matches!(msg.status, sasl::Status::Bad | sasl::Status::Error) {
            return Err(gave_up(p, &msg));
        }
        match server.step(msg.payload).await {
            Ok(crate::kerberos::ServerOut::Challenge(t)) => {
                io.write_sasl(sasl::Status::Ok, &t).await?;
            }
            Ok(crate::kerberos::ServerOut::Done {
                peer: who,
                qop,
                layer,
            }) => {
                debug!(principal = %who.principal, qop = qop.as_str(), "GSSAPI context established");
                p.user = who.user.clone();
                return Ok(Authenticated::Sasl {
                    identity: ClientIdentity::from_ticket(who.user, peer),
                    layer,
                });
            }
            Err(e) => return Err(unusable(e.to_string())),
        }
    }
}
