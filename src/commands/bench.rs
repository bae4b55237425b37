//! `kyuubi-broker bench`: the load generator, for the broker, a direct
//! upstream or any other HiveServer2/Kyuubi gateway, side by side.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::loadgen::{self, Limit, Plan, Scenario};

#[derive(Args)]
pub struct BenchArgs {
    /// A Hive JDBC URL (binary or transportMode=http); repeat to compare.
    /// Ratios are against the first.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    #[arg(long, default_value = "bench")]
    pub user: String,
    #[arg(
        long,
        default_value = "x",
        env = "KYUUBI_BENCH_PASSWORD",
        hide_env_values = true
    )]
    pub password: String,
    #[arg(long, value_enum, default_value = "small")]
    pub scenario: Scenario,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// How long to run each target, e.g. 10 (seconds).
    #[arg(long, conflicts_with = "iterations")]
    pub duration: Option<f64>,
    /// Operations per target, shared by the workers.
    #[arg(long)]
    pub iterations: Option<u64>,
    /// Fetch scenario: rows in the result.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Fetch scenario: the statement; {rows} is replaced.
    #[arg(
        long,
        default_value = "select id, cast(id as string) from range({rows})"
    )]
    pub fetch_sql: String,
    /// The CA certificate(s), PEM, that `ssl=true` targets are verified
    /// against (Hive JDBC's JKS sslTrustStore cannot be read); without it,
    /// the system's roots.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> ExitCode {
    let limit = match (a.duration, a.iterations) {
        (Some(d), _) if d > 0.0 => Limit::Duration(Duration::from_secs_f64(d)),
        (_, Some(n)) if n > 0 => Limit::Iterations(n),
        _ => {
            eprintln!("give --duration SECONDS or --iterations N (above zero)");
            return ExitCode::from(64);
        }
    };
    for t in &a.targets {
        // a CA file that cannot be read is refused here, not once per operation
        let checked = loadgen::target_for(t, a.tls_ca.as_deref())
            .and_then(|cfg| cfg.client_tls("target").map_err(|e| e.to_string()));
        if let Err(e) = checked {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    }
    let plan = Plan {
        scenario: a.scenario,
        concurrency: a.concurrency.max(1),
        limit,
        user: a.user,
        password: a.password,
        rows: a.rows,
        fetch_sql: a.fetch_sql,
        tls_ca: a.tls_ca,
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let report = match rt.block_on(loadgen::run(&a.targets, &plan)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench failed: {e}");
            return ExitCode::from(1);
        }
    };
    print!("{}", loadgen::format_report(&report));
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report).expect("report serializes");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    if report.targets.iter().any(|t| t.ops == 0) {
        eprintln!("a target completed no operation");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
