//! ZooKeeper discovery (issue 13) against a real ZooKeeper 3.8 (the
//! fixture's, 127.0.0.1:2181, or a private one where a test stops it), a
//! real Spark Thrift Server and stock beeline (Hive JDBC 2.3.10).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};
use zookeeper_client as zk;

const ZK: &str = "127.0.0.1:2181";

fn shared_zk() {
    fixture(&["zk-start"]);
}

async fn zk_client(ensemble: &str) -> zk::Client {
    tokio::time::timeout(
        Duration::from_secs(20),
        zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(ensemble),
    )
    .await
    .expect("a ZooKeeper session within 20 s")
    .expect("ZooKeeper answers")
}

/// The children of `/<ns>` once `want(children)` holds, within `within`.
async fn children_when(
    zkc: &zk::Client,
    ns: &str,
    within: Duration,
    want: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let kids = match zkc.list_children(&format!("/{ns}")).await {
            Ok(k) => k,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => panic!("listing /{ns}: {e}"),
        };
        if want(&kids) {
            return kids;
        }
        assert!(
            Instant::now() < deadline,
            "/{ns} never reached the expected children within {within:?}: {kids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cluster_toml(ensemble: &str, ns: &str, extra: &str) -> String {
    format!(
        "[cluster]\nzookeeper = \"{ensemble}\"\nnamespace = \"{ns}\"\nsession_timeout = \"4s\"\n{extra}\n"
    )
}

fn broker_toml(cluster: &str, route: &str) -> String {
    format!(
        "[server]\nshutdown_grace = \"10s\"\n[admin]\nbind = \"127.0.0.1:0\"\n{cluster}\n{LISTENERS}\n{route}\n"
    )
}

/// An unlabelled sample of the broker's metrics (counters and gauges here
/// are whole numbers).
async fn metric(b: &Broker, name: &str) -> i64 {
    let (_, text) = admin_get(b.addrs["admin"], "/metrics").await;
    text.lines()
        .find_map(|l| {
            let v: f64 = l
                .strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()?;
            Some(v as i64)
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// A query through the broker's binary listener.
async fn query(addr: SocketAddr, sql: &str) -> String {
    let cfg = client_cfg(Transport::Binary, addr, UpstreamSasl::Plain);
    let mut c = Hs2Client::connect(&cfg, "alice", "x").await.unwrap();
    scalar(&mut c, &[], sql, 0).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_register_ephemeral_sequential_znodes_that_hive_jdbc_reads() {
    shared_zk();
    let ns = zk_namespace("form");
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let b = start_broker_toml(&broker_toml(
        &cluster_toml(ZK, &ns, ""),
        &route_toml("binary", up, ""),
    ))
    .await;
    let zkc = zk_client(ZK).await;
    let kids = children_when(&zkc, &ns, Duration::from_secs(20), |k| k.len() == 1).await;
    let bin = b.binary;
    let name = &kids[0];
    let prefix = format!(
        "serverUri={bin};version={};sequence=",
        env!("CARGO_PKG_VERSION")
    );
    let seq = name
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{name} does not start with {prefix}"));
    assert!(
        seq.len() == 10 && seq.bytes().all(|c| c.is_ascii_digit()),
        "{name}"
    );
    let (data, stat) = zkc.get_data(&format!("/{ns}/{name}")).await.unwrap();
    assert_ne!(
        stat.ephemeral_owner, 0,
        "the znode lives with the broker's session"
    );
    assert_eq!(
        String::from_utf8(data).unwrap(),
        format!(
            "hive.server2.thrift.bind.host=127.0.0.1;hive.server2.transport.mode=binary;\
             hive.server2.thrift.port={};hive.server2.thrift.sasl.qop=auth;\
             hive.server2.authentication=NONE;hive.server2.use.SSL=false",
            bin.port()
        )
    );
    // the HTTP listener is in a namespace of its own
    let http_ns = format!("{ns}-http");
    let kids = children_when(&zkc, &http_ns, Duration::from_secs(20), |k| k.len() == 1).await;
    let (data, _) = zkc
        .get_data(&format!("/{http_ns}/{}", kids[0]))
        .await
        .unwrap();
    let data = String::from_utf8(data).unwrap();
    let port = b.http.port();
    for kv in [
        "hive.server2.transport.mode=http".to_string(),
        format!("hive.server2.thrift.http.port={port}"),
        format!("hive.server2.thrift.port={port}"),
        "hive.server2.thrift.http.path=cliservice".into(),
    ] {
        assert!(data.split(';').any(|x| x == kv), "{kv} not in {data}");
    }
    assert_eq!(metric(&b, "kyuubi_broker_discovery_znodes").await, 2);
    let (_, status) = admin_get(b.addrs["admin"], "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["discovery"]["connected"], true);
    assert_eq!(status["discovery"]["znodes"].as_array().unwrap().len(), 2);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beeline_finds_the_broker_through_zookeeper_on_both_transports() {
    shared_zk();
    let sts = sts_binary().await;
    let ns = zk_namespace("beeline");
    let toml = broker_toml(&cluster_toml(ZK, &ns, ""), &route_toml("binary", sts, ""));
    let b = start_broker_toml(&toml).await;
    // the URLs a user is given: `connstr --local --zookeeper` on the config
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, &toml).unwrap();
    let urls = fleet_urls(&file).unwrap();
    let want = |n: &str| {
        format!("jdbc:hive2://{ZK}/;serviceDiscoveryMode=zooKeeper;zooKeeperNamespace={n}")
    };
    assert_eq!(urls, [want(&ns), want(&format!("{ns}-http"))]);
    let zkc = zk_client(ZK).await;
    for n in [ns.clone(), format!("{ns}-http")] {
        children_when(&zkc, &n, Duration::from_secs(20), |k| k.len() == 1).await;
    }
    let logins_before = metric_sum(&b, "kyuubi_broker_login_duration_seconds_count").await;
    for (url, transport) in urls.iter().zip(["binary", "http"]) {
        let run = beeline(
            url,
            "alice",
            "x",
            &format!("select 'via-zk-{transport}';\n"),
        )
        .await;
        assert!(run.ok, "{transport}: {}\n{}", run.stdout, run.stderr);
        assert!(
            run.stdout.contains(&format!("via-zk-{transport}")),
            "{transport}: {}",
            run.stdout
        );
    }
    // both sessions came through this broker (its listeners counted them)
    let logins = metric_sum(&b, "kyuubi_broker_login_duration_seconds_count").await;
    assert!(
        logins >= logins_before + 2.0,
        "logins {logins_before} -> {logins}"
    );
    b.shutdown().await;
}

async fn metric_sum(b: &Broker, name: &str) -> f64 {
    let (_, text) = admin_get(b.addrs["admin"], "/metrics").await;
    series(&text, name).values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_removes_the_znodes_before_the_listeners_stop_accepting() {
    shared_zk();
    let ns = zk_namespace("drain");
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut b = start_broker_toml(&broker_toml(
        &cluster_toml(ZK, &ns, "deregister_grace = \"3s\""),
        &route_toml("binary", up, ""),
    ))
    .await;
    let zkc = zk_client(ZK).await;
    children_when(&zkc, &ns, Duration::from_secs(20), |k| k.len() == 1).await;
    let addr = b.binary;
    b.begin_shutdown();
    children_when(&zkc, &ns, Duration::from_secs(5), |k| k.is_empty()).await;
    // gone from discovery, yet a client that read the znode just before
    // still gets in
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("still accepting after deregistering");
    b.join().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting once stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_away_never_stops_serving_and_the_broker_registers_when_it_is_back() {
    let sts = sts_binary().await;
    let zkp = PrivateZk::new();
    let ns = zk_namespace("outage");
    // ZooKeeper is not there when the broker starts
    let b = start_broker_toml(&broker_toml(
        &cluster_toml(&zkp.ensemble(), &ns, ""),
        &route_toml("binary", sts, ""),
    ))
    .await;
    assert_eq!(query(b.binary, "select 'served'").await, "served");
    zkp.run("zk-start");
    let zkc = zk_client(&zkp.ensemble()).await;
    // the retry backoff is at most 5 s
    children_when(&zkc, &ns, Duration::from_secs(45), |k| k.len() == 1).await;
    assert!(metric(&b, "kyuubi_broker_discovery_failures_total").await >= 1);
    drop(zkc);

    // a ZooKeeper that comes back without the broker's session (its state
    // lost): the broker registers again in a new session
    zkp.run("zk-stop");
    assert_eq!(
        query(b.binary, "select 'still served'").await,
        "still served"
    );
    std::fs::remove_dir_all(zkp.dir.path().join("data")).unwrap();
    zkp.run("zk-start");
    let zkc = zk_client(&zkp.ensemble()).await;
    children_when(&zkc, &ns, Duration::from_secs(45), |k| k.len() == 1).await;
    assert_eq!(metric(&b, "kyuubi_broker_discovery_znodes").await, 2);
    assert_eq!(query(b.binary, "select 'after'").await, "after");
    b.shutdown().await;
}

/// `connstr --local --zookeeper --config FILE`: its URLs, or its error text.
fn fleet_urls(config: &std::path::Path) -> Result<Vec<String>, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .args(["connstr", "--local", "--zookeeper", "--config"])
        .arg(config)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn the_discovery_example_prints_one_zookeeper_url_per_transport() {
    assert_eq!(
        fleet_urls(&root().join("config/examples/discovery.toml")).unwrap(),
        [
            "jdbc:hive2://127.0.0.1:2181/;serviceDiscoveryMode=zooKeeper;zooKeeperNamespace=kyuubi-broker",
            "jdbc:hive2://127.0.0.1:2181/;serviceDiscoveryMode=zooKeeper;zooKeeperNamespace=kyuubi-broker-http",
        ]
    );
    // without [cluster] there is no fleet to print
    let e = fleet_urls(&root().join("config/examples/bi.toml")).unwrap_err();
    assert!(e.contains("[cluster]"), "{e}");
}
