//! Binary TCLIService upstream: TCP, then SASL PLAIN (4-byte frames after the
//! handshake) or NOSASL (bare messages).

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Credential, Target};
use crate::config::UpstreamSasl;
use crate::error::UpstreamError;
use crate::wire::io::{FrameError, Framing, MessageIo};
use crate::wire::sasl;

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
            let stream = TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|source| UpstreamError::Connect {
                    upstream: t.display.clone(),
                    source,
                })?;
            let framing = match t.sasl {
                UpstreamSasl::Plain => Framing::Sasl,
                UpstreamSasl::Nosasl => Framing::Bare,
            };
            let mut conn = BinaryConn {
                io: Some(MessageIo::new(stream, t.max_message_bytes)),
                target: t,
                framing,
                broken: false,
            };
            if framing == Framing::Sasl {
                conn.sasl_plain(cred).await?;
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

    pub async fn call(&mut self, msg: Bytes) -> Result<Bytes, UpstreamError> {
        if self.broken {
            return Err(self.closed());
        }
        let Some(io) = self.io.as_mut() else {
            return Err(self.closed());
        };
        let limit = self.target.read_timeout;
        let framing = self.framing;
        let exchange = async {
            io.write_message(framing, &msg).await?;
            io.read_message(framing).await
        };
        let r = match timeout(limit, exchange).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(UpstreamError::ReadTimeout {
                upstream: self.target.display.clone(),
                secs: limit.as_secs_f64(),
            }),
        };
        // A failed exchange leaves the stream mid-message: never reuse it.
        if r.is_err() {
            self.broken = true;
        }
        r
    }
}
