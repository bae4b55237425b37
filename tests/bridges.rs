//! Real clients (impyla, PyHive, beeline) through all four bridges — client
//! binary or HTTP × upstream binary or HTTP — against a real Spark Thrift
//! Server 4.0.1.

mod common;

use common::*;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

async fn broker_for(upstream: &str) -> Broker {
    match upstream {
        "binary" => start_broker(&route_toml("binary", sts_binary().await, "")).await,
        "http" => {
            start_broker(&route_toml(
                "http",
                sts_http().await,
                "http_path = \"cliservice\"",
            ))
            .await
        }
        other => panic!("unknown upstream {other}"),
    }
}

fn client_port(b: &Broker, mode: &str) -> u16 {
    if mode == "http" {
        b.http.port()
    } else {
        b.binary.port()
    }
}

fn expected_rows() -> Value {
    json!([
        ["1", "ascii", "12.345", "2024-01-02 03:04:05.678", null],
        ["2", "ünïcødé 数据 🚀", "-0.001", null, "x"],
        ["3", null, null, "1970-01-01 00:00:00", ""]
    ])
}

async fn workload_py(client: &str, mode: &str, upstream: &str) {
    let b = broker_for(upstream).await;
    let t = table(&format!("{client}_{mode}_{upstream}"));
    let v = py_client(client, mode, client_port(&b, mode), "workload", Some(&t)).await;
    assert_eq!(v["rows"], expected_rows(), "{v}");
    assert!(
        v["show_tables"].as_array().unwrap().contains(&json!(t)),
        "{v}"
    );
    assert_eq!(v["tables"], json!([t]), "GetTables: {v}");
    assert_eq!(
        v["columns"],
        json!(["id", "name", "amount", "ts", "note"]),
        "GetColumns: {v}"
    );
    b.shutdown().await;
}

async fn workload_beeline(mode: &str, upstream: &str) {
    let b = broker_for(upstream).await;
    let t = table(&format!("beeline_{mode}_{upstream}"));
    let script = format!(
        "drop table if exists {t};\n\
         create table {t} (id int, name string, amount decimal(12,3), ts timestamp, note string) using parquet;\n\
         insert into {t} values (1, 'ascii', 12.345, timestamp'2024-01-02 03:04:05.678', null), \
         (2, 'ünïcødé 数据 🚀', -0.001, null, 'x'), (3, null, null, timestamp'1970-01-01 00:00:00', '');\n\
         select id, name, amount, ts, note from {t} order by id;\n\
         show tables;\n\
         !tables\n\
         !columns {t}\n\
         drop table {t};\n"
    );
    let addr = if mode == "http" { b.http } else { b.binary };
    let r = beeline(&jdbc_url(mode, addr), "alice", "alice-pw", &script).await;
    assert!(r.ok, "beeline failed:\n{}\n{}", r.stdout, r.stderr);
    for line in [
        "1,ascii,12.345,2024-01-02 03:04:05.678,NULL",
        "2,ünïcødé 数据 🚀,-0.001,NULL,x",
        "3,NULL,NULL,1970-01-01 00:00:00.0,",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "missing row {line:?} in:\n{}",
            r.stdout
        );
    }
    // show tables, then GetTables (!tables) and GetColumns (!columns)
    assert!(
        r.stdout.contains(&format!("default,{t},false")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(",default,{t},TABLE,")),
        "GetTables:\n{}",
        r.stdout
    );
    // (beeline's csv2 wraps the type name in NUL quote characters)
    let amount = format!("default,{t},amount,3,");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(&amount) && l.contains("DECIMAL(12,3)")),
        "GetColumns:\n{}",
        r.stdout
    );
    b.shutdown().await;
}

macro_rules! workload_tests {
    ($($name:ident: $kind:ident $($arg:literal),+;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $kind($($arg),+).await
        }
    )*};
}

workload_tests! {
    impyla_binary_to_binary_round_trips_types_and_metadata: workload_py "impyla", "binary", "binary";
    impyla_binary_to_http_round_trips_types_and_metadata: workload_py "impyla", "binary", "http";
    impyla_http_to_binary_round_trips_types_and_metadata: workload_py "impyla", "http", "binary";
    impyla_http_to_http_round_trips_types_and_metadata: workload_py "impyla", "http", "http";
    pyhive_binary_to_binary_round_trips_types_and_metadata: workload_py "pyhive", "binary", "binary";
    pyhive_binary_to_http_round_trips_types_and_metadata: workload_py "pyhive", "binary", "http";
    pyhive_http_to_binary_round_trips_types_and_metadata: workload_py "pyhive", "http", "binary";
    pyhive_http_to_http_round_trips_types_and_metadata: workload_py "pyhive", "http", "http";
    beeline_binary_to_binary_round_trips_types_and_metadata: workload_beeline "binary", "binary";
    beeline_binary_to_http_round_trips_types_and_metadata: workload_beeline "binary", "http";
    beeline_http_to_binary_round_trips_types_and_metadata: workload_beeline "http", "binary";
    beeline_http_to_http_round_trips_types_and_metadata: workload_beeline "http", "http";
}

const MILLION: &str = "1000000";

/// Row count and checksums of the 1M-row query over a direct connection.
async fn direct_fetch() -> &'static Value {
    static DIRECT: OnceCell<Value> = OnceCell::const_new();
    DIRECT
        .get_or_init(|| async {
            let sts = sts_binary().await;
            py_client("impyla", "binary", sts.port(), "fetch", Some(MILLION)).await
        })
        .await
}

async fn fetch_matches_direct(client: &str, mode: &str, upstream: &str) {
    let direct = direct_fetch().await;
    assert_eq!(direct["rows"], json!(1_000_000));
    let b = broker_for(upstream).await;
    let v = py_client(client, mode, client_port(&b, mode), "fetch", Some(MILLION)).await;
    assert_eq!(
        &v, direct,
        "{client} {mode}->{upstream} differs from a direct connection"
    );
    b.shutdown().await;
}

workload_tests! {
    impyla_binary_to_binary_fetches_1m_rows_identical_to_direct: fetch_matches_direct "impyla", "binary", "binary";
    impyla_binary_to_http_fetches_1m_rows_identical_to_direct: fetch_matches_direct "impyla", "binary", "http";
    impyla_http_to_binary_fetches_1m_rows_identical_to_direct: fetch_matches_direct "impyla", "http", "binary";
    impyla_http_to_http_fetches_1m_rows_identical_to_direct: fetch_matches_direct "impyla", "http", "http";
    pyhive_http_to_http_fetches_1m_rows_identical_to_direct: fetch_matches_direct "pyhive", "http", "http";
}

async fn sql_error_surfaces(client: &str, mode: &str, upstream: &str) {
    let b = broker_for(upstream).await;
    let v = py_client(client, mode, client_port(&b, mode), "error", None).await;
    assert_eq!(v["raised"], json!(true), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("TABLE_OR_VIEW_NOT_FOUND") && msg.contains("kb_no_such_table"),
        "{msg}"
    );
    b.shutdown().await;
}

workload_tests! {
    sql_error_reaches_impyla_binary_to_binary_with_server_message: sql_error_surfaces "impyla", "binary", "binary";
    sql_error_reaches_impyla_binary_to_http_with_server_message: sql_error_surfaces "impyla", "binary", "http";
    sql_error_reaches_impyla_http_to_binary_with_server_message: sql_error_surfaces "impyla", "http", "binary";
    sql_error_reaches_impyla_http_to_http_with_server_message: sql_error_surfaces "impyla", "http", "http";
    sql_error_reaches_pyhive_http_to_binary_with_server_message: sql_error_surfaces "pyhive", "http", "binary";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_error_reaches_beeline_with_server_message() {
    let b = broker_for("binary").await;
    let r = beeline(
        &jdbc_url("http", b.http),
        "alice",
        "alice-pw",
        "select nosuchcol from kb_no_such_table;\n",
    )
    .await;
    assert!(!r.ok, "beeline should fail");
    assert!(r.stderr.contains("TABLE_OR_VIEW_NOT_FOUND"), "{}", r.stderr);
    b.shutdown().await;
}

async fn cancel_works(client: &str, mode: &str, upstream: &str) {
    let b = broker_for(upstream).await;
    let v = py_client(client, mode, client_port(&b, mode), "cancel", None).await;
    assert_eq!(v["before"], json!("RUNNING_STATE"), "{v}");
    assert_eq!(v["after"], json!("CANCELED_STATE"), "{v}");
    assert_eq!(
        v["next_query"],
        json!(7),
        "the session still works after a cancel: {v}"
    );
    b.shutdown().await;
}

workload_tests! {
    cancel_stops_a_running_query_impyla_binary_to_binary: cancel_works "impyla", "binary", "binary";
    cancel_stops_a_running_query_impyla_binary_to_http: cancel_works "impyla", "binary", "http";
    cancel_stops_a_running_query_impyla_http_to_binary: cancel_works "impyla", "http", "binary";
    cancel_stops_a_running_query_impyla_http_to_http: cancel_works "impyla", "http", "http";
    cancel_stops_a_running_query_pyhive_http_to_binary: cancel_works "pyhive", "http", "binary";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beeline_nosasl_client_is_served_as_the_user_it_names() {
    let b = broker_for("binary").await;
    let url = format!("jdbc:hive2://{}/;auth=noSasl", b.binary);
    let r = beeline(&url, "dave", "dave-pw", "select current_user();\n").await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.lines().any(|l| l == "dave"), "{}", r.stdout);
    b.shutdown().await;
}
