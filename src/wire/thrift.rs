//! Strict TBinaryProtocol, read without copying: message header peek, a
//! bounded skipper that finds where a message ends, and field lookups by id
//! path. The broker never decodes result payloads; it only walks them.

use std::fmt;

/// Thrift message types (TMessageType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Call = 1,
    Reply = 2,
    Exception = 3,
    Oneway = 4,
}

/// Thrift wire types (TType).
pub mod ttype {
    pub const STOP: u8 = 0;
    pub const BOOL: u8 = 2;
    pub const BYTE: u8 = 3;
    pub const DOUBLE: u8 = 4;
    pub const I16: u8 = 6;
    pub const I32: u8 = 8;
    pub const I64: u8 = 10;
    pub const STRING: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const MAP: u8 = 13;
    pub const SET: u8 = 14;
    pub const LIST: u8 = 15;
}

const VERSION_1: u32 = 0x8001_0000;
const VERSION_MASK: u32 = 0xffff_0000;
/// Nesting limit, as in Thrift's TConfiguration default.
const MAX_DEPTH: usize = 64;
/// Method names are short; anything longer is garbage, not a message.
const MAX_NAME_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed; not an error for a streaming reader.
    Incomplete,
    Malformed(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Incomplete => f.write_str("truncated Thrift message"),
            WireError::Malformed(m) => write!(f, "malformed Thrift message: {m}"),
        }
    }
}

impl std::error::Error for WireError {}

fn malformed(msg: impl Into<String>) -> WireError {
    WireError::Malformed(msg.into())
}

/// The header of one Thrift message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHeader<'a> {
    pub name: &'a str,
    pub kind: MessageType,
    pub seqid: i32,
    /// Offset of the argument/result struct.
    pub body_offset: usize,
}

/// A bounds-checked cursor over a byte slice.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Incomplete)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    fn skip_bytes(&mut self, n: usize) -> Result<(), WireError> {
        self.take(n).map(|_| ())
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len(&mut self, what: &str) -> Result<usize, WireError> {
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| malformed(format!("negative {what} length {n}")))
    }

    /// A length-prefixed binary/string field.
    pub fn binary(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.len("string")?;
        // Refuse lengths beyond the buffer only once the buffer could hold
        // them; a streaming caller treats this as Incomplete.
        self.take(n)
    }

    pub fn string(&mut self) -> Result<&'a str, WireError> {
        let b = self.binary()?;
        std::str::from_utf8(b).map_err(|_| malformed("string is not UTF-8"))
    }

    /// Reads a field header; `None` at the struct's STOP byte.
    pub fn field_begin(&mut self) -> Result<Option<(u8, i16)>, WireError> {
        let t = self.u8()?;
        if t == ttype::STOP {
            return Ok(None);
        }
        Ok(Some((t, self.i16()?)))
    }

    /// Skips one value of wire type `t`.
    pub fn skip(&mut self, t: u8) -> Result<(), WireError> {
        self.skip_depth(t, 0)
    }

    fn skip_depth(&mut self, t: u8, depth: usize) -> Result<(), WireError> {
        if depth > MAX_DEPTH {
            return Err(malformed("nesting deeper than 64"));
        }
        match t {
            ttype::BOOL | ttype::BYTE => self.skip_bytes(1),
            ttype::I16 => self.skip_bytes(2),
            ttype::I32 => self.skip_bytes(4),
            ttype::DOUBLE | ttype::I64 => self.skip_bytes(8),
            ttype::STRING => {
                let n = self.len("string")?;
                self.skip_bytes(n)
            }
            ttype::STRUCT => {
                while let Some((ft, _)) = self.field_begin()? {
                    self.skip_depth(ft, depth + 1)?;
                }
                Ok(())
            }
            ttype::MAP => {
                let kt = self.u8()?;
                let vt = self.u8()?;
                let n = self.len("map")?;
                self.skip_elems(&[kt, vt], n, depth)
            }
            ttype::SET | ttype::LIST => {
                let et = self.u8()?;
                let n = self.len("list")?;
                self.skip_elems(&[et], n, depth)
            }
            other => Err(malformed(format!("unknown wire type {other}"))),
        }
    }

    fn skip_elems(&mut self, types: &[u8], n: usize, depth: usize) -> Result<(), WireError> {
        // Fixed-width elements are skipped in one step: a FetchResults column
        // of a million i64 values costs one bounds check, not a million.
        let width: Option<usize> = types.iter().map(|t| fixed_width(*t)).sum();
        if let Some(w) = width {
            let total = n.checked_mul(w).ok_or_else(|| malformed("list too long"))?;
            return self.skip_bytes(total);
        }
        for _ in 0..n {
            for t in types {
                self.skip_depth(*t, depth + 1)?;
            }
        }
        Ok(())
    }
}

fn fixed_width(t: u8) -> Option<usize> {
    match t {
        ttype::BOOL | ttype::BYTE => Some(1),
        ttype::I16 => Some(2),
        ttype::I32 => Some(4),
        ttype::DOUBLE | ttype::I64 => Some(8),
        _ => None,
    }
}

/// Reads the message header (strict binary protocol only; that is what every
/// HiveServer2 client and server sends).
pub fn peek_header(buf: &[u8]) -> Result<MessageHeader<'_>, WireError> {
    let mut r = Reader::new(buf);
    let word = r.i32()? as u32;
    if word & VERSION_MASK != VERSION_1 {
        return Err(malformed(format!(
            "not a strict TBinaryProtocol message (first word {word:#010x})"
        )));
    }
    let kind = match word & 0xff {
        1 => MessageType::Call,
        2 => MessageType::Reply,
        3 => MessageType::Exception,
        4 => MessageType::Oneway,
        t => return Err(malformed(format!("unknown message type {t}"))),
    };
    let n = r.len("method name")?;
    if n > MAX_NAME_LEN {
        return Err(malformed(format!("method name of {n} bytes")));
    }
    let name =
        std::str::from_utf8(r.take(n)?).map_err(|_| malformed("method name is not UTF-8"))?;
    let seqid = r.i32()?;
    Ok(MessageHeader {
        name,
        kind,
        seqid,
        body_offset: r.pos(),
    })
}

/// Length of the complete message at the start of `buf`, or `Incomplete`.
/// Used where no framing tells us (NOSASL streams).
pub fn message_len(buf: &[u8]) -> Result<usize, WireError> {
    let h = peek_header(buf)?;
    let mut r = Reader::at(buf, h.body_offset);
    r.skip(ttype::STRUCT)?;
    Ok(r.pos())
}

/// Finds where a bare (NOSASL) message ends while its bytes arrive, without
/// walking it again from the start for every new chunk: the walk's state
/// (position, the open structs and containers) is kept between calls, and
/// every step either completes or leaves the state as it was, so each byte
/// is examined a bounded number of times whatever the chunking. Agrees with
/// [`message_len`] on every input.
#[derive(Debug, Default)]
pub struct BareScanner {
    /// Where the walk stands; 0 until the header has been read.
    pos: usize,
    stack: Vec<Frame>,
    /// The wire type of the value at `pos`, when one is due.
    value: Option<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Frame {
    Struct,
    /// `remaining` more elements of one (list, set) or two (map) types.
    Elems {
        types: [u8; 2],
        arity: u8,
        next: u8,
        remaining: u64,
    },
    /// Bytes to pass over: a string's body, a run of fixed-width elements.
    Skip(usize),
}

impl BareScanner {
    /// The length of the message at the start of `buf` once it is all
    /// there (`Ok(None)` until then). `buf` must be the same bytes as on
    /// the previous call, possibly with more appended; call
    /// [`BareScanner::reset`] after taking the message.
    pub fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        if self.pos == 0 {
            match peek_header(buf) {
                Ok(h) => {
                    self.pos = h.body_offset;
                    self.stack.push(Frame::Struct);
                }
                Err(WireError::Incomplete) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        loop {
            if let Some(t) = self.value {
                match self.value_step(buf, t)? {
                    true => self.value = None,
                    false => return Ok(None),
                }
                continue;
            }
            let Some(top) = self.stack.last_mut() else {
                return Ok(Some(self.pos));
            };
            let avail = &buf[self.pos.min(buf.len())..];
            match top {
                Frame::Skip(n) => {
                    let k = (*n).min(avail.len());
                    *n -= k;
                    self.pos += k;
                    if *n > 0 {
                        return Ok(None);
                    }
                    self.stack.pop();
                }
                Frame::Elems { remaining: 0, .. } => {
                    self.stack.pop();
                }
                Frame::Elems {
                    types,
                    arity,
                    next,
                    remaining,
                } => {
                    self.value = Some(types[*next as usize]);
                    *next += 1;
                    if *next == *arity {
                        *next = 0;
                        *remaining -= 1;
                    }
                }
                Frame::Struct => match avail.first() {
                    None => return Ok(None),
                    Some(&ttype::STOP) => {
                        self.pos += 1;
                        self.stack.pop();
                    }
                    Some(&t) if avail.len() >= 3 => {
                        self.pos += 3;
                        self.value = Some(t);
                    }
                    Some(_) => return Ok(None),
                },
            }
        }
    }

    /// Starts over for the next message.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.stack.clear();
        self.value = None;
    }

    /// Takes the value of type `t` at `pos` (or opens it); false if more
    /// bytes are needed first (nothing is consumed then).
    fn value_step(&mut self, buf: &[u8], t: u8) -> Result<bool, WireError> {
        // the same depth rule as `Reader::skip`: a value's depth is the
        // number of frames it sits in
        if self.stack.len() > MAX_DEPTH {
            return Err(malformed("nesting deeper than 64"));
        }
        let avail = &buf[self.pos.min(buf.len())..];
        let be32 = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let count = |n: i32, what: &str| {
            u64::try_from(n).map_err(|_| malformed(format!("negative {what} length {n}")))
        };
        if let Some(w) = fixed_width(t) {
            return Ok(match avail.len() >= w {
                true => {
                    self.pos += w;
                    true
                }
                false => false,
            });
        }
        let (head, frame) = match t {
            ttype::STRING if avail.len() >= 4 => {
                (4, Frame::Skip(count(be32(avail), "string")? as usize))
            }
            ttype::STRUCT => (0, Frame::Struct),
            ttype::MAP if avail.len() >= 6 => {
                let (kt, vt) = (avail[0], avail[1]);
                let n = count(be32(&avail[2..]), "map")?;
                (6, elems([kt, vt], 2, n)?)
            }
            ttype::SET | ttype::LIST if avail.len() >= 5 => {
                let n = count(be32(&avail[1..]), "list")?;
                (5, elems([avail[0], 0], 1, n)?)
            }
            ttype::STRING | ttype::MAP | ttype::SET | ttype::LIST => return Ok(false),
            other => return Err(malformed(format!("unknown wire type {other}"))),
        };
        self.pos += head;
        self.stack.push(frame);
        Ok(true)
    }
}

/// The frame for `n` elements: fixed-width ones are one run of bytes.
fn elems(types: [u8; 2], arity: u8, n: u64) -> Result<Frame, WireError> {
    let width: Option<usize> = types[..arity as usize]
        .iter()
        .map(|t| fixed_width(*t))
        .sum();
    Ok(match width {
        Some(w) => Frame::Skip(
            usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(w))
                .ok_or_else(|| malformed("list too long"))?,
        ),
        None => Frame::Elems {
            types,
            arity,
            next: 0,
            remaining: n,
        },
    })
}

/// Follows a path of struct field ids from `start` (which must point at a
/// struct body) and returns a reader positioned at the last field's value,
/// with its wire type. `None` if a field on the path is absent.
pub fn find_field<'a>(
    buf: &'a [u8],
    start: usize,
    path: &[i16],
) -> Result<Option<(u8, Reader<'a>)>, WireError> {
    let mut r = Reader::at(buf, start);
    let mut found_type = ttype::STRUCT;
    for (i, want) in path.iter().enumerate() {
        if found_type != ttype::STRUCT {
            return Err(malformed(format!("field {} is not a struct", path[i - 1])));
        }
        let mut hit = None;
        while let Some((t, id)) = r.field_begin()? {
            if id == *want {
                hit = Some(t);
                break;
            }
            r.skip(t)?;
        }
        match hit {
            Some(t) => found_type = t,
            None => return Ok(None),
        }
    }
    Ok(Some((found_type, r)))
}

/// Builds strict-binary messages; used for the few messages the broker writes
/// itself and for tests.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn message_begin(&mut self, name: &str, kind: MessageType, seqid: i32) {
        self.i32((VERSION_1 | kind as u32) as i32);
        self.string(name);
        self.i32(seqid);
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn i16(&mut self, v: i16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn binary(&mut self, v: &[u8]) {
        self.i32(v.len() as i32);
        self.buf.extend_from_slice(v);
    }
    pub fn string(&mut self, v: &str) {
        self.binary(v.as_bytes());
    }
    pub fn field(&mut self, t: u8, id: i16) {
        self.u8(t);
        self.i16(id);
    }
    pub fn stop(&mut self) {
        self.u8(ttype::STOP);
    }
    pub fn string_map(&mut self, entries: &[(String, String)]) {
        self.u8(ttype::STRING);
        self.u8(ttype::STRING);
        self.i32(entries.len() as i32);
        for (k, v) in entries {
            self.string(k);
            self.string(v);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every prefix of `msg`, fed to one scanner as it grows, gives what
    /// `message_len` gives for the whole buffer (and `None` before).
    fn scan_agrees(msg: &[u8]) {
        let want = message_len(msg);
        let mut s = BareScanner::default();
        for end in 0..=msg.len() {
            match s.advance(&msg[..end]) {
                Ok(None) if end < msg.len() => continue,
                Ok(Some(n)) => {
                    assert_eq!(Ok(n), want, "complete at {end} of {}", msg.len());
                    return;
                }
                Ok(None) => {
                    assert_eq!(want, Err(WireError::Incomplete), "all {} bytes", msg.len());
                    return;
                }
                Err(e) => {
                    assert_eq!(Err(e), want, "error at {end}");
                    return;
                }
            }
        }
    }

    #[test]
    fn the_bare_scanner_agrees_with_message_len_at_every_split() {
        let mut w = Writer::default();
        w.message_begin("ExecuteStatement", MessageType::Call, 3);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRING, 2);
        w.string("select 1");
        w.field(ttype::MAP, 3);
        w.u8(ttype::STRING);
        w.u8(ttype::STRING);
        w.i32(2);
        for s in ["a", "b", "c", "d"] {
            w.string(s);
        }
        w.field(ttype::LIST, 4);
        w.u8(ttype::I64);
        w.i32(3);
        for _ in 0..3 {
            w.buf.extend_from_slice(&7i64.to_be_bytes());
        }
        w.field(ttype::LIST, 5);
        w.u8(ttype::STRUCT);
        w.i32(2);
        for _ in 0..2 {
            w.field(ttype::BOOL, 1);
            w.u8(1);
            w.stop();
        }
        w.field(ttype::DOUBLE, 6);
        w.buf.extend_from_slice(&1.5f64.to_be_bytes());
        w.stop();
        w.stop();
        let msg = w.buf.clone();
        scan_agrees(&msg);
        let mut trailing = msg.clone();
        trailing.extend_from_slice(b"next message");
        scan_agrees(&trailing);
        // every truncation and every single-byte corruption, too
        for cut in 0..msg.len() {
            scan_agrees(&msg[..cut]);
            for b in [0u8, 1, 0x7f, 0xff] {
                let mut bad = msg.clone();
                bad[cut] = b;
                scan_agrees(&bad);
            }
        }
    }

    #[test]
    fn the_bare_scanner_refuses_nesting_like_message_len() {
        for depth in [63usize, 64, 65, 66, 200] {
            let mut w = Writer::default();
            w.message_begin("GetInfo", MessageType::Call, 1);
            for _ in 0..depth {
                w.field(ttype::STRUCT, 1);
            }
            w.field(ttype::BYTE, 2);
            w.u8(1);
            for _ in 0..=depth {
                w.stop();
            }
            scan_agrees(&w.buf);
        }
    }

    #[test]
    fn a_message_trickled_one_byte_at_a_time_is_found_whole() {
        let mut w = Writer::default();
        w.message_begin("ExecuteStatement", MessageType::Call, 1);
        w.field(ttype::STRUCT, 1);
        for i in 0..30_000i16 {
            w.field(ttype::I32, i);
            w.i32(1);
        }
        w.field(ttype::STRING, 2);
        w.binary(&vec![b'x'; 300_000]);
        w.stop();
        w.stop();
        let msg = w.buf;
        let mut s = BareScanner::default();
        let mut found = None;
        // one byte at a time (a walk from the start per chunk would take
        // ~10^11 steps here)
        for end in 0..=msg.len() {
            if let Some(n) = s.advance(&msg[..end]).unwrap() {
                found = Some(n);
                break;
            }
        }
        assert_eq!(found, Some(msg.len()));
    }

    use super::*;

    fn call(name: &str, body: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::default();
        w.message_begin(name, MessageType::Call, 7);
        body(&mut w);
        w.stop();
        w.buf
    }

    #[test]
    fn header_peek_reads_name_type_and_seqid() {
        let m = call("ExecuteStatement", |_| {});
        let h = peek_header(&m).unwrap();
        assert_eq!(h.name, "ExecuteStatement");
        assert_eq!(h.kind, MessageType::Call);
        assert_eq!(h.seqid, 7);
    }

    #[test]
    fn header_peek_matches_captured_open_session_request() {
        // OpenSession(client_protocol = V1), as captured from a real client.
        let bytes: Vec<u8> = [
            &[0x80, 0x01, 0x00, 0x01, 0, 0, 0, 0x0b][..],
            b"OpenSession",
            &[0, 0, 0, 1, 0x0c, 0, 1, 0x08, 0, 1, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        let h = peek_header(&bytes).unwrap();
        assert_eq!((h.name, h.seqid), ("OpenSession", 1));
        assert_eq!(message_len(&bytes).unwrap(), bytes.len());
    }

    #[test]
    fn every_truncation_of_a_message_is_incomplete_not_malformed() {
        let m = call("FetchResults", |w| {
            w.field(ttype::LIST, 1);
            w.u8(ttype::STRING);
            w.i32(2);
            w.string("a");
            w.string("bé");
            w.field(ttype::MAP, 2);
            w.string_map(&[("k".into(), "v".into())]);
        });
        assert_eq!(message_len(&m).unwrap(), m.len());
        for cut in 0..m.len() {
            assert_eq!(
                message_len(&m[..cut]),
                Err(WireError::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_and_non_strict_headers_are_malformed() {
        assert!(matches!(
            peek_header(b"GET / HTTP/1.1\r\n"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            peek_header(&[0x80, 0x01, 0x00, 0x09, 0, 0, 0, 0]),
            Err(WireError::Malformed(_))
        ));
        let huge_name = [0x80, 0x01, 0x00, 0x01, 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            peek_header(&huge_name),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn negative_lengths_and_unknown_types_are_malformed() {
        let m = call("X", |w| {
            w.field(ttype::STRING, 1);
            w.i32(-5);
        });
        assert!(matches!(message_len(&m), Err(WireError::Malformed(_))));
        let m = call("X", |w| w.field(99, 1));
        assert!(matches!(message_len(&m), Err(WireError::Malformed(_))));
    }

    #[test]
    fn huge_declared_list_of_fixed_width_values_does_not_allocate_or_loop() {
        // A list header claiming 500M i64 values: one bounds check says Incomplete.
        let m = call("X", |w| {
            w.field(ttype::LIST, 1);
            w.u8(ttype::I64);
            w.i32(500_000_000);
        });
        assert_eq!(message_len(&m), Err(WireError::Incomplete));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut w = Writer::default();
        w.message_begin("X", MessageType::Call, 1);
        for _ in 0..100 {
            w.field(ttype::STRUCT, 1);
        }
        assert!(matches!(message_len(&w.buf), Err(WireError::Malformed(_))));
    }

    #[test]
    fn find_field_follows_an_id_path_and_skips_unknown_fields() {
        let m = call("CloseSession", |w| {
            w.field(ttype::STRUCT, 1); // args.req
            w.field(ttype::STRING, 1281); // vendor extension before the handle
            w.string("ext");
            w.field(ttype::STRUCT, 1); // sessionHandle
            w.field(ttype::STRUCT, 1); // sessionId
            w.field(ttype::STRING, 1);
            w.binary(&[7u8; 16]);
            w.stop();
            w.stop();
            w.stop();
        });
        let h = peek_header(&m).unwrap();
        let (t, mut r) = find_field(&m, h.body_offset, &[1, 1, 1, 1])
            .unwrap()
            .unwrap();
        assert_eq!(t, ttype::STRING);
        assert_eq!(r.binary().unwrap(), &[7u8; 16]);
        assert!(find_field(&m, h.body_offset, &[1, 2]).unwrap().is_none());
    }
}
