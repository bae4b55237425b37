//! `kyuubi-broker emulate`: the management-API emulator and token gateway.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct EmulateArgs {
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    #[arg(long)]
    pub access_key_id: String,
    /// Prefer the environment variable over the flag (the flag shows in `ps`).
    #[arg(long, env = "KB_EMULATOR_ACCESS_KEY_SECRET", hide_env_values = true)]
    pub access_key_secret: String,
    /// w-<16 hex>
    #[arg(long)]
    pub workspace: String,
    /// kb-<32 hex>
    #[arg(long)]
    pub kyuubi_service: String,
    #[arg(long, default_value = "cn-hangzhou")]
    pub region: String,
    /// Serve the token gateway front here.
    #[arg(long, requires = "gateway_upstream")]
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// HTTP HiveServer2 behind the gateway, e.g. http://127.0.0.1:10001/cliservice
    #[arg(long, requires = "gateway_listen")]
    pub gateway_upstream: Option<String>,
    /// Serve the gateway over HTTPS with this PEM certificate chain (as the
    /// public endpoint on port 443 does).
    #[arg(long, requires_all = ["gateway_listen", "gateway_tls_key"])]
    pub gateway_tls_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "gateway_tls_cert")]
    pub gateway_tls_key: Option<std::path::PathBuf>,
}

pub fn run(a: EmulateArgs) -> ExitCode {
    use crate::cloud::request::{is_kyuubi_service_id, is_workspace_id};
    use crate::emulator::{serve_api, serve_gateway, Emulator, EmulatorConfig};
    if !is_workspace_id(&a.workspace) || !is_kyuubi_service_id(&a.kyuubi_service) {
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
    let tls = match (a.gateway_tls_cert, a.gateway_tls_key) {
        (Some(cert), Some(key)) => {
            let files = crate::tls::server::ListenerTls {
                cert,
                key,
                client_ca: None,
                client_cert: None,
                identity: None,
            };
            match crate::tls::server::ServerTls::new(&files, true) {
                Ok(t) => Some(std::sync::Arc::new(t)),
                Err(e) => {
                    eprintln!("--gateway-tls-cert/--gateway-tls-key: {e}");
                    return ExitCode::from(64);
                }
            }
        }
        _ => None,
    };
    let emu = Emulator::new(EmulatorConfig {
        access_key_id: a.access_key_id,
        access_key_secret: crate::secret::Secret::new(a.access_key_secret),
        region: a.region,
        workspace: a.workspace,
        kyuubi_service: a.kyuubi_service,
    });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let trigger = stop.clone();
        let shutdown = crate::shutdown_signal();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
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
                    let https = tls.is_some();
                    tracing::info!(%addr, upstream = %up, https, "token gateway emulator up");
                    Some(tokio::spawn(serve_gateway(
                        l,
                        emu.clone(),
                        up,
                        tls,
                        stop.clone().cancelled_owned(),
                    )))
                }
                Err(e) => {
                    eprintln!("cannot bind {addr}: {e}");
                    return ExitCode::from(1);
                }
            },
            _ => None,
        };
        serve_api(api, emu, stop.cancelled_owned()).await;
        if let Some(g) = gateway {
            g.abort();
        }
        ExitCode::SUCCESS
    })
}
