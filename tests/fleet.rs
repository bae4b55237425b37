//! A fleet of three brokers on a real ZooKeeper 3.8 in front of the
//! emulated token gateway and a real Spark Thrift Server (issue 13): one
//! leader rotates the gateway token for all, followers switch as soon as it
//! publishes, and neither a leader killed with SIGKILL mid-rotation nor
//! ZooKeeper stopped for 30 s fails a query or orphans a token. Clients find
//! the brokers through ZooKeeper: stock beeline, and impyla through kazoo.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};
use serde_json::Value;

/// The fleet's key in these tests, given as the environment variable (the
/// examples use the key file).
const KEY: &str = "6b79757562692d62726f6b65722d666c6565742d746573742d6b65792d303031";
const SHARED_ZK: &str = "127.0.0.1:2181";

/// A Spark Thrift Server of the fleet tests' own: their thousands of short
/// sessions would otherwise crowd the shared one the other tests use.
async fn sts_fleet() -> SocketAddr {
    tokio::task::spawn_blocking(|| sts("sts-fleet", "http", 10004))
        .await
        .unwrap()
}

/// What the brokers of one fleet share.
struct FleetSetup {
    zookeeper: String,
    namespace: String,
    emu: Emu,
    /// Rotation interval and grace.
    interval: &'static str,
    grace: &'static str,
}

impl FleetSetup {
    /// A fleet in `zookeeper`'s namespace of `tag`, in front of the emulator's
    /// token gateway to the fleet tests' Spark Thrift Server.
    async fn new(
        zookeeper: &str,
        tag: &str,
        interval: &'static str,
        grace: &'static str,
    ) -> FleetSetup {
        let sts = sts_fleet().await;
        FleetSetup {
            zookeeper: zookeeper.into(),
            namespace: zk_namespace(&format!("fleet-{tag}")),
            emu: start_emulator(Some(sts)).await,
            interval,
            grace,
        }
    }

    /// `n` brokers without failpoints, once they agree on one leader and
    /// one token.
    async fn members(&self, n: usize) -> Vec<Member> {
        let mut members = Vec::new();
        for _ in 0..n {
            members.push(Member::start(self, None).await);
        }
        agreed(&members.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
        members
    }
}

/// One broker process of the fleet.
struct Member {
    child: tokio::process::Child,
    pid: u32,
    binary: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Member {
    /// Starts `kyuubi-broker serve`, with `failpoint` set if given; returns
    /// once its admin listener answers.
    async fn start(f: &FleetSetup, failpoint: Option<&str>) -> Member {
        // ports are picked free, then bound by the broker: another test may
        // take one in between, which the broker reports; pick again then
        for _ in 0..3 {
            if let Some(m) = Member::try_start(f, failpoint).await {
                return m;
            }
        }
        panic!("no free ports for a broker in three tries");
    }

    async fn try_start(f: &FleetSetup, failpoint: Option<&str>) -> Option<Member> {
        let dir = tempfile::tempdir().unwrap();
        let (b, h, a) = (free_port(), free_port(), free_port());
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[cluster]
zookeeper = "{zk}"
namespace = "{ns}"
session_timeout = "2s"
deregister_grace = "1s"

[admin]
bind = "127.0.0.1:{a}"

[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:{b}"
route = "gateway"
auth = "none"
allow_any_user = true

[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:{h}"
route = "gateway"
auth = "none"
allow_any_user = true

[routes.gateway.upstream]
transport = "http"
host = "127.0.0.1"
port = {gw}
http_path = "cliservice"
token_rotation = true

[tokens]
endpoint = "http://{api}"
region = "cn-hangzhou"
workspace = "{EMU_WS}"
kyuubi_service = "{EMU_KB}"
expire_days = 1
min_interval = "{iv}"
max_interval = "{iv}"
grace = "{grace}"
"#,
                zk = f.zookeeper,
                ns = f.namespace,
                gw = f.emu.gateway.port(),
                api = f.emu.api,
                iv = f.interval,
                grace = f.grace,
            ),
        )
        .unwrap();
        let log = dir.path().join("broker.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("ALIBABA_CLOUD_ACCESS_KEY_ID", EMU_AK)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", EMU_SECRET)
            .env("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true")
            .env("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
            .env("KYUUBI_BROKER_FLEET_KEY", KEY)
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match failpoint {
            Some(fp) => cmd.env("KYUUBI_BROKER_FAILPOINT", fp),
            None => cmd.env_remove("KYUUBI_BROKER_FAILPOINT"),
        };
        let child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let m = Member {
            child,
            pid,
            binary: format!("127.0.0.1:{b}").parse().unwrap(),
            admin: format!("127.0.0.1:{a}").parse().unwrap(),
            log,
            _dir: dir,
        };
        let mut m = m;
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(m.admin).await.is_err() {
            if m.child.try_wait().unwrap().is_some() && m.log_text().contains("cannot bind") {
                return None;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "broker {pid} up: {}",
                m.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(m)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/status`'s `token`: role, leader, token id and age (never a value).
    async fn token(&self) -> Value {
        let (code, body) = admin_get(self.admin, "/status").await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["token"].clone()
    }

    async fn role(&self) -> String {
        self.token().await["role"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn token_id(&self) -> Option<String> {
        self.token().await["token_id"].as_str().map(str::to_string)
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {}", self.pid);
    }

    /// SIGTERM; the exit status within 30 s, and the log.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("a broker stops within 30 s of SIGTERM")
            .unwrap();
        (status, self.log_text())
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) {
    let t0 = Instant::now();
    while !check().await {
        assert!(t0.elapsed() < within, "timed out after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queries running on some brokers all along: each worker opens a session,
/// runs a query and closes it, over and over, on a new connection every
/// time and on one connection kept open, so both new logins and sessions
/// spanning a token switch are exercised.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(brokers: &[SocketAddr]) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        for &addr in brokers {
            for kept in [false, true] {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let cfg = client_cfg(Transport::Binary, addr, UpstreamSasl::Plain);
                    let mut conn: Option<Hs2Client> = None;
                    while !stop.is_cancelled() {
                        let r = async {
                            let c = match conn.take() {
                                Some(c) => c,
                                None => Hs2Client::connect(&cfg, "alice", "pw").await?,
                            };
                            let mut c = c;
                            let v = scalar(&mut c, &[], "select 'fleet'", 0).await?;
                            Ok::<_, kyuubi_broker::client::ClientError>((c, v))
                        }
                        .await;
                        match r {
                            Ok((c, v)) if v == "fleet" => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if kept {
                                    conn = Some(c);
                                }
                            }
                            Ok((_, v)) => failures.lock().unwrap().push(format!("{addr}: got {v}")),
                            Err(e) => failures.lock().unwrap().push(format!("{addr}: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }));
            }
        }
        Load {
            ok,
            failures,
            stop,
            tasks,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Stops the workers; returns (queries that worked, failures).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        let failures = self.failures();
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = [failures, self.failures.lock().unwrap().clone()]
            .into_iter()
            .max_by_key(Vec::len)
            .unwrap();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// The fleet's active token, once every broker in `members` uses the same
/// one and exactly one broker leads.
async fn agreed(members: &[&Member], within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let mut ids = Vec::new();
        let mut leaders = 0;
        for m in members {
            let t = m.token().await;
            leaders += usize::from(t["role"] == "leader");
            ids.push(t["token_id"].as_str().map(str::to_string));
        }
        if let Some(Some(first)) = ids.first().cloned() {
            if leaders == 1 && ids.iter().all(|i| i.as_deref() == Some(first.as_str())) {
                return first;
            }
        }
        assert!(
            t0.elapsed() < within,
            "no single leader with every broker on one token within {within:?}: {ids:?}, {leaders} leaders"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the management API holds exactly one token, the one every
/// broker uses: none orphaned, none left retiring.
async fn converged(e: &Emu, members: &[&Member], within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let active = agreed(members, within).await;
        let live = e.emu.token_ids();
        if live == [active.clone()] {
            return active;
        }
        assert!(
            t0.elapsed() < within,
            "the API's tokens {live:?} never became just the fleet's active {active}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills the leader with SIGKILL while it is stopped at `step` of its
/// second rotation, and checks that another broker takes over, that
/// exactly one token remains, and that no query on the survivors failed.
async fn leader_killed_at(step: &str) {
    fixture(&["zk-start"]);
    let f = FleetSetup::new(SHARED_ZK, "kill", "6s", "2s").await;
    // the first broker up leads: its first rotation makes the first token,
    // its second stops at `step` until killed
    let b1 = Member::start(&f, Some(&format!("{step}@2:hang"))).await;
    eventually("b1 leads", Duration::from_secs(30), || async {
        b1.role().await == "leader" && b1.token_id().await.is_some()
    })
    .await;
    let b2 = Member::start(&f, None).await;
    let b3 = Member::start(&f, None).await;
    let first = agreed(&[&b1, &b2, &b3], Duration::from_secs(30)).await;
    let load = Load::start(&[b2.binary, b3.binary]);

    let hung = format!("failpoint {step}: hanging until killed");
    eventually(
        "b1 stops in its second rotation",
        Duration::from_secs(30),
        || async { b1.log_text().contains(&hung) },
    )
    .await;
    let at_kill = f.emu.emu.token_ids();
    if step == "after_persist" {
        // the record says the new token: the followers switched to it
        eventually(
            "the survivors on b1's new token",
            Duration::from_secs(10),
            || async {
                let (t2, t3) = (b2.token_id().await, b3.token_id().await);
                t2 == t3 && t2.is_some_and(|t| t != first && at_kill.contains(&t))
            },
        )
        .await;
    } else {
        assert_eq!(b2.token_id().await.as_deref(), Some(first.as_str()));
    }
    b1.signal("-KILL");
    let killed = Instant::now();

    // a survivor leads (once b1's session expires: 2 s) and finishes or
    // undoes b1's rotation, as a single broker does at restart
    let survivors = [&b2, &b3];
    let leader = 'found: loop {
        for m in survivors {
            if m.role().await == "leader" {
                break 'found m;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no survivor leads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let takeover = killed.elapsed();
    let active = converged(&f.emu, &survivors, Duration::from_secs(40)).await;
    match step {
        // b1 had created the token but not yet published it: it was adopted
        "after_create" => {
            assert_eq!(
                at_kill.len(),
                2,
                "{at_kill:?}: the active one and b1's new one"
            );
            assert!(
                leader
                    .log_text()
                    .contains("adopting the token created before a restart"),
                "{}",
                leader.log_text()
            );
            assert!(at_kill.contains(&first));
        }
        // b1 had published the new token: the survivors used it already
        _ => assert_eq!(
            at_kill.len(),
            2,
            "{at_kill:?}: the new one and the retiring one"
        ),
    }
    // and the rotation goes on: another token, everyone on it
    eventually(
        "a rotation after the takeover",
        Duration::from_secs(30),
        || async { b2.token_id().await.is_some_and(|t| t != active) },
    )
    .await;
    let next = converged(&f.emu, &survivors, Duration::from_secs(40)).await;
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{step}: failed queries: {failures:?}");
    assert!(ok > 20, "{step}: only {ok} queries ran");
    let snap = f.emu.emu.snapshot();
    assert_eq!(
        snap.creates,
        snap.deletes + 1,
        "{step}: every token but the active {next} was deleted: {snap:?}"
    );
    assert_eq!(snap.delete_workspace_attempts, 0);
    let lag = b3.token().await["last_switch_lag_ms"].clone();
    eprintln!(
        "{step}: takeover {takeover:?} after SIGKILL; {ok} queries, 0 failed; \
         tokens created {}, deleted {}; follower switch lag {lag} ms",
        snap.creates, snap.deletes
    );
    for m in [b2, b3] {
        let (st, log) = m.stop().await;
        assert!(st.success(), "{st:?}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_after_creating_a_token_before_publishing_it_loses_no_query_and_orphans_nothing(
) {
    leader_killed_at("after_create").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_after_publishing_a_token_before_retiring_the_old_loses_no_query_and_orphans_nothing(
) {
    leader_killed_at("after_persist").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zookeeper_stopped_for_30_s_fails_no_query_and_the_rotation_resumes_when_it_returns() {
    let zkp = PrivateZk::new();
    zkp.run("zk-start");
    let f = FleetSetup::new(&zkp.ensemble(), "outage", "6s", "2s").await;
    let members = f.members(3).await;
    let all: Vec<&Member> = members.iter().collect();
    let load = Load::start(&members.iter().map(|m| m.binary).collect::<Vec<_>>());

    let ok_before_stop = load.ok.load(Ordering::Relaxed);
    zkp.run("zk-stop");
    // with ZooKeeper gone nothing can publish: each broker keeps the token
    // it has now, and at most a create already under way lands
    let creates_at_stop = f.emu.emu.snapshot().creates;
    let mut kept = Vec::new();
    for m in &members {
        kept.push(m.token_id().await.expect("a token"));
    }
    // the fault under test is an outage of this length
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = load.failures();
    assert!(
        during.is_empty(),
        "failed while ZooKeeper was away: {during:?}"
    );
    for (m, had) in members.iter().zip(&kept) {
        let t = m.token().await;
        assert_eq!(
            t["token_id"].as_str(),
            Some(had.as_str()),
            "still serving the token it had: {t}"
        );
    }
    let creates_during = f.emu.emu.snapshot().creates;
    assert!(
        creates_during <= creates_at_stop + 1,
        "tokens made while ZooKeeper was away: {creates_at_stop} -> {creates_during}"
    );
    let stopped_with = kept[0].clone();
    let ok_during = load.ok.load(Ordering::Relaxed) - ok_before_stop;

    zkp.run("zk-start");
    let back = Instant::now();
    eventually(
        "a rotation after ZooKeeper is back",
        Duration::from_secs(60),
        || async { f.emu.emu.snapshot().creates > creates_during },
    )
    .await;
    let resumed = back.elapsed();
    let active = converged(&f.emu, &all, Duration::from_secs(40)).await;
    assert_ne!(active, stopped_with);
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed queries: {failures:?}");
    let snap = f.emu.emu.snapshot();
    assert_eq!(snap.creates, snap.deletes + 1, "{snap:?}");
    eprintln!(
        "ZooKeeper away 30 s: {ok} queries ({ok_during} during the outage), 0 failed; first rotation {resumed:?} after it returned"
    );
    for m in members {
        let (st, log) = m.stop().await;
        assert!(st.success(), "{st:?}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beeline_and_impyla_find_the_fleet_through_zookeeper_and_a_sigterm_takes_a_broker_out_first(
) {
    fixture(&["zk-start"]);
    let f = FleetSetup::new(SHARED_ZK, "find", "1h", "10s").await;
    let mut members = f.members(3).await;
    let ports: Vec<u16> = members.iter().map(|m| m.binary.port()).collect();

    let url = format!(
        "jdbc:hive2://{SHARED_ZK}/;serviceDiscoveryMode=zooKeeper;zooKeeperNamespace={}",
        f.namespace
    );
    let run = beeline(&url, "alice", "any", "select 'via-zookeeper';\n").await;
    assert!(
        run.ok && run.stdout.contains("via-zookeeper"),
        "{}",
        run.stderr
    );

    let discover = |mode: &str, extra: Vec<String>| {
        let mut c = tokio::process::Command::new(python());
        c.arg(root().join("tests/clients/zk_discover.py"))
            .arg(mode)
            .args(["--zookeeper", SHARED_ZK, "--namespace", &f.namespace])
            .args(extra);
        c
    };
    let out = discover("zk", vec!["--repeat".into(), "20".into()])
        .output()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let runs = v["runs"].as_array().unwrap();
    for r in runs {
        assert_eq!(r["value"], "found");
        assert!(ports.contains(&(r["port"].as_u64().unwrap() as u16)), "{r}");
    }
    let direct = discover(
        "direct",
        vec![
            "--port".into(),
            ports[0].to_string(),
            "--repeat".into(),
            "20".into(),
        ],
    )
    .output()
    .await
    .unwrap();
    let d: Value = serde_json::from_slice(&direct.stdout).unwrap();
    let median = |runs: &[Value]| {
        let mut t: Vec<f64> = runs
            .iter()
            .map(|r| r["first_result_s"].as_f64().unwrap())
            .collect();
        t.sort_by(|a, b| a.total_cmp(b));
        t[t.len() / 2]
    };
    let landed: std::collections::BTreeSet<u64> =
        runs.iter().map(|r| r["port"].as_u64().unwrap()).collect();
    eprintln!(
        "impyla to first result, median of 20: through ZooKeeper (kazoo) {:.1} ms, direct {:.1} ms; landed on {landed:?}",
        median(runs) * 1000.0,
        median(d["runs"].as_array().unwrap()) * 1000.0
    );

    // SIGTERM to the leader: it steps down first (the next broker leads
    // before it is gone, not a session timeout later), its znodes go, then
    // it stops; discovery finds only the others from then on
    let mut leader = None;
    for (i, m) in members.iter().enumerate() {
        if m.role().await == "leader" {
            leader = Some(i);
        }
    }
    let gone = members.remove(leader.expect("a leader"));
    let gone_port = gone.binary.port();
    let (status, text) = gone.stop().await;
    assert!(status.success(), "{status:?}");
    let mut leaders = 0;
    for m in &members {
        leaders += usize::from(m.role().await == "leader");
    }
    // it exited a deregister grace (1 s) after stepping down; its session
    // would have held the office 2 s more had it not deleted its znode
    assert_eq!(leaders, 1, "a successor leads as the old leader exits");
    let stepped = text.find("fleet: stepped down").expect("stepped down");
    let left_zk = text
        .find("deregistered from ZooKeeper")
        .expect("deregistered");
    assert!(
        stepped < left_zk,
        "the rotation is handed over before the drain"
    );
    let left = text
        .find("deregistered from ZooKeeper")
        .expect("deregistered");
    let stopped = text.find("no new connections").expect("stopped accepting");
    assert!(left < stopped, "the znodes go before the listeners stop");
    let out = discover("zk", vec!["--repeat".into(), "10".into()])
        .output()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in v["runs"].as_array().unwrap() {
        assert_ne!(r["port"].as_u64().unwrap() as u16, gone_port, "{r}");
        assert_eq!(r["value"], "found");
    }
    let rest: Vec<&Member> = members.iter().collect();
    agreed(&rest, Duration::from_secs(30)).await;
    for m in members {
        let (st, log) = m.stop().await;
        assert!(st.success(), "{st:?}: {log}");
    }
}

/// `kyuubi-broker check-config FILE` with `env`; (success, stderr).
fn check_config(file: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
        .arg("check-config")
        .arg(file)
        .env_remove("KYUUBI_BROKER_FLEET_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_fleet_examples_check_and_a_fleet_without_a_usable_key_is_refused_naming_the_key() {
    fixture(&["tls-certs"]);
    fixture(&["fleet-key"]);
    for i in 1..=3 {
        let f = root().join(format!("config/examples/fleet-{i}.toml"));
        let (ok, err) = check_config(&f, &[]);
        assert!(ok, "fleet-{i}.toml: {err}");
    }
    let example = std::fs::read_to_string(root().join("config/examples/fleet-1.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fleet.toml");

    // no key file and no environment variable
    let no_key = example.replace("token_key_file = \"/tmp/kb-fleet.key\"\n", "");
    assert_ne!(no_key, example);
    std::fs::write(&cfg, &no_key).unwrap();
    let (ok, err) = check_config(&cfg, &[]);
    assert!(!ok);
    assert!(
        err.contains("cluster.token_key_file") && err.contains("KYUUBI_BROKER_FLEET_KEY"),
        "{err}"
    );
    // the environment variable, but not 64 hex digits: its text is not echoed
    let (ok, err) = check_config(&cfg, &[("KYUUBI_BROKER_FLEET_KEY", "not-a-key-value")]);
    assert!(
        !ok && err.contains("64 hex digits") && !err.contains("not-a-key-value"),
        "{err}"
    );
    let (ok, err) = check_config(&cfg, &[("KYUUBI_BROKER_FLEET_KEY", KEY)]);
    assert!(ok, "{err}");

    // a key file others can read
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("fleet.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_key = example.replace("/tmp/kb-fleet.key", &key.display().to_string());
    std::fs::write(&cfg, &open_key).unwrap();
    let (ok, err) = check_config(&cfg, &[]);
    assert!(
        !ok && err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );

    // a single broker (no [cluster]) still needs its state file
    let start = example.find("[admin]").unwrap();
    std::fs::write(&cfg, &example[start..]).unwrap();
    let (ok, err) = check_config(&cfg, &[]);
    assert!(!ok && err.contains("tokens.state_file"), "{err}");
}

/// An unlabelled sample of `/metrics`.
async fn metric(m: &Member, name: &str) -> f64 {
    let (_, text) = admin_get(m.admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_record_stops_the_rotation_never_the_serving_and_restoring_it_resumes() {
    use zookeeper_client as zk;
    fixture(&["zk-start"]);
    let f = FleetSetup::new(SHARED_ZK, "damage", "3s", "1s").await;
    let b1 = Member::start(&f, None).await;
    let b2 = Member::start(&f, None).await;
    let token = agreed(&[&b1, &b2], Duration::from_secs(30)).await;
    let load = Load::start(&[b1.binary, b2.binary]);
    let zkc = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(SHARED_ZK)
        .await
        .unwrap();
    let record = format!("/kyuubi-broker-fleet/{}/tokens", f.namespace);
    let (good, _) = zkc.get_data(&record).await.unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    assert!(text.contains(&token) && text.contains("gcm1:"), "{text}");

    let before = [
        metric(&b1, "kyuubi_broker_fleet_errors_total").await,
        metric(&b2, "kyuubi_broker_fleet_errors_total").await,
    ];
    zkc.set_data(&record, b"{ not a record", None)
        .await
        .unwrap();
    let damaged = Instant::now();
    for (m, base) in [&b1, &b2].into_iter().zip(before) {
        eventually(
            "the damage is counted and shown",
            Duration::from_secs(10),
            || async {
                metric(m, "kyuubi_broker_fleet_errors_total").await > base
                    && m.token().await["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("not valid JSON"))
            },
        )
        .await;
    }
    let creates = f.emu.emu.snapshot().creates;
    // two rotation intervals: the leader must not rotate over a record it
    // cannot read (it may hold tokens only it knows)
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        f.emu.emu.snapshot().creates,
        creates,
        "no token while damaged"
    );
    assert!(load.failures().is_empty(), "{:?}", load.failures());

    zkc.set_data(&record, &good, None).await.unwrap();
    eventually("rotation resumes", Duration::from_secs(30), || async {
        f.emu.emu.snapshot().creates > creates
    })
    .await;
    let active = converged(&f.emu, &[&b1, &b2], Duration::from_secs(30)).await;
    assert_ne!(active, token);
    for m in [&b1, &b2] {
        let t = m.token().await;
        assert!(t["last_error"].is_null(), "{t}");
    }
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!(
        "damaged record for {:?}: {ok} queries, 0 failed",
        damaged.elapsed()
    );
    for m in [b1, b2] {
        let (st, log) = m.stop().await;
        assert!(st.success(), "{st:?}: {log}");
    }
}
