//! `cargo bench --bench bridges`: 1M rows × 2 columns (bigint, string),
//! fetched in 10,000-row batches, on each of the four bridges (binary and
//! HTTP clients, binary and HTTP upstreams), against direct connections over
//! both transports, in one run, with the broker's peak RSS during each
//! bridge's fetches.
//!
//! Two upstreams, each reached on both transports:
//! - the fixture's Spark Thrift Servers (binary 127.0.0.1:10000, HTTP 10001):
//!   what a user sees; skipped, saying so, when they do not run;
//! - the benchmark's in-process responder (`proxy/responder.rs`), which has
//!   every batch ready at once: the broker's own forwarding cost, the
//!   harshest case.
//!
//! Rounds interleave the targets (one fetch of each per round) so that the
//! machine's drift falls on all of them alike; figures are medians. The
//! broker is the release build in its own process; before each bridge its
//! peak-RSS mark is reset (`/proc/PID/clear_refs`, 5) and read after
//! (`VmHWM`). Under `cargo test --all-targets` (no `--bench`) it runs a small
//! pass against the responder only. Writes target/bench-report/bridges.{md,json}.

#[path = "common/mod.rs"]
mod common;
#[path = "proxy/responder.rs"]
#[allow(dead_code)]
mod responder;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::{free_port, serve_broker, status_kb, wait_port, Proc};
use kyuubi_broker::loadgen::{self, Limit, Plan, Scenario};
use serde_json::json;

fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn rows() -> usize {
    if full() {
        1_000_000
    } else {
        20_000
    }
}

fn rounds() -> usize {
    if full() {
        5
    } else {
        1
    }
}

/// A client transport and an upstream transport.
const BRIDGES: [(&str, &str); 4] = [
    ("binary", "binary"),
    ("binary", "http"),
    ("http", "binary"),
    ("http", "http"),
];

fn url(transport: &str, port: u16) -> String {
    match transport {
        "http" => format!("jdbc:hive2://127.0.0.1:{port}/;transportMode=http;httpPath=cliservice"),
        _ => format!("jdbc:hive2://127.0.0.1:{port}/"),
    }
}

fn plan() -> Plan {
    Plan {
        scenario: Scenario::Fetch,
        concurrency: 1,
        limit: Limit::Iterations(1),
        user: "bench".into(),
        password: "x".into(),
        rows: rows() as u64,
        fetch_sql: "select id, cast(id as string) from range({rows})".into(),
        tls_ca: None,
    }
}

/// One fetch of the whole result: its time in µs.
async fn fetch_us(url: &str) -> u64 {
    let r = loadgen::run_target(url, &plan())
        .await
        .expect("bench target");
    assert_eq!(r.errors, 0, "{url}: {:?}", r.first_error);
    r.p50_us.max(1)
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The broker with one listener per bridge: binary listeners `bb`, `bh`
/// and HTTP listeners `hb`, `hh` (client, upstream) over two routes.
fn broker(up_bin: u16, up_http: u16, dir: &Path, name: &str) -> (Proc, Vec<u16>) {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut cfg = String::from("[server]\nslow_rpc_threshold = \"0s\"\n");
    for ((client, up), port) in BRIDGES.iter().zip(&ports) {
        let name = format!("{}{}", &client[..1], &up[..1]);
        cfg.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"{client}\"\nbind = \"127.0.0.1:{port}\"\n\
             route = \"{up}\"\nauth = \"none\"\nallow_any_user = true\n"
        ));
    }
    for (route, port) in [("binary", up_bin), ("http", up_http)] {
        cfg.push_str(&format!(
            "[routes.{route}]\ncache = false\n[routes.{route}.upstream]\ntransport = \"{route}\"\n\
             host = \"127.0.0.1\"\nport = {port}\n"
        ));
    }
    let path = dir.join(format!("bridges-{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let p = serve_broker(&path);
    for port in &ports {
        wait_port(*port, "the broker");
    }
    (p, ports)
}

/// Direct over both transports and the four bridges, interleaved: rows/s
/// from the median fetch, ratios to direct, the broker's peak RSS.
async fn pass(label: &str, up_bin: u16, up_http: u16, dir: &Path) -> serde_json::Value {
    let (b, ports) = broker(up_bin, up_http, dir, label);
    let pid = b.0.id();
    let mut targets: Vec<(String, String)> = vec![
        ("direct binary".into(), url("binary", up_bin)),
        ("direct http".into(), url("http", up_http)),
    ];
    for ((client, up), port) in BRIDGES.iter().zip(&ports) {
        targets.push((format!("{client} → {up}"), url(client, *port)));
    }
    // warm-up: one fetch each (JIT on the server, pools, page cache)
    for (_, u) in &targets {
        fetch_us(u).await;
    }
    let idle_kb = status_kb(pid, "VmRSS:");
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); targets.len()];
    let mut peak_kb = vec![0f64; targets.len()];
    for _ in 0..rounds() {
        for (i, (_, u)) in targets.iter().enumerate() {
            let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
            samples[i].push(fetch_us(u).await);
            if reset {
                peak_kb[i] = peak_kb[i].max(status_kb(pid, "VmHWM:"));
            }
        }
    }
    let rps: Vec<f64> = samples
        .iter_mut()
        .map(|s| rows() as f64 / (median(s) as f64 / 1e6))
        .collect();
    let (direct_bin, direct_http) = (rps[0], rps[1]);
    let mut out = serde_json::Map::new();
    for (i, (name, _)) in targets.iter().enumerate() {
        let mut t = json!({
            "rows_per_sec": rps[i],
            "fetch_ms_median": median(&mut samples[i]) as f64 / 1e3,
        });
        if i >= 2 {
            let (client, up) = BRIDGES[i - 2];
            let direct = |tr: &str| {
                if tr == "http" {
                    direct_http
                } else {
                    direct_bin
                }
            };
            t["ratio_to_direct_upstream_transport"] = json!(rps[i] / direct(up));
            t["ratio_to_direct_client_transport"] = json!(rps[i] / direct(client));
            t["broker_peak_rss_mb"] = json!(peak_kb[i] / 1024.0);
        }
        out.insert(name.clone(), t);
    }
    eprintln!(
        "[bench] bridges ({label}): {}",
        serde_json::Value::Object(out.clone())
    );
    json!({ "broker_idle_rss_mb": idle_kb / 1024.0, "targets": out })
}

fn markdown(report: &serde_json::Value) -> String {
    let mut md = format!(
        "# Four bridges, {} rows × 2 columns ({})\n\n",
        report["rows"], report["date"]
    );
    for pass in ["spark_thrift_server", "responder"] {
        let p = &report[pass];
        if p.is_null() {
            md.push_str(&format!("## {pass}\n\nskipped: {}\n\n", report["skipped"]));
            continue;
        }
        md.push_str(&format!(
            "## {pass}\n\nbroker idle RSS {:.1} MB\n\n| path | rows/s | × direct (upstream's transport) | × direct (client's transport) | broker peak RSS MB |\n|---|---:|---:|---:|---:|\n",
            p["broker_idle_rss_mb"].as_f64().unwrap_or(0.0)
        ));
        if let Some(ts) = p["targets"].as_object() {
            for (name, t) in ts {
                let f = |k: &str| t[k].as_f64().map_or("".into(), |v| format!("{v:.2}"));
                md.push_str(&format!(
                    "| {name} | {:.0} | {} | {} | {} |\n",
                    t["rows_per_sec"].as_f64().unwrap_or(0.0),
                    f("ratio_to_direct_upstream_transport"),
                    f("ratio_to_direct_client_transport"),
                    t["broker_peak_rss_mb"]
                        .as_f64()
                        .map_or("".into(), |v| format!("{v:.1}")),
                ));
            }
        }
        md.push('\n');
    }
    md
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(if full() {
        "target/bench-report"
    } else {
        "target/bench-report-smoke"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let sts_up = full()
        && TcpStream::connect("127.0.0.1:10000").is_ok()
        && TcpStream::connect("127.0.0.1:10001").is_ok();
    let sts = match sts_up {
        true => Some(pass("spark_thrift_server", 10000, 10001, &dir).await),
        false => {
            eprintln!("[bench] no Spark Thrift Servers on 127.0.0.1:10000 and :10001: that pass is skipped");
            None
        }
    };
    let resp = responder::Responder::new(rows());
    let up_bin = resp.clone().serve_binary().await;
    let up_http = resp.clone().serve_http().await;
    let responder = pass("responder", up_bin.port(), up_http.port(), &dir).await;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let report = json!({
        "date": date,
        "rows": rows(),
        "rounds": rounds(),
        "spark_thrift_server": sts,
        "skipped": if sts_up { "" } else { "no Spark Thrift Servers on 10000/10001 (or smoke mode)" },
        "responder": responder,
    });
    std::fs::write(
        dir.join("bridges.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let md = markdown(&report);
    std::fs::write(dir.join("bridges.md"), &md).unwrap();
    println!("{md}");
}
