//! Upstream sessions: a per-user cap over every transport, and idle HTTP
//! sessions closed upstream when the broker forgets them.

use std::time::{Duration, Instant};

use crate::common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};

async fn client(b: &Broker, t: Transport, user: &str) -> Hs2Client {
    let addr = match t {
        Transport::Binary => b.binary,
        Transport::Http => b.http,
    };
    Hs2Client::connect(&client_cfg(t, addr, UpstreamSasl::Plain), user, "pw")
        .await
        .expect("logs in")
}

fn opens(up: &RunningFake) -> usize {
    up.calls().iter().filter(|m| *m == "OpenSession").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_at_max_sessions_per_user_is_refused_on_every_transport_until_one_closes() {
    let up = FakeUpstream::binary().start().await;
    let b = start_broker_with(
        &route_toml("binary", up.addr, ""),
        "max_sessions_per_user = 2",
    )
    .await;
    let mut bin = client(&b, Transport::Binary, "carol").await;
    let first = bin.open_session().await.unwrap();
    let mut http = client(&b, Transport::Http, "carol").await;
    http.open_session().await.unwrap();
    assert_eq!(opens(&up), 2);
    for t in [Transport::Binary, Transport::Http] {
        let mut c = client(&b, t, "carol").await;
        match c.open_session().await {
            Err(ClientError::Status(_, text, _)) => {
                assert!(
                    text.contains("server.max_sessions_per_user"),
                    "{t:?}: {text}"
                )
            }
            other => panic!("{t:?}: a third session for carol: {other:?}"),
        }
    }
    assert_eq!(
        opens(&up),
        2,
        "the refused OpenSessions never reached the upstream"
    );
    // another user is not affected
    client(&b, Transport::Binary, "dave")
        .await
        .open_session()
        .await
        .unwrap();
    // a session closed frees its place
    bin.close_session(first).await.unwrap();
    bin.open_session()
        .await
        .expect("room again after CloseSession");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_session_idle_past_session_idle_timeout_is_closed_upstream_and_frees_its_place() {
    let up = FakeUpstream::binary().start().await;
    let server = "session_idle_timeout = \"1s\"\nmax_sessions_per_user = 1";
    let b = start_broker_with(&route_toml("binary", up.addr, ""), server).await;
    let mut http = client(&b, Transport::Http, "carol").await;
    http.open_session().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !up.calls().iter().any(|m| m == "CloseSession") {
        assert!(
            Instant::now() < deadline,
            "no CloseSession upstream 15 s after a 1 s idle timeout: {:?}",
            up.calls()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the expired session no longer counts against carol's cap
    client(&b, Transport::Http, "carol")
        .await
        .open_session()
        .await
        .expect("a new session once the idle one is gone");
    b.shutdown().await;
}
