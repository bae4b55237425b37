//! The metadata cache against the fixture's real Spark Thrift Server and
//! real clients: a replay is the upstream's bytes apart from handles, in any
//! batch size and on either client transport; answers are never shared
//! between upstream identities; DDL through the broker clears them.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::tcli::gen::*;
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TFieldIdentifier, TInputProtocol,
    TMessageIdentifier, TMessageType, TOutputProtocol, TSerializable, TStructIdentifier, TType,
};

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

async fn broker_for(sts: SocketAddr) -> Broker {
    let toml = format!(
        "[server]\nshutdown_grace = \"10s\"\n{ADMIN}{LISTENERS}\n{}",
        route_toml("binary", sts, "")
    );
    start_broker_toml(&toml).await
}

async fn connect(transport: Transport, addr: SocketAddr, user: &str) -> Hs2Client {
    Hs2Client::connect(
        &client_cfg(transport, addr, UpstreamSasl::Plain),
        user,
        "pw",
    )
    .await
    .unwrap()
}

fn encode<T: TSerializable>(method: &str, seqid: i32, req: &T) -> Bytes {
    let mut buf: Vec<u8> = Vec::new();
    {
        let mut p = TBinaryOutputProtocol::new(&mut buf, true);
        p.write_message_begin(&TMessageIdentifier::new(method, TMessageType::Call, seqid))
            .unwrap();
        p.write_struct_begin(&TStructIdentifier::new("args"))
            .unwrap();
        p.write_field_begin(&TFieldIdentifier::new("req", TType::Struct, 1))
            .unwrap();
        req.write_to_out_protocol(&mut p).unwrap();
        p.write_field_end().unwrap();
        p.write_field_stop().unwrap();
        p.write_struct_end().unwrap();
    }
    Bytes::from(buf)
}

fn decode<T: TSerializable>(reply: &[u8]) -> T {
    let mut p = TBinaryInputProtocol::new(reply, true);
    p.read_message_begin().unwrap();
    p.read_struct_begin().unwrap();
    let f = p.read_field_begin().unwrap();
    assert_eq!(f.id, Some(0), "a reply with a result");
    T::read_from_in_protocol(&mut p).unwrap()
}

/// Every reply of one metadata call as a client sees it, with the
/// operation handle's guid and secret zeroed: the call, its result-set
/// metadata, pages of `batch` rows until an empty one, the close.
async fn metadata_round(
    c: &mut Hs2Client,
    session: &TSessionHandle,
    method: &str,
    batch: i64,
) -> Vec<Vec<u8>> {
    let call = match method {
        "GetTables" => encode(
            method,
            100,
            &TGetTablesReq::new(
                session.clone(),
                None,
                Some(DB.to_string()),
                Some("%".to_string()),
                None,
            ),
        ),
        "GetColumns" => encode(
            method,
            100,
            &TGetColumnsReq::new(
                session.clone(),
                None,
                Some(DB.to_string()),
                Some("%".to_string()),
                Some("%".to_string()),
            ),
        ),
        "GetTypeInfo" => encode(method, 100, &TGetTypeInfoReq::new(session.clone())),
        other => panic!("{other}"),
    };
    let first = c.call_raw(call).await.unwrap().to_vec();
    let resp: TGetTablesResp = decode(&first);
    assert_eq!(
        resp.status.status_code,
        TStatusCode::SUCCESS_STATUS,
        "{method}"
    );
    let op = resp.operation_handle.unwrap();
    let mut replies = vec![first];
    let md = encode(
        "GetResultSetMetadata",
        101,
        &TGetResultSetMetadataReq::new(op.clone()),
    );
    replies.push(c.call_raw(md).await.unwrap().to_vec());
    for seqid in 102.. {
        let req = TFetchResultsReq::new(op.clone(), TFetchOrientation::FETCH_NEXT, batch, None);
        let reply = c
            .call_raw(encode("FetchResults", seqid, &req))
            .await
            .unwrap();
        let page: TFetchResultsResp = decode(&reply);
        replies.push(reply.to_vec());
        let rows = page.results.unwrap().columns.unwrap()[0].clone();
        let n = match rows {
            TColumn::StringVal(v) => v.values.len(),
            TColumn::I32Val(v) => v.values.len(),
            TColumn::I16Val(v) => v.values.len(),
            other => panic!("first column {other:?}"),
        };
        if n == 0 {
            break;
        }
        assert!(seqid < 10_000, "no end of rows");
    }
    let close = encode("CloseOperation", 99, &TCloseOperationReq::new(op.clone()));
    replies.push(c.call_raw(close).await.unwrap().to_vec());
    let id = op.operation_id;
    for r in &mut replies {
        mask(r, &id.guid);
        mask(r, &id.secret);
    }
    replies
}

fn mask(buf: &mut [u8], what: &[u8]) {
    if let Some(i) = buf.windows(what.len()).position(|w| w == what) {
        buf[i..i + what.len()].fill(0);
    }
}

/// A database of its own, with tables whose metadata has nulls and
/// comments, created directly on the Spark Thrift Server.
const DB: &str = "kb_metacache";

async fn prepare_db(sts: SocketAddr, extra: &[&str]) {
    let mut c = connect(Transport::Binary, sts, "setup").await;
    let s = c.open_session().await.unwrap();
    let mut sql = vec![
        format!("drop database if exists {DB} cascade"),
        format!("create database {DB}"),
    ];
    for i in 0..5 {
        sql.push(format!(
            "create table {DB}.t{i} (id int comment 'key {i}', name string, amount decimal(10,2)) using parquet"
        ));
    }
    sql.extend(extra.iter().map(|s| s.to_string()));
    for q in sql {
        let op = c.execute(&s, &q).await.unwrap();
        c.close_operation(op).await.unwrap();
    }
    c.close_session(s).await.unwrap();
}

/// A counter's sum over its labels.
async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (_, text) = admin_get(admin, "/metrics").await;
    series(&text, name).values().sum::<f64>() as u64
}

/// One test owns the shared database so the others see it as it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_metadata_answers_are_the_upstreams_bytes_and_follow_the_rules() {
    let sts = sts_binary().await;
    prepare_db(sts, &[]).await;
    let b = broker_for(sts).await;
    let admin = b.addrs["admin"];
    let hits = "kyuubi_broker_metadata_cache_hits_total";

    // The reference: the upstream itself, in pages of 2 and of 3 rows.
    let mut direct = connect(Transport::Binary, sts, "alice").await;
    let ds = direct.open_session().await.unwrap();
    let mut want = std::collections::HashMap::new();
    for method in ["GetTables", "GetColumns", "GetTypeInfo"] {
        for batch in [2, 3, 1000] {
            let r = metadata_round(&mut direct, &ds, method, batch).await;
            want.insert((method, batch), r);
        }
    }

    // First through the broker: recorded in pages of 2 (a miss)...
    let mut bin = connect(Transport::Binary, b.binary, "alice").await;
    let bs = bin.open_session().await.unwrap();
    for method in ["GetTables", "GetColumns", "GetTypeInfo"] {
        let got = metadata_round(&mut bin, &bs, method, 2).await;
        assert_eq!(got, want[&(method, 2)], "{method} recorded, batch 2");
    }
    assert_eq!(metric(admin, hits).await, 0);
    // ...then replayed in other batch sizes, to binary and HTTP clients
    let mut http = connect(Transport::Http, b.http, "alice").await;
    let hs = http.open_session().await.unwrap();
    for method in ["GetTables", "GetColumns", "GetTypeInfo"] {
        for batch in [3, 1000] {
            let got = metadata_round(&mut bin, &bs, method, batch).await;
            assert_eq!(
                got,
                want[&(method, batch)],
                "{method} replayed, batch {batch}"
            );
            let got = metadata_round(&mut http, &hs, method, batch).await;
            assert_eq!(
                got,
                want[&(method, batch)],
                "{method} over HTTP, batch {batch}"
            );
        }
    }
    assert_eq!(metric(admin, hits).await, 12, "every replay was a hit");

    // Another upstream identity never sees alice's answers.
    let mut bob = connect(Transport::Binary, b.binary, "bob").await;
    let bobs = bob.open_session().await.unwrap();
    let got = metadata_round(&mut bob, &bobs, "GetTables", 3).await;
    assert_eq!(got, want[&("GetTables", 3)]);
    assert_eq!(metric(admin, hits).await, 12, "bob's call went upstream");

    // A table made behind the broker's back is not seen until the TTL...
    let op = direct
        .execute(
            &ds,
            &format!("create table {DB}.behind (a int) using parquet"),
        )
        .await
        .unwrap();
    direct.close_operation(op).await.unwrap();
    let stale = metadata_round(&mut bin, &bs, "GetTables", 1000).await;
    assert_eq!(stale, want[&("GetTables", 1000)], "served from the cache");
    // ...but DDL through the broker clears the route's answers at once
    let op = bin
        .execute(
            &bs,
            &format!("create table {DB}.through (a int) using parquet"),
        )
        .await
        .unwrap();
    bin.close_operation(op).await.unwrap();
    let fresh = metadata_round(&mut bin, &bs, "GetTables", 1000).await;
    let names = String::from_utf8_lossy(&fresh.concat()).into_owned();
    assert!(
        names.contains("behind") && names.contains("through"),
        "fresh"
    );
    assert!(metric(admin, "kyuubi_broker_metadata_cache_invalidations_total").await >= 1);

    for (mut c, s) in [(direct, ds), (bin, bs), (http, hs), (bob, bobs)] {
        c.close_session(s).await.unwrap();
    }
    b.shutdown().await;
}

/// beeline's `!tables` and `!columns` (Hive JDBC's DatabaseMetaData), then
/// impyla's and PyHive's metadata calls, each twice: the same answers, the
/// second time from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_metadata_calls_are_answered_from_the_cache_the_second_time() {
    let sts = sts_binary().await;
    let db = "kb_metacache_clients";
    {
        let mut c = connect(Transport::Binary, sts, "setup").await;
        let s = c.open_session().await.unwrap();
        for q in [
            format!("drop database if exists {db} cascade"),
            format!("create database {db}"),
            format!("create table {db}.sales (id int, region string, amount double) using parquet"),
            format!("create table {db}.regions (region string, manager string) using parquet"),
        ] {
            let op = c.execute(&s, &q).await.unwrap();
            c.close_operation(op).await.unwrap();
        }
        c.close_session(s).await.unwrap();
    }
    let b = broker_for(sts).await;
    let admin = b.addrs["admin"];
    let hits = "kyuubi_broker_metadata_cache_hits_total";

    let script = "!tables\n!columns sales\n";
    let url = format!("jdbc:hive2://{}/{db}", b.binary);
    let first = beeline(&url, "alice", "pw", script).await;
    assert!(first.ok, "{}", first.stderr);
    assert!(first.stdout.contains("sales") && !first.stdout.contains("manager"));
    assert!(first.stdout.contains("region"), "{}", first.stdout);
    let before = metric(admin, hits).await;
    let second = beeline(&url, "alice", "pw", script).await;
    assert!(second.ok, "{}", second.stderr);
    assert_eq!(first.stdout, second.stdout);
    assert!(
        metric(admin, hits).await > before,
        "beeline's second run hit the cache"
    );

    for client in ["impyla", "pyhive"] {
        for mode in ["binary", "http"] {
            let port = if mode == "http" {
                b.http.port()
            } else {
                b.binary.port()
            };
            let before = metric(admin, hits).await;
            let arg = format!("{db}.sales");
            let v = py_client(client, mode, port, "metadata", Some(&arg)).await;
            assert!(v.get("fatal").is_none(), "{client} {mode}: {v}");
            assert_eq!(v["first"], v["second"], "{client} {mode}");
            let tables = v["first"]["tables"].to_string();
            assert!(
                tables.contains("sales") && tables.contains("regions"),
                "{v}"
            );
            let columns = v["first"]["columns"].to_string();
            assert!(columns.contains("amount"), "{v}");
            assert!(
                metric(admin, hits).await >= before + 3,
                "{client} {mode}: the second schemas, tables and columns calls hit"
            );
        }
    }
    b.shutdown().await;
}

/// A DBeaver-style refresh: GetTables, then GetColumns for each of 200
/// tables. The second sweep is answered wholly by the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_get_columns_over_200_tables_is_served_from_the_cache_the_second_time() {
    let sts = sts_binary().await;
    let db = "kb_metacache_sweep";
    {
        let mut c = connect(Transport::Binary, sts, "setup").await;
        let s = c.open_session().await.unwrap();
        let mut sql = vec![
            format!("drop database if exists {db} cascade"),
            format!("create database {db}"),
        ];
        for i in 0..200 {
            sql.push(format!(
                "create view {db}.v{i:03} as select {i} as id, 'x' as name"
            ));
        }
        for q in sql {
            let op = c.execute(&s, &q).await.unwrap();
            c.close_operation(op).await.unwrap();
        }
        c.close_session(s).await.unwrap();
    }
    let b = broker_for(sts).await;
    let admin = b.addrs["admin"];
    let mut c = connect(Transport::Binary, b.binary, "alice").await;
    let s = c.open_session().await.unwrap();
    let mut sweeps = Vec::new();
    for _ in 0..2 {
        let mut names = Vec::new();
        for i in 0..200 {
            let req = TGetColumnsReq::new(
                s.clone(),
                None,
                Some(db.to_string()),
                Some(format!("v{i:03}")),
                Some("%".to_string()),
            );
            let resp: TGetColumnsResp = c.call("GetColumns", &req).await.unwrap();
            let op = resp.operation_handle.unwrap();
            let page = c.fetch(&op, 1000).await.unwrap();
            let cols = page.results.unwrap().columns.unwrap();
            if let TColumn::StringVal(v) = &cols[3] {
                names.push(v.values.join(","));
            }
            c.close_operation(op).await.unwrap();
        }
        sweeps.push(names);
    }
    assert_eq!(sweeps[0].len(), 200);
    assert!(
        sweeps[0].iter().all(|n| n == "id,name"),
        "{:?}",
        &sweeps[0][..3]
    );
    assert_eq!(sweeps[0], sweeps[1]);
    assert_eq!(
        metric(admin, "kyuubi_broker_metadata_cache_hits_total").await,
        200
    );
    assert_eq!(
        metric(admin, "kyuubi_broker_metadata_cache_misses_total").await,
        200
    );
    c.close_session(s).await.unwrap();
    b.shutdown().await;
}

/// A session with state of its own (here a temporary view, which Spark's
/// GetTables lists) neither uses nor feeds the cache: another session of
/// the same identity never sees that view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_a_temporary_view_neither_feeds_nor_uses_the_cache() {
    let sts = sts_binary().await;
    // a database of its own, so no other test's DROP runs under this listing
    // (Spark lists a session's temporary views whatever the schema pattern)
    {
        let mut c = connect(Transport::Binary, sts, "setup").await;
        let s = c.open_session().await.unwrap();
        let op = c
            .execute(&s, "create database if not exists kb_mc_tv_db")
            .await
            .unwrap();
        c.close_operation(op).await.unwrap();
        c.close_session(s).await.unwrap();
    }
    let b = broker_for(sts).await;
    let admin = b.addrs["admin"];
    let mut a = connect(Transport::Binary, b.binary, "alice").await;
    let sa = a.open_session().await.unwrap();
    let op = a
        .execute(&sa, "create temporary view kb_mc_tv as select 1 as x")
        .await
        .unwrap();
    a.close_operation(op).await.unwrap();
    assert_eq!(
        table_names(&mut a, &sa, "kb_mc_tv_db", "kb_mc_tv%").await,
        vec!["kb_mc_tv".to_string()]
    );
    assert_eq!(
        table_names(&mut a, &sa, "kb_mc_tv_db", "kb_mc_tv%").await,
        vec!["kb_mc_tv".to_string()]
    );
    let mut other = connect(Transport::Binary, b.binary, "alice").await;
    let so = other.open_session().await.unwrap();
    assert!(
        table_names(&mut other, &so, "%", "kb_mc_tv%")
            .await
            .is_empty(),
        "another session's view"
    );
    assert_eq!(
        metric(admin, "kyuubi_broker_metadata_cache_hits_total").await,
        0
    );
    a.close_session(sa).await.unwrap();
    other.close_session(so).await.unwrap();
    b.shutdown().await;
}

/// Hive JDBC and PyHive run statements asynchronously: the ExecuteStatement
/// reply comes before a CREATE TABLE is done. Answers recorded meanwhile are
/// not kept, and the route's answers are cleared once the statement ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_ddl_statement_is_seen_once_it_has_ended() {
    let sts = sts_binary().await;
    let db = "kb_metacache_async";
    {
        let mut c = connect(Transport::Binary, sts, "setup").await;
        let s = c.open_session().await.unwrap();
        for q in [
            format!("drop database if exists {db} cascade"),
            format!("create database {db}"),
        ] {
            let op = c.execute(&s, &q).await.unwrap();
            c.close_operation(op).await.unwrap();
        }
        c.close_session(s).await.unwrap();
    }
    let b = broker_for(sts).await;
    let mut reader = connect(Transport::Binary, b.binary, "alice").await;
    let rs = reader.open_session().await.unwrap();
    assert!(table_names(&mut reader, &rs, db, "%").await.is_empty());
    let mut writer = connect(Transport::Binary, b.binary, "alice").await;
    let ws = writer.open_session().await.unwrap();
    let req = TExecuteStatementReq {
        session_handle: ws.clone(),
        statement: format!("create table {db}.made_async (a int) using parquet"),
        conf_overlay: None,
        run_async: Some(true),
        query_timeout: None,
    };
    let resp: TExecuteStatementResp = writer.call("ExecuteStatement", &req).await.unwrap();
    let op = resp.operation_handle.unwrap();
    // metadata read while the statement may still run is answered, not kept
    let _ = table_names(&mut reader, &rs, db, "%").await;
    loop {
        let st: TGetOperationStatusResp = writer
            .call(
                "GetOperationStatus",
                &TGetOperationStatusReq::new(op.clone(), None),
            )
            .await
            .unwrap();
        match st.operation_state {
            Some(TOperationState::FINISHED_STATE) => break,
            Some(
                TOperationState::RUNNING_STATE
                | TOperationState::PENDING_STATE
                | TOperationState::INITIALIZED_STATE,
            ) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            other => panic!("the CREATE TABLE ended {other:?}"),
        }
    }
    writer.close_operation(op).await.unwrap();
    assert_eq!(
        table_names(&mut reader, &rs, db, "%").await,
        vec!["made_async".to_string()]
    );
    reader.close_session(rs).await.unwrap();
    writer.close_session(ws).await.unwrap();
    b.shutdown().await;
}

/// GetTables through `c`: the names of the tables matching.
async fn table_names(
    c: &mut Hs2Client,
    s: &TSessionHandle,
    schema: &str,
    table: &str,
) -> Vec<String> {
    let req = TGetTablesReq::new(
        s.clone(),
        None,
        Some(schema.to_string()),
        Some(table.to_string()),
        None,
    );
    let resp: TGetTablesResp = c.call("GetTables", &req).await.unwrap();
    let op = resp
        .operation_handle
        .unwrap_or_else(|| panic!("GetTables {schema}.{table}: {:?}", resp.status));
    let page = c.fetch(&op, 1000).await.unwrap();
    c.close_operation(op).await.unwrap();
    match &page.results.unwrap().columns.unwrap()[2] {
        TColumn::StringVal(v) => v.values.clone(),
        other => panic!("{other:?}"),
    }
}
