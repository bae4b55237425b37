//! Warm upstream sessions against the fixture's real Spark Thrift Server:
//! an OpenSession of a kind seen before is answered with a session opened
//! ahead, one client per session, never another identity's.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::Hs2Client;
use kyuubi_broker::config::{Transport, UpstreamSasl};

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

async fn connect(addr: SocketAddr, user: &str) -> Hs2Client {
    Hs2Client::connect(
        &client_cfg(Transport::Binary, addr, UpstreamSasl::Plain),
        user,
        "pw",
    )
    .await
    .unwrap()
}

/// A broker with an admin listener in front of `upstream`, with these
/// `[routes.r]` keys.
async fn broker_in_front_of(upstream: SocketAddr, route_keys: &str) -> Broker {
    let toml = format!(
        "[server]\nshutdown_grace = \"10s\"\n{ADMIN}{LISTENERS}\n{}",
        route_toml("binary", upstream, &format!("[routes.r]\n{route_keys}"))
    );
    start_broker_toml(&toml).await
}

async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (_, text) = admin_get(admin, "/metrics").await;
    series(&text, name).values().sum::<f64>() as u64
}

/// Waits (bounded) until the broker reports `n` ready warm sessions.
async fn ready(admin: SocketAddr, n: u64) {
    let t0 = Instant::now();
    while metric(admin, "kyuubi_broker_warm_sessions").await != n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{n} warm sessions within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn hits(admin: SocketAddr) -> u64 {
    let (_, text) = admin_get(admin, "/metrics").await;
    series(&text, "kyuubi_broker_warm_session_opens_total")
        .iter()
        .filter(|(labels, _)| labels.contains("result=\"hit\""))
        .map(|(_, v)| *v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_are_handed_out_once_and_carry_nothing_from_their_last_client() {
    let relay = CountingRelay::start(sts_binary().await).await;
    let b = broker_in_front_of(relay.addr, "warm_sessions = 2\ncache = false").await;
    let admin = b.addrs["admin"];

    // The first OpenSession of its kind is opened while the client waits,
    // and teaches the broker to keep two more ready.
    let mut first = connect(b.binary, "alice").await;
    let s = first.open_session().await.unwrap();
    ready(admin, 2).await;
    assert_eq!(hits(admin).await, 0);
    assert_eq!(relay.accepted(), 3, "one for the client, two warm");

    // The next one gets a warm session: no new upstream connection is made
    // for it before the answer (the refill comes after).
    let mut second = connect(b.binary, "alice").await;
    let s2 = second.open_session().await.unwrap();
    assert_eq!(hits(admin).await, 1);
    ready(admin, 2).await;
    assert_eq!(relay.accepted(), 4, "one refill for the one handed out");

    // That client changes its session, then leaves.
    for sql in [
        "set spark.sql.shuffle.partitions=7",
        "create temporary view kb_warm_tv as select 1 as a",
        "use default",
    ] {
        let op = second.execute(&s2, sql).await.unwrap();
        second.close_operation(op).await.unwrap();
    }
    second.close_session(s2).await.unwrap();
    drop(second);

    // Every later client sees a fresh session, not that one.
    for _ in 0..3 {
        ready(admin, 2).await;
        let mut c = connect(b.binary, "alice").await;
        let partitions = scalar(&mut c, &[], "set spark.sql.shuffle.partitions", 1)
            .await
            .unwrap();
        assert_ne!(partitions, "7", "a SET from another client's session");
        ready(admin, 2).await;
        let mut c = connect(b.binary, "alice").await;
        let s = c.open_session().await.unwrap();
        let err = c.execute(&s, "select * from kb_warm_tv").await;
        assert!(err.is_err(), "another client's temporary view is visible");
        c.close_session(s).await.unwrap();
    }
    assert_eq!(hits(admin).await, 7, "the later clients were served warm");

    // Another identity never gets alice's sessions: its first open is a miss.
    let before = hits(admin).await;
    assert_eq!(
        current_user(b.binary, Transport::Binary, "bob", "pw")
            .await
            .unwrap(),
        "bob",
        "bob runs as bob"
    );
    assert_eq!(hits(admin).await, before);

    first.close_session(s).await.unwrap();
    b.shutdown().await;
    // shutdown closes the sessions kept ready
    let t0 = Instant::now();
    while relay.open() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} upstream connections left",
            relay.open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_warm_sessions_opens_each_session_upstream() {
    let relay = CountingRelay::start(sts_binary().await).await;
    let b = broker_in_front_of(relay.addr, "").await;
    for _ in 0..2 {
        let mut c = connect(b.binary, "alice").await;
        let s = c.open_session().await.unwrap();
        c.close_session(s).await.unwrap();
    }
    assert_eq!(relay.accepted(), 2);
    assert_eq!(
        metric(b.addrs["admin"], "kyuubi_broker_warm_sessions").await,
        0
    );
    b.shutdown().await;
}

/// On a route at its governor's cap, a warm session gives its place to a
/// client that would otherwise queue: the upstream never holds more than
/// the cap, and the client is not kept waiting for `queue_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_give_their_places_to_clients_on_a_full_route() {
    let relay = CountingRelay::start(sts_binary().await).await;
    let b = broker_in_front_of(
        relay.addr,
        "warm_sessions = 2\ncache = false\nmax_upstream_sessions = 2\nqueue_timeout = \"20s\"",
    )
    .await;
    let admin = b.addrs["admin"];
    let mut a = connect(b.binary, "alice").await;
    let sa = a.open_session().await.unwrap();
    // one place is left for the two warm sessions asked for
    ready(admin, 1).await;
    assert_eq!(relay.open(), 2);
    let t0 = Instant::now();
    let mut c = connect(b.binary, "carol").await;
    let sc = c.open_session().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "not refused after queue_timeout"
    );
    assert!(
        relay.open() <= 2,
        "{} upstream connections for a cap of 2",
        relay.open()
    );
    assert!(metric(admin, "kyuubi_broker_governor_sessions").await <= 2);
    c.close_session(sc).await.unwrap();
    a.close_session(sa).await.unwrap();
    b.shutdown().await;
}

/// The upstream checks passwords (a Spark Thrift Server against the
/// fixture's slapd) and the listener leaves that to it: a client naming
/// alice with a wrong password is refused by the upstream, never handed a
/// session alice's own password opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_session_is_never_handed_to_a_client_with_another_password() {
    let sts = sts_ldap().await;
    let b = broker_in_front_of(sts, "warm_sessions = 2\ncache = false").await;
    let admin = b.addrs["admin"];
    assert_eq!(
        current_user(b.binary, Transport::Binary, "alice", "alice-pw")
            .await
            .unwrap(),
        "alice"
    );
    ready(admin, 2).await;
    let wrong = current_user(b.binary, Transport::Binary, "alice", "bob-pw").await;
    assert!(wrong.is_err(), "a wrong password got a session: {wrong:?}");
    assert_eq!(hits(admin).await, 0, "the wrong password was a miss");
    // the right one still gets a warm session
    ready(admin, 2).await;
    assert_eq!(
        current_user(b.binary, Transport::Binary, "alice", "alice-pw")
            .await
            .unwrap(),
        "alice"
    );
    assert_eq!(hits(admin).await, 1);
    b.shutdown().await;
}
