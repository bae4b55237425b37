//! Shared integration-test harness: the real Spark Thrift Server fixture
//! (started through `scripts/fixture.sh`, once per instance name), an
//! in-process broker on ephemeral ports, the real clients (PyHive, impyla,
//! beeline) run as subprocesses, and a fake upstream for tests whose point
//! is an upstream that answers, stalls or breaks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Config, Transport, UpstreamConfig, UpstreamSasl};
use kyuubi_broker::error::UpstreamError;
use kyuubi_broker::tcli::gen::TColumn;
use kyuubi_broker::wire::thrift::{ttype, MessageType, Writer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
    sts_args(name, mode, port, &["--auth", auth])
}

/// As [`sts`], with more `fixture.sh start` options.
pub fn sts_args(name: &str, mode: &str, port: u16, extra: &[&str]) -> SocketAddr {
    static STARTED: OnceLock<Mutex<HashMap<String, SocketAddr>>> = OnceLock::new();
    let started = STARTED.get_or_init(Default::default);
    let mut map = started.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = map.get(name) {
        return *a;
    }
    let port = port.to_string();
    let mut args = vec!["start", name, "--mode", mode, "--port", &port];
    args.extend_from_slice(extra);
    let addr: SocketAddr = fixture(&args).parse().unwrap();
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

/// The fixture's TLS test CA and certificates (`scripts/fixture.sh
/// tls-certs`): `ca.pem`, `server.pem`, `truststore.jks`, ...
pub async fn tls_dir() -> PathBuf {
    tokio::task::spawn_blocking(|| PathBuf::from(fixture(&["tls-certs"])))
        .await
        .unwrap()
}

/// A Spark Thrift Server with `hive.server2.use.SSL=true` and the fixture's
/// server certificate: binary on 127.0.0.1:10007, HTTP on 10008.
pub async fn sts_ssl(mode: &'static str) -> SocketAddr {
    tls_dir().await;
    tokio::task::spawn_blocking(move || match mode {
        "http" => sts_args("sts-ssl-http", "http", 10008, &["--ssl"]),
        _ => sts_args("sts-ssl", "binary", 10007, &["--ssl"]),
    })
    .await
    .unwrap()
}

pub fn stop_sts(name: &str) {
    fixture(&["stop", name]);
}

/// A `tracing` writer into a shared buffer, for tests that read the logs
/// of the brokers they run.
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    let mut cmd = py_command(client, mode, port, scenario, arg, extra, env);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("client finished within 300s")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    final_json(
        &format!("{client} {mode} {scenario}"),
        &stdout,
        &String::from_utf8_lossy(&out.stderr),
    )
}

fn py_command(
    client: &str,
    mode: &str,
    port: u16,
    scenario: &str,
    arg: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
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
    cmd
}

/// The client's result: the last line of its stdout, a JSON object
/// without "fatal".
fn final_json(what: &str, stdout: &str, stderr: &str) -> Value {
    let last = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("client printed no JSON ({e}):\nstdout: {stdout}\nstderr: {stderr}")
    });
    assert!(v.get("fatal").is_none(), "{what} failed: {v}");
    v
}

/// A scenario of tests/clients/hs2_client.py still running: its progress
/// lines (`{"event": …}`) can be awaited before its result.
pub struct PyRun {
    what: String,
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stdout: String,
    stderr: JoinHandle<String>,
}

/// Starts a scenario of tests/clients/hs2_client.py without waiting for it.
pub fn py_client_spawn(
    client: &str,
    mode: &str,
    port: u16,
    scenario: &str,
    arg: Option<&str>,
    extra: &[&str],
) -> PyRun {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut cmd = py_command(client, mode, port, scenario, arg, extra, &[]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("python runs");
    let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // drained alongside, so a chatty client never blocks on a full pipe
    let mut err = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    PyRun {
        what: format!("{client} {mode} {scenario}"),
        child,
        lines,
        stdout: String::new(),
        stderr,
    }
}

impl PyRun {
    async fn next_line(&mut self) -> Option<String> {
        let line = self.lines.next_line().await.expect("read client stdout")?;
        self.stdout.push_str(&line);
        self.stdout.push('\n');
        Some(line)
    }

    /// Waits until the client prints `{"event": name}`; panics if it ends
    /// first or takes longer than `within`.
    pub async fn event(&mut self, name: &str, within: Duration) {
        let wait = async {
            while let Some(line) = self.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["event"] == name {
                    return true;
                }
            }
            false
        };
        let seen = tokio::time::timeout(within, wait).await;
        assert!(
            seen == Ok(true),
            "{}: no {{\"event\": \"{name}\"}} within {within:?} (ended: {}):\nstdout: {}",
            self.what,
            seen.is_ok(),
            self.stdout
        );
    }

    /// Waits for the client to end and returns its result, as [`py_client`] does.
    pub async fn finish(mut self) -> Value {
        let rest = async {
            while self.next_line().await.is_some() {}
            self.child.wait().await.expect("python exits")
        };
        tokio::time::timeout(Duration::from_secs(300), rest)
            .await
            .expect("client finished within 300s");
        let stderr = self.stderr.await.unwrap_or_default();
        final_json(&self.what, &self.stdout, &stderr)
    }
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
/// how the broker uses its upstream, and can watch for a byte string going
/// upstream (e.g. a statement's text), to know that a call is in flight.
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    marked: tokio::sync::watch::Receiver<usize>,
}

impl CountingRelay {
    pub async fn start(target: SocketAddr) -> CountingRelay {
        CountingRelay::watching(target, b"").await
    }

    /// As [`CountingRelay::start`], also counting how often `marker` was
    /// passed on to `target`.
    pub async fn watching(target: SocketAddr, marker: &[u8]) -> CountingRelay {
        use std::sync::atomic::Ordering::SeqCst;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (marks, marked) = tokio::sync::watch::channel(0usize);
        let (marks, marker) = (Arc::new(marks), Arc::new(marker.to_vec()));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                a.fetch_add(1, SeqCst);
                o.fetch_add(1, SeqCst);
                let (o, marks, marker) = (o.clone(), marks.clone(), marker.clone());
                tokio::spawn(async move {
                    if let Ok(u) = tokio::net::TcpStream::connect(target).await {
                        let (cr, cw) = c.into_split();
                        let (ur, uw) = u.into_split();
                        tokio::join!(relay_up(cr, uw, &marker, &marks), relay_down(ur, cw));
                    }
                    o.fetch_sub(1, SeqCst);
                });
            }
        });
        CountingRelay {
            addr,
            accepted,
            open,
            marked,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once the watched marker has been passed on `n` times.
    pub async fn forwarded(&self, n: usize) {
        let mut rx = self.marked.clone();
        rx.wait_for(|seen| *seen >= n).await.expect("relay running");
    }
}

/// Client to target, counting `marker` in what has been written on.
async fn relay_up(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    marker: &[u8],
    marks: &tokio::sync::watch::Sender<usize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    // the end of what came before, so a marker split across reads is found once
    let mut window = Vec::new();
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if !marker.is_empty() {
            window.extend_from_slice(&buf[..n]);
            let hits = window
                .windows(marker.len())
                .filter(|w| *w == marker)
                .count();
            if hits > 0 {
                marks.send_modify(|seen| *seen += hits);
            }
            window.drain(..window.len().saturating_sub(marker.len() - 1));
        }
    }
    let _ = to.shutdown().await;
}

async fn relay_down(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
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
        tokio::spawn(serve_gateway(
            g,
            emu.clone(),
            uri,
            None,
            std::future::pending(),
        ));
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

/// Checks that `r` is the broker refusing `user`'s password login, as it
/// refuses every wrong password or unknown user: SASL BAD on binary, HTTP
/// 401 on HTTP, with the one refusal text. Returns that text.
pub fn login_refused<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    t: Transport,
    user: &str,
) -> String {
    // the one refusal text, whatever was wrong (user, password, group)
    let text = format!("kyuubi-broker: authentication failed for user '{user}'");
    let expected = match t {
        Transport::Http => format!("HTTP 401: {text}"),
        Transport::Binary => text,
    };
    match r {
        Err(ClientError::Transport(UpstreamError::AuthRejected { reason, .. })) => {
            assert_eq!(reason, expected, "{t:?}");
            reason
        }
        other => panic!("{t:?}: expected {user}'s login to be refused, got {other:?}"),
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

// ---- a fake upstream ------------------------------------------------------

/// A call the fake upstream received.
pub struct Call {
    pub method: String,
    pub seqid: i32,
    pub msg: Bytes,
}

/// What the fake upstream does with a call.
pub enum Reply {
    /// What a minimal HiveServer2 answers (see [`FakeUpstream::binary`]).
    Answer,
    /// This Thrift message, in a data frame.
    Message(Vec<u8>),
    /// These bytes as they are, no framing added.
    Raw(Vec<u8>),
    /// Nothing; the connection stays open.
    Nothing,
    /// These bytes as they are, then close the connection.
    RawThenHangUp(Vec<u8>),
    /// What [`Reply::Answer`] would send, after this long (a slow query).
    AnswerAfter(Duration),
}

enum Handshake {
    /// Accept SASL PLAIN with any credentials.
    Plain,
    /// Refuse SASL PLAIN with this reason, as HiveServer2 does for a wrong password.
    Reject(String),
    /// Never send a byte, not even the handshake's answer.
    Mute,
}

type OnCall = Arc<dyn Fn(&Call) -> Reply + Send + Sync>;

/// A test-only binary-transport upstream, for tests whose point is an
/// upstream that answers, stalls or breaks (compatibility is proved against
/// the real Spark Thrift Server instead). Listens on 127.0.0.1.
pub struct FakeUpstream {
    handshake: Handshake,
    on_call: OnCall,
}

/// A running [`FakeUpstream`]; stops accepting when dropped.
pub struct RunningFake {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::AbortHandle,
}

impl Drop for RunningFake {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl RunningFake {
    /// The methods called so far, in order, over all connections.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl FakeUpstream {
    /// Completes SASL PLAIN for any credentials, then answers like a minimal
    /// HiveServer2: OpenSession with a new session handle, every
    /// operation-creating call (ExecuteStatement, GetTables, …) with a new
    /// operation handle, GetInfo with a name, FetchResults with an empty
    /// row set, GetOperationStatus with FINISHED, anything else with a
    /// SUCCESS status.
    pub fn binary() -> FakeUpstream {
        FakeUpstream {
            handshake: Handshake::Plain,
            on_call: Arc::new(|_| Reply::Answer),
        }
    }

    /// Refuses SASL PLAIN with `reason`.
    pub fn reject_sasl(mut self, reason: &str) -> FakeUpstream {
        self.handshake = Handshake::Reject(reason.to_string());
        self
    }

    /// Accepts the TCP connection and never sends a byte.
    pub fn silent_from_accept(mut self) -> FakeUpstream {
        self.handshake = Handshake::Mute;
        self
    }

    /// Decides each call's reply.
    pub fn on_call(mut self, f: impl Fn(&Call) -> Reply + Send + Sync + 'static) -> FakeUpstream {
        self.on_call = Arc::new(f);
        self
    }

    /// Completes the handshake, then never answers a call.
    pub fn silent_after_sasl(self) -> FakeUpstream {
        self.on_call(|_| Reply::Nothing)
    }

    /// Answers every call with a frame that is not Thrift.
    pub fn garbage_replies(self) -> FakeUpstream {
        self.on_call(|_| Reply::Raw(b"\x00\x00\x00\x08NOTTHRFT".to_vec()))
    }

    /// Answers every call with a well-formed reply to another call (#999).
    pub fn replies_with_wrong_seqid(self) -> FakeUpstream {
        self.on_call(|c| {
            let mut w = Writer::default();
            w.message_begin(&c.method, MessageType::Reply, 999);
            w.stop();
            Reply::Message(w.buf)
        })
    }

    /// Answers OpenSession and calls that start an operation; answers any
    /// other call with a frame that declares `declared` bytes, and hangs up
    /// after sending `sent` bytes of it (length prefix included).
    pub fn cut_mid_reply(self, declared: u32, sent: usize) -> FakeUpstream {
        self.on_call(move |c| {
            if c.method == "OpenSession" || kyuubi_broker::tcli::creates_operation(&c.method) {
                return Reply::Answer;
            }
            let mut w = Writer::default();
            w.message_begin(&c.method, MessageType::Reply, c.seqid);
            let mut frame = declared.to_be_bytes().to_vec();
            frame.extend_from_slice(&w.buf);
            frame.resize(sent, 0);
            Reply::RawThenHangUp(frame)
        })
    }

    pub async fn start(self) -> RunningFake {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handshake = Arc::new(self.handshake);
        let (on_call, seen) = (self.on_call, calls.clone());
        let handles = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (handshake, on_call, seen, handles) = (
                    handshake.clone(),
                    on_call.clone(),
                    seen.clone(),
                    handles.clone(),
                );
                tokio::spawn(async move {
                    fake_connection(s, &handshake, &on_call, &seen, &handles).await;
                });
            }
        });
        RunningFake {
            addr,
            calls,
            accept: accept.abort_handle(),
        }
    }
}

async fn fake_connection(
    mut s: tokio::net::TcpStream,
    handshake: &Handshake,
    on_call: &OnCall,
    seen: &Mutex<Vec<String>>,
    handles: &std::sync::atomic::AtomicU64,
) {
    use kyuubi_broker::wire::io::{Framing, MessageIo};
    use kyuubi_broker::wire::sasl;
    use kyuubi_broker::wire::thrift::peek_header;
    if let Handshake::Mute = handshake {
        // hold the connection open, reading, until the peer gives up
        let mut sink = [0u8; 4096];
        while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let mut io = MessageIo::new(s, 1 << 20);
    // START "PLAIN", then the PLAIN response
    for _ in 0..2 {
        if io.read_sasl().await.is_err() {
            return;
        }
    }
    if let Handshake::Reject(reason) = handshake {
        let _ = io.write_sasl(sasl::Status::Bad, reason.as_bytes()).await;
        return;
    }
    if io.write_sasl(sasl::Status::Complete, b"").await.is_err() {
        return;
    }
    while let Ok(msg) = io.read_message(Framing::Sasl).await {
        let Ok(h) = peek_header(&msg) else {
            return;
        };
        let call = Call {
            method: h.name.to_string(),
            seqid: h.seqid,
            msg: msg.clone(),
        };
        seen.lock().unwrap().push(call.method.clone());
        let sent = match on_call(&call) {
            Reply::Answer => {
                let id = handles.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                io.write_message(Framing::Sasl, &hs2_answer(&call, id))
                    .await
            }
            Reply::AnswerAfter(d) => {
                tokio::time::sleep(d).await;
                let id = handles.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                io.write_message(Framing::Sasl, &hs2_answer(&call, id))
                    .await
            }
            Reply::Message(m) => io.write_message(Framing::Sasl, &m).await,
            Reply::Raw(b) => io.write_raw(&b).await,
            Reply::Nothing => Ok(()),
            Reply::RawThenHangUp(b) => {
                let _ = io.write_raw(&b).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A minimal HiveServer2's reply to `call`; `id` makes its handles unique.
fn hs2_answer(call: &Call, id: u64) -> Vec<u8> {
    use kyuubi_broker::tcli::gen::*;
    use thrift::protocol::{TBinaryOutputProtocol, TSerializable};
    let ok = || TStatus::new(TStatusCode::SUCCESS_STATUS, None, None, None, None);
    let handle = |tag: u8| {
        let mut guid = vec![tag; 8];
        guid.extend_from_slice(&id.to_be_bytes());
        THandleIdentifier::new(guid, vec![tag; 16])
    };
    let mut body: Vec<u8> = Vec::new();
    {
        let mut p = TBinaryOutputProtocol::new(&mut body, true);
        let r = match call.method.as_str() {
            "OpenSession" => TOpenSessionResp::new(
                ok(),
                TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
                TSessionHandle::new(handle(0x5e)),
                None,
            )
            .write_to_out_protocol(&mut p),
            m if kyuubi_broker::tcli::creates_operation(m) => TExecuteStatementResp::new(
                ok(),
                TOperationHandle::new(handle(0x0e), TOperationType::EXECUTE_STATEMENT, true, None),
            )
            .write_to_out_protocol(&mut p),
            "GetInfo" => TGetInfoResp::new(ok(), TGetInfoValue::StringValue("fake".into()))
                .write_to_out_protocol(&mut p),
            "FetchResults" => {
                TFetchResultsResp::new(ok(), false, TRowSet::new(0, vec![], vec![], None, None))
                    .write_to_out_protocol(&mut p)
            }
            "GetOperationStatus" => TGetOperationStatusResp {
                status: ok(),
                operation_state: Some(TOperationState::FINISHED_STATE),
                sql_state: None,
                error_code: None,
                error_message: None,
                task_status: None,
                operation_started: None,
                operation_completed: None,
                has_result_set: Some(true),
                progress_update_response: None,
                num_modified_rows: None,
            }
            .write_to_out_protocol(&mut p),
            // every TCLIService response has its status in field 1
            _ => TCloseSessionResp::new(ok()).write_to_out_protocol(&mut p),
        };
        r.expect("a generated struct serialises");
    }
    let mut w = Writer::default();
    w.message_begin(&call.method, MessageType::Reply, call.seqid);
    w.field(ttype::STRUCT, 0);
    w.buf.extend_from_slice(&body);
    w.stop();
    w.buf
}

// ---- raw protocol helpers ------------------------------------------------

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// An `Authorization: Basic` header line.
pub fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// Sends `bytes` on a new connection and reads until the broker closes it.
pub async fn send_and_read_all(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("the broker closes the connection")
        .ok();
    out
}

pub async fn raw_http(addr: SocketAddr, req: &[u8]) -> String {
    String::from_utf8_lossy(&send_and_read_all(addr, req).await).into_owned()
}

/// A raw HTTP/1.1 POST with `headers` (CRLF-terminated lines): status, head, body.
pub async fn http_post_bytes(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-thrift\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let raw = send_and_read_all(addr, &req).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    let (s, h, b) = http_post_bytes(addr, path, headers, body).await;
    (s, h, String::from_utf8_lossy(&b).into_owned())
}

/// `name{labels} value` lines of one Prometheus metric, by label text.
pub fn series(text: &str, name: &str) -> HashMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| {
            let (labels, value) = rest.strip_prefix('{')?.rsplit_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// GET on a broker's admin listener: status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    kyuubi_broker::cloud::client::install_tls_provider();
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A private ZooKeeper on its own port and state directory, so stopping it
/// disturbs no other test.
/// A ZooKeeper namespace (or fleet) no other test, or run, uses.
pub fn zk_namespace(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "kb-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A port free now (the caller binds it soon; another may take it first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct PrivateZk {
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrivateZk {
    pub fn new() -> PrivateZk {
        PrivateZk {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn run(&self, cmd: &str) {
        let st = std::process::Command::new(root().join("scripts/fixture.sh"))
            .arg(cmd)
            .env("KB_ZK_PORT", self.port.to_string())
            .env("KB_ZK_DIR", self.dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "fixture.sh {cmd}");
    }

    pub fn ensemble(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateZk {
    fn drop(&mut self) {
        self.run("zk-stop");
    }
}
