//! Percent-encoding, shared by request signing, the emulator, and JDBC URLs.

use std::fmt::Write as _;

/// RFC 3986 strict: only `A-Z a-z 0-9 - _ . ~` stay as they are; every
/// other UTF-8 byte becomes `%XX` (uppercase).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `%XX` (and `+` as a space when `plus_is_space`, as in form
/// encoding). `None` for a bad escape or a result that is not UTF-8.
pub fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_bad_escapes() {
        let s = "a b+c/d*~工";
        assert_eq!(encode(s), "a%20b%2Bc%2Fd%2A~%E5%B7%A5");
        assert_eq!(decode(&encode(s), false).as_deref(), Some(s));
        assert_eq!(decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(decode("%zz", false), None);
        assert_eq!(decode("%4", false), None);
        assert_eq!(decode("%ff", false), None, "not UTF-8");
    }
}
