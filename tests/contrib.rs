//! The files a platform team deploys, checked with the tools that read them.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kyuubi-broker");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The shipped unit with its binary path pointed at `bin`, in a directory
/// of its own under its real name (systemd derives the unit name from it).
fn unit_with(bin: &str) -> (tempfile::TempDir, PathBuf) {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("contrib/systemd/kyuubi-broker.service"))
            .unwrap();
    assert!(text.contains("/usr/local/bin/kyuubi-broker"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kyuubi-broker.service");
    std::fs::write(&path, text.replace("/usr/local/bin/kyuubi-broker", bin)).unwrap();
    (dir, path)
}

fn analyze(args: &[&str], unit: &Path) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian's systemd; .ci/run installs it)")
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_and_a_missing_binary_fails_it() {
    let (_d, good) = unit_with(BIN);
    let out = analyze(&["verify", "--man=no"], &good);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the check can fail: a unit whose binary is not there
    let (_d2, bad) = unit_with("/nonexistent/kyuubi-broker");
    let out = analyze(&["verify", "--man=no"], &bad);
    assert!(!out.status.success(), "verify accepted a missing binary");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not executable"));
}

#[test]
fn systemd_unit_sandbox_scores_ok_in_systemd_analyze_security() {
    let (_d, unit) = unit_with(BIN);
    let out = analyze(&["security", "--offline=yes", "--no-pager"], &unit);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let score: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // systemd rates 0–10; below 2 is its "OK" band (a bare unit scores 9.6)
    assert!(score < 2.0, "{line}");
    let text = std::fs::read_to_string(&unit).unwrap();
    for need in [
        "User=kyuubi-broker",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(text.contains(need), "{need}");
    }
}

#[test]
fn systemd_unit_checks_the_config_it_serves_with_a_command_the_binary_accepts() {
    let (_d, unit) = unit_with(BIN);
    let text = std::fs::read_to_string(&unit).unwrap();
    let args_of = |key: &str| -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    let conf = "/etc/kyuubi-broker/broker.toml";
    assert_eq!(args_of("ExecStart="), ["serve", "--config", conf]);
    let pre = args_of("ExecStartPre=");
    assert_eq!(pre, ["check-config", conf]);
    // the pre-start check as the unit runs it, on a config that exists here
    let local = format!("{ROOT}/config/local.toml");
    let out = Command::new(BIN).arg(&pre[0]).arg(&local).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let bad = Command::new(BIN)
        .arg(&pre[0])
        .arg("/nonexistent.toml")
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(64),
        "a missing config fails the start"
    );
}
