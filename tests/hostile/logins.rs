//! Login floods: backoff per user and client address, per-address failure budget, auth work off the async workers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};

/// A broker whose binary listener checks a users file (alice / alice-pw,
/// bob / bob-pw), with the admin listener and these `[server]` settings.
async fn static_broker(dir: &tempfile::TempDir, server: &str) -> Broker {
    let users = dir.path().join("users");
    let hash = kyuubi_broker::auth::hash_password;
    std::fs::write(
        &users,
        format!("alice:{}\nbob:{}\n", hash("alice-pw"), hash("bob-pw")),
    )
    .unwrap();
    let listeners = LISTENERS.replace(
        "auth = \"none\"\nallow_any_user = true",
        &format!("auth = \"static\"\nusers_file = \"{}\"", users.display()),
    );
    start_broker_toml(&format!(
        "[server]\nshutdown_grace = \"5s\"\n{server}\n[admin]\nbind = \"127.0.0.1:0\"\n{listeners}\n{}",
        route_toml("binary", sts_binary().await, "")
    ))
    .await
}

async fn try_login(addr: std::net::SocketAddr, user: &str, pw: &str) -> Result<(), String> {
    let cfg = client_cfg(Transport::Binary, addr, UpstreamSasl::Plain);
    match Hs2Client::connect(&cfg, user, pw).await {
        Ok(mut c) => c
            .open_session()
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}")),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_throttled_while_a_logged_in_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let b = static_broker(
        &dir,
        "login_backoff_max = \"4s\"\nlogin_failures_per_ip = 100000",
    )
    .await;
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain);
    let mut bob = Hs2Client::connect(&cfg, "bob", "bob-pw").await.unwrap();
    let session = bob.open_session().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let throttled = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..16 {
        let (stop, throttled, addr) = (stop.clone(), throttled.clone(), b.binary);
        flood.push(tokio::spawn(async move {
            let user = if i % 2 == 0 {
                "alice".to_string()
            } else {
                format!("mallory{i}")
            };
            while !stop.load(Ordering::Relaxed) {
                let e = try_login(addr, &user, "wrong").await.unwrap_err();
                if e.contains("too many failed logins") {
                    throttled.fetch_add(1, Ordering::Relaxed);
                } else {
                    assert!(e.contains("authentication failed"), "{e}");
                }
            }
        }));
    }
    // the logged-in client keeps being served throughout
    for _ in 0..200 {
        bob.get_info(&session).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while throttled.load(Ordering::Relaxed) < 16 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood was never throttled"
        );
        bob.get_info(&session).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    // one more checked failure for alice (earlier tries may be refused
    // unchecked) starts a delay; within it the right password is held back
    loop {
        let e = try_login(b.binary, "alice", "wrong").await.unwrap_err();
        if e.contains("authentication failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = try_login(b.binary, "alice", "alice-pw").await.unwrap_err();
    assert!(e.contains("too many failed logins; try again in"), "{e}");
    // ... until its delay (at most login_backoff_max) has passed
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match try_login(b.binary, "alice", "alice-pw").await {
            Ok(()) => break,
            Err(e) if e.contains("too many failed logins") => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still throttled: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let m = admin_get(b.addrs["admin"], "/metrics").await.1;
    let n: f64 = series(&m, "kyuubi_broker_logins_throttled_total")
        .values()
        .sum();
    assert!(n >= 16.0, "{m}");
    bob.get_info(&session).await.unwrap();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_failure_budget_is_refused_for_every_user() {
    let dir = tempfile::tempdir().unwrap();
    let b = static_broker(&dir, "login_failures_per_ip = 5").await;
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Plain);
    let mut bob = Hs2Client::connect(&cfg, "bob", "bob-pw").await.unwrap();
    let session = bob.open_session().await.unwrap();
    for i in 0..5 {
        let e = try_login(b.binary, &format!("guess{i}"), "wrong")
            .await
            .unwrap_err();
        assert!(e.contains("authentication failed"), "{e}");
    }
    // the right password of another user, from the same address: refused
    // unchecked, on the HTTP listener too (the budget is the broker's)
    let e = try_login(b.binary, "alice", "alice-pw").await.unwrap_err();
    assert!(e.contains("too many failed logins"), "{e}");
    let http = current_user(b.http, Transport::Http, "alice", "alice-pw").await;
    assert!(format!("{http:?}").contains("status: 429"), "{http:?}");
    // ... saying when to come back
    let (status, head, body) =
        http_post(b.http, "/cliservice", &basic("alice", "alice-pw"), b"x").await;
    assert_eq!(status, 429, "{body}");
    let retry = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no Retry-After in {head}"));
    assert!(
        retry
            .trim()
            .parse::<u64>()
            .is_ok_and(|s| (1..=60).contains(&s)),
        "{retry}"
    );
    // the connection that logged in before is still served
    bob.get_info(&session).await.unwrap();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_ldap_server_is_a_fast_retryable_refusal_that_hides_its_address() {
    // accepts and never answers
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = stalled.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = stalled.accept().await {
            conns.push(c);
        }
    });
    let listeners = LISTENERS.replace(
        "auth = \"none\"\nallow_any_user = true",
        &format!(
            "auth = \"ldap\"\n[listener.ldap]\nurl = \"ldap://{addr}\"\nuser_dn_pattern = \"uid=%s,ou=people,dc=example,dc=com\"\ntimeout = \"1s\"\nconnect_timeout = \"1s\""
        ),
    );
    let b = start_broker_toml(&format!(
        "{listeners}\n{}",
        route_toml("binary", sts_binary().await, "")
    ))
    .await;
    let t0 = std::time::Instant::now();
    let e = try_login(b.binary, "alice", "alice-pw").await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(
        e.contains("authentication service unavailable; try again shortly"),
        "{e}"
    );
    assert!(
        !e.contains(&addr.port().to_string()),
        "the LDAP address leaked: {e}"
    );
    b.shutdown().await;
    held.abort();
}
