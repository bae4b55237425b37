//! Client side: accept loops for the binary and HTTP listeners. Each
//! connection runs in its own task; handshakes happen inside that task, under
//! a timeout, so a slow client never blocks `accept`. Caps are checked after
//! accept ([`limits`]), so a client over a cap is told so instead of waiting
//! in the backlog.

pub mod binary;
pub(crate) mod cookie;
pub mod http;
pub mod limits;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::auth::Authenticator;
use crate::config::{ListenerConfig, ServerConfig};
use crate::edge::Edge;
use crate::session::{Broker, Route};
use crate::tls::server::{ServerTls, TLS_HANDSHAKE};
use crate::wire::stream::Stream;

use self::limits::{Admission, Gate, Limits, Refusal, Slot};

/// One configured listener: its authenticator, its route, and its side of
/// the edge (where every outcome of its clients is recorded).
pub struct Listener {
    pub config: ListenerConfig,
    pub auth: Arc<Authenticator>,
    /// Its certificate, when it serves TLS.
    pub tls: Option<Arc<ServerTls>>,
    /// The computing resource this listener's clients reach.
    pub route: Arc<Route>,
    pub edge: Edge,
}

impl Listener {
    pub fn new(
        config: ListenerConfig,
        auth: Arc<Authenticator>,
        tls: Option<Arc<ServerTls>>,
        route: Arc<Route>,
        broker: &Broker,
        server: &ServerConfig,
    ) -> Listener {
        let edge = Edge::new(
            &config.name,
            route.name.clone(),
            config.protocol,
            route.target.transport,
            broker.metrics.clone(),
            server.slow_rpc_threshold,
        );
        Listener {
            config,
            auth,
            tls,
            route,
            edge,
        }
    }
}

impl Listener {
    /// On a listener that logs in by client certificate, the user name of
    /// this connection's verified certificate.
    pub fn cert_user(&self, stream: &Stream) -> Option<String> {
        let tls = self.tls.as_ref()?;
        if !self.auth.by_certificate() {
            return None;
        }
        let leaf = stream.peer_certificates()?.first()?;
        crate::tls::server::cert_identity(leaf, tls.identity())
    }
}

/// What every connection task needs.
pub struct Shared {
    pub broker: Arc<Broker>,
    pub server: ServerConfig,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    pub limits: Arc<Limits>,
}

/// How a TLS handshake ended for a caller that must answer a plaintext
/// client in its own protocol.
pub enum Tls {
    Ready(Stream),
    /// A plaintext client on a TLS port (its first byte is not a TLS
    /// record): counted; the transport tells it in plaintext to use TLS.
    Plaintext(TcpStream, u8),
    /// Failed, counted and logged: close.
    Failed,
}

/// A TLS listener's handshake, inside the connection task and within the
/// handshake timeout (a plain listener's stream passes through). Failures
/// are finished at the edge here, once.
pub async fn tls_handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    shared: &Shared,
) -> Tls {
    let Some(tls) = &listener.tls else {
        return Tls::Ready(Stream::Plain(tcp));
    };
    let limit = shared.server.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    // nothing sent yet: a pre-opened connection or a TCP health check, not
    // a failed TLS handshake
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Err(_) => {
            listener.edge.unused(peer, limit);
            return Tls::Failed;
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            tracing::debug!(%peer, "closed before the TLS handshake (health check?)");
            return Tls::Failed;
        }
        Ok(Ok(_)) if first[0] != TLS_HANDSHAKE => {
            listener.edge.tls_plaintext();
            return Tls::Plaintext(tcp, first[0]);
        }
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
        Ok(Ok(s)) => {
            let kind = if s.resumed() == Some(true) {
                "resumed"
            } else {
                "full"
            };
            listener.edge.tls_handshake(kind);
            Tls::Ready(s)
        }
        Ok(Err(e)) => {
            listener.edge.tls_failed(peer, e.reason(), &e.detail());
            Tls::Failed
        }
        Err(_) => {
            listener.edge.tls_failed(
                peer,
                "timeout",
                "TLS handshake not finished within server.handshake_timeout",
            );
            Tls::Failed
        }
    }
}

/// Accepts until shutdown; calls `serve` in a tracked task per connection
/// with the admission decision: a slot, or the refusal to answer. A denied
/// client is closed here, before anything is read.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Result<Slot, Refusal>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let admission = match shared.limits.admit(&gate, peer.ip()) {
                    Admission::Admitted(slot) => Ok(slot),
                    Admission::Refused(r) => Err(r),
                    Admission::Close => continue,
                };
                shared.tracker.spawn(serve(stream, peer, admission));
            }
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning
                warn!(error = %e, "accept failed; retrying in {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if backoff == Duration::from_secs(1) {
                    error!("accept keeps failing");
                }
            }
        }
    }
}
