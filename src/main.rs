use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use kyuubi_broker::commands;
use kyuubi_broker::config::{Config, ConfigError};

/// Local connection broker and SQL gateway proxy for HiveServer2 / Kyuubi.
#[derive(Parser)]
#[command(
    name = "kyuubi-broker",
    version,
    about,
    after_help = "Example:\n  kyuubi-broker serve --config config/local.toml\n  beeline -u 'jdbc:hive2://127.0.0.1:10009/' -n \"$USER\" -p x"
)]
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
    #[command(
        after_help = "Example:\n  kyuubi-broker serve --config /etc/kyuubi-broker/broker.toml\n  KYUUBI_BROKER_LOG=debug kyuubi-broker --log-format json serve -c broker.toml"
    )]
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    #[command(
        after_help = "Example:\n  kyuubi-broker check-config /etc/kyuubi-broker/broker.toml"
    )]
    CheckConfig { file: PathBuf },
    /// Run a local emulator of the EMR Serverless Spark management API
    /// (tokens, Kyuubi service) and, optionally, of the token gateway.
    #[command(
        after_help = "Example:\n  KB_EMULATOR_ACCESS_KEY_SECRET=demo-secret kyuubi-broker emulate \\\n    --listen 127.0.0.1:18080 --access-key-id demo-ak \\\n    --workspace w-0123456789abcdef --kyuubi-service kb-0123456789abcdef0123456789abcdef"
    )]
    Emulate(commands::emulate::EmulateArgs),
    /// List, create, rotate or revoke Kyuubi gateway tokens.
    #[command(after_help = "Example:\n  kyuubi-broker token --config broker.toml list")]
    Token(commands::token::TokenArgs),
    /// Print a JDBC connection string.
    #[command(
        after_help = "Example:\n  kyuubi-broker connstr --local --config broker.toml\n  kyuubi-broker connstr --host gw.example.com --token-file token.txt --port 443 --ssl"
    )]
    Connstr(commands::connstr::ConnstrArgs),
    /// Read a password on stdin and print its argon2 hash for a users file.
    #[command(
        after_help = "Example:\n  printf '%s\\n' 'alice-pw' | kyuubi-broker hash-password | sed 's/^/alice:/' >> users"
    )]
    HashPassword,
    /// Print the per-method latency table of a running broker.
    #[command(after_help = "Example:\n  kyuubi-broker stats --admin 127.0.0.1:10019")]
    Stats(commands::stats::StatsArgs),
    /// Load generator: drive one or more JDBC URLs and compare them.
    #[command(
        after_help = "Example:\n  kyuubi-broker bench --target 'jdbc:hive2://127.0.0.1:10000/' \\\n    --target 'jdbc:hive2://127.0.0.1:10009/' --concurrency 4 --duration 10"
    )]
    Bench(commands::bench::BenchArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  kyuubi-broker completions bash > /etc/bash_completion.d/kyuubi-broker\n  kyuubi-broker completions zsh > \"${fpath[1]}/_kyuubi-broker\"\n  kyuubi-broker completions fish > ~/.config/fish/completions/kyuubi-broker.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per subcommand to --dir.
    #[command(
        after_help = "Example:\n  kyuubi-broker man | man -l -\n  kyuubi-broker man --dir /usr/local/share/man/man1"
    )]
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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
    // colour codes only for a person at a terminal: a file, a pipe or
    // journald gets plain text (and NO_COLOR is honoured)
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
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

/// The man page of the command line as defined here, so it cannot drift
/// from `--help`.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let cmd = Cli::command();
    let written = match dir {
        Some(d) => clap_mangen::generate_to(cmd, d),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the man page: {e}");
            ExitCode::from(1)
        }
    }
}

/// A completion script for `shell`. clap_complete's bash script spells
/// the states of a hyphenated program inconsistently (the dispatch loop
/// sets `kyuubi__broker__subcmd__serve`, the case arms test
/// `kyuubi__subcmd__broker__subcmd__serve`: clap-rs/clap#6421, open), so
/// no subcommand's flags would complete; the arms are respelled here.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kyuubi-broker", &mut script);
    let mut script = String::from_utf8(script).expect("completion scripts are UTF-8");
    if shell == clap_complete::Shell::Bash {
        script = script.replace("kyuubi__subcmd__broker", "kyuubi__broker");
    }
    print!("{script}");
    ExitCode::SUCCESS
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
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(dir.as_deref()),
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
