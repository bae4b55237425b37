//! Client side: accept loops for the binary and HTTP listeners. Each
//! connection runs in its own task; handshakes happen inside that task, under
//! a timeout, so a slow client never blocks `accept`.

pub mod binary;
mod cookie;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::auth::Authenticator;
use crate::config::{ListenerConfig, ServerConfig};
use crate::edge::Edge;
use crate::session::{Broker, Route};

/// One configured listener: its authenticator, its route, and its side of
/// the edge (where every outcome of its clients is recorded).
pub struct Listener {
    pub config: ListenerConfig,
    pub auth: Arc<Authenticator>,
    /// The computing resource this listener's clients reach.
    pub route: Arc<Route>,
    pub edge: Edge,
}

impl Listener {
    pub fn new(
        config: ListenerConfig,
        auth: Arc<Authenticator>,
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
            route,
            edge,
        }
    }
}

/// What every connection task needs.
pub struct Shared {
    pub broker: Arc<Broker>,
    pub server: ServerConfig,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    pub permits: Arc<Semaphore>,
}

/// Accepts until shutdown; calls `serve` in a tracked task per connection.
pub async fn accept_loop<F, Fut>(listener: TcpListener, shared: Arc<Shared>, serve: F)
where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                shared.tracker.spawn(serve(stream, peer, permit));
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
