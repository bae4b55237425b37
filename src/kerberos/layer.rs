//! The RFC 4752 security-layer message that ends a SASL GSSAPI exchange:
//! one byte of QOP bits, a 3-byte maximum buffer size, then (client only) an
//! authorization id. Pure, so it is tested without a KDC.

use serde::Deserialize;

/// Quality of protection after authentication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qop {
    /// Authentication only; frames travel as plain Thrift.
    #[default]
    Auth,
    /// Each frame is integrity-protected (GSS wrap without encryption).
    AuthInt,
    /// Each frame is encrypted (GSS wrap with confidentiality).
    AuthConf,
}

impl Qop {
    pub fn bit(self) -> u8 {
        match self {
            Qop::Auth => 1,
            Qop::AuthInt => 2,
            Qop::AuthConf => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Qop::Auth => "auth",
            Qop::AuthInt => "auth-int",
            Qop::AuthConf => "auth-conf",
        }
    }

    fn from_bit(b: u8) -> Option<Qop> {
        match b {
            1 => Some(Qop::Auth),
            2 => Some(Qop::AuthInt),
            4 => Some(Qop::AuthConf),
            _ => None,
        }
    }
}

/// Largest wrapped frame we offer to receive (Java's default as well).
pub const MAX_BUFFER: u32 = 65_536;

/// The server's offer: the QOP levels it accepts and its buffer size.
pub fn offer(levels: &[Qop]) -> [u8; 4] {
    let bits = levels.iter().fold(0u8, |m, q| m | q.bit());
    let b = MAX_BUFFER.to_be_bytes();
    [bits, b[1], b[2], b[3]]
}

/// Splits a layer message into (QOP bits, max buffer, authorization id).
pub fn parse(msg: &[u8]) -> Result<(u8, u32, &[u8]), String> {
    if msg.len() < 4 {
        return Err(format!(
            "security layer message has {} bytes; RFC 4752 needs at least 4",
            msg.len()
        ));
    }
    let maxbuf = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]);
    Ok((msg[0], maxbuf, &msg[4..]))
}

/// The client's answer to `offer_bits`: `want` if offered, else an error
/// naming both sides.
pub fn choose(offer_bits: u8, want: Qop) -> Result<[u8; 4], String> {
    if offer_bits & want.bit() == 0 {
        let offered: Vec<&str> = [Qop::Auth, Qop::AuthInt, Qop::AuthConf]
            .into_iter()
            .filter(|q| offer_bits & q.bit() != 0)
            .map(Qop::as_str)
            .collect();
        return Err(format!(
            "the server offers QOP [{}] but this side is configured for {}",
            offered.join(", "),
            want.as_str()
        ));
    }
    let b = MAX_BUFFER.to_be_bytes();
    Ok([want.bit(), b[1], b[2], b[3]])
}

/// The single level the client picked, checked against what was offered.
pub fn chosen(bits: u8, offered: &[Qop]) -> Result<Qop, String> {
    match Qop::from_bit(bits) {
        Some(q) if offered.contains(&q) => Ok(q),
        _ => Err(format!(
            "client chose QOP bits {bits:#04x}, which this listener did not offer"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_then_choice_round_trips_each_level() {
        for q in [Qop::Auth, Qop::AuthInt, Qop::AuthConf] {
            let o = offer(&[q]);
            let (bits, maxbuf, _) = parse(&o).unwrap();
            assert_eq!(maxbuf, MAX_BUFFER);
            let reply = choose(bits, q).unwrap();
            let (cbits, _, authz) = parse(&reply).unwrap();
            assert!(authz.is_empty());
            assert_eq!(chosen(cbits, &[q]).unwrap(), q);
        }
    }

    #[test]
    fn a_level_the_server_does_not_offer_is_refused_by_name() {
        let e = choose(offer(&[Qop::Auth])[0], Qop::AuthConf).unwrap_err();
        assert!(e.contains("[auth]") && e.contains("auth-conf"), "{e}");
        assert!(chosen(Qop::AuthConf.bit(), &[Qop::Auth]).is_err());
        assert!(chosen(3, &[Qop::Auth, Qop::AuthInt]).is_err());
    }

    #[test]
    fn short_layer_message_is_an_error() {
        assert!(parse(&[1, 0, 0]).is_err());
    }
}
