use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kyuubi_broker::commands;
use kyuubi_broker::config::{Config, ConfigError};

/// Local connection broker and SQL gateway proxy for HiveServer2 / Kyuubi.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the listeners in the config file until SIGTERM or Ctrl-C.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    CheckConfig { file: PathBuf },
    /// Run a local emulator of the EMR Serverless Spark management API
    /// (tokens, Kyuubi service) and, optionally, of the token gateway.
    Emulate(commands::emulate::EmulateArgs),
    /// List, create, rotate or revoke Kyuubi gateway tokens.
    Token(commands::token::TokenArgs),
    /// Print a JDBC connection string.
    Connstr(commands::connstr::ConnstrArgs),
    /// Read a password on stdin and print its argon2 hash for a users file.
    HashPassword,
    /// Print the per-method latency table of a running broker.
    Stats(commands::stats::StatsArgs),
    /// Load generator: drive one or more JDBC URLs and compare them.
    Bench(commands::bench::BenchArgs),
}

/// The ordinary log on stderr (filtered by `KYUUBI_BROKER_LOG`) and, when
/// `audit` is set, every audit event, whatever that filter says, to the
/// audit file.
fn init_logs(format: LogFormat, audit: Option<kyuubi_broker::audit::AuditSink>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KYUUBI_BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Text => stderr.with_filter(filter).boxed(),
        LogFormat::Json => stderr.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit.map(kyuubi_broker::audit::layer))
        .init();
}

/// Both halves of config validation: the file, then every listener's
/// authenticator (users files and keytabs are read here).
fn load(path: &std::path::Path) -> Result<kyuubi_broker::Prepared, ConfigError> {
    let cfg = Config::load(path)?;
    if let Some(k) = cfg.krb5_conf() {
        // MIT krb5 reads it once per process: set before any thread starts
        std::env::set_var("KRB5_CONFIG", k);
    }
    kyuubi_broker::prepare(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` starts its logs once its config has named the audit file
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logs(cli.log_format, None);
    }
    match cli.command {
        Command::Emulate(a) => commands::emulate::run(a),
        Command::Token(a) => commands::token::run(a),
        Command::Connstr(a) => commands::connstr::run(a),
        Command::Stats(a) => commands::stats::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::HashPassword => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err()
                || line.trim_end_matches(['\r', '\n']).is_empty()
            {
                eprintln!("type the password on standard input");
                return ExitCode::from(64);
            }
            println!(
                "{}",
                kyuubi_broker::auth::hash_password(line.trim_end_matches(['\r', '\n']))
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match load(&file) {
            Ok(p) => {
                for w in p.warnings() {
                    eprintln!("warning: {w}");
                }
                let c = p.config();
                println!(
                    "{}: OK ({} listener(s), {} route(s))",
                    file.display(),
                    c.listeners.len(),
                    c.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid configuration: {e}");
                ExitCode::from(64)
            }
        },
        Command::Serve { config } => {
            let prepared = match load(&config) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("invalid configuration: {e}");
                    return ExitCode::from(64);
                }
            };
            let cfg = prepared.config();
            let audit = match &cfg.server.audit_log {
                None => None,
                Some(path) => match kyuubi_broker::audit::AuditSink::open(path) {
                    Ok(sink) => Some(sink),
                    Err(e) => {
                        eprintln!(
                            "invalid configuration: server.audit_log: cannot open {}: {e} (point it at a writable file, or remove it)",
                            path.display()
                        );
                        return ExitCode::from(64);
                    }
                },
            };
            init_logs(cli.log_format, audit);
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if cfg.server.worker_threads > 0 {
                rt.worker_threads(cfg.server.worker_threads);
            }
            let rt = rt.enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                // registered before any listener is up, so an early SIGTERM
                // still shuts down gracefully
                let shutdown = kyuubi_broker::shutdown_signal();
                let listeners = match kyuubi_broker::bind_all(prepared.config()).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                };
                kyuubi_broker::run(prepared, listeners, shutdown).await;
                ExitCode::SUCCESS
            })
        }
    }
}
