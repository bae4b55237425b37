//! Thrift SASL transport (TSaslTransport): negotiation messages, the PLAIN
//! mechanism on both sides, and the length-prefixed data frames that follow.
//! Sans-IO: callers feed bytes in and write the returned bytes out.

use std::fmt;

use crate::secret::Secret;

/// Negotiation status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Start = 1,
    Ok = 2,
    Bad = 3,
    Error = 4,
    Complete = 5,
}

impl Status {
    fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            1 => Status::Start,
            2 => Status::Ok,
            3 => Status::Bad,
            4 => Status::Error,
            5 => Status::Complete,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslError {
    /// The peer sent bytes that are not a SASL negotiation message.
    Malformed(String),
    /// A declared length above the configured maximum (checked before allocating).
    TooLarge { len: usize, max: usize },
    /// The peer reported failure (BAD or ERROR) with this reason.
    PeerFailure(String),
    /// Authentication refused; the reason is safe to show the peer.
    Rejected(String),
}

impl fmt::Display for SaslError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SaslError::Malformed(m) => write!(f, "malformed SASL message: {m}"),
            SaslError::TooLarge { len, max } => {
                write!(
                    f,
                    "SASL message of {len} bytes exceeds the limit of {max} bytes"
                )
            }
            SaslError::PeerFailure(r) => write!(f, "peer indicated failure: {r}"),
            SaslError::Rejected(r) => f.write_str(r),
        }
    }
}

impl std::error::Error for SaslError {}

/// One negotiation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub status: Status,
    pub payload: Vec<u8>,
}

/// Decodes one negotiation message from the front of `buf`.
/// `Ok(None)` means more bytes are needed; the length is checked against `max`
/// before anything is allocated.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Message, usize)>, SaslError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let status = Status::from_byte(first).ok_or_else(|| {
        SaslError::Malformed(format!("unknown negotiation status byte {first:#04x}"))
    })?;
    let Some(len) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > max {
        return Err(SaslError::TooLarge { len, max });
    }
    let Some(payload) = buf.get(5..5 + len) else {
        return Ok(None);
    };
    Ok(Some((
        Message {
            status,
            payload: payload.to_vec(),
        },
        5 + len,
    )))
}

pub fn encode(status: Status, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(status as u8);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Length of the data frame at the front of `buf` (4-byte big-endian length +
/// payload), `Ok(None)` if incomplete. Checked against `max` first.
pub fn data_frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, SaslError> {
    let Some(h) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > max {
        return Err(SaslError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Credentials carried by a PLAIN response.
#[derive(Debug, Clone)]
pub struct PlainCredentials {
    pub user: String,
    pub password: Secret,
}

/// Parses a PLAIN response: `[authzid] NUL authcid NUL passwd` (RFC 4616).
pub fn parse_plain(payload: &[u8]) -> Result<PlainCredentials, SaslError> {
    // at most three pieces, whatever the payload holds: a payload of NULs
    // must not become millions of slices; a NUL in the password is malformed
    let mut parts = payload.splitn(3, |b| *b == 0);
    let (Some(_authzid), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed(
            "PLAIN response must be [authzid] NUL user NUL password".into(),
        ));
    };
    if password.contains(&0) {
        return Err(SaslError::Malformed(
            "PLAIN response must be [authzid] NUL user NUL password".into(),
        ));
    }
    let user = std::str::from_utf8(user)
        .map_err(|_| SaslError::Malformed("PLAIN user name is not UTF-8".into()))?;
    if user.is_empty() {
        return Err(SaslError::Rejected("No user name provided".into()));
    }
    let password = std::str::from_utf8(password)
        .map_err(|_| SaslError::Malformed("PLAIN password is not UTF-8".into()))?;
    Ok(PlainCredentials {
        user: user.to_string(),
        password: Secret::new(password),
    })
}

/// Server side of the negotiation, one message at a time.
#[derive(Debug, Default)]
pub enum ServerHandshake {
    #[default]
    ExpectStart,
    ExpectPlainResponse,
}

/// What the server does after a message.
#[derive(Debug)]
pub enum ServerStep {
    /// Wait for the next message.
    Continue,
    /// The client presented these credentials; verify them, then answer
    /// COMPLETE (accepted) or BAD (refused).
    Verify(PlainCredentials),
}

impl ServerHandshake {
    pub fn on_message(&mut self, msg: Message) -> Result<ServerStep, SaslError> {
        if matches!(msg.status, Status::Bad | Status::Error) {
            return Err(SaslError::PeerFailure(
                String::from_utf8_lossy(&msg.payload).into_owned(),
            ));
        }
        match self {
            ServerHandshake::ExpectStart => {
                if msg.status != Status::Start {
                    return Err(SaslError::Malformed(format!(
                        "expected START, got {:?}",
                        msg.status
                    )));
                }
                let mech = String::from_utf8_lossy(&msg.payload);
                match mech.as_ref() {
                    "PLAIN" => {
                        *self = ServerHandshake::ExpectPlainResponse;
                        Ok(ServerStep::Continue)
                    }
                    "GSSAPI" => Err(SaslError::Rejected(
                        "Kerberos (SASL GSSAPI) is not enabled on this listener; \
                         connect with a user name and password (SASL PLAIN)"
                            .into(),
                    )),
                    other => Err(SaslError::Rejected(format!(
                        "unsupported SASL mechanism '{}'; this listener offers PLAIN",
                        other.escape_default()
                    ))),
                }
            }
            ServerHandshake::ExpectPlainResponse => match msg.status {
                Status::Ok | Status::Complete => Ok(ServerStep::Verify(parse_plain(&msg.payload)?)),
                s => Err(SaslError::Malformed(format!(
                    "expected the PLAIN response, got {s:?}"
                ))),
            },
        }
    }
}

/// The client side of PLAIN: the two messages to send.
pub fn plain_client_hello(user: &str, password: &Secret) -> Vec<u8> {
    let mut out = encode(Status::Start, b"PLAIN");
    let mut resp = Vec::with_capacity(user.len() + password.expose().len() + 2);
    resp.push(0);
    resp.extend_from_slice(user.as_bytes());
    resp.push(0);
    resp.extend_from_slice(password.expose().as_bytes());
    out.extend(encode(Status::Complete, &resp));
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_plain_response_of_nul_bytes_is_malformed_without_splitting_it_all() {
        for payload in [
            vec![0u8; 16 << 20],
            b"\0alice\0pw\0more".to_vec(),
            vec![0u8; 3],
        ] {
            match parse_plain(&payload) {
                Err(SaslError::Malformed(_)) | Err(SaslError::Rejected(_)) => {}
                other => panic!("{} bytes: {other:?}", payload.len()),
            }
        }
        let ok = parse_plain(b"\0alice\0pw").unwrap();
        assert_eq!((ok.user.as_str(), ok.password.expose()), ("alice", "pw"));
    }
    use super::*;

    const MAX: usize = 1 << 20;

    fn feed(hs: &mut ServerHandshake, bytes: &[u8]) -> Result<Vec<ServerStep>, SaslError> {
        let mut steps = vec![];
        let mut at = 0;
        while let Some((m, n)) = decode(&bytes[at..], MAX)? {
            at += n;
            steps.push(hs.on_message(m)?);
        }
        assert_eq!(at, bytes.len(), "bytes left over");
        Ok(steps)
    }

    #[test]
    fn java_style_plain_handshake_yields_credentials() {
        // START "PLAIN", then COMPLETE "\0alice\0pw" (what Hive JDBC sends).
        let bytes = plain_client_hello("alice", &Secret::new("pw"));
        let mut hs = ServerHandshake::default();
        let steps = feed(&mut hs, &bytes).unwrap();
        let ServerStep::Verify(c) = &steps[1] else {
            panic!("no credentials: {steps:?}")
        };
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.expose(), "pw");
    }

    #[test]
    fn plain_response_sent_with_ok_status_is_accepted() {
        let mut bytes = encode(Status::Start, b"PLAIN");
        bytes.extend(encode(Status::Ok, b"authz\0bob\0"));
        let mut hs = ServerHandshake::default();
        let steps = feed(&mut hs, &bytes).unwrap();
        assert!(
            matches!(&steps[1], ServerStep::Verify(c) if c.user == "bob" && c.password.is_empty())
        );
    }

    #[test]
    fn gssapi_is_refused_with_a_kerberos_hint() {
        let mut hs = ServerHandshake::default();
        let err = feed(&mut hs, &encode(Status::Start, b"GSSAPI")).unwrap_err();
        assert!(err.to_string().contains("Kerberos"), "{err}");
    }

    #[test]
    fn every_truncation_needs_more_bytes() {
        let bytes = plain_client_hello("alice", &Secret::new("pw"));
        let first_len = 5 + 5;
        for cut in 0..first_len {
            assert_eq!(decode(&bytes[..cut], MAX).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let bytes = [1u8, 0x7f, 0xff, 0xff, 0xff];
        assert_eq!(
            decode(&bytes, MAX),
            Err(SaslError::TooLarge {
                len: 0x7fff_ffff,
                max: MAX
            })
        );
        assert!(matches!(
            data_frame_len(&[0xff, 0xff, 0xff, 0xff], MAX),
            Err(SaslError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_status_byte_is_malformed() {
        assert!(matches!(
            decode(b"GET / HTTP/1.1", MAX),
            Err(SaslError::Malformed(_))
        ));
    }

    #[test]
    fn plain_response_without_two_separators_is_malformed() {
        assert!(matches!(
            parse_plain(b"alice"),
            Err(SaslError::Malformed(_))
        ));
        assert!(matches!(
            parse_plain(b"\0a\0b\0c"),
            Err(SaslError::Malformed(_))
        ));
        assert!(matches!(
            parse_plain(b"\0\0pw"),
            Err(SaslError::Rejected(_))
        ));
    }

    #[test]
    fn data_before_start_is_malformed() {
        let mut hs = ServerHandshake::default();
        let err = feed(&mut hs, &encode(Status::Complete, b"\0a\0b")).unwrap_err();
        assert!(matches!(err, SaslError::Malformed(_)));
    }

    #[test]
    fn client_bad_message_is_a_peer_failure() {
        let mut hs = ServerHandshake::default();
        let err = feed(&mut hs, &encode(Status::Bad, b"gave up")).unwrap_err();
        assert_eq!(err, SaslError::PeerFailure("gave up".into()));
    }
}
