//! The management API: the official Python SDK and the broker's own client
//! against the project's emulator, including injected throttling and 5xx.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kyuubi_broker::cloud::client::{ApiClient, ApiError, Endpoint, Retry};
use kyuubi_broker::cloud::credentials::CloudCredential;
use kyuubi_broker::cloud::request::{AutoExpire, KyuubiRef, TokenBody};
use kyuubi_broker::emulator::{Emulator, Faults};
use kyuubi_broker::secret::Secret;
use serde_json::json;

const AK: &str = EMU_AK;
const SECRET: &str = EMU_SECRET;
const WS: &str = EMU_WS;
const KB: &str = EMU_KB;

async fn emulator() -> (Endpoint, Arc<Emulator>) {
    let e = start_emulator(None).await;
    (
        Endpoint::parse(&format!("http://{}", e.api)).unwrap(),
        e.emu,
    )
}

fn client(endpoint: Endpoint, secret: &str) -> ApiClient {
    let mut c = ApiClient::new(
        endpoint,
        CloudCredential {
            access_key_id: AK.into(),
            access_key_secret: Secret::new(secret),
            security_token: None,
            provider: "test".into(),
        },
    );
    c.retry = Retry {
        max_attempts: 4,
        throttle_wait: (Duration::from_millis(10), Duration::from_millis(20)),
        backoff: Duration::from_millis(10),
    };
    c
}

fn kref() -> KyuubiRef {
    KyuubiRef {
        region: "cn-hangzhou".into(),
        workspace: WS.into(),
        kyuubi_service: KB.into(),
    }
}

fn body(value: &str) -> TokenBody {
    TokenBody {
        name: Some("kb-test".into()),
        token: Some(value.into()),
        auto_expire_configuration: Some(AutoExpire {
            enable: true,
            expire_days: Some(3),
        }),
        member_arns: None,
    }
}

async fn set_faults(endpoint: &Endpoint, f: Faults) {
    let url = format!("{}/_emulator/faults", endpoint.base);
    let r = reqwest::Client::new()
        .post(url)
        .body(serde_json::to_vec(&f).unwrap())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdk_creates_lists_gets_updates_and_deletes_tokens_on_the_emulator() {
    let (endpoint, emu) = emulator().await;
    let port = endpoint.host.rsplit(':').next().unwrap().to_string();
    let out = tokio::process::Command::new(python())
        .arg(root().join("tests/clients/sdk_check.py"))
        .args([
            "--port",
            &port,
            "--ak",
            AK,
            "--secret",
            SECRET,
            "--workspace",
            WS,
            "--kyuubi-service",
            KB,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let id = v["created_token_id"].as_str().unwrap();
    assert!(id.starts_with("tk-"));
    assert_eq!(
        v["listed"],
        json!([[id, "sdk check token", "sdk**********lmn"]])
    );
    assert_eq!(v["got"]["expire_days"], json!(7));
    assert_eq!(v["got"]["expire_minus_create_days"], json!(7.0));
    assert_eq!(
        v["after_update"],
        json!({"name": "renamed by sdk", "token": "sdk**********efg"})
    );
    assert_eq!(v["after_delete"], json!([]));
    assert_eq!(v["service_state"], json!("RUNNING"));
    assert_eq!(
        v["workspaces"],
        json!([WS]),
        "a signed query with '+', '*', '~' verifies"
    );
    assert_eq!(
        v["bad_token"],
        json!({"code": "InvalidParameter", "status": 400})
    );
    assert_eq!(v["wrong_secret"]["code"], json!("SignatureDoesNotMatch"));
    assert!(v["wrong_secret"]["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert_eq!(emu.snapshot().deletes, 1);
}

#[tokio::test]
async fn broker_client_manages_tokens_and_services() {
    let (endpoint, emu) = emulator().await;
    let c = client(endpoint, SECRET);
    let r = kref();
    assert_eq!(
        c.list_workspaces("cn-hangzhou").await.unwrap()[0].workspace_id,
        WS
    );
    assert_eq!(
        c.get_workspace("cn-hangzhou", WS)
            .await
            .unwrap()
            .workspace_id,
        WS
    );
    assert!(!c
        .list_workspace_queues("cn-hangzhou", WS)
        .await
        .unwrap()
        .is_empty());
    let before = emu.snapshot().requests;
    let versions = c.list_release_versions("cn-hangzhou").await.unwrap();
    assert_eq!(versions.len(), 3, "both pages followed: {versions:?}");
    assert_eq!(emu.snapshot().requests - before, 2);
    assert_eq!(
        c.list_kyuubi_services(&r).await.unwrap()[0].kyuubi_service_id,
        KB
    );
    c.stop_kyuubi_service(&r).await.unwrap();
    assert_eq!(
        c.get_kyuubi_service(&r).await.unwrap().state.as_deref(),
        Some("NOT_STARTED")
    );
    c.start_kyuubi_service(&r).await.unwrap();
    assert_eq!(
        c.get_kyuubi_service(&r).await.unwrap().state.as_deref(),
        Some("RUNNING")
    );

    let id = c
        .create_kyuubi_token(&r, &body("abcdefghij0123456789abcdefghij01"))
        .await
        .unwrap();
    let t = c.get_kyuubi_token(&r, &id).await.unwrap();
    assert_eq!(
        t.token.as_deref(),
        Some("abc**********j01"),
        "reads are masked"
    );
    let day_ms = 86_400_000;
    assert_eq!(t.expire_time.unwrap() - t.create_time.unwrap(), 3 * day_ms);
    c.update_kyuubi_token(&r, &id, &body("zzzzzzzzzz0123456789abcdefghij01"))
        .await
        .unwrap();
    assert_eq!(
        c.list_kyuubi_tokens(&r).await.unwrap()[0].token.as_deref(),
        Some("zzz**********j01")
    );
    c.delete_kyuubi_token(&r, &id).await.unwrap();
    assert!(c.list_kyuubi_tokens(&r).await.unwrap().is_empty());
    let gone = c.get_kyuubi_token(&r, &id).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
    assert_eq!(emu.snapshot().delete_workspace_attempts, 0);
}

#[tokio::test]
async fn errors_carry_code_message_and_request_id() {
    let (endpoint, _emu) = emulator().await;
    let err = client(endpoint, "wrong")
        .list_kyuubi_tokens(&kref())
        .await
        .unwrap_err();
    match &err {
        ApiError::Api {
            status,
            code,
            request_id,
            ..
        } => {
            assert_eq!((*status, code.as_str()), (400, "SignatureDoesNotMatch"));
            assert_eq!(request_id.len(), 36, "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !err.to_string().contains("wrong"),
        "the secret is not in the error: {err}"
    );
}

#[tokio::test]
async fn throttling_is_waited_out_with_and_without_retry_after() {
    let (endpoint, emu) = emulator().await;
    let c = client(endpoint.clone(), SECRET);
    set_faults(
        &endpoint,
        Faults {
            throttle: 2,
            retry_after_ms: Some(30),
            ..Faults::default()
        },
    )
    .await;
    let before = emu.snapshot().requests;
    let t0 = std::time::Instant::now();
    c.list_kyuubi_tokens(&kref())
        .await
        .expect("succeeds after two throttled attempts");
    assert_eq!(emu.snapshot().requests - before, 3);
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "honours x-acs-retry-after"
    );
    // throttling applies to writes too (the request never ran)
    set_faults(
        &endpoint,
        Faults {
            throttle: 2,
            ..Faults::default()
        },
    )
    .await;
    c.create_kyuubi_token(&kref(), &body("abcdefghij0123456789abcdefghij01"))
        .await
        .unwrap();
    // bounded: more throttling than attempts gives the error
    set_faults(
        &endpoint,
        Faults {
            throttle: 10,
            ..Faults::default()
        },
    )
    .await;
    let err = c.list_kyuubi_tokens(&kref()).await.unwrap_err();
    assert_eq!(err.code(), Some("Throttling"));
}

#[tokio::test]
async fn server_errors_are_retried_only_where_repeating_is_safe() {
    let (endpoint, emu) = emulator().await;
    let c = client(endpoint.clone(), SECRET);
    set_faults(
        &endpoint,
        Faults {
            server_errors: 2,
            ..Faults::default()
        },
    )
    .await;
    c.list_kyuubi_tokens(&kref())
        .await
        .expect("a GET is retried past two 503s");
    set_faults(
        &endpoint,
        Faults {
            server_errors: 1,
            ..Faults::default()
        },
    )
    .await;
    let err = c
        .create_kyuubi_token(&kref(), &body("abcdefghij0123456789abcdefghij01"))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Api { status: 503, .. }), "{err}");
    assert!(
        emu.snapshot().tokens.is_empty(),
        "a create is not blindly repeated"
    );
}

#[tokio::test]
async fn an_action_outage_fails_that_action_only_until_replaced_and_every_call_is_counted() {
    let (endpoint, emu) = emulator().await;
    let c = client(endpoint, SECRET);
    let id = c
        .create_kyuubi_token(&kref(), &body("abcdefghij0123456789abcdefghij01"))
        .await
        .unwrap();
    emu.set_faults(Faults {
        fail_actions: vec!["GetKyuubiToken".into()],
        ..Faults::default()
    });
    for _ in 0..2 {
        let err = c.get_kyuubi_token(&kref(), &id).await.unwrap_err();
        // the gateway's 503 envelope, as a real outage answers
        match &err {
            ApiError::Api { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (503, "ServiceUnavailable"))
            }
            other => panic!("expected a 503, got {other:?}"),
        }
    }
    c.list_kyuubi_tokens(&kref())
        .await
        .expect("other actions are unaffected");
    let calls = emu.snapshot().calls;
    // a GET is retried: 4 attempts each
    assert_eq!(calls["GetKyuubiToken"], 8, "{calls:?}");
    assert_eq!(calls["ListKyuubiToken"], 1);
    assert_eq!(calls["CreateKyuubiToken"], 1);
    emu.set_faults(Faults::default());
    c.get_kyuubi_token(&kref(), &id).await.expect("outage over");
    assert_eq!(emu.snapshot().calls["GetKyuubiToken"], 9);
}
