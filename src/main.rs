use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kyuubi_broker::config::Config;

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
    Emulate(EmulateArgs),
}

#[derive(clap::Args)]
struct EmulateArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
    #[arg(long)]
    access_key_id: String,
    /// Prefer the environment variable over the flag (the flag shows in `ps`).
    #[arg(long, env = "KB_EMULATOR_ACCESS_KEY_SECRET", hide_env_values = true)]
    access_key_secret: String,
    /// w-<16 hex>
    #[arg(long)]
    workspace: String,
    /// kb-<32 hex>
    #[arg(long)]
    kyuubi_service: String,
    #[arg(long, default_value = "cn-hangzhou")]
    region: String,
    /// Serve the token gateway front here.
    #[arg(long, requires = "gateway_upstream")]
    gateway_listen: Option<std::net::SocketAddr>,
    /// HTTP HiveServer2 behind the gateway, e.g. http://127.0.0.1:10001/cliservice
    #[arg(long, requires = "gateway_listen")]
    gateway_upstream: Option<String>,
}

fn is_hex_id(s: &str, prefix: &str, len: usize) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| h.len() == len && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn emulate(a: EmulateArgs) -> ExitCode {
    use kyuubi_broker::emulator::{serve_api, serve_gateway, Emulator, EmulatorConfig};
    if !is_hex_id(&a.workspace, "w-", 16) || !is_hex_id(&a.kyuubi_service, "kb-", 32) {
        eprintln!("--workspace must be w-<16 hex> and --kyuubi-service kb-<32 hex>");
        return ExitCode::from(64);
    }
    let upstream: Option<http::Uri> = match a.gateway_upstream.as_deref().map(str::parse) {
        None => None,
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            eprintln!("--gateway-upstream: {e}");
            return ExitCode::from(64);
        }
    };
    let emu = Emulator::new(EmulatorConfig {
        access_key_id: a.access_key_id,
        access_key_secret: kyuubi_broker::secret::Secret::new(a.access_key_secret),
        region: a.region,
        workspace: a.workspace,
        kyuubi_service: a.kyuubi_service,
    });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let api = match tokio::net::TcpListener::bind(a.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot bind {}: {e}", a.listen);
                return ExitCode::from(1);
            }
        };
        tracing::info!(addr = %a.listen, "management API emulator up");
        let gateway = match (a.gateway_listen, upstream) {
            (Some(addr), Some(up)) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, upstream = %up, "token gateway emulator up");
                    Some(tokio::spawn(serve_gateway(
                        l,
                        emu.clone(),
                        up,
                        shutdown_signal(),
                    )))
                }
                Err(e) => {
                    eprintln!("cannot bind {addr}: {e}");
                    return ExitCode::from(1);
                }
            },
            _ => None,
        };
        serve_api(api, emu, shutdown_signal()).await;
        if let Some(g) = gateway {
            g.abort();
        }
        ExitCode::SUCCESS
    })
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KYUUBI_BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Emulate(a) => emulate(a),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
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
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("invalid configuration: {e}");
                    return ExitCode::from(64);
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(async move {
                let listeners = match kyuubi_broker::bind_all(&cfg).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                };
                kyuubi_broker::run(cfg, listeners, shutdown_signal()).await;
                ExitCode::SUCCESS
            })
        }
    }
}
