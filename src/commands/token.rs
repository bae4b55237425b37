//! `kyuubi-broker token list|create|rotate|revoke`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cloud::client::{ApiClient, Endpoint};
use crate::cloud::credentials::Chain;
use crate::cloud::request::KyuubiRef;
use crate::config::Config;
use crate::tokens::{Holder, Lifecycle, StateLock, TokenError, TokenState};

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub action: TokenAction,
    /// Read these settings from the `[tokens]` section of a config file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Management API endpoint, e.g. http://127.0.0.1:18080 (default: the regional one).
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    #[arg(long, global = true)]
    pub region: Option<String>,
    #[arg(long, global = true)]
    pub workspace: Option<String>,
    #[arg(long, global = true)]
    pub kyuubi_service: Option<String>,
    /// The broker's token state file.
    #[arg(long, global = true)]
    pub state: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum TokenAction {
    /// List the gateway's tokens (values are masked by the API).
    #[command(
        after_help = "Example:\n  ALIBABA_CLOUD_ACCESS_KEY_ID=... ALIBABA_CLOUD_ACCESS_KEY_SECRET=... \\\n    kyuubi-broker token --config broker.toml list"
    )]
    List,
    /// Create a token and make it the broker's active one (needs --state).
    #[command(
        after_help = "Example:\n  kyuubi-broker token --config broker.toml create --expire-days 7"
    )]
    Create {
        /// Auto-expiry in days; 0 for none.
        #[arg(long, default_value_t = 7)]
        expire_days: u32,
    },
    /// Replace the active token; delete the old one after the grace period.
    #[command(
        after_help = "Example:\n  kyuubi-broker token --config broker.toml rotate --grace 10m"
    )]
    Rotate {
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        grace: Duration,
        #[arg(long, default_value_t = 7)]
        expire_days: u32,
    },
    /// Delete a token, after showing what it is and what stops working.
    #[command(
        after_help = "Example:\n  kyuubi-broker token --config broker.toml revoke <token-id>"
    )]
    Revoke {
        token_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Allow revoking the broker's active token.
        #[arg(long)]
        force: bool,
    },
}

struct Resolved {
    endpoint: Endpoint,
    kref: KyuubiRef,
    state: Option<PathBuf>,
}

fn resolve(a: &TokenArgs) -> Result<Resolved, String> {
    let file = match &a.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?.tokens,
        None => None,
    };
    let pick = |flag: &Option<String>, from: Option<String>, name: &str| {
        flag.clone()
            .or(from)
            .ok_or_else(|| format!("--{name} is required (or a --config with a [tokens] section)"))
    };
    let region = pick(&a.region, file.as_ref().map(|t| t.region.clone()), "region")?;
    let endpoint = match a
        .endpoint
        .clone()
        .or(file.as_ref().and_then(|t| t.endpoint.clone()))
    {
        Some(e) => Endpoint::parse(&e)?,
        None => Endpoint::regional(&region, file.as_ref().is_some_and(|t| t.vpc)),
    };
    Ok(Resolved {
        endpoint,
        kref: KyuubiRef {
            workspace: pick(
                &a.workspace,
                file.as_ref().map(|t| t.workspace.clone()),
                "workspace",
            )?,
            kyuubi_service: pick(
                &a.kyuubi_service,
                file.as_ref().map(|t| t.kyuubi_service.clone()),
                "kyuubi-service",
            )?,
            region,
        },
        state: a.state.clone().or(file.and_then(|t| t.state_file)),
    })
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(1)
}

fn when(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms > 0 => crate::cloud::client::utc_timestamp(
            std::time::UNIX_EPOCH + Duration::from_millis(ms as u64),
        ),
        _ => "-".into(),
    }
}

pub fn run(a: TokenArgs) -> ExitCode {
    let r = match resolve(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let cred = match Chain::from_process().resolve().await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let api = ApiClient::new(r.endpoint.clone(), cred);
        match a.action {
            TokenAction::List => list(&api, &r).await,
            TokenAction::Create { expire_days } => {
                rotate(api, &r, Duration::ZERO, expire_days, true).await
            }
            TokenAction::Rotate { grace, expire_days } => {
                rotate(api, &r, grace, expire_days, false).await
            }
            TokenAction::Revoke {
                token_id,
                yes,
                force,
            } => revoke(&api, &r, &token_id, yes, force).await,
        }
    })
}

async fn list(api: &ApiClient, r: &Resolved) -> ExitCode {
    let state = r.state.as_ref().and_then(|p| TokenState::load(p).ok());
    let tokens = match api.list_kyuubi_tokens(&r.kref).await {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    println!(
        "{:<22} {:<18} {:<20} {:<20} {:<20} NAME",
        "TOKEN ID", "TOKEN", "CREATED", "EXPIRES", "LAST USED"
    );
    for t in tokens {
        let mark = match &state {
            Some(s) if s.active.as_ref().is_some_and(|a| a.token_id == t.token_id) => " (active)",
            Some(s) if s.retiring.iter().any(|x| x.token.token_id == t.token_id) => " (retiring)",
            _ => "",
        };
        println!(
            "{:<22} {:<18} {:<20} {:<20} {:<20} {}{mark}",
            t.token_id,
            t.token.unwrap_or_default(),
            when(t.create_time),
            when(t.expire_time),
            when(t.last_used_time),
            t.name.unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}

async fn rotate(
    api: ApiClient,
    r: &Resolved,
    grace: Duration,
    expire_days: u32,
    create_only: bool,
) -> ExitCode {
    let Some(state) = r.state.clone() else {
        return fail("--state FILE is required: the broker must record the token value, which the API never shows again");
    };
    let expire = (expire_days > 0).then_some(expire_days as i32);
    let mut lc = match Lifecycle::open(api, r.kref.clone(), state, expire, Holder::Command) {
        Ok(lc) => lc,
        Err(e) => return fail(e),
    };
    if create_only && lc.state().active.is_some() {
        return fail("a token is already active; use `token rotate` to replace it");
    }
    match lc.reconcile(grace).await {
        Ok(rep) if rep != Default::default() => eprintln!("reconciled earlier state: {rep:?}"),
        Ok(_) => {}
        Err(e) => return fail(e),
    }
    let id = match lc.rotate(grace).await {
        Ok(id) => id,
        Err(e) => return fail(e),
    };
    println!("{id}");
    let pending: Vec<String> = lc
        .state()
        .retiring
        .iter()
        .map(|x| x.token.token_id.clone())
        .collect();
    if !pending.is_empty() {
        eprintln!(
            "active token is now {id}; deleting {} after {grace:?}",
            pending.join(", ")
        );
        tokio::time::sleep(grace).await;
        if let Err(e) = retire(&mut lc).await {
            return fail(format!(
                "{e} (the old token stays recorded and is deleted on the next run)"
            ));
        }
    }
    ExitCode::SUCCESS
}

async fn retire(lc: &mut Lifecycle) -> Result<(), TokenError> {
    for id in lc.retire_due().await? {
        eprintln!("deleted {id}");
    }
    Ok(())
}

async fn revoke(api: &ApiClient, r: &Resolved, token_id: &str, yes: bool, force: bool) -> ExitCode {
    // state first: what is it, and is it in use?
    let t = match api.get_kyuubi_token(&r.kref, token_id).await {
        Ok(t) => t,
        Err(e) if e.is_not_found() => {
            return fail(format!(
                "token {token_id} does not exist; nothing to revoke"
            ))
        }
        Err(e) => return fail(e),
    };
    let state_path = r.state.clone();
    let recorded = |p: &PathBuf| {
        TokenState::load(p).ok().filter(|s| {
            s.active.as_ref().is_some_and(|a| a.token_id == token_id)
                || s.retiring.iter().any(|x| x.token.token_id == token_id)
        })
    };
    // a token the state records is revoked under the state's lock (the
    // state is rewritten); any other one needs no lock, even while a
    // broker runs
    let _lock = match state_path.as_ref().filter(|p| recorded(p).is_some()) {
        Some(p) => match StateLock::acquire(p, Holder::Command) {
            Ok(l) => Some(l),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let state = state_path.as_ref().and_then(|p| TokenState::load(p).ok());
    let active = state
        .as_ref()
        .and_then(|s| s.active.as_ref())
        .is_some_and(|a| a.token_id == token_id);
    eprintln!(
        "token {token_id} \"{}\" ({}), created {}, last used {}, expires {}",
        t.name.clone().unwrap_or_default(),
        t.token.clone().unwrap_or_default(),
        when(t.create_time),
        when(t.last_used_time),
        when(t.expire_time)
    );
    if active {
        eprintln!("impact: this is the broker's ACTIVE token; every upstream request fails until the next rotation");
        if !force {
            return fail("refusing to revoke the active token without --force (rotate first)");
        }
    } else {
        eprintln!("impact: every client or gateway URL using this token is refused from now on");
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return fail(
                "no confirmation: pass --yes, or run in a terminal to confirm; nothing was changed",
            );
        }
        eprint!("type the token id to confirm: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if line.trim() != token_id {
            return fail("not confirmed; nothing was changed");
        }
    }
    if let Err(e) = api.delete_kyuubi_token(&r.kref, token_id).await {
        return fail(e);
    }
    if let (Some(p), Some(mut s)) = (state_path, state) {
        if active {
            s.active = None;
        }
        s.retiring.retain(|x| x.token.token_id != token_id);
        if let Err(e) = s.save(&p) {
            return fail(e);
        }
    }
    println!("revoked {token_id}");
    ExitCode::SUCCESS
}
