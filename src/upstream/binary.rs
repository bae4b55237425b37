//! Binary TCLIService upstream: TCP, then SASL PLAIN (4-byte frames after the
//! handshake) or NOSASL (bare messages).

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::Target;
use crate::config::UpstreamSasl;
use crate::error::UpstreamError;
use crate::identity::Credential;
use crate::wire::io::{FrameError, Framing, MessageIo};
use crate::wire::sasl;
use crate::wire::stream::Stream;

/// The start of a reply.
pub enum Head {
    Whole(Bytes),
    /// `len` bytes in all, `head` the first of them.
    Partial {
        len: usize,
        head: Bytes,
    },
}

pub struct BinaryConn {
    target: Arc<Target>,
    /// `None` once closed.
    io: Option<MessageIo>,
    framing: Framing,
    broken: bool,
}

impl BinaryConn {
    pub async fn connect(
        target: Arc<Target>,
        cred: &Credential,
    ) -> Result<BinaryConn, UpstreamError> {
        let t = target.clone();
        let setup = async move {
            let tcp = TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|source| UpstreamError::Connect {
                    upstream: t.display.clone(),
                    source,
                })?;
            let stream: Stream = match &t.tls {
                None => tcp.into(),
                Some(tls) => {
                    let _ = tcp.set_nodelay(true);
                    tls.connect(tcp).await.map_err(|e| UpstreamError::Tls {
                        upstream: t.display.clone(),
                        reason: crate::tls::explain(&e).unwrap_or_else(|| e.to_string()),
                    })?
                }
            };
            let framing = match t.sasl {
                UpstreamSasl::Plain => Framing::Sasl,
                UpstreamSasl::Nosasl => Framing::Bare,
            };
            let mut conn = BinaryConn {
                io: Some({
                    let mut io = MessageIo::new(stream, t.max_message_bytes);
                    io.join_frames();
                    io
                }),
                target: t,
                framing,
                broken: false,
            };
            match (&conn.target.service.clone(), framing) {
                (Some(service), _) => conn.sasl_gssapi(service, cred).await?,
                (None, Framing::Sasl) => conn.sasl_plain(cred).await?,
                (None, Framing::Bare) => {}
            }
            // from here on a stalled upstream is caught by the connection's
            // deadline, not by a timer armed per exchange
            if let Some(io) = conn.io.as_mut() {
                io.set_limits(
                    Some(conn.target.read_timeout),
                    Some(conn.target.read_timeout),
                );
            }
            Ok(conn)
        };
        timeout(target.connect_timeout, setup)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                upstream: target.display.clone(),
                secs: target.connect_timeout.as_secs_f64(),
            })?
    }

    fn err(&self, e: FrameError) -> UpstreamError {
        let upstream = self.target.display.clone();
        match e {
            FrameError::Eof | FrameError::Truncated => UpstreamError::Closed { upstream },
            FrameError::Io(e) => self.target.io_err(e),
            FrameError::TooLarge { .. } | FrameError::Malformed(_) => UpstreamError::Protocol {
                upstream,
                detail: e.to_string(),
            },
            FrameError::TimedOut { after, .. } => UpstreamError::ReadTimeout {
                upstream,
                secs: after.as_secs_f64(),
            },
        }
    }

    async fn sasl_plain(&mut self, cred: &Credential) -> Result<(), UpstreamError> {
        let hello = sasl::plain_client_hello(&cred.user, &cred.password);
        let Some(io) = self.io.as_mut() else {
            return Err(self.closed());
        };
        let r = io.write_raw(&hello).await;
        r.map_err(|e| self.err(e))?;
        loop {
            let Some(io) = self.io.as_mut() else {
                return Err(self.closed());
            };
            let r = io.read_sasl().await;
            let msg = r.map_err(|e| self.err(e))?;
            match msg.status {
                sasl::Status::Complete => return Ok(()),
                // PLAIN has no challenge; wait for COMPLETE
                sasl::Status::Ok => continue,
                sasl::Status::Bad | sasl::Status::Error => {
                    return Err(UpstreamError::AuthRejected {
                        upstream: self.target.display.clone(),
                        reason: String::from_utf8_lossy(&msg.payload).into_owned(),
                    })
                }
                sasl::Status::Start => {
                    return Err(UpstreamError::Protocol {
                        upstream: self.target.display.clone(),
                        detail: "unexpected SASL START from the server".into(),
                    })
                }
            }
        }
    }

    /// SASL GSSAPI as the credential's principal (RFC 4752), then the
    /// negotiated QOP's security layer on every frame.
    async fn sasl_gssapi(&mut self, service: &str, cred: &Credential) -> Result<(), UpstreamError> {
        let upstream = self.target.display.clone();
        let krb_err = |e: crate::kerberos::KerberosError| UpstreamError::AuthRejected {
            upstream: upstream.clone(),
            reason: e.to_string(),
        };
        let Some(init) = &cred.kerberos else {
            return Err(UpstreamError::Protocol {
                upstream: upstream.clone(),
                detail: format!("{} has no Kerberos credentials", cred.user),
            });
        };
        let (mut client, first) = init
            .sasl_client(service.to_string(), self.target.qop)
            .await
            .map_err(krb_err)?;
        let mut hello = sasl::encode(sasl::Status::Start, b"GSSAPI");
        hello.extend(sasl::encode(sasl::Status::Ok, &first));
        let Some(io) = self.io.as_mut() else {
            return Err(self.closed());
        };
        let r = io.write_raw(&hello).await;
        r.map_err(|e| self.err(e))?;
        let mut layer = None;
        let mut sent_final = false;
        loop {
            let Some(io) = self.io.as_mut() else {
                return Err(self.closed());
            };
            let r = io.read_sasl().await;
            let msg = r.map_err(|e| self.err(e))?;
            match msg.status {
                sasl::Status::Complete if sent_final => {
                    if let Some(io) = self.io.as_mut() {
                        io.set_layer(layer.take());
                    }
                    return Ok(());
                }
                sasl::Status::Ok | sasl::Status::Complete if !sent_final => {
                    let out = client.step(msg.payload).await.map_err(krb_err)?;
                    let (status, payload) = match out {
                        crate::kerberos::ClientOut::Response(p) => (sasl::Status::Ok, p),
                        crate::kerberos::ClientOut::Final { response, layer: l } => {
                            layer = l;
                            sent_final = true;
                            (sasl::Status::Complete, response)
                        }
                    };
                    let Some(io) = self.io.as_mut() else {
                        return Err(self.closed());
                    };
                    let r = io.write_sasl(status, &payload).await;
                    r.map_err(|e| self.err(e))?;
                }
                sasl::Status::Bad | sasl::Status::Error => {
                    return Err(UpstreamError::AuthRejected {
                        upstream,
                        reason: String::from_utf8_lossy(&msg.payload).into_owned(),
                    })
                }
                s => {
                    return Err(UpstreamError::Protocol {
                        upstream,
                        detail: format!("unexpected SASL {s:?} during GSSAPI"),
                    })
                }
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken || self.io.is_none()
    }

    /// Drops the connection.
    pub fn close(&mut self) {
        self.io = None;
    }

    fn closed(&self) -> UpstreamError {
        UpstreamError::Closed {
            upstream: self.target.display.clone(),
        }
    }

    /// Sends `msg` and reads the start of the reply: the whole reply when it
    /// is at most `min` bytes (or frames are wrapped or unframed), else its
    /// first `min` bytes; [`BinaryConn::read_rest`] then takes the rest.
    pub async fn call_head(&mut self, msg: Bytes, min: usize) -> Result<Head, UpstreamError> {
        let piecewise =
            self.framing == Framing::Sasl && self.io.as_ref().is_some_and(|io| !io.has_layer());
        if !piecewise {
            return self.call(msg).await.map(Head::Whole);
        }
        if self.broken {
            return Err(self.closed());
        }
        let Some(io) = self.io.as_mut() else {
            return Err(self.closed());
        };
        let exchange = async {
            io.write_message(Framing::Sasl, &msg).await?;
            io.read_frame_head(min).await
        };
        let r = match exchange.await {
            Ok((len, head)) if head.len() == len => Ok(Head::Whole(head)),
            Ok((len, head)) => Ok(Head::Partial { len, head }),
            Err(e) => Err(self.err(e)),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// A reply's head was read and its rest is still on the connection:
    /// until [`BinaryConn::read_rest`] has taken all of it the stream is
    /// mid-frame, and the link counts as broken.
    pub fn begin_relay(&mut self) {
        self.broken = true;
    }

    /// Up to `remaining` more bytes of the reply being relayed, as they
    /// arrive; the last of them makes the link usable again. Any failure
    /// leaves the stream mid-frame: the link stays broken.
    pub async fn read_rest(&mut self, remaining: usize) -> Result<Bytes, String> {
        let Some(io) = self.io.as_mut() else {
            return Err("upstream connection closed".into());
        };
        let chunk = io
            .read_chunk(remaining)
            .await
            .map_err(|e| format!("{}: {e}", self.target.display))?;
        if chunk.is_empty() {
            return Err(format!(
                "{}: connection closed mid-reply",
                self.target.display
            ));
        }
        if chunk.len() == remaining {
            self.broken = false;
        }
        Ok(chunk)
    }

    pub async fn call(&mut self, msg: Bytes) -> Result<Bytes, UpstreamError> {
        if self.broken {
            return Err(self.closed());
        }
        let Some(io) = self.io.as_mut() else {
            return Err(self.closed());
        };
        let framing = self.framing;
        let exchange = async {
            io.write_message(framing, &msg).await?;
            io.read_message(framing).await
        };
        let r = exchange.await.map_err(|e| self.err(e));
        // A failed exchange leaves the stream mid-message: never reuse it.
        if r.is_err() {
            self.broken = true;
        }
        r
    }
}
