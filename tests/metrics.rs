//! Per-RPC metrics, the admin listener and the CLI that reads it, after real
//! traffic: impyla and the broker's own client through the broker to the
//! fixture's Spark Thrift Server.

mod common;

use common::*;
use std::time::Duration;

use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};

const BIN: &str = env!("CARGO_BIN_EXE_kyuubi-broker");
const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_metrics_carry_their_labels_after_real_traffic_and_overhead_is_never_negative() {
    let route = route_toml("binary", sts_binary().await, "");
    let b = start_broker_toml(&format!("{ADMIN}{LISTENERS}\n{route}")).await;
    let admin = b.addrs["admin"];
    for (mode, port) in [("binary", b.binary.port()), ("http", b.http.port())] {
        let v = py_client("impyla", mode, port, "query", Some("select 1")).await;
        assert_eq!(v["rows"][0][0], "1", "{v}");
    }
    let (code, text) = admin_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    let count = series(&text, "kyuubi_broker_rpc_duration_seconds_count");
    for client in ["binary", "http"] {
        for method in ["OpenSession", "ExecuteStatement", "FetchResults"] {
            let key = format!(
                "method=\"{method}\",route=\"r\",client_transport=\"{client}\",upstream_transport=\"binary\",outcome=\"ok\""
            );
            assert!(
                count.get(&key).copied().unwrap_or(0.0) >= 1.0,
                "no {key} in\n{text}"
            );
        }
    }
    let total = series(&text, "kyuubi_broker_rpc_duration_seconds_sum");
    let upstream = series(&text, "kyuubi_broker_rpc_upstream_duration_seconds_sum");
    let overhead = series(&text, "kyuubi_broker_rpc_overhead_seconds_sum");
    assert!(!overhead.is_empty());
    for (k, o) in &overhead {
        let (t, u) = (total[k], upstream[k]);
        assert!(*o >= 0.0 && *o <= t, "{k}: overhead {o} total {t}");
        assert!(
            (u + o - t).abs() < 1e-3,
            "{k}: upstream {u} + overhead {o} != total {t}"
        );
    }
    for needle in [
        "kyuubi_broker_rpc_request_size_bytes_count{method=\"ExecuteStatement\",route=\"r\"}",
        "kyuubi_broker_client_connections{listener=\"binary\"}",
        "kyuubi_broker_sessions{route=\"r\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_sessions_per_user_and_latency_and_masks_tokens() {
    let sts = sts_binary().await;
    // a second route whose token must never appear; its upstream is down
    let toml = format!(
        "{ADMIN}{LISTENERS}\n{}\n[routes.gw.upstream]\ntransport = \"http\"\nhost = \"127.0.0.1\"\nport = 9\ntoken = \"s3cr3tT0kenValue0123456789abcdef\"\n",
        route_toml("binary", sts, "")
    );
    let b = start_broker_toml(&toml).await;
    let admin = b.addrs["admin"];
    let mut c = Hs2Client::connect(
        &client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain),
        "alice",
        "x",
    )
    .await
    .unwrap();
    let s = c.open_session().await.unwrap();
    let op = c.execute(&s, "select 1").await.unwrap();
    c.fetch(&op, 10).await.unwrap();

    let (code, body) = admin_get(admin, "/status").await;
    assert_eq!(code, 200);
    assert!(!body.contains("s3cr3t"), "token leaked: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["routes"].to_string().contains("/token/****"), "{body}");
    assert_eq!(
        v["sessions"],
        serde_json::json!([{"route": "r", "user": "alice", "sessions": 1}])
    );
    let exec = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "ExecuteStatement")
        .expect("ExecuteStatement row");
    assert!(
        exec["count"] == 1 && exec["p99_us"].as_u64().unwrap() >= exec["p50_us"].as_u64().unwrap()
    );

    // readiness: the token gateway is down, so not ready, and says which
    let (code, body) = admin_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("\"route\": \"gw\"") && !body.contains("s3cr3t"),
        "{body}"
    );
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);

    // the CLI prints the same table
    let out = tokio::process::Command::new(BIN)
        .args(["stats", "--admin", &admin.to_string()])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("ExecuteStatement") && table.contains("1 live session"),
        "{table}"
    );

    c.close_session(s).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&admin_get(admin, "/status").await.1).unwrap();
    assert_eq!(v["sessions"], serde_json::json!([]));
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_broker_and_direct_and_writes_json_that_parses() {
    let sts = sts_binary().await;
    let b = start_broker(&route_toml("binary", sts, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = tokio::process::Command::new(BIN)
        .args([
            "bench",
            "--scenario",
            "small",
            "--concurrency",
            "2",
            "--iterations",
            "20",
        ])
        .args(["--target", &format!("jdbc:hive2://{sts}/")])
        .args(["--target", &format!("jdbc:hive2://{}/", b.binary)])
        .args([
            "--target",
            &format!(
                "jdbc:hive2://{}/;transportMode=http;httpPath=cliservice",
                b.http
            ),
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    for t in targets {
        for k in [
            "url",
            "p50_us",
            "p95_us",
            "p99_us",
            "max_us",
            "ops_per_sec",
            "errors",
        ] {
            assert!(t.get(k).is_some(), "{k} missing in {t}");
        }
        assert_eq!(t["errors"], 0, "{t}");
        assert_eq!(t["ops"], 20, "{t}");
        assert!(t["p99_us"].as_u64() >= t["p50_us"].as_u64());
    }
    assert_eq!(targets[0]["p50_ratio"], 1.0);
    b.shutdown().await;
}

/// The metric names and label names a PromQL expression uses: identifiers
/// starting `kyuubi_broker_`, the labels in `by (...)`, and those matched in
/// `{...}` selectors.
fn promql_names(expr: &str) -> (Vec<String>, Vec<String>) {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let metrics = expr
        .match_indices("kyuubi_broker_")
        .map(|(i, _)| ident(&expr[i..]))
        .collect();
    let mut labels = Vec::new();
    for (i, _) in expr.match_indices("by (") {
        let inner = &expr[i + 4..i + 4 + expr[i + 4..].find(')').unwrap()];
        labels.extend(inner.split(',').map(|l| l.trim().to_string()));
    }
    for (i, _) in expr.match_indices('{') {
        let inner = &expr[i + 1..i + 1 + expr[i + 1..].find('}').unwrap()];
        // a Grafana legend such as {{method}} is not a selector
        if inner.starts_with('{') || inner.is_empty() {
            continue;
        }
        labels.extend(inner.split(',').map(|m| ident(m.trim())));
    }
    (metrics, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_metrics_and_labels_the_broker_exports() {
    // traffic that makes every series the dashboard queries: good RPCs on
    // both transports, a refused login, a connection over a listener's cap,
    // one that never sends a request, and an upstream that is not there
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let hash = kyuubi_broker::auth::hash_password("alice-pw");
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let route = route_toml("binary", sts_binary().await, "");
    let b = start_broker_toml(&format!(
        "{ADMIN}[server]\nhandshake_timeout = \"1s\"\n{LISTENERS}\n\
         [[listener]]\nname = \"locked\"\nprotocol = \"http\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\n\
         auth = \"static\"\nusers_file = \"{}\"\nmax_connections = 1\n\n\
         [[listener]]\nname = \"dead\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"dead\"\n\
         auth = \"none\"\nallow_any_user = true\n\n\
         [routes.dead.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 9\n\n{route}",
        users.display()
    ))
    .await;
    let admin = b.addrs["admin"];
    for (mode, port) in [("binary", b.binary.port()), ("http", b.http.port())] {
        let v = py_client("impyla", mode, port, "query", Some("select 1")).await;
        assert_eq!(v["rows"][0][0], "1", "{v}");
    }
    let locked = b.addrs["locked"];
    let (status, _, _) = http_post(locked, "/cliservice", &basic("alice", "nope"), b"x").await;
    assert_eq!(status, 401);
    // the one place on "locked", held without a request...
    let idle = tokio::net::TcpStream::connect(locked).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while series(
        &admin_get(admin, "/metrics").await.1,
        "kyuubi_broker_client_connections",
    )
    .get("listener=\"locked\"")
        != Some(&1.0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle connection was not accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...so this one is over the cap, and the idle one times out (read to
    // its end: the broker closes it after the 1 s handshake timeout)
    let _ = send_and_read_all(locked, b"x").await;
    {
        use tokio::io::AsyncReadExt;
        let mut idle = idle;
        let mut sink = Vec::new();
        let _ = idle.read_to_end(&mut sink).await;
    }
    let cfg = client_cfg(Transport::Binary, b.addrs["dead"], UpstreamSasl::Plain);
    let mut c = Hs2Client::connect(&cfg, "alice", "x").await.unwrap();
    assert!(c.open_session().await.is_err(), "the dead route answered");
    let (_, text) = admin_get(b.addrs["admin"], "/metrics").await;
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/grafana/kyuubi-broker.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    exprs.push(
        dash["templating"]["list"][1]["definition"]
            .as_str()
            .unwrap()
            .into(),
    );
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut with_samples = 0;
    let mut missing = Vec::new();
    for expr in &exprs {
        let (metrics, labels) = promql_names(expr);
        assert!(!metrics.is_empty(), "no broker metric in {expr}");
        for m in &metrics {
            let family = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            if !text.contains(&format!("# TYPE {family} ")) {
                missing.push(family.to_string());
                continue;
            }
            let samples: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{m}{{")) || l.starts_with(&format!("{m} ")))
                .collect();
            if samples.is_empty() {
                continue;
            }
            with_samples += 1;
            for l in &labels {
                // added by Prometheus when it scrapes, or by histogram_quantile
                if ["instance", "job"].contains(&l.as_str())
                    || (l == "le" && !m.ends_with("_bucket"))
                {
                    continue;
                }
                assert!(
                    samples.iter().any(|s| s.contains(&format!("{l}=\""))),
                    "{expr}: {m} has no label {l}: {samples:?}"
                );
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "not in /metrics after the traffic: {missing:?}"
    );
    assert!(
        with_samples >= 12,
        "too few queried series had samples: {with_samples}"
    );
    b.shutdown().await;
}
