//! Shared integration-test harness: the real Spark Thrift Server fixture
//! (started through `scripts/fixture.sh`, once per instance name), an
//! in-process broker on ephemeral ports, and the real clients (PyHive,
//! impyla, beeline) run as subprocesses.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Config, Transport, UpstreamConfig, UpstreamSasl};
use kyuubi_broker::tcli::gen::TColumn;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KB_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            PathBuf::from(home).join(".cache/kyuubi-broker")
        })
}

pub fn python() -> PathBuf {
    cache_dir().join("venv/bin/python")
}

pub fn spark_home() -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            "import os, pyspark; print(os.path.dirname(pyspark.__file__))",
        ])
        .output()
        .expect("python in the fixture venv");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs `scripts/fixture.sh ARGS` and returns its stdout; panics with its
/// stderr on failure. Blocking.
pub fn fixture(args: &[&str]) -> String {
    let out = Command::new(root().join("scripts/fixture.sh"))
        .args(args)
        .output()
        .expect("run scripts/fixture.sh");
    assert!(
        out.status.success(),
        "scripts/fixture.sh {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts (or finds running) a named Spark Thrift Server and returns its
/// address. Blocking: call it from `spawn_blocking` or before the runtime.
pub fn sts(name: &str, mode: &str, port: u16) -> SocketAddr {
    sts_auth(name, mode, port, "none")
}

/// As [`sts`], with the server's own authentication (`none` or `ldap`).
pub fn sts_auth(name: &str, mode: &str, port: u16, auth: &str) -> SocketAddr {
    static STARTED: OnceLock<Mutex<HashMap<String, SocketAddr>>> = OnceLock::new();
    let started = STARTED.get_or_init(Default::default);
    let mut map = started.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = map.get(name) {
        return *a;
    }
    let port = port.to_string();
    let addr: SocketAddr = fixture(&[
        "start", name, "--mode", mode, "--port", &port, "--auth", auth,
    ])
    .parse()
    .unwrap();
    map.insert(name.to_string(), addr);
    addr
}

/// The fixture's OpenLDAP (slapd) on ldap://127.0.0.1:3890.
pub async fn ldap_server() {
    tokio::task::spawn_blocking(|| fixture(&["ldap-start"]))
        .await
        .unwrap();
}

/// A Spark Thrift Server checking passwords against the fixture LDAP
/// (127.0.0.1:10003).
pub async fn sts_ldap() -> SocketAddr {
    ldap_server().await;
    tokio::task::spawn_blocking(|| sts_auth("sts-ldap", "binary", 10003, "ldap"))
        .await
        .unwrap()
}

/// The shared binary Spark Thrift Server (127.0.0.1:10000).
pub async fn sts_binary() -> SocketAddr {
    tokio::task::spawn_blocking(|| sts("sts-binary", "binary", 10000))
        .await
        .unwrap()
}

/// The shared HTTP Spark Thrift Server (127.0.0.1:10001, path cliservice).
pub async fn sts_http() -> SocketAddr {
    tokio::task::spawn_blocking(|| sts("sts-http", "http", 10001))
        .await
        .unwrap()
}

pub fn stop_sts(name: &str) {
    fixture(&["stop", name]);
}

/// A broker running in this process.
pub struct Broker {
    pub binary: SocketAddr,
    pub http: SocketAddr,
    /// Every listener's address, by listener name.
    pub addrs: HashMap<String, SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Broker {
    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("broker stops within 60s")
                .unwrap();
        }
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(mut self) {
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("broker stops")
                .unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Route config for an upstream: "binary" or "http" transport.
pub fn route_toml(transport: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[routes.r.upstream]\ntransport = \"{transport}\"\nhost = \"{}\"\nport = {}\n{extra}\n",
        upstream.ip(),
        upstream.port()
    )
}

/// Starts a broker with a binary and an HTTP listener (ports chosen by the
/// OS) in front of the route given as TOML.
pub async fn start_broker(route: &str) -> Broker {
    start_broker_with(route, "").await
}

/// A binary and an HTTP listener on ephemeral ports, both to route "r".
pub const LISTENERS: &str = r#"
[[listener]]
name = "binary"
protocol = "binary"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true

[[listener]]
name = "http"
protocol = "http"
bind = "127.0.0.1:0"
route = "r"
auth = "none"
allow_any_user = true
"#;

pub async fn start_broker_with(route: &str, server: &str) -> Broker {
    let toml = format!("[server]\nshutdown_grace = \"10s\"\n{server}\n{LISTENERS}\n{route}\n");
    start_broker_toml(&toml).await
}

/// Starts a broker from a whole config; listeners bind where it says
/// (use 127.0.0.1:0). `binary`/`http` are the listeners of those names.
pub async fn start_broker_toml(toml: &str) -> Broker {
    let cfg = Config::from_toml(toml, "test").expect("test config is valid");
    let listeners = kyuubi_broker::bind_all(&cfg).await.unwrap();
    let addrs: HashMap<String, SocketAddr> = listeners
        .iter()
        .map(|l| (l.name.clone(), l.tcp.local_addr().unwrap()))
        .collect();
    let unbound: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let prepared = kyuubi_broker::prepare(cfg).expect("test listeners' authenticators build");
    let task = tokio::spawn(kyuubi_broker::run(prepared, listeners, async {
        let _ = rx.await;
    }));
    Broker {
        binary: addrs.get("binary").copied().unwrap_or(unbound),
        http: addrs.get("http").copied().unwrap_or(unbound),
        addrs,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Runs a scenario of tests/clients/hs2_client.py and returns its JSON.
pub async fn py_client(
    client: &str,
    mode: &str,
    port: u16,
    scenario: &str,
    arg: Option<&str>,
) -> Value {
    py_client_args(client, mode, port, scenario, arg, &[]).await
}

pub async fn py_client_args(
    client: &str,
    mode: &str,
    port: u16,
    scenario: &str,
    arg: Option<&str>,
    extra: &[&str],
) -> Value {
    py_client_env(client, mode, port, scenario, arg, extra, &[]).await
}

/// As [`py_client_args`], with extra environment (e.g. a Kerberos ticket cache).
pub async fn py_client_env(
    client: &str,
    mode: &str,
    port: u16,
    scenario: &str,
    arg: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.envs(env.iter().copied());
    cmd.arg(root().join("tests/clients/hs2_client.py"))
        .args([
            "--client",
            client,
            "--mode",
            mode,
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .arg(scenario);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("client finished within 300s")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}):\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        v.get("fatal").is_none(),
        "{client} {mode} {scenario} failed: {v}"
    );
    v
}

pub struct BeelineRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs beeline (Hive JDBC 2.3.10) with a script file.
pub async fn beeline(url: &str, user: &str, password: &str, script: &str) -> BeelineRun {
    beeline_env(url, user, password, script, &[]).await
}

/// As [`beeline`], with extra environment (e.g. a Kerberos ticket cache).
pub async fn beeline_env(
    url: &str,
    user: &str,
    password: &str,
    script: &str,
    env: &[(&str, &str)],
) -> BeelineRun {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    let sh = tokio::task::spawn_blocking(spark_home).await.unwrap();
    let mut cmd = tokio::process::Command::new(sh.join("bin/beeline"));
    cmd.args([
        "-u",
        url,
        "-n",
        user,
        "-p",
        password,
        "--silent=true",
        "--outputformat=csv2",
        "-f",
    ])
    .arg(&file)
    .env("LC_ALL", "C.UTF-8")
    .env("SPARK_HOME", &sh)
    .envs(env.iter().copied())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("beeline finished within 300s")
        .expect("beeline runs");
    BeelineRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn jdbc_url(mode: &str, addr: SocketAddr) -> String {
    match mode {
        "http" => format!("jdbc:hive2://{addr}/;transportMode=http;httpPath=cliservice"),
        _ => format!("jdbc:hive2://{addr}/"),
    }
}

/// A unique table name per test, so tests can share one server.
pub fn table(tag: &str) -> String {
    format!("kb_{tag}_{}", std::process::id())
}

/// A TCP relay in front of a real server that counts connections, to observe
/// how the broker uses its upstream.
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingRelay {
    pub async fn start(target: SocketAddr) -> CountingRelay {
        use std::sync::atomic::Ordering::SeqCst;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                a.fetch_add(1, SeqCst);
                o.fetch_add(1, SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    if let Ok(mut u) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    o.fetch_sub(1, SeqCst);
                });
            }
        });
        CountingRelay {
            addr,
            accepted,
            open,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How a test client reaches a broker or server.
pub fn client_cfg(transport: Transport, addr: SocketAddr, sasl: UpstreamSasl) -> UpstreamConfig {
    let mut cfg = UpstreamConfig::new(transport, addr.ip().to_string(), addr.port());
    cfg.sasl = sasl;
    cfg.read_timeout = Duration::from_secs(60);
    cfg
}

pub const EMU_AK: &str = "testAccessKeyId";
pub const EMU_SECRET: &str = "testAccessKeySecret";
pub const EMU_WS: &str = "w-1234567890abcdef";
pub const EMU_KB: &str = "kb-0123456789abcdef0123456789abcdef";

/// The management-API emulator in this process, and optionally its token
/// gateway in front of an HTTP HiveServer2.
pub struct Emu {
    pub api: SocketAddr,
    pub gateway: SocketAddr,
    pub emu: std::sync::Arc<kyuubi_broker::emulator::Emulator>,
}

pub async fn start_emulator(gateway_upstream: Option<SocketAddr>) -> Emu {
    use kyuubi_broker::emulator::{serve_api, serve_gateway, Emulator, EmulatorConfig};
    let emu = Emulator::new(EmulatorConfig {
        access_key_id: EMU_AK.into(),
        access_key_secret: kyuubi_broker::secret::Secret::new(EMU_SECRET),
        region: "cn-hangzhou".into(),
        workspace: EMU_WS.into(),
        kyuubi_service: EMU_KB.into(),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = l.local_addr().unwrap();
    tokio::spawn(serve_api(l, emu.clone(), std::future::pending()));
    let g = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = g.local_addr().unwrap();
    if let Some(up) = gateway_upstream {
        let uri = format!("http://{up}/cliservice").parse().unwrap();
        tokio::spawn(serve_gateway(g, emu.clone(), uri, std::future::pending()));
    }
    Emu { api, gateway, emu }
}

/// Opens a session with `conf`, runs `sql`, and returns column `col` of the
/// first row as a string.
pub async fn scalar(
    c: &mut Hs2Client,
    conf: &[(&str, &str)],
    sql: &str,
    col: usize,
) -> Result<String, ClientError> {
    let s = c.open_session_with(conf).await?;
    let op = c.execute(&s, sql).await?;
    let rows = c.fetch(&op, 1).await?;
    c.close_session(s).await?;
    match &rows.results.unwrap().columns.unwrap()[col] {
        TColumn::StringVal(v) => Ok(v.values[0].clone()),
        other => panic!("unexpected column {other:?}"),
    }
}

/// `select current_user()` on a new connection (SASL PLAIN or HTTP Basic
/// as `user`/`pw`): who the upstream thinks the session belongs to.
pub async fn current_user(
    addr: SocketAddr,
    t: Transport,
    user: &str,
    pw: &str,
) -> Result<String, ClientError> {
    let mut c = Hs2Client::connect(&client_cfg(t, addr, UpstreamSasl::Plain), user, pw).await?;
    scalar(&mut c, &[], "select current_user()", 0).await
}
