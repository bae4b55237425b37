//! Async message I/O over a connection (plain or TLS), shared by the client
//! and upstream sides: SASL negotiation messages, SASL data frames, and bare (NOSASL)
//! Thrift messages. Payloads are split off the read buffer without copying.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::stream::Stream;
use super::{sasl, thrift};
use crate::deadline::{Deadline, Elapsed};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most memory reserved ahead of data that has not arrived.
const RESERVE_STEP: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between messages.
    #[error("connection closed")]
    Eof,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    Malformed(String),
    /// A read or write bounded by [`MessageIo::set_limits`] ran out of time.
    #[error("{op} timed out after {:.1} s", after.as_secs_f64())]
    TimedOut { op: IoOp, after: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
        })
    }
}

/// How long one read (a whole message, or one chunk of a relayed reply) and
/// one write may take on a connection. Checked by the connection's
/// [`Deadline`], not a timer per message.
struct Limits {
    deadline: Arc<Deadline>,
    read: Option<Duration>,
    write: Option<Duration>,
}

/// Runs `op` within `limit` of `limits`' deadline, if there is one.
async fn bounded<T>(
    limits: Option<(Arc<Deadline>, Duration)>,
    op_kind: IoOp,
    op: impl Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    match limits {
        None => op.await,
        Some((d, limit)) => d
            .within(limit, op)
            .await
            .unwrap_or_else(|Elapsed(after)| Err(FrameError::TimedOut { op: op_kind, after })),
    }
}

impl From<sasl::SaslError> for FrameError {
    fn from(e: sasl::SaslError) -> Self {
        match e {
            sasl::SaslError::TooLarge { len, max } => FrameError::TooLarge { len, max },
            other => FrameError::Malformed(other.to_string()),
        }
    }
}

/// Per-frame protection negotiated by SASL (GSSAPI QOP auth-int/auth-conf).
pub trait SecurityLayer: Send {
    fn wrap(&mut self, msg: &[u8]) -> Result<Vec<u8>, String>;
    fn unwrap(&mut self, frame: &[u8]) -> Result<Vec<u8>, String>;
}

/// How messages are delimited on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// 4-byte length + payload (after a SASL handshake with QOP auth).
    Sasl,
    /// Bare TBinaryProtocol messages (NOSASL).
    Bare,
}

pub struct MessageIo {
    stream: Stream,
    buf: BytesMut,
    max: usize,
    /// Set after a SASL handshake with QOP above `auth`.
    layer: Option<Box<dyn SecurityLayer>>,
    /// Where the walk of a bare message being read stands.
    scanner: thrift::BareScanner,
    /// None: every read and write may take as long as the caller allows.
    limits: Option<Limits>,
    /// Replies read by the broker as a client: a message may span frames.
    join_frames: bool,
}

impl MessageIo {
    pub fn new(stream: impl Into<Stream>, max: usize) -> MessageIo {
        let stream = stream.into();
        let _ = stream.tcp().set_nodelay(true);
        // small at first: an idle connection should cost little memory;
        // big messages get room sized to them (see `fill`, `read_frame`)
        MessageIo {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            max,
            layer: None,
            scanner: thrift::BareScanner::default(),
            limits: None,
            join_frames: false,
        }
    }

    /// From now on each read (a whole message, or one chunk) must end within
    /// `read` and each write within `write` (`None`: unbounded), else it
    /// fails with [`FrameError::TimedOut`] and the connection should close.
    pub fn set_limits(&mut self, read: Option<Duration>, write: Option<Duration>) {
        let deadline = match self.limits.take() {
            Some(l) => l.deadline,
            None => Arc::new(Deadline::new()),
        };
        self.limits = Some(Limits {
            deadline,
            read,
            write,
        });
    }

    fn limit(&self, op: IoOp) -> Option<(Arc<Deadline>, Duration)> {
        let l = self.limits.as_ref()?;
        let limit = match op {
            IoOp::Read => l.read,
            IoOp::Write => l.write,
        }?;
        Some((l.deadline.clone(), limit))
    }

    /// The largest message accepted from now on: the handshake cap until the
    /// client is authenticated, then the server's `max_message_bytes`.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// From now on every SASL data frame is wrapped/unwrapped by `layer`.
    pub fn set_layer(&mut self, layer: Option<Box<dyn SecurityLayer>>) {
        self.layer = layer;
    }

    /// Reads more bytes; `at_boundary` says whether EOF here is clean.
    async fn fill(&mut self, at_boundary: bool) -> Result<(), FrameError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            // double as a message grows, so big ones take few reads
            self.buf
                .reserve(self.buf.len().clamp(16 * 1024, RESERVE_STEP));
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) if at_boundary && self.buf.is_empty() => Err(FrameError::Eof),
            Ok(0) => Err(FrameError::Truncated),
            Ok(_) => Ok(()),
            // a TLS peer that closed TCP without close_notify (CPython's ssl
            // does): between messages that is an ordinary close
            Err(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    && at_boundary
                    && self.buf.is_empty() =>
            {
                Err(FrameError::Eof)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Err(e) => Err(e.into()),
        }
    }

    /// The first byte the peer sends, without consuming it.
    pub async fn peek_byte(&mut self) -> Result<u8, FrameError> {
        bounded(self.limit(IoOp::Read), IoOp::Read, async {
            while self.buf.is_empty() {
                self.fill(true).await?;
            }
            Ok(self.buf[0])
        })
        .await
    }

    pub async fn read_sasl(&mut self) -> Result<sasl::Message, FrameError> {
        bounded(self.limit(IoOp::Read), IoOp::Read, async {
            loop {
                if let Some((m, n)) = sasl::decode(&self.buf, self.max)? {
                    let _ = self.buf.split_to(n);
                    return Ok(m);
                }
                self.fill(true).await?;
            }
        })
        .await
    }

    /// One whole message, within the read limit if one is set.
    pub async fn read_message(&mut self, framing: Framing) -> Result<Bytes, FrameError> {
        let limit = self.limit(IoOp::Read);
        bounded(limit, IoOp::Read, async {
            match framing {
                Framing::Sasl => self.read_frame().await,
                Framing::Bare => self.read_bare().await,
            }
        })
        .await
    }

    /// The broker reads replies here as a client (an upstream link, or the
    /// load generator): join frames into messages (see `read_frame`).
    pub fn join_frames(&mut self) {
        self.join_frames = true;
    }

    /// One Thrift message from SASL data frames. On a connection whose
    /// replies the broker reads as a client, a message may span frames
    /// (Thrift's TSaslTransport reads across them, and a broker relaying an
    /// HTTP upstream's reply of unknown length sends it so): frames are then
    /// joined until the message is complete. Clients' requests come one
    /// frame per message, so a truncated one is answered at once.
    async fn read_frame(&mut self) -> Result<Bytes, FrameError> {
        let first = self.read_one_frame().await?;
        let mut scan = thrift::BareScanner::default();
        if !self.join_frames || self.layer.is_some() || !matches!(scan.advance(&first), Ok(None)) {
            // whole (or not Thrift at all: the caller's parser says so)
            return Ok(first);
        }
        let mut msg = BytesMut::from(&first[..]);
        loop {
            let next = self.read_one_frame().await?;
            if msg.len() + next.len() > self.max {
                return Err(FrameError::TooLarge {
                    len: msg.len() + next.len(),
                    max: self.max,
                });
            }
            msg.extend_from_slice(&next);
            match scan.advance(&msg) {
                Ok(None) => continue,
                _ => return Ok(msg.freeze()),
            }
        }
    }

    async fn read_one_frame(&mut self) -> Result<Bytes, FrameError> {
        loop {
            if let Some(len) = sasl::data_frame_len(&self.buf, self.max)? {
                if self.buf.len() >= 4 + len {
                    let _ = self.buf.split_to(4);
                    let frame = self.buf.split_to(len).freeze();
                    return match self.layer.as_mut() {
                        None => Ok(frame),
                        Some(l) => l
                            .unwrap(&frame)
                            .map(Bytes::from)
                            .map_err(FrameError::Malformed),
                    };
                }
                // grow in bounded steps: a declared length is not yet data
                self.buf
                    .reserve((4 + len - self.buf.len()).min(RESERVE_STEP));
            }
            self.fill(self.buf.is_empty()).await?;
        }
    }

    /// For relaying a big frame as it arrives: its declared length and the
    /// bytes buffered so far (at least `min`, or the whole frame if shorter).
    /// The caller then takes the rest with [`MessageIo::read_chunk`].
    /// Only without a security layer (a wrapped frame must be whole).
    pub async fn read_frame_head(&mut self, min: usize) -> Result<(usize, Bytes), FrameError> {
        bounded(self.limit(IoOp::Read), IoOp::Read, self.frame_head(min)).await
    }

    async fn frame_head(&mut self, min: usize) -> Result<(usize, Bytes), FrameError> {
        debug_assert!(self.layer.is_none());
        loop {
            if let Some(len) = sasl::data_frame_len(&self.buf, self.max)? {
                let want = 4 + len.min(min);
                if self.buf.len() >= want {
                    let _ = self.buf.split_to(4);
                    let n = self.buf.len().min(len);
                    return Ok((len, self.buf.split_to(n).freeze()));
                }
                self.buf.reserve(want - self.buf.len());
            }
            self.fill(self.buf.is_empty()).await?;
        }
    }

    /// Up to `max` more bytes of a frame being relayed (at least one).
    pub async fn read_chunk(&mut self, max: usize) -> Result<Bytes, FrameError> {
        if self.buf.is_empty() {
            if self.buf.capacity() < 64 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            bounded(self.limit(IoOp::Read), IoOp::Read, self.fill(false)).await?;
        }
        let n = self.buf.len().min(max);
        Ok(self.buf.split_to(n).freeze())
    }

    /// Ends the connection cleanly: a TLS peer gets its close_notify (Java
    /// and Python clients otherwise report a truncated stream).
    pub async fn shutdown(&mut self) {
        if self.stream.is_tls() {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.stream.shutdown()).await;
        }
    }

    /// The connection underneath (for a TLS client's certificate).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Whether frames are wrapped (QOP auth-int/auth-conf): then they cannot
    /// be relayed piecewise.
    pub fn has_layer(&self) -> bool {
        self.layer.is_some()
    }

    /// Starts a frame of `len` bytes whose first part is `head`; the rest
    /// follows with [`MessageIo::write_raw`].
    pub async fn write_frame_head(
        &mut self,
        framing: Framing,
        len: usize,
        head: &[u8],
    ) -> Result<(), FrameError> {
        debug_assert!(self.layer.is_none());
        let prefix = (len as u32).to_be_bytes();
        let prefix: &[u8] = if framing == Framing::Sasl {
            &prefix
        } else {
            &[]
        };
        self.write_parts(prefix, head).await
    }

    /// A bare message has no length prefix: the scanner finds its end as
    /// the bytes arrive, resuming where it stopped (a trickling client
    /// costs no more than a fast one).
    async fn read_bare(&mut self) -> Result<Bytes, FrameError> {
        loop {
            match self.scanner.advance(&self.buf) {
                Ok(Some(n)) if n <= self.max => {
                    self.scanner.reset();
                    return Ok(self.buf.split_to(n).freeze());
                }
                Ok(None) if self.buf.len() <= self.max => {}
                Ok(_) => {
                    self.scanner.reset();
                    return Err(FrameError::TooLarge {
                        len: self.buf.len(),
                        max: self.max,
                    });
                }
                Err(e) => {
                    self.scanner.reset();
                    return Err(FrameError::Malformed(e.to_string()));
                }
            }
            self.fill(self.buf.is_empty()).await?;
        }
    }

    pub async fn write_message(&mut self, framing: Framing, msg: &[u8]) -> Result<(), FrameError> {
        let wrapped;
        let msg = match (framing, self.layer.as_mut()) {
            (Framing::Sasl, Some(l)) => {
                wrapped = l.wrap(msg).map_err(FrameError::Malformed)?;
                &wrapped[..]
            }
            _ => msg,
        };
        let len = (msg.len() as u32).to_be_bytes();
        let prefix: &[u8] = if framing == Framing::Sasl { &len } else { &[] };
        self.write_parts(prefix, msg).await
    }

    /// Length and payload in one writev: no lone 4-byte segment, and no
    /// write buffer kept per connection.
    async fn write_parts(&mut self, head: &[u8], body: &[u8]) -> Result<(), FrameError> {
        bounded(
            self.limit(IoOp::Write),
            IoOp::Write,
            self.writev(head, body),
        )
        .await
    }

    async fn writev(&mut self, mut head: &[u8], mut body: &[u8]) -> Result<(), FrameError> {
        while !head.is_empty() || !body.is_empty() {
            let n = self
                .stream
                .write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)])
                .await?;
            if n == 0 {
                return Err(FrameError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            let h = n.min(head.len());
            head = &head[h..];
            body = &body[n - h..];
        }
        // TLS may hold the last records until flushed; plain TCP: no-op
        self.stream.flush().await?;
        Ok(())
    }

    pub async fn write_sasl(
        &mut self,
        status: sasl::Status,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        self.write_raw(&sasl::encode(status, payload)).await
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let limit = self.limit(IoOp::Write);
        bounded(limit, IoOp::Write, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await?;
            Ok(())
        })
        .await
    }
}

/// A binary client's connection as the destination of a reply relayed as it
/// arrives from the upstream. Only the listener builds one; the broker core
/// hands it to the upstream link without looking inside.
pub struct ReplySink<'a> {
    io: &'a mut MessageIo,
    framing: Framing,
    /// Set when a write ran out of the connection's write limit, so the
    /// listener can say so (the relay reports only "client side broke").
    timed_out: Option<std::time::Duration>,
}

impl<'a> ReplySink<'a> {
    pub fn new(io: &'a mut MessageIo, framing: Framing) -> ReplySink<'a> {
        ReplySink {
            io,
            framing,
            timed_out: None,
        }
    }

    /// The write limit that ran out while relaying, if one did.
    pub fn timed_out(&self) -> Option<std::time::Duration> {
        self.timed_out
    }

    fn note(&mut self, r: Result<(), FrameError>) -> Result<(), FrameError> {
        if let Err(FrameError::TimedOut { after, .. }) = &r {
            self.timed_out = Some(*after);
        }
        r
    }

    /// A wrapped frame (QOP auth-int/auth-conf) must be whole before it can
    /// be written, so such clients get replies whole.
    pub fn can_relay(&self) -> bool {
        !self.io.has_layer()
    }

    /// Starts a reply of `len` bytes whose first part is `head`.
    pub async fn start(&mut self, len: usize, head: &[u8]) -> Result<(), FrameError> {
        let r = self.io.write_frame_head(self.framing, len, head).await;
        self.note(r)
    }

    /// A part of a reply whose length is not known: a SASL frame of its own
    /// (the client reads the message across frames), or the bare bytes.
    pub async fn frame(&mut self, part: &[u8]) -> Result<(), FrameError> {
        let r = self.io.write_message(self.framing, part).await;
        self.note(r)
    }

    /// The next part of the reply.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), FrameError> {
        let r = self.io.write_raw(chunk).await;
        self.note(r)
    }
}
