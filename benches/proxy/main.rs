//! `cargo bench --bench proxy`: the broker's own cost, measured in one run
//! against the same upstream (an in-process responder that answers at once)
//! reached directly, through the broker (release build, its own process), and
//! through HAProxy in TCP mode as the L4 baseline. Then a 1M-row fetch, idle
//! sessions with the broker's RSS, and one realistic pass against the
//! fixture's Spark Thrift Server when it runs on 127.0.0.1:10000.
//!
//! Writes target/bench-report/{report.json, report.md, latency.png}.

mod png;
mod responder;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::loadgen::{self, Limit, Plan, Scenario, TargetReport};
use serde_json::json;

const BROKER: &str = env!("CARGO_BIN_EXE_kyuubi-broker");
/// Set by `cargo bench`; `cargo test --all-targets` runs this binary without
/// it, and then it only checks, quickly, that the harness works.
fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn pings() -> u64 {
    if full() {
        20_000
    } else {
        200
    }
}
const FETCH_ROWS: usize = 1_000_000;

/// A child process killed (by PID) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// HAProxy's path, installing Debian's package when missing (as root).
fn haproxy() -> Option<PathBuf> {
    let find = || {
        [
            "/usr/sbin/haproxy",
            "/usr/bin/haproxy",
            "/usr/local/sbin/haproxy",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-haproxy.sh");
    eprintln!("[bench] haproxy missing: running {}", script.display());
    let _ = Command::new(script).status();
    find()
}

fn plan(scenario: Scenario, limit: Limit, concurrency: usize) -> Plan {
    Plan {
        scenario,
        concurrency,
        limit,
        user: "bench".into(),
        password: "x".into(),
        rows: FETCH_ROWS as u64,
        fetch_sql: "select id, cast(id as string) from range({rows})".into(),
    }
}

async fn measure(url: &str, p: &Plan) -> TargetReport {
    let r = loadgen::run_target(url, p).await.expect("bench target");
    assert_eq!(r.errors, 0, "{url}: {:?}", r.first_error);
    eprintln!(
        "[bench] {:?} {url}: p50 {} µs, p99 {} µs, {:.0} ops/s",
        p.scenario, r.p50_us, r.p99_us, r.ops_per_sec
    );
    r
}

/// Warm up, then measure.
async fn latency(url: &str) -> TargetReport {
    measure(
        url,
        &plan(Scenario::Ping, Limit::Iterations(pings() / 10), 1),
    )
    .await;
    measure(url, &plan(Scenario::Ping, Limit::Iterations(pings()), 1)).await
}

/// Opens `sessions` sessions over `conns` binary connections to the broker
/// and returns its RSS while they sit idle.
async fn idle_sessions(addr: SocketAddr, conns: usize, sessions: usize, pid: u32) -> f64 {
    let cfg = loadgen::target_for(&format!("jdbc:hive2://{addr}/")).unwrap();
    let per = sessions / conns;
    let mut held = Vec::with_capacity(conns);
    for chunk in 0..conns.div_ceil(100) {
        let n = 100.min(conns - chunk * 100);
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..n {
            let cfg = cfg.clone();
            opening.spawn(async move {
                let mut c = Hs2Client::connect(&cfg, "idle", "x")
                    .await
                    .expect("connect");
                let mut s = Vec::new();
                for _ in 0..per {
                    s.push(c.open_session().await.expect("open session"));
                }
                (c, s)
            });
        }
        held.extend(opening.join_all().await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mb(pid);
    for (mut c, s) in held {
        for h in s {
            let _ = c.close_session(h).await;
        }
    }
    rss
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not meaningful here
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(if full() {
        "target/bench-report"
    } else {
        "target/bench-report-smoke"
    });
    std::fs::create_dir_all(&out_dir).unwrap();
    let resp = responder::Responder::new(FETCH_ROWS);
    let up_bin = resp.clone().serve_binary().await;
    let up_http = resp.clone().serve_http().await;
    let sts_up = full() && TcpStream::connect("127.0.0.1:10000").is_ok();

    // KB_BENCH_BROKER_THREADS=1 measures the single-threaded runtime
    let threads: usize = std::env::var("KB_BENCH_BROKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (b_bin, b_http, b_http2bin, b_sts, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut cfg = format!(
        r#"[server]
max_connections = 20000
# the idle-sessions pass is one user on one address holding thousands
max_connections_per_ip = 20000
max_connections_per_user = 20000
max_sessions_per_user = 20000
slow_rpc_threshold = "0s"
worker_threads = {threads}
[admin]
bind = "127.0.0.1:{admin}"
[[listener]]
name = "bin"
protocol = "binary"
bind = "127.0.0.1:{b_bin}"
route = "resp_bin"
auth = "none"
allow_any_user = true
[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:{b_http}"
route = "resp_http"
auth = "none"
allow_any_user = true
[[listener]]
name = "http2bin"
protocol = "http"
bind = "127.0.0.1:{b_http2bin}"
route = "resp_bin"
auth = "none"
allow_any_user = true
[routes.resp_bin.upstream]
transport = "binary"
host = "127.0.0.1"
port = {}
[routes.resp_http.upstream]
transport = "http"
host = "127.0.0.1"
port = {}
"#,
        up_bin.port(),
        up_http.port()
    );
    if sts_up {
        cfg.push_str(&format!(
            "[[listener]]\nname = \"sts\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:{b_sts}\"\nroute = \"sts\"\nauth = \"none\"\nallow_any_user = true\n[routes.sts.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 10000\n"
        ));
    }
    let cfg_path = out_dir.join("broker.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let broker = Proc(
        Command::new(BROKER)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .env("KYUUBI_BROKER_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the broker"),
    );
    let broker_pid = broker.0.id();
    wait_port(b_bin, "the broker");

    let ha_port = free_port();
    let ha = if full() { haproxy() } else { None }.map(|bin| {
        let conf = out_dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nfrontend fe\n  bind 127.0.0.1:{ha_port}\n  default_backend be\nbackend be\n  server s1 127.0.0.1:{}\n",
                up_bin.port()
            ),
        )
        .unwrap();
        let p = Proc(
            Command::new(bin)
                .args(["-f"])
                .arg(&conf)
                .arg("-db")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start haproxy"),
        );
        wait_port(ha_port, "haproxy");
        p
    });

    let direct = format!("jdbc:hive2://{up_bin}/");
    let via_broker = format!("jdbc:hive2://127.0.0.1:{b_bin}/");
    let via_ha = format!("jdbc:hive2://127.0.0.1:{ha_port}/");
    let http = |port: u16| {
        format!("jdbc:hive2://127.0.0.1:{port}/;transportMode=http;httpPath=cliservice")
    };

    // small-RPC latency (GetInfo round trips, one client)
    let lat_direct = latency(&direct).await;
    let lat_broker = latency(&via_broker).await;
    let lat_ha = match &ha {
        Some(_) => Some(latency(&via_ha).await),
        None => None,
    };
    let lat_http_direct = latency(&http(up_http.port())).await;
    let lat_http_broker = latency(&http(b_http)).await;
    let lat_http2bin = latency(&http(b_http2bin)).await;
    // the broker's own view: time it spent on GetInfo outside the upstream wait
    let own = kyuubi_broker::admin::fetch_status(format!("127.0.0.1:{admin}").parse().unwrap())
        .await
        .expect("broker /status");
    let own = own
        .methods
        .iter()
        .find(|m| m.method == "GetInfo")
        .map(|m| (m.overhead_p50_us, m.overhead_p99_us))
        .unwrap_or_default();

    // 1M rows × 2 columns, fetched in 10,000-row batches
    let fetch_plan = plan(
        Scenario::Fetch,
        Limit::Iterations(if full() { 7 } else { 1 }),
        1,
    );
    let f_direct = measure(&direct, &fetch_plan).await;
    let f_broker = measure(&via_broker, &fetch_plan).await;
    let f_ha = match &ha {
        Some(_) => Some(measure(&via_ha, &fetch_plan).await),
        None => None,
    };

    // idle sessions; the broker's file limit is the machine's (20,000 here),
    // so 10,000 sessions ride on 5,000 connections (two sessions each)
    let rss_base = rss_mb(broker_pid);
    let b_addr: SocketAddr = format!("127.0.0.1:{b_bin}").parse().unwrap();
    let scale = if full() { 1 } else { 10 };
    let rss_1k = idle_sessions(b_addr, 1_000 / scale, 1_000 / scale, broker_pid).await;
    let rss_10k = idle_sessions(b_addr, 5_000 / scale, 10_000 / scale, broker_pid).await;

    // one realistic pass against Spark Thrift Server
    let sts = if sts_up {
        let p = plan(Scenario::Small, Limit::Iterations(300), 1);
        measure(
            "jdbc:hive2://127.0.0.1:10000/",
            &plan(Scenario::Small, Limit::Iterations(30), 1),
        )
        .await;
        let d = measure("jdbc:hive2://127.0.0.1:10000/", &p).await;
        let b = measure(&format!("jdbc:hive2://127.0.0.1:{b_sts}/"), &p).await;
        Some((d, b))
    } else {
        eprintln!("[bench] no Spark Thrift Server on 127.0.0.1:10000: realistic pass skipped");
        None
    };
    drop(ha);
    drop(broker);

    let added = |t: &TargetReport, base: &TargetReport| {
        (
            t.p50_us as i64 - base.p50_us as i64,
            t.p99_us as i64 - base.p99_us as i64,
        )
    };
    let (b50, b99) = added(&lat_broker, &lat_direct);
    let ha_added = lat_ha.as_ref().map(|h| added(h, &lat_direct));
    let (h50, h99) = added(&lat_http_broker, &lat_http_direct);
    // rows/s from the median fetch, steadier than the mean of a few
    let rows_per_sec = |t: &TargetReport| FETCH_ROWS as f64 / (t.p50_us.max(1) as f64 / 1e6);
    let fetch_ratio = rows_per_sec(&f_broker) / rows_per_sec(&f_direct);
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s
                .lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string)))
            .unwrap_or_default()
    );
    let date = chrono_date();
    let report = json!({
        "date": date,
        "machine": machine,
        "broker_added_p50_us": b50,
        "broker_added_p99_us": b99,
        "haproxy_added_p50_us": ha_added.map(|a| a.0),
        "haproxy_added_p99_us": ha_added.map(|a| a.1),
        "broker_self_measured_overhead_p50_us": own.0,
        "broker_self_measured_overhead_p99_us": own.1,
        "http_broker_added_p50_us": h50,
        "http_broker_added_p99_us": h99,
        "fetch_throughput_ratio": fetch_ratio,
        "fetch_rows": FETCH_ROWS,
        "fetch_rows_per_sec_direct": rows_per_sec(&f_direct),
        "fetch_rows_per_sec_broker": rows_per_sec(&f_broker),
        "fetch_rows_per_sec_haproxy": f_ha.as_ref().map(rows_per_sec),
        "rss_mb_idle_broker": rss_base,
        "rss_mb_1k_idle_sessions": rss_1k,
        "rss_mb_10k_idle_sessions": rss_10k,
        "idle_10k_connections": 5_000 / scale,
        "latency": {
            "binary_direct": lat_direct,
            "binary_broker": lat_broker,
            "binary_haproxy": lat_ha,
            "http_direct": lat_http_direct,
            "http_broker": lat_http_broker,
            "http_client_to_binary_upstream_broker": lat_http2bin,
        },
        "spark_thrift_server_small": sts.as_ref().map(|(d, b)| json!({"direct": d, "broker": b})),
    });
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();

    let mut md = format!(
        "# kyuubi-broker benchmark\n\n{date}, {machine}. One client, GetInfo round trips ({} after {} warm-up) against an in-process responder that answers at once; the broker is the release build in its own process.\n\n| path | p50 µs | p99 µs | added p50 µs | added p99 µs |\n|---|---|---|---|---|\n",
        pings(),
        pings() / 10
    );
    let mut row = |name: &str, t: &TargetReport, base: &TargetReport| {
        let (a50, a99) = added(t, base);
        md.push_str(&format!(
            "| {name} | {} | {} | {a50} | {a99} |\n",
            t.p50_us, t.p99_us
        ));
    };
    row("binary, direct", &lat_direct, &lat_direct);
    row("binary, through the broker", &lat_broker, &lat_direct);
    if let Some(h) = &lat_ha {
        row("binary, through HAProxy (TCP)", h, &lat_direct);
    }
    row("HTTP, direct", &lat_http_direct, &lat_http_direct);
    row(
        "HTTP, through the broker (HTTP upstream)",
        &lat_http_broker,
        &lat_http_direct,
    );
    row(
        "HTTP client, broker to binary upstream (vs binary direct)",
        &lat_http2bin,
        &lat_direct,
    );
    md.push_str(&format!(
        "\n| {FETCH_ROWS} rows × 2 columns (median of 7) | rows/s |\n|---|---|\n| direct | {:.0} |\n| broker | {:.0} (×{fetch_ratio:.3}) |\n",
        rows_per_sec(&f_direct),
        rows_per_sec(&f_broker)
    ));
    if let Some(f) = &f_ha {
        md.push_str(&format!(
            "| HAProxy | {:.0} (×{:.3}) |\n",
            rows_per_sec(f),
            rows_per_sec(f) / rows_per_sec(&f_direct)
        ));
    }
    md.push_str(&format!(
        "\nThe broker's own measure of its overhead (RPC time minus upstream wait, all GetInfo calls, binary and HTTP): p50 {} µs, p99 {} µs. The rest of the added latency is the extra process hop (two more socket round trips and wake-ups), which HAProxy pays too.\n",
        own.0, own.1
    ));
    md.push_str(&format!(
        "\nBroker RSS: {rss_base:.1} MB idle; {rss_1k:.1} MB with {} idle sessions ({} connections); {rss_10k:.1} MB with {} idle sessions ({} connections, two sessions each: the machine allows 20,000 open files).\n",
        1_000 / scale,
        1_000 / scale,
        10_000 / scale,
        5_000 / scale
    ));
    if let Some((d, b)) = &sts {
        md.push_str(&format!(
            "\nSpark Thrift Server 4.0.1, `select 1` + fetch + close (300 ops): direct p50 {} µs / p99 {} µs; through the broker p50 {} µs / p99 {} µs.\n",
            d.p50_us, d.p99_us, b.p50_us, b.p99_us
        ));
    }
    md.push_str("\n`latency.png`: one group per path (binary direct, broker, HAProxy; HTTP direct, broker); light bar p50, dark bar p99, labels in µs.\n");
    std::fs::write(out_dir.join("report.md"), &md).unwrap();

    let mut groups = vec![("bd", &lat_direct), ("bb", &lat_broker)];
    if let Some(h) = &lat_ha {
        groups.push(("bh", h));
    }
    groups.push(("hd", &lat_http_direct));
    groups.push(("hb", &lat_http_broker));
    std::fs::write(out_dir.join("latency.png"), chart(&groups)).unwrap();
    println!("{md}");
    println!("written: {}", out_dir.display());
}

fn chart(groups: &[(&str, &TargetReport)]) -> Vec<u8> {
    let (w, h) = (120 * groups.len() + 40, 400);
    let mut c = png::Canvas::new(w, h);
    let top = groups
        .iter()
        .map(|(_, t)| t.p99_us)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let base = h - 30;
    c.rect(20, base, w - 40, 2, [0, 0, 0]);
    for (i, (name, t)) in groups.iter().enumerate() {
        let x = 40 + i * 120;
        let tint: [u8; 3] = if name.starts_with('b') {
            [70, 110, 200]
        } else {
            [220, 120, 40]
        };
        let light = tint.map(|v| v.saturating_add(70));
        for (j, (v, col)) in [(t.p50_us, light), (t.p99_us, tint)]
            .into_iter()
            .enumerate()
        {
            let bh = ((v as f64 / top) * (h - 80) as f64) as usize;
            c.rect(x + j * 40, base - bh, 34, bh, col);
            c.digits(x + j * 40, base - bh - 14, &v.to_string(), 2, [0, 0, 0]);
        }
    }
    c.png()
}

fn chrono_date() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
