//! The route governor in front of the fixture's real Spark Thrift Server:
//! 60 clients of 6 users through a route capped at 20 sessions, watched by
//! a relay on the upstream wire that the broker cannot fake; the clear,
//! counted refusal after `queue_timeout`; and HTTP sessions giving their
//! place back at CloseSession and at `session_idle_timeout`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::tcli::gen::TStatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A broker whose route "r" to `upstream` has these governor keys.
fn governed(upstream: SocketAddr, server: &str, keys: &str) -> String {
    format!(
        "[server]\nshutdown_grace = \"10s\"\n{server}\n[admin]\nbind = \"127.0.0.1:0\"\n{LISTENERS}\n\
         [routes.r]\n{keys}\n{}",
        route_toml("binary", upstream, "")
    )
}

fn client(t: Transport, addr: SocketAddr) -> kyuubi_broker::config::UpstreamConfig {
    client_cfg(t, addr, UpstreamSasl::Plain)
}

/// One series' value, as a whole number (counters and gauges here are).
fn value(text: &str, name: &str, labels: &str) -> u64 {
    let v = series(text, name)[labels];
    v as u64
}

/// The route's governor as `/status` shows it.
async fn governor(admin: SocketAddr) -> kyuubi_broker::governor::GovernorStatus {
    let s = kyuubi_broker::admin::fetch_status(admin).await.unwrap();
    s.routes[0].governor.clone()
}

/// Live sessions on the upstream, as its own wire shows them: up when an
/// OpenSession request goes to the server, down when a CloseSession reply
/// comes back from it (or the connection ends with sessions open). Counters
/// move before the bytes are passed on, so the count is never below what
/// the server holds: a maximum of 20 here means the server never had more.
#[derive(Default)]
struct Live {
    now: AtomicIsize,
    max: AtomicIsize,
}

impl Live {
    fn add(&self, n: isize) {
        let v = self.now.fetch_add(n, SeqCst) + n;
        self.max.fetch_max(v, SeqCst);
    }
}

async fn session_relay(target: SocketAddr) -> (SocketAddr, Arc<Live>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let live = Arc::new(Live::default());
    let all = live.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let live = all.clone();
            tokio::spawn(async move {
                let Ok(u) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let here = Arc::new(AtomicIsize::new(0));
                let (cr, cw) = c.into_split();
                let (ur, uw) = u.into_split();
                tokio::join!(
                    pass(cr, uw, b"OpenSession", 1, &live, &here),
                    pass(ur, cw, b"CloseSession", -1, &live, &here),
                );
                live.add(-here.load(SeqCst));
            });
        }
    });
    (addr, live)
}

/// Copies `from` to `to`, adding `step` for each `marker` seen, before the
/// bytes that complete it are written on.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    marker: &[u8],
    step: isize,
    live: &Live,
    here: &AtomicIsize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut window = Vec::new();
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        window.extend_from_slice(&buf[..n]);
        let hits = window
            .windows(marker.len())
            .filter(|w| *w == marker)
            .count() as isize;
        if hits > 0 {
            live.add(step * hits);
            here.fetch_add(step * hits, SeqCst);
        }
        window.drain(..window.len().saturating_sub(marker.len() - 1));
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// One client's run: the time its OpenSession took (its wait for a place,
/// plus the upstream's own open), and how long it then held its session.
struct Run {
    /// Its place in the order of arrival.
    arrival: usize,
    user: usize,
    waited: Duration,
    held: Duration,
    /// When it sent its OpenSession, and when that returned.
    asked: Instant,
    admitted: Instant,
}

impl Run {
    /// Its wait once places were being handed out (from the gate opening,
    /// or from its own OpenSession if later): the part the queue's order
    /// decides, without the time the test took to line the clients up.
    fn turn_wait(&self, gate_opened: Instant) -> Duration {
        self.admitted
            .saturating_duration_since(self.asked.max(gate_opened))
    }
}

async fn one_client(
    addr: SocketAddr,
    (arrival, user): (usize, usize),
    ready: tokio::sync::mpsc::UnboundedSender<()>,
    mut gate: watch::Receiver<bool>,
    hold: Duration,
) -> Result<Run, ClientError> {
    let mut c =
        Hs2Client::connect(&client(Transport::Binary, addr), &format!("u{user}"), "pw").await?;
    let t0 = Instant::now();
    let s = c.open_session().await?;
    let admitted = Instant::now();
    let op = c.execute(&s, "select 1").await?;
    c.fetch(&op, 1).await?;
    let _ = ready.send(());
    // the first 20 keep their places until every other client waits
    let _ = gate.wait_for(|open| *open).await;
    // the workload: a session in use for a while, not a wait for an event
    tokio::time::sleep(hold).await;
    c.close_session(s).await?;
    Ok(Run {
        arrival,
        user,
        waited: admitted - t0,
        held: admitted.elapsed(),
        asked: t0,
        admitted,
    })
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_clients_of_six_users_share_twenty_upstream_sessions_in_turn() {
    const USERS: usize = 6;
    const CAP: usize = 20;
    const HOLD: Duration = Duration::from_secs(2);
    let (relay, live) = session_relay(sts_binary().await).await;
    let b = start_broker_toml(&governed(
        relay,
        "",
        &format!("max_upstream_sessions = {CAP}\nqueue_timeout = \"120s\""),
    ))
    .await;
    let admin = b.addrs["admin"];
    // the broker's own view, sampled through /metrics while the run lasts
    let (stop, mut stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let (mut sessions, mut queue) = (0, 0);
        loop {
            let (_, text) = admin_get(admin, "/metrics").await;
            let key = "route=\"r\"";
            sessions = sessions.max(value(&text, "kyuubi_broker_governor_sessions", key));
            queue = queue.max(value(&text, "kyuubi_broker_governor_queue_length", key));
            tokio::select! {
                _ = stopped.changed() => return (sessions, queue),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    });
    // arrivals in a known order: the first 20 interleaved by user, the
    // other 40 in bursts (u0's, then u1's, ...), which a FIFO queue would
    // serve user after user
    let mut order: Vec<usize> = (0..CAP).map(|i| i % USERS).collect();
    for u in 0..USERS {
        let left = 10 - order.iter().filter(|x| **x == u).count();
        order.extend(std::iter::repeat_n(u, left));
    }
    let (open_gate, gate) = watch::channel(false);
    let (ready, mut readies) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for (k, &user) in order.iter().enumerate() {
        let me = (k, user);
        clients.push(tokio::spawn(one_client(
            b.binary,
            me,
            ready.clone(),
            gate.clone(),
            HOLD,
        )));
        // the next arrives once the governor has this one (admitted or queued)
        loop {
            let g = governor(admin).await;
            if g.in_use + g.queued > k {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    let g = governor(admin).await;
    assert_eq!((g.in_use, g.queued), (CAP, 60 - CAP), "{g:?}");
    // the first 20 have their sessions and have run their query
    for _ in 0..CAP {
        readies.recv().await.unwrap();
    }
    let gate_opened = Instant::now();
    open_gate.send(true).unwrap();
    let mut runs = Vec::new();
    for c in clients {
        runs.push(
            c.await
                .unwrap()
                .expect("every client is served before its deadline"),
        );
    }
    stop.send(true).unwrap();
    let (gauge_max, queue_max) = sampler.await.unwrap();

    // never more than 20 upstream sessions, by the wire and by the broker
    assert_eq!(
        live.max.load(SeqCst),
        CAP as isize,
        "sessions seen on the upstream wire"
    );
    assert_eq!(live.now.load(SeqCst), 0);
    assert!(
        gauge_max <= CAP as u64,
        "governor_sessions reached {gauge_max}"
    );
    assert_eq!(queue_max, (60 - CAP) as u64);

    // fairness: the first 20 places freed go round robin, 3 or 4 per user
    // (a FIFO queue would give them to u0, u1, u2 and one of u3's)
    let mut queued: Vec<&Run> = runs.iter().filter(|r| r.arrival >= CAP).collect();
    assert_eq!(queued.len(), 60 - CAP);
    queued.sort_by_key(|r| r.admitted);
    let mut second_round = [0; USERS];
    for r in &queued[..CAP] {
        second_round[r.user] += 1;
    }
    assert!(
        second_round.iter().all(|n| (3..=4).contains(n)),
        "places freed by the first holders, by user: {second_round:?}"
    );
    // and no user waits on average more than one slot's turn longer than another
    let mut holds: Vec<Duration> = queued.iter().map(|r| r.held).collect();
    let turn = quantile(&mut holds, 0.5);
    let of = |u: usize, f: &dyn Fn(&Run) -> Duration| -> Vec<Duration> {
        runs.iter().filter(|r| r.user == u).map(f).collect()
    };
    let mean = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64;
    let means: Vec<f64> = (0..USERS)
        .map(|u| mean(&of(u, &|r| r.turn_wait(gate_opened))))
        .collect();
    let spread = means.iter().cloned().fold(f64::MIN, f64::max)
        - means.iter().cloned().fold(f64::MAX, f64::min);
    for (u, m) in means.iter().enumerate() {
        let mut raw = of(u, &|r| r.waited);
        let mut turns = of(u, &|r| r.turn_wait(gate_opened));
        eprintln!(
            "u{u}: OpenSession took p50 {:.3}s p99 {:.3}s; wait once places were handed out p50 {:.3}s p99 {:.3}s mean {m:.3}s",
            quantile(&mut raw, 0.5).as_secs_f64(),
            quantile(&mut raw, 0.99).as_secs_f64(),
            quantile(&mut turns, 0.5).as_secs_f64(),
            quantile(&mut turns, 0.99).as_secs_f64(),
        );
    }
    let mut all: Vec<Duration> = runs.iter().map(|r| r.waited).collect();
    eprintln!(
        "all: OpenSession took p50 {:.3}s p99 {:.3}s; one slot's turn {:.3}s; spread of per-user \
         mean waits {spread:.3}s; places freed first, by user {second_round:?}; upstream max {} \
         sessions; broker gauge max {gauge_max}",
        quantile(&mut all, 0.5).as_secs_f64(),
        quantile(&mut all, 0.99).as_secs_f64(),
        turn.as_secs_f64(),
        live.max.load(SeqCst)
    );
    assert!(
        spread <= turn.as_secs_f64(),
        "per-user mean waits {means:?} spread {spread:.3}s, more than one turn ({turn:?})"
    );
    let g = governor(admin).await;
    // the broker's own measure: the wait for a place alone, all users
    eprintln!(
        "broker: governor wait p50 {} ms p99 {} ms",
        g.wait_p50_us / 1000,
        g.wait_p99_us / 1000
    );
    assert_eq!((g.in_use, g.queued, g.timeouts), (0, 0, 0), "{g:?}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_queue_timeout_fails_clearly_is_counted_and_leaks_no_place() {
    let b = start_broker_toml(&governed(
        sts_binary().await,
        "",
        "max_upstream_sessions = 1\nqueue_timeout = \"1s\"",
    ))
    .await;
    let admin = b.addrs["admin"];
    let cfg = client(Transport::Binary, b.binary);
    let mut holder = Hs2Client::connect(&cfg, "alice", "pw").await.unwrap();
    let held = holder.open_session().await.unwrap();
    let mut late = Hs2Client::connect(&cfg, "bob", "pw").await.unwrap();
    let t0 = Instant::now();
    match late.open_session().await {
        Err(ClientError::Status(TStatusCode::ERROR_STATUS, msg, state)) => {
            assert_eq!(state.as_deref(), Some("08004"), "{msg}");
            assert_eq!(
                msg,
                "kyuubi-broker: route 'r': all 1 upstream sessions (max_upstream_sessions) are in \
                 use and none came free within queue_timeout 1s; retry later"
            );
        }
        other => panic!("expected the queue timeout, got {other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    let (_, text) = admin_get(admin, "/metrics").await;
    let r = "route=\"r\"";
    assert_eq!(
        value(&text, "kyuubi_broker_governor_timeouts_total", r),
        1,
        "{text}"
    );
    let refused = "listener=\"binary\",kind=\"queue_timeout\"";
    assert_eq!(
        value(&text, "kyuubi_broker_client_errors_total", refused),
        1
    );
    assert_eq!(value(&text, "kyuubi_broker_governor_sessions", r), 1);
    assert_eq!(value(&text, "kyuubi_broker_governor_queue_length", r), 0);
    // the place comes back with CloseSession, and the refused client gets it
    holder.close_session(held).await.unwrap();
    let s = late.open_session().await.unwrap();
    late.close_session(s).await.unwrap();
    let g = governor(admin).await;
    assert_eq!(
        (g.max_upstream_sessions, g.in_use, g.queued, g.timeouts),
        (Some(1), 0, 0, 1),
        "{g:?}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_session_gives_its_place_back_at_close_session_and_when_left_idle() {
    let b = start_broker_toml(&governed(
        sts_binary().await,
        "session_idle_timeout = \"2s\"",
        "max_upstream_sessions = 1\nqueue_timeout = \"60s\"",
    ))
    .await;
    let admin = b.addrs["admin"];
    let mut web = Hs2Client::connect(&client(Transport::Http, b.http), "alice", "pw")
        .await
        .unwrap();
    let s = web.open_session().await.unwrap();
    web.close_session(s).await.unwrap();
    let mut bin = Hs2Client::connect(&client(Transport::Binary, b.binary), "bob", "pw")
        .await
        .unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), bin.open_session())
        .await
        .expect("CloseSession freed the place")
        .unwrap();
    bin.close_session(s).await.unwrap();
    // a session left open: closed upstream after session_idle_timeout,
    // which frees the place the waiting client then gets
    let _abandoned = web.open_session().await.unwrap();
    let t0 = Instant::now();
    let s = bin.open_session().await.unwrap();
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1500), "waited {waited:?}");
    bin.close_session(s).await.unwrap();
    let g = governor(admin).await;
    assert_eq!((g.in_use, g.queued, g.timeouts), (0, 0, 0), "{g:?}");
    b.shutdown().await;
}
