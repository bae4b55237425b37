//! `kyuubi-broker stats`: the per-method latency table of a running broker,
//! read from its admin listener's `/status`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub struct StatsArgs {
    /// The broker's admin listener.
    #[arg(long, default_value = "127.0.0.1:10019")]
    pub admin: SocketAddr,
    /// Print the whole /status document as JSON instead.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: StatsArgs) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(crate::admin::fetch_status(a.admin)) {
        Ok(s) if a.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&s).expect("status serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(s) => {
            print!("{}", crate::admin::format_table(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
