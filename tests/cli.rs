//! The command line: `check-config` and `serve` with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kyuubi-broker");

/// The fixture's TLS test certificates (`scripts/fixture.sh tls-certs`).
fn tls_certs() -> std::path::PathBuf {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fixture.sh"))
        .arg("tls-certs")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

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
fn check_config_warns_about_a_non_loopback_listener_taking_passwords_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let hash = kyuubi_broker::auth::hash_password("alice-pw");
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let listener = |name: &str, bind: &str, tls: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"http\"\nbind = \"{bind}\"\nroute = \"r\"\nauth = \"static\"\nusers_file = \"{}\"\n{tls}\n",
            users.display()
        )
    };
    let certs = tls_certs();
    let tls = format!(
        "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        certs.join("server.pem").display(),
        certs.join("server-key.pem").display()
    );
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "{}{}{}[routes.r.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 10000\n",
            listener("open", "0.0.0.0:10099", ""),
            listener("covered", "0.0.0.0:10098", &tls),
            listener("local", "127.0.0.1:10097", "")
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(
        warnings.len(),
        1,
        "only the plaintext non-loopback one: {err}"
    );
    assert!(
        warnings[0]
            .contains("listener 'open' on 0.0.0.0:10099 takes passwords (HTTP Basic) without TLS"),
        "{err}"
    );
}

#[test]
fn check_config_warns_about_ldap_passwords_sent_in_clear_to_a_non_loopback_server() {
    let dir = tempfile::tempdir().unwrap();
    // loopback listeners: no warning of their own about the client side
    let listener = |name: &str, port: u16, ldap: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:{port}\"\nroute = \"r\"\nauth = \"ldap\"\n[listener.ldap]\nuser_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\"\n{ldap}\n"
        )
    };
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "{}{}{}{}[routes.r.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 10000\n",
            listener("clear", 10096, "url = \"ldap://ldap.example.com:389\""),
            listener("starttls", 10095, "url = \"ldap://ldap.example.com:389\"\nstarttls = true"),
            listener("ldaps", 10094, "url = \"ldaps://ldap.example.com:636\""),
            listener("local", 10093, "url = \"ldap://127.0.0.1:3890\"")
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "only the one in clear: {err}");
    assert!(
        warnings[0].starts_with(
            "warning: listener 'clear' checks passwords against ldap://ldap.example.com:389 without TLS"
        ) && warnings[0].contains("use ldaps:// or set starttls = true"),
        "{err}"
    );
}

#[test]
fn check_config_accepts_the_tls_examples_once_the_test_certificates_exist() {
    let root = env!("CARGO_MANIFEST_DIR");
    tls_certs();
    for example in ["tls.toml", "tls-upstream.toml"] {
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(format!("{root}/config/examples/{example}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn sighup_reloads_a_tls_listeners_certificate_even_when_its_files_did_not_change() {
    let certs = tls_certs();
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "[admin]\nbind = \"{admin}\"\n\n[[listener]]\nname = \"b\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\nauth = \"none\"\nallow_any_user = true\n\n\
             [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [routes.r.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 9\n",
            certs.join("server.pem").display(),
            certs.join("server-key.pem").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&f)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reloads = || -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(
            body.lines()
                .find(|l| l.starts_with("kyuubi_broker_tls_reloads_total{"))
                .unwrap_or("")
                .to_string(),
        )
    };
    let t0 = Instant::now();
    // up (admin answering), and the SIGHUP handler registered with it
    while reloads().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the broker did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reloads().unwrap(), "", "no reload before the signal");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let line = loop {
        let l = reloads().unwrap_or_default();
        if !l.is_empty() {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no reload after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        line.contains("result=\"ok\"") && line.ends_with(" 1"),
        "{line}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the broker"
    );
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("TLS certificate reloaded"), "{err}");
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
fn serve_stops_cleanly_on_sigterm_and_logs_plain_text_to_a_pipe() {
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
    let mut seen = Vec::new();
    for l in lines.by_ref().take(20).map_while(Result::ok) {
        let up = l.contains("binary listener up");
        seen.push(l);
        if up {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("binary listener up")),
        "the broker reports its listener: {seen:?}"
    );
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
    // stderr is a pipe here, as under systemd or `> file`: no colour codes
    let coloured: Vec<&String> = seen
        .iter()
        .chain(&rest)
        .filter(|l| l.contains('\x1b'))
        .collect();
    assert!(
        coloured.is_empty(),
        "ANSI escapes in piped logs: {coloured:?}"
    );
}

/// The subcommands `--help` lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

fn help_of(path: &[String]) -> String {
    let out = Command::new(BIN).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "{path:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_subcommand_help_ends_with_an_example_that_names_the_program() {
    let mut todo = vec![vec![]];
    let mut checked = Vec::new();
    while let Some(path) = todo.pop() {
        let help = help_of(&path);
        let example = help.split("Example:").nth(1).unwrap_or_else(|| {
            panic!(
                "`kyuubi-broker {}` --help has no example:\n{help}",
                path.join(" ")
            )
        });
        assert!(example.contains("kyuubi-broker"), "{path:?}: {example}");
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        checked.push(path.join(" "));
    }
    for must in [
        "serve",
        "token",
        "token revoke",
        "completions",
        "man",
        "bench",
    ] {
        assert!(
            checked.iter().any(|c| c == must),
            "{must} not reached: {checked:?}"
        );
    }
}

#[test]
fn bash_completion_offers_subcommands_and_their_flags() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("kb.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // what bash's programmable completion does on <TAB>: the function
    // `complete -p` names, with COMP_WORDS and COMP_CWORD set
    let complete = |words: &str, cword: usize| -> String {
        let prog = format!(
            "source {}; f=$(complete -p kyuubi-broker | sed -E 's/.*-F ([^ ]+).*/\\1/'); \
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             \"$f\" kyuubi-broker \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &prog])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = complete("kyuubi-broker to", 1);
    assert_eq!(top.trim(), "token", "{top}");
    let flags = complete("kyuubi-broker serve --c", 2);
    assert!(flags.lines().any(|l| l == "--config"), "{flags}");
    let shells = complete("kyuubi-broker completions", 2);
    for sh in ["bash", "zsh", "fish"] {
        assert!(shells.lines().any(|l| l == sh), "{shells}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("serve"),
            "{shell}"
        );
    }
}

#[test]
fn man_pages_render_without_groff_warnings_one_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for want in [
        "kyuubi-broker.1",
        "kyuubi-broker-serve.1",
        "kyuubi-broker-token-revoke.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want} missing: {pages:?}");
    }
    for p in &pages {
        let out = Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
            .arg(dir.path().join(p))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let main = Command::new(BIN).arg("man").output().unwrap();
    let text = String::from_utf8(main.stdout).unwrap();
    assert!(
        text.contains(".TH kyuubi-broker 1") && text.contains("completions"),
        "{text}"
    );
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

/// Stops a `serve` child even when an assertion fails first.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One SASL frame: status byte, 4-byte big-endian length, payload.
fn sasl_frame(status: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![status];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn serve_writes_audit_events_to_server_audit_log_as_private_json_lines() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    const RIGHT: &str = "Right-Pw-4k";
    const WRONG: &str = "Wrong-Pw-8m";
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("alice:{}\n", kyuubi_broker::auth::hash_password(RIGHT)),
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "[server]\naudit_log = {audit:?}\n\n\
             [[listener]]\nname = \"b\"\nprotocol = \"binary\"\nbind = \"127.0.0.1:0\"\nroute = \"r\"\n\
             auth = \"static\"\nusers_file = {users:?}\nallow_any_user = true\n\n\
             [routes.r.upstream]\ntransport = \"binary\"\nhost = \"127.0.0.1\"\nport = 9\n"
        ),
    )
    .unwrap();
    let mut child = Child(
        Command::new(BIN)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&f)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .find(|l| l.contains("binary listener up"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            v["fields"]["addr"].as_str().unwrap().to_string()
        })
        .expect("the broker reports its listener");
    // keep draining stderr so the child never blocks on a full pipe
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));

    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&sasl_frame(1, b"PLAIN")).unwrap();
    s.write_all(&sasl_frame(2, format!("\0alice\0{WRONG}").as_bytes()))
        .unwrap();
    let mut status = [0u8; 1];
    s.read_exact(&mut status).unwrap();
    assert!(
        matches!(status[0], 3 | 4),
        "a refusal, got status {}",
        status[0]
    );
    drop(s);

    let t0 = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.contains("login_failed") {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no login_failed event in {} within 10 s: {text:?}",
            audit.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is one JSON object"))
        .collect();
    let failed = events
        .iter()
        .find(|e| e["fields"]["event"] == "login_failed")
        .expect("a login_failed event");
    assert_eq!(failed["fields"]["user"], "alice", "{failed}");
    assert!(!text.contains(WRONG) && !text.contains(RIGHT), "{text}");
    assert!(
        events.iter().all(|e| e["target"] == "audit"),
        "only audit events reach the audit file: {text}"
    );
    let mode = std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the audit file is private");
}
