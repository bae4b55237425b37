//! `cargo bench --bench bi`: what the broker does for BI tools, measured in
//! one run against the fixture's real Spark Thrift Server (127.0.0.1:10000),
//! direct and through the broker (release build, its own process):
//!
//! 1. A DBeaver-style metadata refresh: GetTables of one database, then
//!    GetColumns of each of its 200 tables (each fetched and closed). Direct,
//!    through the broker the first time (cold: recorded) and again (warm:
//!    answered from the metadata cache).
//! 2. connect + OpenSession + CloseSession, direct and through warm
//!    sessions: paced (one every 25 ms, as a BI pool opening connections
//!    while users arrive) and back to back (the refill is then the limit).
//! 3. The first OpenSession after a Spark Thrift Server starts (full mode
//!    only: it starts its own instance twice through `scripts/fixture.sh`).
//!
//! Without a server on 10000 it says so and does nothing. Under
//! `cargo test --all-targets` (no `--bench`) it runs a small pass.
//! Writes target/bench-report/bi.{md,json}.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamConfig};
use kyuubi_broker::tcli::gen::{
    TColumn, TGetColumnsReq, TGetColumnsResp, TGetTablesReq, TGetTablesResp, TSessionHandle,
};
use serde_json::json;

#[path = "common/mod.rs"]
mod common;

use common::{free_port, serve_broker, wait_port, Proc};

const DB: &str = "kb_bench_bi";

fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn tables() -> usize {
    if full() {
        200
    } else {
        5
    }
}

fn connects() -> usize {
    if full() {
        300
    } else {
        5
    }
}

/// A broker process in front of 127.0.0.1:`upstream` with these route keys.
fn broker(upstream: u16, route: &str, dir: &Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let cfg = format!(
        "[server]\nmax_sessions_per_user = 4096\n[[listener]]\nname = \"bin\"\nprotocol = \"binary\"\n\
         bind = \"127.0.0.1:{port}\"\nroute = \"sts\"\nauth = \"none\"\nallow_any_user = true\n\
         [routes.sts]\n{route}\n[routes.sts.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = {upstream}\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let p = serve_broker(&path);
    wait_port(port, "the broker");
    (p, port)
}

async fn connect(port: u16) -> Hs2Client {
    let mut cfg = UpstreamConfig::new(Transport::Binary, "127.0.0.1", port);
    cfg.read_timeout = Duration::from_secs(120);
    Hs2Client::connect(&cfg, "bench", "x")
        .await
        .expect("connect")
}

fn rows(c: &TColumn) -> usize {
    match c {
        TColumn::StringVal(v) => v.values.len(),
        TColumn::I32Val(v) => v.values.len(),
        _ => 0,
    }
}

/// GetTables of the database: how many tables it lists.
async fn table_count(c: &mut Hs2Client, s: &TSessionHandle) -> usize {
    let req = TGetTablesReq::new(
        s.clone(),
        None,
        Some(DB.to_string()),
        Some("%".to_string()),
        None,
    );
    let resp: TGetTablesResp = c.call("GetTables", &req).await.unwrap();
    let op = resp.operation_handle.unwrap();
    let page = c.fetch(&op, 10_000).await.unwrap();
    c.close_operation(op).await.unwrap();
    page.results
        .and_then(|r| r.columns)
        .map_or(0, |cols| rows(&cols[2]))
}

/// The database of `tables()` tables (views: metastore entries, quick to
/// make), made when it is missing or has another count.
async fn prepare(port: u16) {
    let mut c = connect(port).await;
    let s = c.open_session().await.unwrap();
    let have = table_count(&mut c, &s).await;
    if have != tables() {
        eprintln!("[bi] making {DB} with {} tables", tables());
        let mut sql = vec![
            format!("drop database if exists {DB} cascade"),
            format!("create database {DB}"),
        ];
        for i in 0..tables() {
            sql.push(format!(
                "create view {DB}.v{i:03} as select {i} as id, 'x' as name, cast(1.5 as decimal(10,2)) as amount, current_date() as day"
            ));
        }
        for q in sql {
            let op = c.execute(&s, &q).await.unwrap();
            c.close_operation(op).await.unwrap();
        }
    }
    c.close_session(s).await.unwrap();
}

/// One refresh: GetTables of the database, GetColumns of each table.
async fn sweep(port: u16) -> Duration {
    let mut c = connect(port).await;
    let s = c.open_session().await.unwrap();
    let t0 = Instant::now();
    let n = table_count(&mut c, &s).await;
    assert_eq!(n, tables(), "GetTables saw every table");
    for i in 0..tables() {
        let req = TGetColumnsReq::new(
            s.clone(),
            None,
            Some(DB.to_string()),
            Some(format!("v{i:03}")),
            Some("%".to_string()),
        );
        let resp: TGetColumnsResp = c.call("GetColumns", &req).await.unwrap();
        let op = resp.operation_handle.unwrap();
        let page = c.fetch(&op, 1000).await.unwrap();
        let cols = page.results.and_then(|r| r.columns).unwrap();
        assert_eq!(rows(&cols[3]), 4, "four columns in v{i:03}");
        c.close_operation(op).await.unwrap();
    }
    let t = t0.elapsed();
    c.close_session(s).await.unwrap();
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// connect + OpenSession + CloseSession, `n` times, `pause` between.
async fn connects_to(port: u16, n: usize, pause: Duration) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut c = connect(port).await;
        let s = c.open_session().await.unwrap();
        c.close_session(s).await.unwrap();
        drop(c);
        out.push(t0.elapsed());
        tokio::time::sleep(pause).await;
    }
    out
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn fixture(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fixture.sh");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("fixture.sh runs");
    assert!(
        out.status.success(),
        "fixture.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The first and second OpenSession after a fresh Spark Thrift Server is
/// up: direct, or through a broker with warm sessions.
async fn first_open(through_broker: bool, dir: &Path) -> (Duration, Duration) {
    let port = 10012u16;
    fixture(&["stop", "sts-bench-fresh"]);
    fixture(&[
        "start",
        "sts-bench-fresh",
        "--mode",
        "binary",
        "--port",
        &port.to_string(),
    ]);
    let (b, target) = match through_broker {
        true => {
            let (p, bp) = broker(port, "cache = false\nwarm_sessions = 2", dir, "fresh");
            (Some(p), bp)
        }
        false => (None, port),
    };
    let mut times = Vec::new();
    for _ in 0..2 {
        let t0 = Instant::now();
        let mut c = connect(target).await;
        let s = c.open_session().await.unwrap();
        times.push(t0.elapsed());
        c.close_session(s).await.unwrap();
        // the broker's refill has time to finish, as between two users
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    drop(b);
    fixture(&["stop", "sts-bench-fresh"]);
    (times[0], times[1])
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    if TcpStream::connect("127.0.0.1:10000").is_err() {
        println!("bi: skipped, no Spark Thrift Server on 127.0.0.1:10000 (scripts/fixture.sh start sts-binary)");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(if full() {
        "target/bench-report"
    } else {
        "target/bench-report-smoke"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    prepare(10000).await;

    // 1. metadata sweep
    let runs = if full() { 5 } else { 1 };
    let _ = sweep(10000).await; // the server's own first-time costs, not counted
    let mut direct = Vec::new();
    for _ in 0..runs {
        direct.push(sweep(10000).await);
    }
    let direct = median(direct);
    let (cached, cport) = broker(10000, "cache = true\ncache_ttl = \"1h\"", &dir, "cache");
    let cold = sweep(cport).await;
    let mut warm = Vec::new();
    for _ in 0..runs {
        warm.push(sweep(cport).await);
    }
    let warm = median(warm);
    drop(cached);

    // 2. connect + open + close
    let n = connects();
    let pause = Duration::from_millis(25);
    let mut d_paced = connects_to(10000, n, pause).await;
    let (w, wport) = broker(10000, "cache = false\nwarm_sessions = 4", &dir, "warm");
    // the first of its kind teaches the broker; not counted
    let _ = connects_to(wport, 1, Duration::from_millis(500)).await;
    let mut w_paced = connects_to(wport, n, pause).await;
    let mut d_b2b = connects_to(10000, n, Duration::ZERO).await;
    let _ = connects_to(wport, 1, Duration::from_millis(500)).await;
    let mut w_b2b = connects_to(wport, n, Duration::ZERO).await;
    drop(w);

    // 3. the first OpenSession after a server starts
    let first = if full() {
        let direct = first_open(false, &dir).await;
        let via = first_open(true, &dir).await;
        Some((direct, via))
    } else {
        None
    };

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let mut md = format!(
        "# BI acceleration, {date}\n\nAgainst the fixture's Spark Thrift Server 4.0.1 (127.0.0.1:10000, binary), one client, the broker as a release build in its own process.\n\n\
         ## Metadata refresh\n\nGetTables of one database, then GetColumns of each of its {} tables, each fetched and closed (as DBeaver refreshes a schema); median of {runs}.\n\n\
         | path | time ms | × direct (speed-up) |\n|---|---|---|\n| direct | {:.1} | 1.0 |\n| broker, cold (recorded) | {:.1} | {:.2} |\n| broker, warm (metadata cache) | {:.1} | {:.1} |\n",
        tables(),
        direct.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e3,
        ratio(direct, cold),
        warm.as_secs_f64() * 1e3,
        ratio(direct, warm),
    );
    md.push_str(&format!(
        "\n## connect + OpenSession + CloseSession\n\n{n} in a row, one client; paced: 25 ms between connects (not counted), back to back: none. Through the broker with `warm_sessions = 4`.\n\n\
         | path | p50 µs | p99 µs | p50 speed-up |\n|---|---|---|---|\n\
         | direct, paced | {} | {} | 1.0 |\n| broker warm, paced | {} | {} | {:.1} |\n| direct, back to back | {} | {} | 1.0 |\n| broker warm, back to back | {} | {} | {:.1} |\n",
        us(pct(&mut d_paced, 0.5)), us(pct(&mut d_paced, 0.99)),
        us(pct(&mut w_paced, 0.5)), us(pct(&mut w_paced, 0.99)), ratio(pct(&mut d_paced, 0.5), pct(&mut w_paced, 0.5)),
        us(pct(&mut d_b2b, 0.5)), us(pct(&mut d_b2b, 0.99)),
        us(pct(&mut w_b2b, 0.5)), us(pct(&mut w_b2b, 0.99)), ratio(pct(&mut d_b2b, 0.5), pct(&mut w_b2b, 0.5)),
    ));
    if let Some(((d1, d2), (b1, b2))) = first {
        md.push_str(&format!(
            "\n## The first OpenSession after a Spark Thrift Server starts\n\nA fresh instance (port 10012) each time; connect + OpenSession of the first and the second client, 3 s apart.\n\n\
             | path | first ms | second ms |\n|---|---|---|\n| direct | {:.1} | {:.1} |\n| broker, warm_sessions = 2 | {:.1} | {:.1} |\n",
            d1.as_secs_f64() * 1e3, d2.as_secs_f64() * 1e3, b1.as_secs_f64() * 1e3, b2.as_secs_f64() * 1e3
        ));
    }
    print!("{md}");
    std::fs::write(dir.join("bi.md"), &md).unwrap();
    let j = json!({
        "date": date,
        "metadata_sweep_ms": {"tables": tables(), "direct": direct.as_secs_f64()*1e3, "broker_cold": cold.as_secs_f64()*1e3, "broker_warm": warm.as_secs_f64()*1e3},
        "connect_us": {
            "direct_paced_p50": us(pct(&mut d_paced, 0.5)), "warm_paced_p50": us(pct(&mut w_paced, 0.5)),
            "direct_paced_p99": us(pct(&mut d_paced, 0.99)), "warm_paced_p99": us(pct(&mut w_paced, 0.99)),
            "direct_b2b_p50": us(pct(&mut d_b2b, 0.5)), "warm_b2b_p50": us(pct(&mut w_b2b, 0.5)),
        },
        "first_open_ms": first.map(|((d1, d2), (b1, b2))| json!({"direct_first": d1.as_secs_f64()*1e3, "direct_second": d2.as_secs_f64()*1e3, "broker_first": b1.as_secs_f64()*1e3, "broker_second": b2.as_secs_f64()*1e3})),
    });
    std::fs::write(
        dir.join("bi.json"),
        serde_json::to_string_pretty(&j).unwrap(),
    )
    .unwrap();
}
