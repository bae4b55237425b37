//! Handles belong to their owner: another user's session or operation handles, duplicate or malformed handle fields.

use crate::common::*;
use kyuubi_broker::client::{ClientError, Hs2Client};
use kyuubi_broker::config::{Transport, UpstreamSasl};
use kyuubi_broker::tcli::gen::{
    TCloseSessionReq, TCloseSessionResp, TGetOperationStatusReq, TGetOperationStatusResp,
};
use kyuubi_broker::wire::thrift::{ttype, MessageType, Writer};

async fn login(addr: std::net::SocketAddr, t: Transport, user: &str) -> Hs2Client {
    Hs2Client::connect(&client_cfg(t, addr, UpstreamSasl::Plain), user, "x")
        .await
        .unwrap()
}

/// The broker's invalid-handle refusal, as a TStatus error.
fn refused_as_invalid_handle<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) {
    match r {
        Err(ClientError::Status(_, msg, _)) => {
            assert!(msg.contains("handle"), "{what}: {msg}")
        }
        other => panic!("{what}: expected an invalid-handle refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_operation_and_session_handles_are_refused_on_binary_and_http() {
    let b = start_broker_with(&route_toml("binary", sts_binary().await, ""), WITH_ADMIN).await;
    let mut alice = login(b.binary, Transport::Binary, "alice").await;
    let a_session = alice.open_session().await.unwrap();
    let a_op = alice.execute(&a_session, "select 42").await.unwrap();

    for (t, addr) in [(Transport::Binary, b.binary), (Transport::Http, b.http)] {
        let mut bob = login(addr, t, "bob").await;
        let b_session = bob.open_session().await.unwrap();
        refused_as_invalid_handle(bob.fetch(&a_op, 10).await, "FetchResults");
        let status: Result<TGetOperationStatusResp, _> = bob
            .call(
                "GetOperationStatus",
                &TGetOperationStatusReq {
                    operation_handle: a_op.clone(),
                    get_progress_update: None,
                },
            )
            .await;
        let status = status.and_then(|r| kyuubi_broker::client::check(&r.status).map(|_| r));
        refused_as_invalid_handle(status, "GetOperationStatus");
        let close: Result<TCloseSessionResp, _> = bob
            .call(
                "CloseSession",
                &TCloseSessionReq {
                    session_handle: a_session.clone(),
                },
            )
            .await;
        let close = close.and_then(|r| kyuubi_broker::client::check(&r.status).map(|_| r));
        refused_as_invalid_handle(close, "CloseSession");
        // bob's own work is served as usual
        bob.get_info(&b_session).await.unwrap();
        bob.close_session(b_session).await.unwrap();
    }
    // alice's query and session were never touched: her rows are all hers
    let rows = alice.fetch(&a_op, 10).await.unwrap();
    assert!(format!("{:?}", rows.results).contains("42"), "{rows:?}");
    alice.close_operation(a_op).await.unwrap();
    alice.close_session(a_session).await.unwrap();
    let m = admin_metrics(&b).await;
    let refused = series(&m, "kyuubi_broker_handles_refused_total");
    assert_eq!(refused.values().sum::<f64>() as u64, 6, "{refused:?}");
    b.shutdown().await;
}

async fn admin_metrics(b: &Broker) -> String {
    admin_get(b.addrs["admin"], "/metrics").await.1
}

const WITH_ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"";

/// A GetInfo naming `guid` with the handle-identifier field given twice:
/// the first a copy of the connection's own handle, the second `other`.
fn get_info_with_two_guids(own: &[u8], own_secret: &[u8], other: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("GetInfo", MessageType::Call, 7);
    w.field(ttype::STRUCT, 1); // args.req
    w.field(ttype::STRUCT, 1); // req.sessionHandle
    for g in [own, other] {
        w.field(ttype::STRUCT, 1); // sessionHandle.sessionId (twice)
        w.field(ttype::STRING, 1);
        w.binary(g);
        w.field(ttype::STRING, 2);
        w.binary(own_secret);
        w.stop();
    }
    w.stop();
    w.field(ttype::I32, 2); // infoType
    w.i32(2);
    w.stop();
    w.stop();
    w.buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_field_given_twice_is_refused_and_not_forwarded() {
    let b = start_broker(&route_toml("binary", sts_binary().await, "")).await;
    let mut alice = login(b.binary, Transport::Binary, "alice").await;
    let a_session = alice.open_session().await.unwrap();
    let mut bob = login(b.binary, Transport::Binary, "bob").await;
    let b_session = bob.open_session().await.unwrap();
    let own = &b_session.session_id;
    let msg = get_info_with_two_guids(&own.guid, &own.secret, &a_session.session_id.guid);
    let reply = bob.call_raw(msg.into()).await;
    // refused at the broker: an exception or an error status, never a
    // GetInfo answered by the upstream for alice's session
    let text = format!("{reply:?}");
    assert!(
        text.contains("twice"),
        "a duplicated handle field must be refused: {text}"
    );
    // both users are still served
    bob.get_info(&b_session).await.unwrap();
    alice.get_info(&a_session).await.unwrap();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nosasl_clients_own_password_never_reaches_the_upstream() {
    // the route presents its own account upstream (with the default
    // passthrough the client's credentials are forwarded on purpose)
    const PW: &[u8] = b"Nosasl-Client-Pw-8k";
    let relay = CountingRelay::watching(sts_binary().await, PW).await;
    let creds = "[routes.r.credentials]\nmode = \"static\"\nuser = \"svc\"\npassword = \"svc-pw\"";
    let b = start_broker(&format!(
        "{}\n{creds}",
        route_toml("binary", relay.addr, "")
    ))
    .await;
    let cfg = client_cfg(Transport::Binary, b.binary, UpstreamSasl::Nosasl);
    let mut c = Hs2Client::connect(&cfg, "carol", std::str::from_utf8(PW).unwrap())
        .await
        .unwrap();
    assert_eq!(
        scalar(&mut c, &[], "select current_user()", 0)
            .await
            .unwrap(),
        "svc"
    );
    // the OpenSession has been answered: whatever went upstream has gone
    let leaked = tokio::time::timeout(std::time::Duration::from_secs(1), relay.forwarded(1)).await;
    assert!(
        leaked.is_err(),
        "the client's password was forwarded upstream"
    );
    b.shutdown().await;
}
