//! Token rotation end to end: the broker rotates the gateway token through
//! the emulator while real queries run through broker → emulated token
//! gateway → Spark Thrift Server; crashes at every rotation step; faults.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::cloud::client::{ApiClient, ApiError, Endpoint, Retry};
use kyuubi_broker::cloud::credentials::CloudCredential;
use kyuubi_broker::cloud::request::KyuubiRef;
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::emulator::Faults;
use kyuubi_broker::secret::Secret;
use kyuubi_broker::tokens::schedule::Schedule;
use kyuubi_broker::tokens::{Clock, Holder, Lifecycle, TokenError, TokenState};

const AK: &str = EMU_AK;
const SECRET: &str = EMU_SECRET;
const WS: &str = EMU_WS;
const KB: &str = EMU_KB;

/// The broker under test reads credentials the standard way: from the
/// environment. Every test here uses the same values.
fn cloud_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("ALIBABA_CLOUD_ACCESS_KEY_ID", AK);
        std::env::set_var("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET);
        std::env::set_var("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true");
        std::env::set_var("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true");
    });
}

async fn emulator(gateway_upstream: Option<SocketAddr>) -> Emu {
    start_emulator(gateway_upstream).await
}

fn tokens_toml(api: SocketAddr, state: &Path, max_interval: &str, grace: &str) -> String {
    format!(
        r#"
[tokens]
endpoint = "http://{api}"
region = "cn-hangzhou"
workspace = "{WS}"
kyuubi_service = "{KB}"
state_file = "{}"
expire_days = 1
min_interval = "100ms"
max_interval = "{max_interval}"
grace = "{grace}"
"#,
        state.display()
    )
}

fn kref() -> KyuubiRef {
    KyuubiRef {
        region: "cn-hangzhou".into(),
        workspace: WS.into(),
        kyuubi_service: KB.into(),
    }
}

fn api_client(api: SocketAddr) -> ApiClient {
    let mut c = ApiClient::new(
        Endpoint::parse(&format!("http://{api}")).unwrap(),
        CloudCredential {
            access_key_id: AK.into(),
            access_key_secret: Secret::new(SECRET),
            security_token: None,
            provider: "test".into(),
        },
    );
    c.retry = Retry {
        max_attempts: 4,
        throttle_wait: (Duration::from_millis(5), Duration::from_millis(10)),
        backoff: Duration::from_millis(5),
    };
    c
}

/// Does this token value open a session through the emulated gateway?
async fn token_works(gateway: SocketAddr, value: &str) -> bool {
    let mut cfg = client_cfg(Transport::Http, gateway, UpstreamSasl::Plain);
    cfg.token = Some(Secret::new(value));
    match Hs2Client::connect(&cfg, "alice", "pw").await {
        Ok(mut c) => c.open_session().await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_rotations_under_load_fail_no_query_and_leave_no_old_token() {
    cloud_env();
    let e = emulator(Some(sts_http().await)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tokens.json");
    let route = format!(
        "{}\n{}",
        route_toml("http", e.gateway, "token_rotation = true"),
        tokens_toml(e.api, &state, "500ms", "300ms")
    );
    let b = start_broker(&route).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    // queries each worker completed, sampled at every new token
    let per_worker: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
    let mut workers = Vec::new();
    for (i, (t, addr)) in [(Transport::Binary, b.binary), (Transport::Http, b.http)]
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let (stop, ok, failed) = (stop.clone(), per_worker.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            // wait for the first token, then keep one session for the whole run
            let mut c = loop {
                if let Ok(mut c) =
                    Hs2Client::connect(&client_cfg(t, addr, UpstreamSasl::Plain), "alice", "pw")
                        .await
                {
                    if let Ok(s) = c.open_session().await {
                        break (c, s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            while !stop.load(SeqCst) {
                let r = async {
                    let op = c.0.execute(&c.1, &format!("select {i}")).await?;
                    c.0.fetch(&op, 1).await
                }
                .await;
                match r {
                    Ok(_) => ok[i].fetch_add(1, SeqCst),
                    Err(err) => {
                        eprintln!("query failed during rotation: {err}");
                        failed.fetch_add(1, SeqCst)
                    }
                };
            }
        }));
    }
    let t0 = Instant::now();
    let mut progress: Vec<Vec<usize>> = Vec::new();
    let mut seen = 0;
    while seen < 21 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "rotations too slow: {:?}",
            e.emu.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let creates = e.emu.snapshot().creates;
        if creates > seen {
            seen = creates;
            progress.push(per_worker.iter().map(|c| c.load(SeqCst)).collect());
        }
    }
    stop.store(true, SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    b.shutdown().await;
    let rotations_s = t0.elapsed().as_secs_f64();
    let failed = failed.load(SeqCst);
    let done: Vec<usize> = per_worker.iter().map(|c| c.load(SeqCst)).collect();
    eprintln!("21 tokens (20 rotations) in {rotations_s:.1}s; queries per worker {done:?}, {failed} failed");
    assert_eq!(failed, 0);
    // every worker's session kept making progress while the tokens changed
    let (first, last) = (&progress[1], progress.last().unwrap());
    for w in 0..4 {
        assert!(
            last[w] > first[w],
            "worker {w} made no progress across rotations: {progress:?}"
        );
    }

    // old tokens deleted (the last grace may still be running), none orphaned
    let st = TokenState::load(&state).unwrap();
    let snap = e.emu.snapshot();
    let known: Vec<String> = st
        .active
        .iter()
        .map(|t| t.token_id.clone())
        .chain(st.retiring.iter().map(|r| r.token.token_id.clone()))
        .collect();
    let live: Vec<String> = snap.tokens.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        live.iter().all(|id| known.contains(id)),
        "orphans: {live:?} vs {known:?}"
    );
    assert!(
        snap.deletes as usize >= snap.creates as usize - 2,
        "{snap:?}"
    );
    assert_eq!(snap.delete_workspace_attempts, 0);
    assert!(token_works(e.gateway, &st.active.unwrap().value).await);
}

/// Runs `kyuubi-broker token ARGS` against the emulator at `api`.
async fn broker_cmd(
    args: &[&str],
    api: SocketAddr,
    state: &Path,
    failpoint: Option<&str>,
) -> std::process::Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"));
    c.arg("token")
        .args(args)
        .args([
            "--endpoint",
            &format!("http://{api}"),
            "--region",
            "cn-hangzhou",
        ])
        .args(["--workspace", WS, "--kyuubi-service", KB, "--state"])
        .arg(state)
        .env("ALIBABA_CLOUD_ACCESS_KEY_ID", AK)
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)
        .env("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true")
        .env("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::null());
    match failpoint {
        Some(f) => c.env("KYUUBI_BROKER_FAILPOINT", f),
        None => c.env_remove("KYUUBI_BROKER_FAILPOINT"),
    };
    c.output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_rotation_step_converges_with_no_orphan_and_a_working_token() {
    let sts = sts_http().await;
    for step in [
        "after_intent",
        "after_create",
        "after_persist",
        "after_swap",
        "during_delete",
    ] {
        let e = emulator(Some(sts)).await;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("tokens.json");
        let run = |args: &'static [&'static str], fp: Option<&'static str>| {
            broker_cmd(args, e.api, &state, fp)
        };
        let out = run(&["create"], None).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let crashed = run(&["rotate", "--grace", "0s"], Some(step)).await;
        assert!(
            !crashed.status.success(),
            "{step}: the failpoint must stop the process"
        );

        // right after the crash, the recorded active token still works
        let before = TokenState::load(&state).unwrap();
        let active = before.active.clone().expect("an active token is recorded");
        assert!(
            token_works(e.gateway, &active.value).await,
            "{step}: working token lost"
        );

        // restart: reconcile, then a normal rotation
        let out = run(&["rotate", "--grace", "0s"], None).await;
        assert!(
            out.status.success(),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = TokenState::load(&state).unwrap();
        assert!(
            after.intent.is_none() && after.retiring.is_empty(),
            "{step}: {after:?}"
        );
        let live = e.emu.token_ids();
        let active = after.active.unwrap();
        assert_eq!(
            live,
            vec![active.token_id.clone()],
            "{step}: exactly the active token remains"
        );
        assert!(token_works(e.gateway, &active.value).await, "{step}");
        eprintln!(
            "{step}: converged; tokens created {}, deleted {}",
            e.emu.snapshot().creates,
            e.emu.snapshot().deletes
        );
    }
}

#[tokio::test]
async fn throttling_and_server_errors_during_rotation_are_survived() {
    let e = emulator(None).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("t.json");
    let mut lc = Lifecycle::open(
        api_client(e.api),
        kref(),
        state.clone(),
        Some(1),
        Holder::Command,
    )
    .unwrap();
    let faults = |f: Faults| {
        let url = format!("http://{}/_emulator/faults", e.api);
        async move {
            reqwest::Client::new()
                .post(url)
                .body(serde_json::to_vec(&f).unwrap())
                .send()
                .await
                .unwrap();
        }
    };
    lc.rotate(Duration::ZERO).await.unwrap();
    // throttled twice: waited out
    faults(Faults {
        throttle: 2,
        ..Faults::default()
    })
    .await;
    lc.rotate(Duration::ZERO)
        .await
        .expect("rotation survives throttling");
    // a 503 on the create: not repeated blindly; the intent stays
    faults(Faults {
        server_errors: 1,
        ..Faults::default()
    })
    .await;
    match lc.rotate(Duration::ZERO).await {
        Err(TokenError::Api(ApiError::Api { action, status, .. })) => {
            assert_eq!((action, status), ("CreateKyuubiToken", 503))
        }
        other => panic!("expected the create's 503, got {other:?}"),
    }
    assert!(lc.state().intent.is_some());
    assert!(matches!(
        lc.rotate(Duration::ZERO).await,
        Err(TokenError::Refused(_))
    ));
    // 503s on the reads of reconcile are retried; the unmade token's intent is dropped
    faults(Faults {
        server_errors: 2,
        ..Faults::default()
    })
    .await;
    let rep = lc.reconcile(Duration::ZERO).await.unwrap();
    assert!(rep.dropped_intent, "{rep:?}");
    lc.rotate(Duration::ZERO).await.unwrap();
    lc.retire_due().await.unwrap();
    let snap = e.emu.snapshot();
    assert_eq!(snap.tokens.len(), 1, "{snap:?}");
    assert_eq!(
        snap.tokens[0].0,
        lc.state().active.as_ref().unwrap().token_id
    );
}

#[tokio::test]
async fn tokens_not_created_by_this_broker_are_never_deleted() {
    let e = emulator(None).await;
    let api = api_client(e.api);
    let foreign = api
        .create_kyuubi_token(
            &kref(),
            &kyuubi_broker::cloud::request::TokenBody {
                name: Some("someone-elses".into()),
                token: Some("f0reign0123456789abcdefghijklmno".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut lc = Lifecycle::open(
        api_client(e.api),
        kref(),
        dir.path().join("t.json"),
        None,
        Holder::Command,
    )
    .unwrap();
    for _ in 0..3 {
        lc.rotate(Duration::ZERO).await.unwrap();
        lc.reconcile(Duration::ZERO).await.unwrap();
    }
    let ids = e.emu.token_ids();
    assert!(
        ids.contains(&foreign),
        "the foreign token survives: {ids:?}"
    );
    assert_eq!(ids.len(), 2);
}

#[tokio::test]
async fn revoke_without_confirmation_changes_nothing() {
    let e = emulator(None).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("t.json");
    let api = e.api;
    let out = broker_cmd(&["create"], api, &state, None).await;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = broker_cmd(&["revoke", &id, "--force"], api, &state, None).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ACTIVE token") && err.contains("no confirmation"),
        "{err}"
    );
    assert_eq!(e.emu.snapshot().tokens.len(), 1, "nothing was deleted");
    let out = broker_cmd(&["revoke", &id, "--yes"], api, &state, None).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --force"));
    assert_eq!(e.emu.snapshot().tokens.len(), 1);
    let out = broker_cmd(&["revoke", &id, "--yes", "--force"], api, &state, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(e.emu.snapshot().tokens.is_empty());
    assert!(TokenState::load(&state).unwrap().active.is_none());
}

type Calls = std::collections::BTreeMap<String, u64>;

/// The management API calls, per action, of an hour of the rotation loop
/// (a rotation every 10 minutes, a minute of grace) while every call of
/// `failing` fails, and the rotations made. The hour is paused time, on a
/// runtime of its own: paused time passes only while the loop waits, so a
/// loop calling the API without pause never gets through the hour, and
/// that shows here as a failure after 30 real seconds, not a hang.
fn an_hour_of_rotation_while_failing(failing: &'static str) -> (Calls, u64) {
    let (emu_tx, emu_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let e = emulator(None).await;
            emu_tx.send(e.emu.clone()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let origin = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let lc = Lifecycle::open(
                api_client(e.api),
                kref(),
                dir.path().join("t.json"),
                None,
                Holder::Command,
            )
            .unwrap()
            .with_clock(Clock::tokio(origin));
            e.emu.set_faults(Faults {
                fail_actions: vec![failing.into()],
                ..Faults::default()
            });
            let stop = tokio_util::sync::CancellationToken::new();
            let schedule = Schedule {
                lifetime: Duration::from_secs(1200),
                fraction: 0.5,
                min_interval: Duration::from_secs(60),
                max_interval: Duration::from_secs(86400),
                grace: Duration::from_secs(60),
            };
            let r = kyuubi_broker::tokens::spawn(lc, schedule, stop.clone());
            // half a minute past the 60-minute rotation
            tokio::time::sleep(Duration::from_secs(3630)).await;
            stop.cancel();
            let rotations = r.status.lock().unwrap().rotations;
            let _ = done_tx.send((e.emu.snapshot().calls, rotations));
        });
    });
    let emu = emu_rx.recv().unwrap();
    let (calls, rotations) = done_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "{failing} failing: an hour of paused time did not pass; \
                 the loop calls the API without pause: {:?}",
                emu.snapshot().calls
            )
        });
    eprintln!("{failing} failing for an hour: {rotations} rotations, calls {calls:?}");
    (calls, rotations)
}

/// No state at the start: the first token at 0, then one every 10 minutes.
const SCHEDULED_IN_AN_HOUR: u64 = 7;

#[test]
fn an_hour_of_failing_get_calls_creates_no_token_beyond_the_schedule() {
    let (calls, rotations) = an_hour_of_rotation_while_failing("GetKyuubiToken");
    assert!(
        calls.get("CreateKyuubiToken").copied().unwrap_or(0) <= SCHEDULED_IN_AN_HOUR,
        "{calls:?}"
    );
    assert_eq!(rotations, SCHEDULED_IN_AN_HOUR, "{calls:?}");
    // the failure was met, again and again, and nothing was deleted unchecked
    assert!(calls["GetKyuubiToken"] > 20, "{calls:?}");
    assert_eq!(calls.get("DeleteKyuubiToken"), None, "{calls:?}");
}

#[test]
fn an_hour_of_failing_delete_calls_creates_no_token_beyond_the_schedule() {
    let (calls, rotations) = an_hour_of_rotation_while_failing("DeleteKyuubiToken");
    assert!(
        calls.get("CreateKyuubiToken").copied().unwrap_or(0) <= SCHEDULED_IN_AN_HOUR,
        "{calls:?}"
    );
    assert_eq!(rotations, SCHEDULED_IN_AN_HOUR, "{calls:?}");
    assert!(calls["DeleteKyuubiToken"] > 20, "{calls:?}");
}

/// Polls `done` every 50 ms until it holds; fails after 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_broker_holds_the_state_so_the_cli_is_refused_and_sigusr1_rotates_once() {
    let e = emulator(None).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tokens.json");
    let config = dir.path().join("broker.toml");
    // no scheduled rotation within the test: only the first token and the asked-for one
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"b\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\nauth = \"none\"\nallow_any_user = true\n\n\
             {}\n{}",
            route_toml("binary", closed_port().await, ""),
            tokens_toml(e.api, &state, "1h", "1h")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
    let mut broker = tokio::process::Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("ALIBABA_CLOUD_ACCESS_KEY_ID", AK)
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)
        .env("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true")
        .env("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = broker.id().unwrap();
    let creates = || {
        e.emu
            .snapshot()
            .calls
            .get("CreateKyuubiToken")
            .copied()
            .unwrap_or(0)
    };
    let active = || {
        TokenState::load(&state)
            .ok()
            .and_then(|s| s.active)
            .map(|t| t.token_id.clone())
    };
    eventually("the broker's first token", || {
        creates() == 1 && active().is_some()
    })
    .await;
    let first = active().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tokens.json.lock")).unwrap(),
        format!("{pid} broker\n")
    );

    let out = broker_cmd(&["rotate", "--grace", "0s"], e.api, &state, None).await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "error: token state file {} is in use by a running broker (pid {pid}); \
             to rotate now, ask it: kill -USR1 {pid}\n",
            state.display()
        )
    );
    assert_eq!(creates(), 1, "the refused command made no token");

    let kill = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(kill("-USR1").success());
    eventually("the asked-for rotation", || {
        creates() == 2 && active().is_some_and(|a| a != first)
    })
    .await;
    assert!(kill("-TERM").success());
    let status = tokio::time::timeout(Duration::from_secs(30), broker.wait())
        .await
        .expect("the broker stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(creates(), 2, "one signal, one rotation");
    // its lock went with it
    let out = broker_cmd(&["rotate", "--grace", "0s"], e.api, &state, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every log line of this test binary, as JSON.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(sink.clone()))
            .init();
        buf
    })
}

#[tokio::test]
async fn the_token_lifecycle_is_audited_with_ids_and_names_never_values() {
    let logs = logs();
    let e = emulator(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lc = Lifecycle::open(
        api_client(e.api),
        kref(),
        dir.path().join("t.json"),
        None,
        Holder::Command,
    )
    .unwrap();
    let value = |lc: &Lifecycle| lc.state().active.as_ref().unwrap().value.clone();
    let first = lc.rotate(Duration::ZERO).await.unwrap();
    let mut values = vec![value(&lc)];
    let second = lc.rotate(Duration::ZERO).await.unwrap();
    values.push(value(&lc));
    assert_eq!(lc.retire_due().await.unwrap(), vec![first.clone()]);
    e.emu.set_faults(Faults {
        fail_actions: vec!["CreateKyuubiToken".into()],
        ..Faults::default()
    });
    lc.rotate(Duration::ZERO).await.unwrap_err();
    let intent = lc.state().intent.clone().unwrap();
    values.push(intent.value.clone());

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let prefix = lc.state().prefix();
    let audit: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .filter(|v| {
            v["fields"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    let seen: Vec<(&str, &str)> = audit
        .iter()
        .map(|v| {
            let f = &v["fields"];
            (
                f["event"].as_str().unwrap(),
                f["token_id"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("token_created", first.as_str()),
            ("token_created", second.as_str()),
            ("token_retired", first.as_str()),
            ("token_rotation_failed", "-"),
        ],
        "{audit:#?}"
    );
    assert_eq!(audit[3]["fields"]["name"], intent.name.as_str());
    assert!(
        audit[3]["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("CreateKyuubiToken"),
        "{audit:#?}"
    );
    for v in &values {
        assert!(!text.contains(v.as_str()), "a token value reached the log");
    }
}

#[tokio::test]
async fn the_token_rotation_example_reaches_its_gateway_over_https_with_a_rotated_token() {
    use kyuubi_broker::emulator::{serve_api, serve_gateway, Emulator, EmulatorConfig};
    use kyuubi_broker::tls::server::{ListenerTls, ServerTls};
    cloud_env();
    let (dir, sts) = (tls_dir().await, sts_http().await);
    let example =
        std::fs::read_to_string(root().join("config/examples/token-rotation.toml")).unwrap();
    // the emulator with the example's workspace and gateway ids, its
    // gateway serving HTTPS with the fixture's certificate
    let emu = Emulator::new(EmulatorConfig {
        access_key_id: AK.into(),
        access_key_secret: Secret::new(SECRET),
        region: "cn-hangzhou".into(),
        workspace: "w-0123456789abcdef".into(),
        kyuubi_service: "kb-0123456789abcdef0123456789abcdef".into(),
    });
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = api_l.local_addr().unwrap();
    tokio::spawn(serve_api(api_l, emu.clone(), std::future::pending()));
    let gw_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = gw_l.local_addr().unwrap();
    let tls = ServerTls::new(
        &ListenerTls {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            client_ca: None,
            client_cert: None,
            identity: None,
        },
        true,
    )
    .unwrap();
    let up = format!("http://{sts}/cliservice").parse().unwrap();
    tokio::spawn(serve_gateway(
        gw_l,
        emu.clone(),
        up,
        Some(Arc::new(tls)),
        std::future::pending(),
    ));
    let state = tempfile::tempdir().unwrap();
    let toml = example
        .replace("127.0.0.1:10009", "127.0.0.1:0")
        .replace("127.0.0.1:10010", "127.0.0.1:0")
        .replace("port = 18081", &format!("port = {}", gw.port()))
        .replace("http://127.0.0.1:18080", &format!("http://{api}"))
        .replace(
            "/tmp/kyuubi-broker-demo/tokens.json",
            state.path().join("tokens.json").to_str().unwrap(),
        );
    assert!(
        toml.contains("tls = true"),
        "the example reaches its gateway over TLS"
    );
    let b = start_broker_toml(&toml).await;
    // the first token is created at startup and goes live just after the
    // state file records it: wait for the first query through the gateway
    let t0 = Instant::now();
    let first = loop {
        match current_user(b.binary, Transport::Binary, "alice", "x").await {
            Ok(who) => break who,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                let text = format!("{e:?}");
                assert!(text.contains("no token in the path"), "{text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no query through the HTTPS gateway: {e:?}"),
        }
    };
    assert_eq!(first, "alice");
    let who = current_user(b.http, Transport::Http, "alice", "x")
        .await
        .unwrap();
    assert_eq!(who, "alice");
    b.shutdown().await;
}
