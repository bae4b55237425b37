//! Upstream side: a [`Target`] built from a route's config, and [`Link`], one
//! authenticated channel to it that carries Thrift messages.
//! Binary links own a TCP connection (SASL PLAIN, GSSAPI or NOSASL); HTTP
//! links share a keep-alive connection pool and POST one message per request.
//! [`Link::call_streaming`] lets a big reply from a binary or HTTP upstream
//! go on to the client (binary or HTTP) as it arrives.

mod binary;
mod http;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

use self::binary::{BinaryConn, Head};
pub use self::http::HttpPool;
use crate::config::{Transport, UpstreamConfig, UpstreamSasl};
use crate::error::{RpcError, UpstreamError};
use crate::identity::Credential;
use crate::secret::Secret;
use crate::tls::client::ClientTls;
use crate::wire::io::ReplySink;

/// Where and how to reach one upstream.
#[derive(Debug)]
pub struct Target {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    pub sasl: UpstreamSasl,
    /// Kerberos service principal (`_HOST` resolved) and QOP, when set.
    pub service: Option<String>,
    pub qop: crate::kerberos::Qop,
    /// HTTP path without the token, e.g. `/cliservice`.
    http_base: String,
    token: TokenSource,
    /// The parsed URI when the path never changes (no rotating token).
    fixed_uri: Option<::http::Uri>,
    /// For logs and client-facing errors: the token is masked.
    pub display: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_message_bytes: usize,
    /// How the upstream's certificate is checked, when it speaks TLS.
    pub tls: Option<ClientTls>,
}

/// Where an HTTP upstream's path token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    None,
    Static(Secret),
    /// The rotating token; each request uses the value current at that moment.
    Live(watch::Receiver<Option<Secret>>),
}

impl Target {
    /// `live` is the rotating token, used when the upstream asks for it;
    /// `tls` is how a TLS upstream is verified ([`UpstreamConfig::client_tls`]).
    pub fn from_config(
        u: &UpstreamConfig,
        max_message_bytes: usize,
        live: Option<watch::Receiver<Option<Secret>>>,
        tls: Option<ClientTls>,
    ) -> Target {
        let token = match (&u.token, u.token_rotation, live) {
            (Some(t), _, _) => TokenSource::Static(t.clone()),
            (None, true, Some(rx)) => TokenSource::Live(rx),
            _ => TokenSource::None,
        };
        let shown_path = match token {
            TokenSource::None => format!("/{}", u.http_path),
            _ => format!("/{}/token/****", u.http_path),
        };
        let service = u
            .principal
            .as_deref()
            .map(|p| crate::kerberos::service_principal(p, &u.host));
        let display = match u.transport {
            Transport::Binary => format!(
                "upstream {}:{} (binary, {}{})",
                u.host,
                u.port,
                if tls.is_some() { "TLS, " } else { "" },
                match (&service, u.sasl) {
                    (Some(_), _) => "SASL GSSAPI",
                    (None, UpstreamSasl::Plain) => "SASL PLAIN",
                    (None, UpstreamSasl::Nosasl) => "NOSASL",
                }
            ),
            Transport::Http => format!(
                "upstream {}://{}:{}{}",
                if tls.is_some() { "https" } else { "http" },
                u.host,
                u.port,
                shown_path
            ),
        };
        let mut t = Target {
            transport: u.transport,
            host: u.host.clone(),
            port: u.port,
            sasl: u.sasl,
            service,
            qop: u.qop,
            http_base: format!("/{}", u.http_path),
            token,
            fixed_uri: None,
            display,
            connect_timeout: u.connect_timeout,
            read_timeout: u.read_timeout,
            max_message_bytes,
            tls,
        };
        if !matches!(t.token, TokenSource::Live(_)) {
            t.fixed_uri = t.http_uri().ok();
        }
        t
    }

    /// The URI for a request now, token included (never log it). Parsed
    /// once for a fixed path; built per request only for a rotating token,
    /// so a new token applies from the next call on.
    pub(crate) fn http_uri(&self) -> Result<::http::Uri, UpstreamError> {
        let path = match (&self.token, &self.fixed_uri) {
            (_, Some(u)) => return Ok(u.clone()),
            (TokenSource::Live(rx), _) => match rx.borrow().as_ref() {
                Some(t) => format!("{}/token/{}", self.http_base, t.expose()),
                None => self.http_base.clone(),
            },
            (TokenSource::None, _) => self.http_base.clone(),
            (TokenSource::Static(t), _) => format!("{}/token/{}", self.http_base, t.expose()),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}{path}", self.host, self.port)
            .parse()
            .map_err(|_| UpstreamError::Protocol {
                upstream: self.display.clone(),
                detail: "host or http_path do not form a valid URL".into(),
            })
    }

    fn io_err(&self, e: std::io::Error) -> UpstreamError {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted => UpstreamError::Closed {
                upstream: self.display.clone(),
            },
            _ => UpstreamError::Io {
                upstream: self.display.clone(),
                source: e,
            },
        }
    }
}

/// A reply from [`Link::call_streaming`].
pub enum Streamed {
    Whole(Bytes),
    /// The start of a big reply; the link stays locked until it is relayed
    /// or dropped.
    Partial(Pending),
}

/// A big reply whose first bytes have arrived, read piece by piece with
/// [`Pending::next`] (an HTTP client's streamed body) or written whole to a
/// binary client with [`Pending::relay_to`]. Dropped before its end, it
/// closes a binary link: the stream is mid-frame.
pub struct Pending {
    from: From,
    head: Bytes,
    /// The head was handed out by [`Pending::next`].
    head_taken: bool,
    /// Bytes handed out so far.
    sent: usize,
    relayed: bool,
}

enum From {
    /// A SASL frame of `len` bytes, the rest still on the connection.
    Binary {
        conn: OwnedMutexGuard<BinaryConn>,
        len: usize,
    },
    /// The rest of an HTTP reply body.
    Http(http::HttpRest),
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (false, From::Binary { conn, .. }) = (self.relayed, &mut self.from) {
            conn.close();
        }
    }
}

impl Pending {
    fn new(from: From, head: Bytes) -> Pending {
        Pending {
            from,
            head,
            head_taken: false,
            sent: 0,
            relayed: false,
        }
    }

    /// The bytes received so far (at least the message header).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The reply's whole size, when the upstream said it (a SASL frame's
    /// length, an HTTP Content-Length).
    pub fn size(&self) -> Option<usize> {
        match &self.from {
            From::Binary { len, .. } => Some(*len),
            From::Http(rest) => rest.len,
        }
    }

    /// Bytes handed out by [`Pending::next`] so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Whether the whole reply has been handed out (with a known length,
    /// as soon as its last byte has).
    pub fn is_through(&self) -> bool {
        self.relayed
    }

    /// The next part of the reply, the head first; `None` once it is all
    /// through. Bounded by the upstream's read timeout per part and, for
    /// HTTP, by `max_message_bytes`; every failure here is the upstream's.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        if !self.head_taken {
            self.head_taken = true;
            self.sent = self.head.len();
            return Ok(Some(self.head.clone()));
        }
        let part = match &mut self.from {
            From::Binary { conn, len } => match *len - self.sent {
                0 => None,
                rest => Some(conn.read_rest(rest).await?),
            },
            From::Http(rest) => rest.next(self.sent).await?,
        };
        match part {
            Some(p) => {
                self.sent += p.len();
                match self.size() {
                    Some(len) if self.sent > len => {
                        return Err("reply body longer than its Content-Length".into())
                    }
                    // the last part: a reader that knows the length (hyper
                    // with a Content-Length) asks for nothing more, and the
                    // link is whole again
                    Some(len) if self.sent == len => self.relayed = true,
                    _ => {}
                }
                Ok(Some(p))
            }
            None => {
                if self.size().is_some_and(|len| self.sent != len) {
                    return Err("reply body shorter than its Content-Length".into());
                }
                self.relayed = true;
                Ok(None)
            }
        }
    }

    /// Writes the whole reply to `sink`, the rest as it arrives, and returns
    /// its size. A failure after the first byte went out is
    /// [`RpcError::RelayBroken`], naming the side that failed.
    pub async fn relay_to(mut self, sink: &mut ReplySink<'_>) -> Result<usize, RpcError> {
        use crate::error::Side;
        let broken = |side, detail| RpcError::RelayBroken { side, detail };
        // with its length known, one frame as from a binary upstream;
        // without, each part is a frame of its own (a SASL client reads a
        // message across frames), so nothing waits for the whole body
        let known = self.size();
        let mut first = true;
        while let Some(part) = self.next().await.map_err(|e| broken(Side::Upstream, e))? {
            match (known, first) {
                (Some(len), true) => sink.start(len, &part).await,
                (Some(_), false) => sink.write(&part).await,
                (None, _) => sink.frame(&part).await,
            }
            .map_err(|e| broken(Side::Client, e.to_string()))?;
            first = false;
        }
        Ok(self.sent)
    }
}

/// One channel to an upstream; cheap to clone and share between the HTTP
/// requests of one session.
#[derive(Clone)]
pub enum Link {
    Binary(Arc<Mutex<BinaryConn>>),
    Http(Arc<http::HttpChannel>),
}

impl Link {
    /// Connects (binary: TCP + SASL) or prepares (HTTP) a link as `cred`.
    /// `client_ip` is passed on to HTTP upstreams as X-Real-IP / X-Forwarded-For.
    pub async fn open(
        target: &Arc<Target>,
        cred: &Credential,
        pool: &HttpPool,
        client_ip: std::net::IpAddr,
    ) -> Result<Link, UpstreamError> {
        match target.transport {
            Transport::Binary => Ok(Link::Binary(Arc::new(Mutex::new(
                binary::BinaryConn::connect(target.clone(), cred).await?,
            )))),
            Transport::Http => Ok(Link::Http(Arc::new(http::HttpChannel::new(
                target.clone(),
                cred,
                pool,
                client_ip,
            )?))),
        }
    }

    /// Sends one Thrift message and returns the reply message.
    pub async fn call(&self, msg: Bytes) -> Result<Bytes, UpstreamError> {
        match self {
            Link::Binary(c) => c.lock().await.call(msg).await,
            // boxed: an HTTP exchange's state (hyper's request future) is
            // large, and inline it would size every binary RPC's future
            Link::Http(h) => Box::pin(h.call(msg)).await,
        }
    }

    /// As [`Link::call`], except that a reply above `relay_above` bytes is
    /// returned as soon as its first bytes are in: the caller checks them,
    /// then relays the rest. NOSASL and wrapped (QOP) frames always give the
    /// whole reply.
    pub async fn call_streaming(
        &self,
        msg: Bytes,
        relay_above: usize,
    ) -> Result<Streamed, UpstreamError> {
        let c = match self {
            Link::Binary(c) => c,
            Link::Http(h) => {
                return match Box::pin(h.call_streaming(msg, Some(relay_above))).await? {
                    http::HttpReply::Whole(reply) => Ok(Streamed::Whole(reply)),
                    http::HttpReply::Partial(rest) => {
                        let head = rest.head.clone();
                        Ok(Streamed::Partial(Pending::new(From::Http(rest), head)))
                    }
                };
            }
        };
        let mut conn = c.clone().lock_owned().await;
        match conn.call_head(msg, relay_above).await? {
            Head::Whole(reply) => Ok(Streamed::Whole(reply)),
            Head::Partial { len, head } => {
                conn.begin_relay();
                Ok(Streamed::Partial(Pending::new(
                    From::Binary { conn, len },
                    head,
                )))
            }
        }
    }

    /// False once a binary connection failed; such a link is never reused.
    pub async fn is_usable(&self) -> bool {
        match self {
            Link::Binary(c) => !c.lock().await.is_broken(),
            Link::Http(_) => true,
        }
    }

    /// Closes a binary link's connection now; later calls fail as closed.
    pub async fn close(&self) {
        if let Link::Binary(c) = self {
            c.lock().await.close();
        }
    }
}
