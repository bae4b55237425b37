//! Every connection-string form the broker prints is read back by Hive
//! JDBC's own parser (`org.apache.hive.jdbc.Utils.parseURL`, hive-jdbc
//! 2.3.10 from the pyspark package), and agrees with the broker's parser.

mod common;

use std::process::Command;

use common::*;
use kyuubi_broker::connstr::parse;
use serde_json::{json, Map, Value};

fn connstr(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .arg("connstr")
        .args(args)
        .env("KB_TEST_TS_PASSWORD", "ts-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(s.lines().count(), 1, "one line: {s}");
    assert!(s.starts_with("jdbc:"));
    s.trim().to_string()
}

/// Runs the Java checker over `urls`; one JSON value per URL.
fn hive_parse(urls: &[String]) -> Vec<Value> {
    let sh = spark_home();
    let jars = format!("{}/jars/*", sh.display());
    let classes = tempfile::tempdir().unwrap();
    let javac = Command::new("javac")
        .args(["-d"])
        .arg(classes.path())
        .args(["-cp", &jars])
        .arg(root().join("tests/java/ParseJdbcUrl.java"))
        .output()
        .expect("javac (a JDK) is installed");
    assert!(
        javac.status.success(),
        "{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let out = Command::new("java")
        .args([
            "-cp",
            &format!("{}:{jars}", classes.path().display()),
            "ParseJdbcUrl",
        ])
        .args(urls)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn as_map(pairs: &[(String, String)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn hive_jdbc_parses_every_form_the_broker_prints_as_the_broker_does() {
    let local = Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .args(["connstr", "--local", "--config"])
        .arg(root().join("config/local.toml"))
        .output()
        .unwrap();
    let local: Vec<String> = String::from_utf8(local.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(local.len(), 2, "one URL per listener: {local:?}");
    // TLS listeners: the paths in tls.toml need not exist to print URLs
    let tls_local = Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .args([
            "connstr",
            "--local",
            "--truststore",
            "/tmp/kb-tls/truststore.jks",
            "--config",
        ])
        .arg(root().join("config/examples/tls.toml"))
        .output()
        .unwrap();
    let tls_local: Vec<String> = String::from_utf8(tls_local.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        tls_local.len(),
        2,
        "one URL per TLS listener: {tls_local:?}"
    );
    let mut checked = vec![
        connstr(&[
            "--host",
            "kyuubi-cn-hangzhou-internal.spark.emr.aliyuncs.com",
            "--token",
            "0123456789abcdefghijklmnopqrstuv",
            "--show-secret",
        ]),
        connstr(&[
            "--host",
            "ep-x.privatelink.aliyuncs.com",
            "--principal",
            "kyuubi/_HOST@EMR.C-ABC.COM",
        ]),
        connstr(&[
            "--host", "gw", "--port", "10010", "--http", "--user", "alice", "--db", "sales db",
        ]),
        connstr(&[
            "--host",
            "gw",
            "--user",
            "alice",
            "--ssl",
            "--truststore",
            "/etc/kb/ts.jks",
            "--truststore-password-env",
            "KB_TEST_TS_PASSWORD",
            "--show-secret",
        ]),
        connstr(&[
            "--host",
            "gw",
            "--user",
            "bob",
            "--conf",
            "kyuubi.engine.share.level=CONNECTION",
            "--conf",
            "spark.app.name=a b#c?d",
        ]),
        // the public endpoint of an EMR Serverless Spark gateway
        connstr(&[
            "--host",
            "kyuubi-cn-hangzhou.spark.emr.aliyuncs.com",
            "--token",
            "0123456789abcdefghijklmnopqrstuv",
            "--ssl",
            "--show-secret",
        ]),
    ];
    checked.extend(local);
    checked.extend(tls_local);
    let extra = [
        // refusal evidence: Hive splits at the last '=', which is why such values are refused
        "jdbc:hive2://h:1/;http.header.Authorization=Bearer%20ab==".to_string(),
        connstr(&[
            "--host",
            "127.0.0.1:1,127.0.0.1:2",
            "--zookeeper",
            "--namespace",
            "kyuubi",
        ]),
    ];
    let all: Vec<String> = checked.iter().chain(extra.iter()).cloned().collect();
    let hive = tokio::task::spawn_blocking(move || hive_parse(&all))
        .await
        .unwrap();
    assert_eq!(hive.len(), checked.len() + extra.len(), "{hive:?}");

    for (url, h) in checked.iter().zip(&hive) {
        assert_eq!(h["ok"], json!(true), "Hive refused {url}: {h}");
        let ours = parse(url).unwrap();
        assert_eq!(
            format!("{}:{}", h["host"].as_str().unwrap(), h["port"]),
            ours.authority,
            "{url}"
        );
        assert_eq!(h["db"], json!(ours.db), "{url}");
        assert_eq!(h["session"], as_map(&ours.session), "{url}");
        assert_eq!(h["conf"], as_map(&ours.conf), "{url}");
        assert_eq!(h["vars"], as_map(&ours.vars), "{url}");
    }
    // what matters to the gateway and to users
    assert_eq!(hive[0]["port"], json!(80));
    assert_eq!(
        hive[0]["session"]["httpPath"],
        json!("cliservice/token/0123456789abcdefghijklmnopqrstuv")
    );
    assert_eq!(hive[0]["session"]["transportMode"], json!("http"));
    assert_eq!(
        hive[1]["session"]["principal"],
        json!("kyuubi/_HOST@EMR.C-ABC.COM")
    );
    assert_eq!(hive[2]["db"], json!("sales db"));
    assert_eq!(hive[3]["session"]["trustStorePassword"], json!("ts-secret"));
    assert_eq!(hive[4]["conf"]["spark.app.name"], json!("a b#c?d"));
    assert_eq!(
        checked[5],
        "jdbc:hive2://kyuubi-cn-hangzhou.spark.emr.aliyuncs.com:443/;transportMode=http;httpPath=cliservice/token/0123456789abcdefghijklmnopqrstuv;ssl=true"
    );
    assert_eq!(hive[5]["port"], json!(443));
    assert_eq!(hive[5]["session"]["ssl"], json!("true"));
    assert_eq!(
        hive[7]["session"]["httpPath"],
        json!("cliservice"),
        "the local HTTP listener"
    );
    for h in &hive[8..10] {
        assert_eq!(h["session"]["ssl"], json!("true"), "a TLS listener: {h}");
        assert_eq!(
            h["session"]["sslTrustStore"],
            json!("/tmp/kb-tls/truststore.jks"),
            "{h}"
        );
    }
    assert_eq!(hive[9]["session"]["transportMode"], json!("http"));
    let n = checked.len();
    assert_eq!(
        hive[n]["session"]["http.header.Authorization=Bearer ab="],
        json!(""),
        "{}",
        hive[n]
    );
    assert_eq!(
        hive[n + 1],
        json!({"ok": true, "zookeeper_lookup_failed": true}),
        "ZooKeeper form accepted"
    );
}

#[test]
fn secrets_are_masked_unless_asked_for_and_bad_values_are_refused() {
    let masked = connstr(&[
        "--host",
        "gw",
        "--token",
        "0123456789abcdefghijklmnopqrstuv",
    ]);
    assert!(
        masked.ends_with("/token/****") && !masked.contains("0123456789"),
        "{masked}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .args(["connstr", "--host", "gw", "--user", "a=b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("last '='"));
}
