//! TCLIService knowledge the broker needs: which RPCs are session- or
//! operation-scoped, where handles sit, the OpenSession rewrite, and the error
//! replies the broker writes itself. Everything else is relayed as bytes.

#[allow(clippy::all, dead_code, non_camel_case_types)]
#[rustfmt::skip]
pub mod gen;

use thrift::protocol::{TBinaryOutputProtocol, TOutputProtocol, TSerializable};

use crate::wire::thrift::{
    find_field, peek_header, ttype, MessageHeader, MessageType, Reader, WireError, Writer,
};

/// A 16-byte handle GUID (session or operation).
pub type Guid = [u8; 16];

/// How an RPC is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    OpenSession,
    /// Carries a TSessionHandle in field 1 of its request.
    Session,
    /// Carries only a TOperationHandle in field 1 of its request.
    Operation,
    /// Not in TCLIService (e.g. Impala's GetLog). Relayed unchanged; HTTP
    /// clients are routed by whatever handle sits in field 1 of the request.
    Unknown,
}

/// Scope of a method, or `None` for a name TCLIService does not have.
pub fn scope(method: &str) -> Option<Scope> {
    canonical(method).map(|(_, s)| s)
}

/// The method's name as a static string (no allocation per RPC) and its scope.
pub fn canonical(method: &str) -> Option<(&'static str, Scope)> {
    METHODS.iter().find(|(m, _)| *m == method).copied()
}

const METHODS: [(&str, Scope); 23] = [
    ("OpenSession", Scope::OpenSession),
    ("CloseSession", Scope::Session),
    ("GetInfo", Scope::Session),
    ("ExecuteStatement", Scope::Session),
    ("GetTypeInfo", Scope::Session),
    ("GetCatalogs", Scope::Session),
    ("GetSchemas", Scope::Session),
    ("GetTables", Scope::Session),
    ("GetTableTypes", Scope::Session),
    ("GetColumns", Scope::Session),
    ("GetFunctions", Scope::Session),
    ("GetPrimaryKeys", Scope::Session),
    ("GetCrossReference", Scope::Session),
    ("GetOperationStatus", Scope::Operation),
    ("CancelOperation", Scope::Operation),
    ("CloseOperation", Scope::Operation),
    ("GetResultSetMetadata", Scope::Operation),
    ("FetchResults", Scope::Operation),
    ("GetDelegationToken", Scope::Session),
    ("CancelDelegationToken", Scope::Session),
    ("RenewDelegationToken", Scope::Session),
    ("GetQueryId", Scope::Operation),
    ("SetClientInfo", Scope::Session),
];

/// A call as the broker reads it: enough to route it and to answer it on
/// failure. Nothing past the message header is decoded.
#[derive(Debug, Clone)]
pub struct Call {
    /// TCLIService method name, or "other" (a bounded set, fit for labels).
    pub method: &'static str,
    pub seqid: i32,
    pub scope: Scope,
    /// The name as sent, for methods outside TCLIService.
    other_name: Option<Box<str>>,
}

impl Call {
    pub fn parse(msg: &[u8]) -> Result<Call, WireError> {
        let h = peek_header(msg)?;
        if h.kind != MessageType::Call {
            return Err(WireError::Malformed(format!(
                "expected a CALL message, got {:?}",
                h.kind
            )));
        }
        Ok(match canonical(h.name) {
            Some((method, scope)) => Call {
                method,
                seqid: h.seqid,
                scope,
                other_name: None,
            },
            None => Call {
                method: "other",
                seqid: h.seqid,
                scope: Scope::Unknown,
                other_name: Some(h.name.into()),
            },
        })
    }

    /// The method name as it appears on the wire.
    pub fn wire_name(&self) -> &str {
        self.other_name.as_deref().unwrap_or(self.method)
    }
}

/// Methods whose reply carries a new operation handle in field 2.
pub fn creates_operation(method: &str) -> bool {
    matches!(
        method,
        "ExecuteStatement"
            | "GetTypeInfo"
            | "GetCatalogs"
            | "GetSchemas"
            | "GetTables"
            | "GetTableTypes"
            | "GetColumns"
            | "GetFunctions"
            | "GetPrimaryKeys"
            | "GetCrossReference"
    )
}

fn guid_at(buf: &[u8], start: usize, path: &[i16]) -> Result<Option<Guid>, WireError> {
    match find_field(buf, start, path)? {
        Some((ttype::STRING, mut r)) => {
            let b = r.binary()?;
            let g: Guid = b.try_into().map_err(|_| {
                WireError::Malformed(format!("handle guid of {} bytes, expected 16", b.len()))
            })?;
            Ok(Some(g))
        }
        Some(_) => Err(WireError::Malformed("handle guid is not binary".into())),
        None => Ok(None),
    }
}

/// The handle GUID of a session- or operation-scoped request
/// (args.req(1).handle(1).identifier(1).guid(1) in both cases).
///
/// This decides whose session a request reaches, so it reads the path the
/// way the upstream will: every struct on the path is walked to its end,
/// and a field on the path that appears twice is refused (a Thrift decoder
/// keeps the last one, so checking the first would check the wrong
/// handle). A handle must be a 16-byte GUID with its secret beside it.
pub fn request_guid(msg: &[u8], h: &MessageHeader<'_>) -> Result<Option<Guid>, WireError> {
    let mut at = h.body_offset;
    for (depth, want) in [1i16, 1, 1].into_iter().enumerate() {
        match unique_field(msg, at, want, "on the handle path")? {
            Some((ttype::STRUCT, pos)) => at = pos,
            Some(_) => {
                return Err(WireError::Malformed(format!(
                    "handle path field {want} at depth {depth} is not a struct"
                )))
            }
            None => return Ok(None),
        }
    }
    // `at` is the THandleIdentifier: guid (1) and secret (2), once each
    let guid = match unique_field(msg, at, 1, "on the handle path")? {
        Some((ttype::STRING, pos)) => {
            let b = Reader::at(msg, pos).binary()?;
            let g: Guid = b.try_into().map_err(|_| {
                WireError::Malformed(format!("handle guid of {} bytes, expected 16", b.len()))
            })?;
            g
        }
        Some(_) => return Err(WireError::Malformed("handle guid is not binary".into())),
        None => return Err(WireError::Malformed("handle without a guid".into())),
    };
    match unique_field(msg, at, 2, "on the handle path")? {
        Some((ttype::STRING, _)) => Ok(Some(guid)),
        _ => Err(WireError::Malformed(
            "handle without a binary secret".into(),
        )),
    }
}

/// The value position and wire type of field `want` of the struct whose
/// body starts at `start`, walking the whole struct: `Malformed` if the
/// field appears more than once (`place` says where, for the message).
fn unique_field(
    buf: &[u8],
    start: usize,
    want: i16,
    place: &str,
) -> Result<Option<(u8, usize)>, WireError> {
    let mut r = Reader::at(buf, start);
    let mut hit = None;
    while let Some((t, id)) = r.field_begin()? {
        if id == want {
            if hit.is_some() {
                return Err(WireError::Malformed(format!(
                    "field {want} {place} appears twice"
                )));
            }
            hit = Some((t, r.pos()));
        }
        r.skip(t)?;
    }
    Ok(hit)
}

/// The operation GUID in a reply of a [`creates_operation`] method.
pub fn reply_operation_guid(msg: &[u8], h: &MessageHeader<'_>) -> Result<Option<Guid>, WireError> {
    guid_at(msg, h.body_offset, &[0, 2, 1, 1])
}

/// Session handle (guid, secret) from an OpenSession reply, if it has one.
pub fn reply_session_handle(
    msg: &[u8],
    h: &MessageHeader<'_>,
) -> Result<Option<(Guid, Vec<u8>)>, WireError> {
    let Some(guid) = guid_at(msg, h.body_offset, &[0, 3, 1, 1])? else {
        return Ok(None);
    };
    let secret = match find_field(msg, h.body_offset, &[0, 3, 1, 2])? {
        Some((ttype::STRING, mut r)) => r.binary()?.to_vec(),
        _ => return Err(WireError::Malformed("session handle without secret".into())),
    };
    Ok(Some((guid, secret)))
}

/// The values the broker sets in an OpenSession request. Fields not named
/// here, including unknown vendor fields, are copied byte for byte.
#[derive(Debug, Default)]
pub struct OpenSessionEdit {
    /// TOpenSessionReq.username / password (NOSASL upstreams read them).
    pub credentials: Option<(String, String)>,
    /// Replaces TOpenSessionReq.configuration as a whole.
    pub configuration: Option<Vec<(String, String)>>,
}

/// What a client put in its OpenSession request.
#[derive(Debug, Default)]
pub struct OpenSessionInfo {
    pub client_protocol: i32,
    pub username: Option<String>,
    pub password: Option<String>,
    pub configuration: Vec<(String, String)>,
}

/// Reads the fields of TOpenSessionReq the broker cares about.
/// The SQL text of an ExecuteStatement call (args field 1, request field 2).
pub fn read_statement(msg: &[u8]) -> Option<String> {
    let h = peek_header(msg).ok()?;
    match find_field(msg, h.body_offset, &[1, 2]).ok()? {
        Some((ttype::STRING, mut r)) => r.string().ok().map(str::to_string),
        _ => None,
    }
}

pub fn read_open_session(msg: &[u8]) -> Result<OpenSessionInfo, WireError> {
    let h = peek_header(msg)?;
    let mut info = OpenSessionInfo::default();
    let mut r = Reader::at(msg, open_session_request(msg, &h)?);
    while let Some((t, id)) = r.field_begin()? {
        match (id, t) {
            (1, ttype::I32) => info.client_protocol = r.i32()?,
            (2, ttype::STRING) => info.username = Some(r.string()?.to_string()),
            (3, ttype::STRING) => info.password = Some(r.string()?.to_string()),
            (4, ttype::MAP) => info.configuration = read_string_map(&mut r)?,
            _ => r.skip(t)?,
        }
    }
    Ok(info)
}

/// Where the TOpenSessionReq of an OpenSession call starts. The whole args
/// struct is walked and a second request struct is refused: the upstream's
/// decoder keeps the last one, so editing the first would let the client's
/// own user name and configuration through.
fn open_session_request(msg: &[u8], h: &MessageHeader<'_>) -> Result<usize, WireError> {
    match unique_field(msg, h.body_offset, 1, "of the OpenSession args")? {
        Some((ttype::STRUCT, pos)) => Ok(pos),
        _ => Err(WireError::Malformed(
            "OpenSession without a request struct".into(),
        )),
    }
}

fn read_string_map(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, WireError> {
    let (kt, vt) = (r.u8()?, r.u8()?);
    let n = r.i32()?;
    if kt != ttype::STRING || vt != ttype::STRING || n < 0 {
        return Err(WireError::Malformed(
            "configuration is not a map<string,string>".into(),
        ));
    }
    let mut out = Vec::new();
    for _ in 0..n {
        let k = r.string()?.to_string();
        let v = r.string()?.to_string();
        out.push((k, v));
    }
    Ok(out)
}

/// Rewrites an OpenSession request. Only TOpenSessionReq fields 2, 3 and 4 are
/// decoded and re-encoded; everything else is copied as it came.
pub fn rewrite_open_session(msg: &[u8], edit: &OpenSessionEdit) -> Result<Vec<u8>, WireError> {
    if edit.credentials.is_none() && edit.configuration.is_none() {
        return Ok(msg.to_vec());
    }
    let h = peek_header(msg)?;
    let req_start = open_session_request(msg, &h)?;
    let mut r = Reader::at(msg, req_start);
    let mut w = Writer {
        buf: msg[..req_start].to_vec(),
    };
    loop {
        let field_start = r.pos();
        let Some((t, id)) = r.field_begin()? else {
            break;
        };
        match (id, t) {
            (2 | 3, _) if edit.credentials.is_some() => r.skip(t)?,
            (4, _) if edit.configuration.is_some() => r.skip(t)?,
            _ => {
                r.skip(t)?;
                w.buf.extend_from_slice(&msg[field_start..r.pos()]);
            }
        }
    }
    if let Some((user, password)) = &edit.credentials {
        w.field(ttype::STRING, 2);
        w.string(user);
        w.field(ttype::STRING, 3);
        w.string(password);
    }
    if let Some(conf) = &edit.configuration {
        w.field(ttype::MAP, 4);
        w.string_map(conf);
    }
    w.stop();
    // the rest of the args struct after field 1 (normally just its STOP)
    w.buf.extend_from_slice(&msg[r.pos()..]);
    Ok(w.buf)
}

/// `reply` with its sequence id replaced (the four bytes before the body,
/// in the strict and the old message layout alike): for replies the broker
/// kept and hands to another call.
pub fn with_seqid(reply: &[u8], seqid: i32) -> Result<Vec<u8>, WireError> {
    let h = peek_header(reply)?;
    let mut v = reply.to_vec();
    v[h.body_offset - 4..h.body_offset].copy_from_slice(&seqid.to_be_bytes());
    Ok(v)
}

/// The status code of a reply's TStatus (field 1 of the response): success
/// or success with info.
pub fn reply_succeeded(reply: &[u8]) -> bool {
    let Ok(h) = peek_header(reply) else {
        return false;
    };
    if h.kind != MessageType::Reply {
        return false;
    }
    match find_field(reply, h.body_offset, &[0, 1, 1]) {
        Ok(Some((ttype::I32, mut r))) => matches!(r.i32(), Ok(0 | 1)),
        _ => false,
    }
}

/// A reply carrying only a success TStatus (CloseSession, CloseOperation,
/// CancelOperation), for calls the broker answers itself.
pub fn status_reply(method: &str, seqid: i32) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin(method, MessageType::Reply, seqid);
    w.field(ttype::STRUCT, 0);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::I32, 1);
    w.i32(gen::TStatusCode::SUCCESS_STATUS.0);
    w.stop();
    w.stop();
    w.stop();
    w.buf
}

/// Status codes the broker itself reports.
#[derive(Debug, Clone, Copy)]
pub enum ReplyStatus {
    Error,
    InvalidHandle,
}

/// Builds a complete reply for `method` whose TStatus carries the error, with
/// every required field of the response present so strict clients (Hive JDBC
/// validates required fields) surface the message rather than a decode error.
/// GetQueryId has no TStatus, so it gets a TApplicationException.
pub fn error_reply(
    method: &str,
    seqid: i32,
    status: ReplyStatus,
    sql_state: &str,
    message: &str,
) -> Vec<u8> {
    use gen::{TGetInfoValue, TStatus, TStatusCode};
    let mut buf: Vec<u8> = Vec::with_capacity(128 + message.len());
    if method == "GetQueryId" || scope(method).is_none() {
        let mut w = Writer::default();
        w.message_begin(method, MessageType::Exception, seqid);
        w.field(ttype::STRING, 1);
        w.string(message);
        w.field(ttype::I32, 2);
        w.i32(6); // TApplicationException.INTERNAL_ERROR
        w.stop();
        return w.buf;
    }
    let code = match status {
        ReplyStatus::Error => TStatusCode::ERROR_STATUS,
        ReplyStatus::InvalidHandle => TStatusCode::INVALID_HANDLE_STATUS,
    };
    let tstatus = TStatus {
        status_code: code,
        info_messages: None,
        sql_state: Some(sql_state.to_string()),
        error_code: Some(0),
        error_message: Some(message.to_string()),
    };
    let mut w = Writer::default();
    w.message_begin(method, MessageType::Reply, seqid);
    w.field(ttype::STRUCT, 0);
    w.field(ttype::STRUCT, 1);
    buf.append(&mut w.buf);
    {
        let mut p = TBinaryOutputProtocol::new(&mut buf, true);
        // writing into a Vec cannot fail
        let _ = tstatus.write_to_out_protocol(&mut p);
        match method {
            "OpenSession" => {
                let _ = p.write_field_begin(&thrift::protocol::TFieldIdentifier::new(
                    "serverProtocolVersion",
                    thrift::protocol::TType::I32,
                    2,
                ));
                let _ = p.write_i32(gen::TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10.0);
            }
            "GetInfo" => {
                let _ = p.write_field_begin(&thrift::protocol::TFieldIdentifier::new(
                    "infoValue",
                    thrift::protocol::TType::Struct,
                    2,
                ));
                let _ = TGetInfoValue::StringValue(String::new()).write_to_out_protocol(&mut p);
            }
            _ => {}
        }
    }
    buf.push(ttype::STOP); // response struct
    buf.push(ttype::STOP); // result struct
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use gen::{TOpenSessionReq, TOpenSessionResp, TStatusCode};
    use std::collections::BTreeMap;
    use thrift::protocol::{TBinaryInputProtocol, TInputProtocol, TSerializable};

    fn open_session_msg(extra_vendor_field: bool) -> Vec<u8> {
        let mut w = Writer::default();
        w.message_begin("OpenSession", MessageType::Call, 3);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::I32, 1);
        w.i32(9);
        w.field(ttype::STRING, 2);
        w.string("alice");
        if extra_vendor_field {
            w.field(ttype::I64, 1282);
            w.buf.extend_from_slice(&42i64.to_be_bytes());
        }
        w.field(ttype::MAP, 4);
        w.string_map(&[
            ("use:database".into(), "default".into()),
            ("k".into(), "client".into()),
        ]);
        w.stop();
        w.stop();
        w.buf
    }

    fn decode_req(msg: &[u8]) -> TOpenSessionReq {
        let h = peek_header(msg).unwrap();
        let mut p = TBinaryInputProtocol::new(&msg[h.body_offset..], true);
        p.read_struct_begin().unwrap();
        let f = p.read_field_begin().unwrap();
        assert_eq!(f.id, Some(1));
        TOpenSessionReq::read_from_in_protocol(&mut p).unwrap()
    }

    #[test]
    fn rewrite_sets_credentials_and_replaces_conf_keeping_vendor_fields() {
        let msg = open_session_msg(true);
        let edit = OpenSessionEdit {
            credentials: Some(("etl".into(), "pw".into())),
            configuration: Some(vec![
                ("use:database".into(), "default".into()),
                ("k".into(), "broker".into()),
                ("new".into(), "1".into()),
            ]),
        };
        let out = rewrite_open_session(&msg, &edit).unwrap();
        let req = decode_req(&out);
        assert_eq!(req.client_protocol.0, 9);
        assert_eq!(req.username.as_deref(), Some("etl"));
        assert_eq!(req.password.as_deref(), Some("pw"));
        let conf: BTreeMap<_, _> = req.configuration.unwrap();
        assert_eq!(conf["k"], "broker");
        assert_eq!(conf["new"], "1");
        assert_eq!(conf["use:database"], "default");
        // the unknown field 1282 survives byte for byte
        let h = peek_header(&out).unwrap();
        let (t, _) = find_field(&out, h.body_offset, &[1, 1282])
            .unwrap()
            .unwrap();
        assert_eq!(t, ttype::I64);
    }

    #[test]
    fn an_open_session_with_two_request_structs_is_refused() {
        // the upstream keeps the last `req`: rewriting the first would let
        // the second (the client's own user and conf) through unedited
        let mut w = Writer::default();
        w.message_begin("OpenSession", MessageType::Call, 1);
        for user in ["alice", "admin"] {
            w.field(ttype::STRUCT, 1);
            w.field(ttype::I32, 1);
            w.i32(9);
            w.field(ttype::STRING, 2);
            w.string(user);
            w.field(ttype::MAP, 4);
            w.string_map(&[("hive.server2.proxy.user".into(), user.into())]);
            w.stop();
        }
        w.stop();
        let edit = OpenSessionEdit {
            credentials: Some(("etl".into(), "pw".into())),
            configuration: Some(vec![("k".into(), "broker".into())]),
        };
        for err in [
            rewrite_open_session(&w.buf, &edit).unwrap_err(),
            read_open_session(&w.buf).unwrap_err(),
        ] {
            assert!(
                matches!(&err, WireError::Malformed(m) if m.contains("appears twice")),
                "{err}"
            );
        }
        // one request struct among other args fields is still fine
        let mut ok = Writer::default();
        ok.message_begin("OpenSession", MessageType::Call, 1);
        ok.field(ttype::I32, 7);
        ok.i32(1);
        let m = open_session_msg(false);
        ok.buf
            .extend_from_slice(&m[peek_header(&m).unwrap().body_offset..]);
        let out = rewrite_open_session(&ok.buf, &edit).unwrap();
        assert_eq!(decode_req_after(&out, 7).username.as_deref(), Some("etl"));
    }

    /// The request of an OpenSession whose args start with field `skip`.
    fn decode_req_after(msg: &[u8], skip: i16) -> TOpenSessionReq {
        let h = peek_header(msg).unwrap();
        let mut p = TBinaryInputProtocol::new(&msg[h.body_offset..], true);
        p.read_struct_begin().unwrap();
        let f = p.read_field_begin().unwrap();
        assert_eq!(f.id, Some(skip));
        p.skip(f.field_type).unwrap();
        p.read_field_end().unwrap();
        assert_eq!(p.read_field_begin().unwrap().id, Some(1));
        TOpenSessionReq::read_from_in_protocol(&mut p).unwrap()
    }

    #[test]
    fn read_open_session_skips_unknown_fields() {
        let info = read_open_session(&open_session_msg(true)).unwrap();
        assert_eq!(info.client_protocol, 9);
        assert_eq!(info.username.as_deref(), Some("alice"));
        assert_eq!(info.configuration.len(), 2);
    }

    #[test]
    fn empty_edit_leaves_the_message_untouched() {
        let msg = open_session_msg(false);
        assert_eq!(
            rewrite_open_session(&msg, &OpenSessionEdit::default()).unwrap(),
            msg
        );
    }

    #[test]
    fn open_session_error_reply_decodes_with_generated_types() {
        let reply = error_reply(
            "OpenSession",
            5,
            ReplyStatus::Error,
            "08S01",
            "upstream down",
        );
        let h = peek_header(&reply).unwrap();
        assert_eq!(
            (h.name, h.kind, h.seqid),
            ("OpenSession", MessageType::Reply, 5)
        );
        let mut p = TBinaryInputProtocol::new(&reply[h.body_offset..], true);
        p.read_struct_begin().unwrap();
        assert_eq!(p.read_field_begin().unwrap().id, Some(0));
        let resp = TOpenSessionResp::read_from_in_protocol(&mut p).unwrap();
        assert_eq!(resp.status.status_code, TStatusCode::ERROR_STATUS);
        assert_eq!(resp.status.error_message.as_deref(), Some("upstream down"));
        assert_eq!(
            crate::wire::thrift::message_len(&reply).unwrap(),
            reply.len()
        );
    }

    #[test]
    fn get_info_error_reply_has_its_required_info_value() {
        let reply = error_reply("GetInfo", 1, ReplyStatus::InvalidHandle, "HY000", "x");
        let h = peek_header(&reply).unwrap();
        let mut p = TBinaryInputProtocol::new(&reply[h.body_offset..], true);
        p.read_struct_begin().unwrap();
        p.read_field_begin().unwrap();
        let resp = gen::TGetInfoResp::read_from_in_protocol(&mut p).unwrap();
        assert_eq!(resp.status.status_code, TStatusCode::INVALID_HANDLE_STATUS);
    }

    #[test]
    fn handles_are_found_in_requests_and_replies() {
        let mut w = Writer::default();
        w.message_begin("ExecuteStatement", MessageType::Reply, 1);
        w.field(ttype::STRUCT, 0);
        w.field(ttype::STRUCT, 1); // status
        w.field(ttype::I32, 1);
        w.i32(0);
        w.stop();
        w.field(ttype::STRUCT, 2); // operationHandle
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRING, 1);
        w.binary(&[9u8; 16]);
        w.field(ttype::STRING, 2);
        w.binary(&[1u8; 16]);
        w.stop();
        w.stop();
        w.stop();
        w.stop();
        let h = peek_header(&w.buf).unwrap();
        assert_eq!(reply_operation_guid(&w.buf, &h).unwrap(), Some([9u8; 16]));
    }

    #[test]
    fn every_tcli_method_has_a_scope() {
        for m in [
            "OpenSession",
            "CloseSession",
            "GetInfo",
            "ExecuteStatement",
            "GetTypeInfo",
            "GetCatalogs",
            "GetSchemas",
            "GetTables",
            "GetTableTypes",
            "GetColumns",
            "GetFunctions",
            "GetPrimaryKeys",
            "GetCrossReference",
            "GetOperationStatus",
            "CancelOperation",
            "CloseOperation",
            "GetResultSetMetadata",
            "FetchResults",
            "GetDelegationToken",
            "CancelDelegationToken",
            "RenewDelegationToken",
            "GetQueryId",
            "SetClientInfo",
        ] {
            assert!(scope(m).is_some(), "{m}");
        }
        assert!(scope("DropEverything").is_none());
    }
}
