//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`,
//! which feeds them every seed and crash file: one function per target, each
//! handing arbitrary bytes to the production parsers and asserting what must
//! hold whatever the bytes (a panic here is a finding). Nothing is parsed
//! here that the broker parses itself; the upstream's view of a message
//! (a Java Thrift decoder keeps the last of a repeated field and skips a
//! field of the wrong type) is read with the `thrift` crate's protocol.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use thrift::protocol::{TBinaryInputProtocol, TInputProtocol, TType};
use thrift::TConfiguration;

use crate::tcli::{self, OpenSessionEdit};
use crate::wire::sasl;
use crate::wire::thrift::{find_field, message_len, peek_header, ttype, BareScanner, Reader};
use crate::wire::thrift::{MessageType, WireError, Writer};

/// The handshake-phase cap the broker applies by default
/// (`server.handshake_max_bytes`).
const HANDSHAKE_MAX: usize = 64 * 1024;

/// `sub` is a piece of `whole` (the same bytes, somewhere in it).
fn within(whole: &[u8], sub: &[u8]) -> bool {
    sub.is_empty() || whole.windows(sub.len()).any(|w| w == sub)
}

/// SASL negotiation messages and data frames, one after another.
pub fn sasl_frames(data: &[u8]) {
    let mut at = 0;
    let mut hs = sasl::ServerHandshake::default();
    let mut handshake_over = false;
    loop {
        let rest = &data[at..];
        match sasl::decode(rest, HANDSHAKE_MAX) {
            Ok(Some((m, n))) => {
                assert_eq!(n, 5 + m.payload.len());
                assert!(n <= rest.len());
                // re-encoding gives the bytes back
                assert_eq!(sasl::encode(m.status, &m.payload), &rest[..n]);
                // one byte short is "more bytes needed", never an error
                assert_eq!(sasl::decode(&rest[..n - 1], HANDSHAKE_MAX), Ok(None));
                if !handshake_over {
                    match hs.on_message(m) {
                        Ok(sasl::ServerStep::Continue) => {}
                        Ok(sasl::ServerStep::Verify(c)) => {
                            assert!(!c.user.is_empty());
                            handshake_over = true;
                        }
                        Err(_) => handshake_over = true,
                    }
                }
                at += n;
            }
            Ok(None) => {
                assert!(rest.len() < 5 || rest.len() < 5 + be32(&rest[1..5]));
                break;
            }
            Err(sasl::SaslError::TooLarge { len, max }) => {
                assert!(len > max);
                break;
            }
            Err(_) => break,
        }
    }
    // the same bytes read as data frames (what follows the handshake)
    let mut at = 0;
    while let Ok(Some(len)) = sasl::data_frame_len(&data[at..], HANDSHAKE_MAX) {
        assert!(len <= HANDSHAKE_MAX);
        let Some(next) = (at + 4).checked_add(len).filter(|e| *e <= data.len()) else {
            break;
        };
        at = next;
    }
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// A SASL PLAIN response (`[authzid] NUL user NUL password`).
pub fn sasl_plain(data: &[u8]) {
    let Ok(c) = sasl::parse_plain(data) else {
        return;
    };
    let (user, password) = (c.user.as_bytes(), c.password.expose().as_bytes());
    assert!(!user.is_empty());
    assert!(!user.contains(&0) && !password.contains(&0));
    // the parts are the input's: `... NUL user NUL password`
    let tail = [&[0][..], user, &[0], password].concat();
    assert!(data.ends_with(&tail));
    assert!(!data[..data.len() - tail.len()].contains(&0));
    // what a client sends for them parses back to them
    let hello = sasl::plain_client_hello(&c.user, &c.password);
    let (start, n) = sasl::decode(&hello, usize::MAX).unwrap().unwrap();
    assert_eq!(start.payload, b"PLAIN");
    let (resp, m) = sasl::decode(&hello[n..], usize::MAX).unwrap().unwrap();
    assert_eq!(n + m, hello.len());
    let again = sasl::parse_plain(&resp.payload).unwrap();
    assert_eq!(again.user, c.user);
    assert_eq!(again.password.expose(), c.password.expose());
}

/// Chunk sizes for feeding a message piece by piece: from the seed byte, one
/// byte at a time (0) or pseudo-random sizes up to `seed` bytes.
struct Chunks {
    max: usize,
    state: u32,
}

impl Chunks {
    fn new(seed: u8) -> Chunks {
        Chunks {
            max: seed as usize,
            state: u32::from(seed) | 0x9e37_0000,
        }
    }

    fn next(&mut self) -> usize {
        if self.max <= 1 {
            return 1;
        }
        self.state = self
            .state
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        1 + (self.state >> 8) as usize % self.max
    }
}

/// The Thrift message header peek, the message-length walk, the bare
/// (NOSASL) scanner fed in chunks, and field lookups. The first byte picks
/// the chunk sizes; the rest is one or more messages.
pub fn thrift_header(data: &[u8]) {
    let Some((&split, msgs)) = data.split_first() else {
        return;
    };
    if let Ok(h) = peek_header(msgs) {
        assert!(h.name.len() <= 256);
        assert_eq!(h.body_offset, 12 + h.name.len());
        assert!(h.body_offset <= msgs.len());
        assert_eq!(&msgs[8..8 + h.name.len()], h.name.as_bytes());
        // re-encoding gives the header back, except the version word's
        // third byte, which Thrift (and so the peek) ignores
        let mut w = Writer::default();
        w.message_begin(h.name, h.kind, h.seqid);
        w.buf[2] = msgs[2];
        assert_eq!(w.buf, &msgs[..h.body_offset]);
        for path in [&[1][..], &[1, 1], &[1, 2], &[1, 1, 1, 1], &[0, 2, 1, 1]] {
            if let Ok(Some((t, mut r))) = find_field(msgs, h.body_offset, path) {
                assert!(r.pos() <= msgs.len());
                if r.skip(t).is_ok() {
                    assert!(r.pos() <= msgs.len());
                }
            }
        }
    }
    // every message in turn: the scanner, fed growing prefixes, agrees
    // with message_len on the whole of what is left
    let mut chunks = Chunks::new(split);
    let mut scanner = BareScanner::default();
    let mut start = 0;
    while start < msgs.len() {
        let buf = &msgs[start..];
        let want = message_len(buf);
        if let Ok(n) = want {
            assert!(n <= buf.len());
            let h = peek_header(buf).unwrap();
            assert!(n > h.body_offset);
            let mut r = Reader::at(buf, h.body_offset);
            r.skip(ttype::STRUCT).unwrap();
            assert_eq!(r.pos(), n);
        }
        let mut end = 0;
        let got = loop {
            end = (end + chunks.next()).min(buf.len());
            match scanner.advance(&buf[..end]) {
                Ok(None) if end < buf.len() => continue,
                Ok(None) => break Err(WireError::Incomplete),
                Ok(Some(n)) => break Ok(n),
                Err(e) => break Err(e),
            }
        };
        assert_eq!(got, want, "scanner and message_len disagree at {start}");
        match got {
            Ok(n) => {
                scanner.reset();
                start += n;
            }
            Err(_) => break,
        }
    }
}

/// The upstream's reading of an OpenSession request, as Hive's generated
/// Java code does it: the last `req` struct wins, and each field of the
/// request is taken only with its declared type (the last one wins).
#[derive(Debug, Default, PartialEq)]
struct UpstreamOpenSession {
    client_protocol: Option<i32>,
    username: Option<String>,
    password: Option<String>,
    configuration: Option<BTreeMap<String, String>>,
}

fn protocol(buf: &[u8]) -> TBinaryInputProtocol<&[u8]> {
    // declared sizes are bounded by the message, as a careful server bounds them
    let config = TConfiguration::builder()
        .max_string_size(Some(buf.len()))
        .max_container_size(Some(buf.len()))
        .build()
        .expect("valid limits");
    TBinaryInputProtocol::with_config(buf, true, config)
}

fn upstream_open_session(msg: &[u8]) -> Option<UpstreamOpenSession> {
    let h = peek_header(msg).ok()?;
    let mut p = protocol(&msg[h.body_offset..]);
    p.read_struct_begin().ok()?;
    let mut req = None;
    loop {
        let f = p.read_field_begin().ok()?;
        match (f.field_type, f.id) {
            (TType::Stop, _) => break,
            (TType::Struct, Some(1)) => req = Some(upstream_open_session_req(&mut p)?),
            (t, _) => p.skip(t).ok()?,
        }
        p.read_field_end().ok()?;
    }
    p.read_struct_end().ok()?;
    req
}

fn upstream_open_session_req(p: &mut dyn TInputProtocol) -> Option<UpstreamOpenSession> {
    let mut req = UpstreamOpenSession::default();
    p.read_struct_begin().ok()?;
    loop {
        let f = p.read_field_begin().ok()?;
        match (f.field_type, f.id) {
            (TType::Stop, _) => break,
            (TType::I32, Some(1)) => req.client_protocol = Some(p.read_i32().ok()?),
            (TType::String, Some(2)) => req.username = Some(p.read_string().ok()?),
            (TType::String, Some(3)) => req.password = Some(p.read_string().ok()?),
            (TType::Map, Some(4)) => {
                let m = p.read_map_begin().ok()?;
                if m.key_type != Some(TType::String) || m.value_type != Some(TType::String) {
                    // Java's generated code fails on a map of other types
                    return None;
                }
                let mut conf = BTreeMap::new();
                for _ in 0..m.size {
                    let k = p.read_string().ok()?;
                    conf.insert(k, p.read_string().ok()?);
                }
                p.read_map_end().ok()?;
                req.configuration = Some(conf);
            }
            (t, _) => p.skip(t).ok()?,
        }
        p.read_field_end().ok()?;
    }
    p.read_struct_end().ok()?;
    Some(req)
}

/// The edit for [`open_session_rewrite`]: a flags byte (bit 0 credentials,
/// bit 1 configuration), a length byte, then that many bytes of NUL-separated
/// text (user, password, then key, value, ...).
fn edit_from(data: &[u8]) -> Option<(OpenSessionEdit, &[u8])> {
    let (&flags, rest) = data.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let (text, msg) = rest.split_at_checked(len as usize)?;
    let text = String::from_utf8_lossy(text);
    let mut parts = text.split('\0').map(str::to_string);
    let mut next = || parts.next().unwrap_or_default();
    let credentials = (flags & 1 != 0).then(|| (next(), next()));
    let configuration = (flags & 2 != 0).then(|| {
        let n = (flags >> 2) as usize;
        (0..n).map(|_| (next(), next())).collect()
    });
    Some((
        OpenSessionEdit {
            credentials,
            configuration,
        },
        msg,
    ))
}

/// The OpenSession rewrite with an edit taken from the input.
pub fn open_session_rewrite(data: &[u8]) {
    let Some((edit, msg)) = edit_from(data) else {
        return;
    };
    let before = tcli::read_open_session(msg);
    let Ok(out) = tcli::rewrite_open_session(msg, &edit) else {
        return;
    };
    if edit.credentials.is_none() && edit.configuration.is_none() {
        assert_eq!(out, msg);
        return;
    }
    // the rewrite keeps the method, the message type and the seqid
    let (h0, h1) = (peek_header(msg).unwrap(), peek_header(&out).unwrap());
    assert_eq!((h0.name, h0.kind, h0.seqid), (h1.name, h1.kind, h1.seqid));
    // it changes the request struct only, and where the input was a whole
    // message, so is the output
    if let Ok(n) = message_len(msg) {
        assert_eq!(message_len(&out), Ok(out.len() - (msg.len() - n)));
    }
    // what the broker reads back is the edit, and what it did not edit
    // stays as the client sent it
    if let Ok(before) = before {
        let after = tcli::read_open_session(&out).expect("a readable request stays readable");
        assert_eq!(after.client_protocol, before.client_protocol);
        match &edit.credentials {
            Some((u, p)) => {
                assert_eq!(after.username.as_ref(), Some(u));
                assert_eq!(after.password.as_ref(), Some(p));
            }
            None => {
                assert_eq!(after.username, before.username);
                assert_eq!(after.password, before.password);
            }
        }
        match &edit.configuration {
            Some(c) => assert_eq!(&after.configuration, c),
            None => assert_eq!(after.configuration, before.configuration),
        }
    }
    // and the upstream, reading it its own way, sees the edited values:
    // nothing the client sent can stand in for them
    if let Some(up) = upstream_open_session(&out) {
        if let Some((u, p)) = &edit.credentials {
            assert_eq!(up.username.as_ref(), Some(u), "upstream sees another user");
            assert_eq!(up.password.as_ref(), Some(p));
        }
        if let Some(c) = &edit.configuration {
            let want: BTreeMap<String, String> = c.iter().cloned().collect();
            assert_eq!(up.configuration, Some(want), "upstream sees another conf");
        }
    }
}

/// The handle GUID the upstream acts on in a request: at each of
/// args.req.handle.identifier the last struct field 1 (Java keeps the last
/// and skips one of another type), then the identifier's last binary field 1.
fn upstream_request_guid(msg: &[u8]) -> Option<Option<Vec<u8>>> {
    fn walk(p: &mut dyn TInputProtocol, depth: usize) -> Option<Option<Vec<u8>>> {
        let mut found = None;
        p.read_struct_begin().ok()?;
        loop {
            let f = p.read_field_begin().ok()?;
            match (f.field_type, f.id) {
                (TType::Stop, _) => break,
                (TType::Struct, Some(1)) if depth < 3 => found = walk(p, depth + 1)?,
                (TType::String, Some(1)) if depth == 3 => found = Some(p.read_bytes().ok()?),
                (t, _) => p.skip(t).ok()?,
            }
            p.read_field_end().ok()?;
        }
        p.read_struct_end().ok()?;
        Some(found)
    }
    let h = peek_header(msg).ok()?;
    walk(&mut protocol(&msg[h.body_offset..]), 0)
}

/// Session and operation handle extraction from requests (with its refusal
/// of a repeated field on the handle path) and from replies.
pub fn handles(msg: &[u8]) {
    let Ok(h) = peek_header(msg) else {
        return;
    };
    match h.kind {
        MessageType::Call | MessageType::Oneway => {
            if let Ok(call) = tcli::Call::parse(msg) {
                assert_eq!(call.wire_name(), h.name);
                assert_eq!(call.seqid, h.seqid);
            }
            if let Ok(Some(g)) = tcli::request_guid(msg, &h) {
                assert!(within(&msg[h.body_offset..], &g));
                // the handle the broker checks is the one the upstream uses
                if let Some(up) = upstream_request_guid(msg) {
                    assert_eq!(
                        up.as_deref(),
                        Some(&g[..]),
                        "upstream acts on another handle"
                    );
                }
            }
            let _ = tcli::read_statement(msg);
        }
        MessageType::Reply | MessageType::Exception => {
            if let Ok(Some(g)) = tcli::reply_operation_guid(msg, &h) {
                assert!(within(&msg[h.body_offset..], &g));
            }
            if let Ok(Some((g, secret))) = tcli::reply_session_handle(msg, &h) {
                assert!(within(&msg[h.body_offset..], &g));
                assert!(within(&msg[h.body_offset..], &secret));
            }
        }
    }
}

/// A runtime and a cookie jar for [`http_auth`], made once per process.
fn cookie_jar() -> &'static (tokio::runtime::Runtime, crate::listen::cookie::CookieJar) {
    static JAR: OnceLock<(tokio::runtime::Runtime, crate::listen::cookie::CookieJar)> =
        OnceLock::new();
    JAR.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        let jar =
            crate::listen::cookie::CookieJar::new(std::time::Duration::from_secs(3600), false);
        (rt, jar)
    })
}

/// HTTP credentials: the input is NUL-separated parts, an `Authorization`
/// value, a `Cookie` header, a cookie payload the broker's key signs (so
/// the part after the signature check is reached too), and a request path.
pub fn http_auth(data: &[u8]) {
    use base64::Engine;
    use http::header::{HeaderValue, AUTHORIZATION};

    let mut parts = data.splitn(4, |b| *b == 0);
    let (auth, cookie, payload, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if let Ok(v) = HeaderValue::from_bytes(auth) {
        let req = http::Request::builder()
            .header(AUTHORIZATION, v)
            .body(())
            .expect("a request with one valid header");
        if let Ok(Some((user, pass))) = crate::listen::http::basic_credentials(&req) {
            assert!(!user.contains(':'));
            // base64 decoding is canonical: the credentials encode back to
            // exactly what was sent
            let value = req.headers()[AUTHORIZATION].to_str().unwrap();
            let sent = value.split_once(' ').unwrap().1.trim();
            let again = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", pass.expose()));
            assert_eq!(again, sent);
        }
        if let Ok(Some(token)) = crate::listen::http::negotiate_token(&req) {
            assert!(token.len() <= auth.len());
        }
    }
    let (rt, jar) = cookie_jar();
    if let Ok(c) = std::str::from_utf8(cookie) {
        // no cookie this jar issued is in the input, so none is honoured
        assert!(rt.block_on(jar.check(c)).is_none());
    }
    if let Ok(p) = std::str::from_utf8(payload) {
        let signed = format!("{}={p}&s={}", crate::listen::cookie::NAME, jar.signature(p));
        if let Some(id) = rt.block_on(jar.check(&signed)) {
            panic!("a cookie nobody was issued names {}", id.user);
        }
    }
    if let Ok(p) = std::str::from_utf8(path) {
        for base in ["cliservice", "", "a/b"] {
            if crate::listen::http::path_matches(p, base) {
                assert!(p.trim_start_matches('/').starts_with(base));
            }
        }
        if let Some(t) = crate::emulator::token_in_path(p) {
            assert!(!t.is_empty() && !t.contains('/'));
            assert!(p.contains(&format!("token/{t}")));
        }
    }
}

/// A JDBC URL, parsed as Hive JDBC parses it; what the builder can express
/// of the result builds back into a URL that parses to the same.
pub fn jdbc_url(data: &[u8]) {
    use crate::connstr::{build, parse, Auth, ConnSpec};
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = parse(url) else {
        return;
    };
    assert!(url.contains(&p.authority));
    let mut spec = ConnSpec::new("", Auth::None);
    spec.hosts = p.authority.split(',').map(str::to_string).collect();
    spec.db = Some(p.db.clone());
    spec.session = p.session.clone();
    spec.conf = p.conf.clone();
    spec.vars = p.vars.clone();
    if let Ok(again) = build(&spec, true) {
        assert_eq!(parse(&again).as_ref(), Ok(&p), "{url} built as {again}");
    }
}

/// The configuration loader on the input as TOML text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::Config::from_toml(text, "fuzz.toml");
}
