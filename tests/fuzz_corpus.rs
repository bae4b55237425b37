//! The fuzz corpora as ordinary tests: every seed in `fuzz/seeds/<target>/`
//! and every crash in `fuzz/regressions/<target>/` goes to the function the
//! cargo-fuzz target calls (`kyuubi_broker::fuzzing::<target>`), so CI checks
//! them without building the fuzzers. An empty seed directory fails the test.
//!
//! The seeds are generated from real wire bytes (TCLIService messages
//! encoded with the generated Thrift types, SASL frames as clients send
//! them, the shipped config files, the JDBC URLs in the tests and docs):
//! `scripts/fuzz.sh seeds` runs the ignored `generate_seeds` below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kyuubi_broker::fuzzing;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    out.sort();
    out
}

fn replay(target: &str, f: fn(&[u8])) {
    let seeds = files(&root().join("fuzz/seeds").join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{target}/ is empty: run scripts/fuzz.sh seeds"
    );
    let crashes = files(&root().join("fuzz/regressions").join(target));
    for p in seeds.iter().chain(&crashes) {
        let data = std::fs::read(p).unwrap();
        let name = p.display().to_string();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            panic!("{name} fails (replay: cargo fuzz run {target} {name})");
        }
    }
}

#[test]
fn sasl_frames_corpus() {
    replay("sasl_frames", fuzzing::sasl_frames);
}

#[test]
fn sasl_plain_corpus() {
    replay("sasl_plain", fuzzing::sasl_plain);
}

#[test]
fn thrift_header_corpus() {
    replay("thrift_header", fuzzing::thrift_header);
}

#[test]
fn open_session_rewrite_corpus() {
    replay("open_session_rewrite", fuzzing::open_session_rewrite);
}

#[test]
fn handles_corpus() {
    replay("handles", fuzzing::handles);
}

#[test]
fn http_auth_corpus() {
    replay("http_auth", fuzzing::http_auth);
}

#[test]
fn jdbc_url_corpus() {
    replay("jdbc_url", fuzzing::jdbc_url);
}

#[test]
fn config_corpus() {
    replay("config", fuzzing::config);
}

/// Writes `fuzz/seeds/`. Ignored: run by `scripts/fuzz.sh seeds`.
#[test]
#[ignore]
fn generate_seeds() {
    let seeds = root().join("fuzz/seeds");
    let mut all: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    seeds::sasl(&mut all);
    seeds::thrift(&mut all);
    seeds::http(&mut all);
    seeds::text(&mut all);
    let mut total = 0;
    for (target, list) in &all {
        let dir = seeds.join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in list {
            assert!(bytes.len() < 64 * 1024, "{target}/{name} is too big");
            total += bytes.len();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        eprintln!("{target}: {} seeds", list.len());
    }
    assert!(total < 512 * 1024, "{total} bytes of seeds");
    eprintln!("{total} bytes in all");
}

mod seeds {
    use std::collections::BTreeMap;

    use kyuubi_broker::secret::Secret;
    use kyuubi_broker::tcli::gen::*;
    use kyuubi_broker::tcli::{error_reply, ReplyStatus};
    use kyuubi_broker::wire::sasl::{self, Status};
    use thrift::protocol::{
        TBinaryOutputProtocol, TFieldIdentifier, TMessageIdentifier, TMessageType, TOutputProtocol,
        TSerializable, TStructIdentifier, TType,
    };

    pub type Seeds<'a> = BTreeMap<&'a str, Vec<(String, Vec<u8>)>>;

    fn add(all: &mut Seeds<'_>, target: &'static str, name: &str, bytes: impl Into<Vec<u8>>) {
        all.entry(target)
            .or_default()
            .push((name.to_string(), bytes.into()));
    }

    /// A TCLIService message as the generated client code writes it: the
    /// args (a call, field 1) or result (a reply, field 0) struct around `body`.
    fn message<T: TSerializable>(name: &str, kind: TMessageType, seqid: i32, body: &T) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut p = TBinaryOutputProtocol::new(&mut buf, true);
        p.write_message_begin(&TMessageIdentifier::new(name, kind, seqid))
            .unwrap();
        p.write_struct_begin(&TStructIdentifier::new("args"))
            .unwrap();
        let id = if kind == TMessageType::Call { 1 } else { 0 };
        p.write_field_begin(&TFieldIdentifier::new("x", TType::Struct, id))
            .unwrap();
        body.write_to_out_protocol(&mut p).unwrap();
        p.write_field_end().unwrap();
        p.write_field_stop().unwrap();
        p.write_struct_end().unwrap();
        p.write_message_end().unwrap();
        buf
    }

    fn call<T: TSerializable>(name: &str, seqid: i32, body: &T) -> Vec<u8> {
        message(name, TMessageType::Call, seqid, body)
    }

    fn reply<T: TSerializable>(name: &str, seqid: i32, body: &T) -> Vec<u8> {
        message(name, TMessageType::Reply, seqid, body)
    }

    fn id(guid: u8, secret: u8) -> THandleIdentifier {
        THandleIdentifier::new(vec![guid; 16], vec![secret; 16])
    }

    fn session() -> TSessionHandle {
        TSessionHandle::new(id(0x5a, 0xa5))
    }

    fn operation() -> TOperationHandle {
        TOperationHandle::new(
            id(0x0b, 0xb0),
            TOperationType::EXECUTE_STATEMENT,
            true,
            None,
        )
    }

    fn ok() -> TStatus {
        TStatus::new(TStatusCode::SUCCESS_STATUS, None, None, None, None)
    }

    fn conf(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn open_session(user: Option<&str>, password: Option<&str>) -> Vec<u8> {
        let req = TOpenSessionReq::new(
            TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
            user.map(str::to_string),
            password.map(str::to_string),
            conf(&[
                ("use:database", "default"),
                (
                    "set:hiveconf:hive.server2.thrift.resultset.default.fetch.size",
                    "1000",
                ),
            ]),
        );
        call("OpenSession", 1, &req)
    }

    /// Requests and replies of one JDBC session, in order.
    fn session_messages() -> Vec<(&'static str, Vec<u8>)> {
        let stmt = TExecuteStatementReq::new(
            session(),
            "SELECT id, name FROM t WHERE id < 10".to_string(),
            conf(&[("spark.sql.shuffle.partitions", "4")]),
            true,
            None,
        );
        let tables = TGetTablesReq::new(session(), None, None, None, vec!["TABLE".to_string()]);
        let rows = TRowSet::new(
            0,
            Vec::new(),
            vec![
                TColumn::I64Val(TI64Column::new(vec![1, 2, 3], vec![0])),
                TColumn::StringVal(TStringColumn::new(
                    vec!["a".into(), "bé".into(), String::new()],
                    vec![4],
                )),
            ],
            None,
            2,
        );
        let open_resp = TOpenSessionResp::new(
            ok(),
            TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
            session(),
            conf(&[("kyuubi.session.engine.id", "e-1")]),
        );
        vec![
            ("open_session_reply", reply("OpenSession", 1, &open_resp)),
            (
                "get_info",
                call(
                    "GetInfo",
                    2,
                    &TGetInfoReq::new(session(), TGetInfoType::CLI_SERVER_NAME),
                ),
            ),
            ("execute_statement", call("ExecuteStatement", 3, &stmt)),
            (
                "execute_statement_reply",
                reply(
                    "ExecuteStatement",
                    3,
                    &TExecuteStatementResp::new(ok(), operation()),
                ),
            ),
            (
                "get_operation_status",
                call(
                    "GetOperationStatus",
                    4,
                    &TGetOperationStatusReq::new(operation(), true),
                ),
            ),
            (
                "fetch_results",
                call(
                    "FetchResults",
                    5,
                    &TFetchResultsReq::new(operation(), TFetchOrientation::FETCH_NEXT, 1000, 0),
                ),
            ),
            (
                "fetch_results_reply",
                reply(
                    "FetchResults",
                    5,
                    &TFetchResultsResp::new(ok(), false, rows),
                ),
            ),
            (
                "cancel_operation",
                call("CancelOperation", 6, &TCancelOperationReq::new(operation())),
            ),
            (
                "close_operation",
                call("CloseOperation", 7, &TCloseOperationReq::new(operation())),
            ),
            ("get_tables", call("GetTables", 8, &tables)),
            (
                "get_tables_reply",
                reply("GetTables", 8, &TGetTablesResp::new(ok(), operation())),
            ),
            (
                "close_session",
                call("CloseSession", 9, &TCloseSessionReq::new(session())),
            ),
            (
                "error_reply_open_session",
                error_reply(
                    "OpenSession",
                    1,
                    ReplyStatus::Error,
                    "08S01",
                    "upstream down",
                ),
            ),
            (
                "error_reply_invalid_handle",
                error_reply(
                    "FetchResults",
                    5,
                    ReplyStatus::InvalidHandle,
                    "HY000",
                    "invalid handle",
                ),
            ),
            (
                "error_reply_exception",
                error_reply("GetQueryId", 10, ReplyStatus::Error, "HY000", "no"),
            ),
        ]
    }

    /// A request whose handle path carries field 1 twice (what the broker
    /// must refuse), built from a real GetInfo.
    fn duplicate_handle() -> Vec<u8> {
        let mut two = call(
            "GetInfo",
            2,
            &TGetInfoReq::new(session(), TGetInfoType::CLI_SERVER_NAME),
        );
        // args { 1: req { 1: handle, 2: type } STOP }: add a second handle
        // (field 1 of req) before req's STOP
        let mut other = Vec::new();
        {
            let mut p = TBinaryOutputProtocol::new(&mut other, true);
            p.write_field_begin(&TFieldIdentifier::new("h", TType::Struct, 1))
                .unwrap();
            TSessionHandle::new(id(0x66, 0x99))
                .write_to_out_protocol(&mut p)
                .unwrap();
        }
        let req_stop = two.len() - 2;
        two.splice(req_stop..req_stop, other);
        two
    }

    pub fn sasl(all: &mut Seeds<'_>) {
        let hello = sasl::plain_client_hello("alice", &Secret::new("pw"));
        add(all, "sasl_frames", "plain_hello", hello.clone());
        let mut ok_status = sasl::encode(Status::Start, b"PLAIN");
        ok_status.extend(sasl::encode(Status::Ok, b"authz\0bob\0secret"));
        add(all, "sasl_frames", "plain_ok_status", ok_status);
        add(
            all,
            "sasl_frames",
            "gssapi_start",
            sasl::encode(Status::Start, b"GSSAPI"),
        );
        add(
            all,
            "sasl_frames",
            "bad",
            sasl::encode(Status::Bad, b"gave up"),
        );
        // the handshake, then the first data frame (an OpenSession)
        let msg = open_session(None, None);
        let mut framed = hello.clone();
        framed.extend((msg.len() as u32).to_be_bytes());
        framed.extend(&msg);
        add(all, "sasl_frames", "hello_then_frame", framed);
        let mut frame = (msg.len() as u32).to_be_bytes().to_vec();
        frame.extend(&msg);
        add(all, "sasl_frames", "data_frame", frame);

        add(all, "sasl_plain", "plain", &b"\0alice\0pw"[..]);
        add(all, "sasl_plain", "authzid", &b"authz\0bob\0"[..]);
        add(
            all,
            "sasl_plain",
            "utf8",
            "\0jos\u{e9}\0p\u{e4}ss w\u{f6}rd".as_bytes(),
        );
        add(all, "sasl_plain", "no_separator", &b"alice"[..]);
        add(all, "sasl_plain", "extra_nul", &b"\0a\0b\0c"[..]);
        let resp = sasl::decode(&hello[10..], 1 << 20).unwrap().unwrap().0;
        add(all, "sasl_plain", "from_hello", resp.payload);
    }

    pub fn thrift(all: &mut Seeds<'_>) {
        let messages = session_messages();
        let opens = [
            ("open_session", open_session(None, None)),
            (
                "open_session_nosasl",
                open_session(Some("alice"), Some("pw")),
            ),
        ];
        for (name, m) in opens.iter().chain(&messages) {
            for split in [0u8, 9, 200] {
                add(
                    all,
                    "thrift_header",
                    &format!("{name}_{split}"),
                    [&[split][..], m].concat(),
                );
            }
            add(all, "handles", name, m.clone());
        }
        // a NOSASL stream: two requests back to back
        let two = [&[3u8][..], &opens[0].1, &messages[1].1].concat();
        add(all, "thrift_header", "two_messages", two);
        add(all, "handles", "duplicate_handle", duplicate_handle());
        for (name, m) in &opens {
            // no edit, credentials, configuration (2 entries), both
            for (flags, text) in [
                (0u8, &b""[..]),
                (1, b"etl\0s3cret"),
                (2 | 2 << 2, b"use:database\0sales\0k\0broker"),
                (3 | 1 << 2, b"etl\0pw\0hive.server2.proxy.user\0etl"),
            ] {
                let seed = [&[flags, text.len() as u8][..], text, m].concat();
                add(
                    all,
                    "open_session_rewrite",
                    &format!("{name}_{flags}"),
                    seed,
                );
            }
        }
    }

    pub fn http(all: &mut Seeds<'_>) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let cookie = format!(
            "other=1; hive.server2.auth=cu={}&rn=42&s={}",
            url.encode("alice"),
            url.encode([7u8; 32])
        );
        let payload = format!("cu={}&rn=42", url.encode("alice"));
        let seed = |auth: &str, path: &str| [auth, &cookie, &payload, path].join("\0").into_bytes();
        let basic = format!("Basic {}", b64.encode("alice:pw"));
        add(all, "http_auth", "basic", seed(&basic, "/cliservice"));
        add(
            all,
            "http_auth",
            "basic_lowercase",
            seed(&format!("basic  {} ", b64.encode("bob:")), "/cliservice/"),
        );
        // Hive JDBC 2.x writes "Negotiate : <token>"; an SPNEGO token starts 0x60
        let token = b64.encode([0x60, 0x82, 0x02, 0x10, 0x06, 0x06, 0x2b, 0x06, 0x01, 0x05]);
        add(
            all,
            "http_auth",
            "negotiate_jdbc",
            seed(&format!("Negotiate : {token}"), "/cliservice/token/abc123"),
        );
        add(
            all,
            "http_auth",
            "negotiate",
            seed(
                &format!("Negotiate {}", token.trim_end_matches('=')),
                "/x/token/t/y",
            ),
        );
        add(
            all,
            "http_auth",
            "bearer",
            seed("Bearer ab==", "/cliservice/token/"),
        );
    }

    /// `jdbc:hive2://...` URLs quoted in these files.
    fn urls(text: &str, out: &mut Vec<String>) {
        for (i, _) in text.match_indices("jdbc:hive2://") {
            let url: String = text[i..]
                .chars()
                .take_while(|c| !matches!(c, '"' | '`' | '\'' | ' ' | '\n' | '<' | '>' | ')'))
                .collect();
            if url.len() > "jdbc:hive2://".len() && !out.contains(&url) {
                out.push(url);
            }
        }
    }

    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p
                .extension()
                .is_some_and(|x| x == "rs" || x == "md" || x == "toml")
            {
                out.push(p);
            }
        }
    }

    pub fn text(all: &mut Seeds<'_>) {
        let root = super::root();
        let mut found = Vec::new();
        let mut sources = vec![root.join("README.md")];
        for d in ["src", "tests", "config"] {
            walk(&root.join(d), &mut sources);
        }
        sources.sort();
        for f in &sources {
            urls(&std::fs::read_to_string(f).unwrap_or_default(), &mut found);
        }
        for (i, u) in found.iter().enumerate() {
            add(all, "jdbc_url", &format!("url_{i:03}"), u.as_bytes());
        }
        let mut configs = Vec::new();
        walk(&root.join("config"), &mut configs);
        configs.sort();
        for f in configs {
            let name = f.strip_prefix(root.join("config")).unwrap();
            let name = name.display().to_string().replace('/', "_");
            add(all, "config", &name, std::fs::read(&f).unwrap());
        }
    }
}
