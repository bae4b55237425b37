//! The command line: `check-config` and `serve` with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kyuubi-broker");

#[test]
fn check_config_accepts_the_shipped_local_config() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (2 listener(s), 1 route(s))"));
}

#[test]
fn check_config_names_the_bad_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "[[listener]]\nname = \"b\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:1\"\nroute = \"missing\"\nauth = \"none\"\nallow_any_user = true\n\n\
         [routes.r.upstream]\ntransport = \"binary\"\nhost = \"h\"\nport = 1\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listener[0].route") && err.contains("define [routes.missing]"),
        "{err}"
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "[[listener]]\nname = \"b\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\nauth = \"none\"\nallow_any_user = true\n\n\
         [routes.r.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 9\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&f)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let up = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("binary listener up"));
    assert!(up, "the broker reports its listener");
    let t0 = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no exit 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn hash_password_output_is_accepted_in_a_users_file() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains("s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("users");
    std::fs::write(&f, format!("alice:{hash}")).unwrap();
    assert_eq!(kyuubi_broker::auth::load_users(&f).unwrap()[0].0, "alice");
}
