//! The load generator behind `kyuubi-broker bench`: it speaks TCLIService
//! itself (the broker's own client) to one or more JDBC URLs, side by side,
//! and reports latency percentiles and throughput per target.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::{ClientError, Hs2Client};
use crate::config::{Transport, UpstreamConfig, UpstreamSasl};
use crate::tcli::gen::TSessionHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One session per worker; each op: ExecuteStatement `select 1`,
    /// FetchResults, CloseOperation.
    Small,
    /// Each op: GetTables + GetColumns (each fetched and closed).
    Metadata,
    /// Each op: a large result (`--rows` × 2 columns) fetched to the end.
    Fetch,
    /// Each op: connect, OpenSession, CloseSession, disconnect.
    Connect,
    /// Each op: one GetInfo round trip (the smallest RPC).
    Ping,
}

#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    /// Total operations per target, shared by the workers.
    Iterations(u64),
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub limit: Limit,
    pub user: String,
    pub password: String,
    /// Fetch scenario: rows in the result.
    pub rows: u64,
    /// Fetch scenario: the statement; `{rows}` is replaced.
    pub fetch_sql: String,
    /// The CA (PEM) that `ssl=true` targets are verified against; without
    /// it, the system's roots.
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetReport {
    pub url: String,
    pub ops: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub ops_per_sec: f64,
    /// p50 and throughput relative to the first target.
    pub p50_ratio: f64,
    pub throughput_ratio: f64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub targets: Vec<TargetReport>,
}

/// The client config for a Hive JDBC URL (binary or `transportMode=http`;
/// `auth=noSasl` honoured; Kerberos URLs are refused). `ssl=true` speaks
/// TLS, verified against `tls_ca` (PEM) or the system's roots; a JKS
/// `sslTrustStore` cannot be read here, so it needs `tls_ca` instead.
pub fn target_for(url: &str, tls_ca: Option<&Path>) -> Result<UpstreamConfig, String> {
    let p = crate::connstr::parse(url).map_err(|e| format!("{url}: {e}"))?;
    if p.session_var("principal").is_some() {
        return Err(format!("{url}: Kerberos URLs are not supported by bench"));
    }
    let (host, port) = match p.authority.rsplit_once(':') {
        Some((h, port)) => (
            h.to_string(),
            port.parse::<u16>()
                .map_err(|_| format!("{url}: bad port '{port}'"))?,
        ),
        None if !p.authority.is_empty() => (p.authority.clone(), 10000),
        None => return Err(format!("{url}: no host")),
    };
    let http = p
        .session_var("transportMode")
        .is_some_and(|m| m.eq_ignore_ascii_case("http"));
    let nosasl = p
        .session_var("auth")
        .is_some_and(|a| a.eq_ignore_ascii_case("noSasl"));
    let path = p.session_var("httpPath").unwrap_or("cliservice");
    let mut cfg = UpstreamConfig::new(
        if http {
            Transport::Http
        } else {
            Transport::Binary
        },
        host,
        port,
    );
    if nosasl {
        cfg.sasl = UpstreamSasl::Nosasl;
    }
    cfg.http_path = path.trim_matches('/').to_string();
    if p.session_var("ssl")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        if tls_ca.is_none() && p.session_var("sslTrustStore").is_some() {
            return Err(format!(
                "jdbc:hive2://{}: sslTrustStore is a Java (JKS/PKCS12) trust store, which rustls cannot read: give the CA as PEM with --tls-ca (keytool -exportcert -rfc -keystore STORE -alias ALIAS)",
                p.authority
            ));
        }
        cfg.tls = true;
        cfg.tls_ca = tls_ca.map(Path::to_path_buf);
    }
    cfg.connect_timeout = Duration::from_secs(10);
    cfg.read_timeout = Duration::from_secs(600);
    Ok(cfg)
}

struct Worker {
    client: Option<Hs2Client>,
    session: Option<TSessionHandle>,
}

async fn connect(cfg: &UpstreamConfig, plan: &Plan) -> Result<Hs2Client, ClientError> {
    Hs2Client::connect(cfg, &plan.user, &plan.password).await
}

impl Worker {
    async fn ready(&mut self, cfg: &UpstreamConfig, plan: &Plan) -> Result<(), ClientError> {
        if plan.scenario == Scenario::Connect || self.session.is_some() {
            return Ok(());
        }
        let mut c = connect(cfg, plan).await?;
        self.session = Some(c.open_session().await?);
        self.client = Some(c);
        Ok(())
    }

    async fn op(&mut self, cfg: &UpstreamConfig, plan: &Plan) -> Result<(), ClientError> {
        if plan.scenario == Scenario::Connect {
            let mut c = connect(cfg, plan).await?;
            let s = c.open_session().await?;
            return c.close_session(s).await;
        }
        let (Some(c), Some(s)) = (self.client.as_mut(), self.session.as_ref()) else {
            return Err(ClientError::Application("no session".into()));
        };
        match plan.scenario {
            Scenario::Ping => c.get_info(s).await,
            Scenario::Small => {
                let op = c.execute(s, "select 1").await?;
                c.fetch(&op, 100).await?;
                c.close_operation(op).await
            }
            Scenario::Metadata => {
                for get_columns in [false, true] {
                    let op = if get_columns {
                        c.get_columns(s).await?
                    } else {
                        c.get_tables(s).await?
                    };
                    c.fetch(&op, 1000).await?;
                    c.close_operation(op).await?;
                }
                Ok(())
            }
            Scenario::Fetch => {
                let sql = plan.fetch_sql.replace("{rows}", &plan.rows.to_string());
                let op = c.execute(s, &sql).await?;
                loop {
                    let r = c.fetch(&op, 10_000).await?;
                    let n = r
                        .results
                        .as_ref()
                        .and_then(|rs| rs.columns.as_ref())
                        .and_then(|cols| cols.first())
                        .map_or(0, column_len);
                    // hasMoreRows is unreliable across servers: an empty batch ends it
                    if n == 0 {
                        break;
                    }
                }
                c.close_operation(op).await
            }
            Scenario::Connect => unreachable!("handled above"),
        }
    }
}

fn column_len(c: &crate::tcli::gen::TColumn) -> usize {
    use crate::tcli::gen::TColumn::*;
    match c {
        BoolVal(v) => v.values.len(),
        ByteVal(v) => v.values.len(),
        I16Val(v) => v.values.len(),
        I32Val(v) => v.values.len(),
        I64Val(v) => v.values.len(),
        DoubleVal(v) => v.values.len(),
        StringVal(v) => v.values.len(),
        BinaryVal(v) => v.values.len(),
    }
}

/// Runs the plan against one target.
pub async fn run_target(url: &str, plan: &Plan) -> Result<TargetReport, String> {
    let cfg = Arc::new(target_for(url, plan.tls_ca.as_deref())?);
    let plan = Arc::new(plan.clone());
    let remaining = Arc::new(AtomicU64::new(match plan.limit {
        Limit::Iterations(n) => n,
        Limit::Duration(_) => u64::MAX,
    }));
    let started = Instant::now();
    let deadline = match plan.limit {
        Limit::Duration(d) => Some(started + d),
        Limit::Iterations(_) => None,
    };
    let mut tasks = Vec::new();
    for _ in 0..plan.concurrency.max(1) {
        let (cfg, plan, remaining) = (cfg.clone(), plan.clone(), remaining.clone());
        tasks.push(tokio::spawn(async move {
            let mut w = Worker {
                client: None,
                session: None,
            };
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let t0 = Instant::now();
                let r = match w.ready(&cfg, &plan).await {
                    Ok(()) => w.op(&cfg, &plan).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        // start over with a fresh connection
                        w.client = None;
                        w.session = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            if let (Some(mut c), Some(s)) = (w.client.take(), w.session.take()) {
                let _ = c.close_session(s).await;
            }
            (lat, errors, first_error)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await.map_err(|e| format!("worker failed: {e}"))?;
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |q: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    Ok(TargetReport {
        url: url.to_string(),
        ops: lat.len() as u64,
        errors,
        p50_us: pct(0.50),
        p95_us: pct(0.95),
        p99_us: pct(0.99),
        max_us: lat.last().copied().unwrap_or(0),
        ops_per_sec: lat.len() as f64 / elapsed.max(1e-9),
        p50_ratio: 1.0,
        throughput_ratio: 1.0,
        first_error,
    })
}

/// Runs the plan against each target in turn (same plan, same machine).
pub async fn run(urls: &[String], plan: &Plan) -> Result<Report, String> {
    let mut targets = Vec::new();
    for u in urls {
        targets.push(run_target(u, plan).await?);
    }
    if let Some(first) = targets.first().cloned() {
        for t in &mut targets {
            t.p50_ratio = t.p50_us as f64 / first.p50_us.max(1) as f64;
            t.throughput_ratio = t.ops_per_sec / first.ops_per_sec.max(1e-9);
        }
    }
    Ok(Report {
        scenario: plan.scenario,
        concurrency: plan.concurrency,
        targets,
    })
}

pub fn format_report(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {:?}, concurrency {}",
        r.scenario, r.concurrency
    );
    let _ = writeln!(
        out,
        "{:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8}  url",
        "ops", "errors", "p50_us", "p95_us", "p99_us", "max_us", "ops/s", "p50×", "ops/s×"
    );
    for t in &r.targets {
        let _ = writeln!(
            out,
            "{:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>8.2} {:>8.2}  {}",
            t.ops,
            t.errors,
            t.p50_us,
            t.p95_us,
            t.p99_us,
            t.max_us,
            t.ops_per_sec,
            t.p50_ratio,
            t.throughput_ratio,
            t.url
        );
        if let Some(e) = &t.first_error {
            let _ = writeln!(out, "         first error: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jdbc_urls_become_client_targets() {
        let b = target_for("jdbc:hive2://127.0.0.1:10009/", None).unwrap();
        assert_eq!(
            (b.transport, b.port, b.sasl, b.tls),
            (Transport::Binary, 10009, UpstreamSasl::Plain, false)
        );
        let h = target_for(
            "jdbc:hive2://h:10010/default;transportMode=http;httpPath=/cli/x",
            None,
        )
        .unwrap();
        assert_eq!(
            (h.transport, h.host.as_str(), h.http_path.as_str()),
            (Transport::Http, "h", "cli/x")
        );
        let n = target_for("jdbc:hive2://h:1/;auth=noSasl", None).unwrap();
        assert_eq!(n.sasl, UpstreamSasl::Nosasl);
        assert!(target_for("jdbc:hive2://h:1/;principal=hive/_HOST@R", None).is_err());
        assert!(target_for("http://h:1/", None).is_err());
    }

    #[test]
    fn ssl_urls_speak_tls_with_a_pem_ca() {
        let ca = Path::new("/tmp/ca.pem");
        let t = target_for("jdbc:hive2://h:10009/;ssl=true", Some(ca)).unwrap();
        assert!(t.tls);
        assert_eq!(t.tls_ca.as_deref(), Some(ca));
        // no CA given: the system's roots
        let t = target_for("jdbc:hive2://h:10009/;ssl=TRUE", None).unwrap();
        assert!(t.tls && t.tls_ca.is_none());
        // the CA only applies to ssl=true targets
        let t = target_for("jdbc:hive2://h:10009/", Some(ca)).unwrap();
        assert!(!t.tls && t.tls_ca.is_none());
        let h = target_for(
            "jdbc:hive2://h:10010/;transportMode=http;httpPath=cliservice;ssl=true",
            Some(ca),
        )
        .unwrap();
        assert!(h.transport == Transport::Http && h.tls);
        // a JKS trust store cannot be read: the error says what to give
        let jks =
            "jdbc:hive2://h:10009/;ssl=true;sslTrustStore=/x/ts.jks;trustStorePassword=changeit";
        let e = target_for(jks, None).unwrap_err();
        assert!(
            e.contains("rustls cannot read") && e.contains("--tls-ca"),
            "{e}"
        );
        assert!(!e.contains("changeit"), "{e}");
        assert!(target_for(jks, Some(ca)).unwrap().tls);
    }
}
