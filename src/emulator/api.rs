//! The management-API side of the emulator.

// Errors here are finished HTTP replies, built once per failed request;
// boxing them would buy nothing.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{mask, now_ms, valid_token_value, Emulator, Faults, Token};
use crate::cloud::request::VERSION;
use crate::cloud::sign::{self, SignInput};
use crate::percent;
use crate::secret::Secret;

type Reply = Response<Full<Bytes>>;

pub async fn serve_api(
    listener: TcpListener,
    emu: Arc<Emulator>,
    shutdown: impl Future<Output = ()>,
) {
    super::serve_http(listener, None, shutdown, move |req| {
        let emu = emu.clone();
        async move { handle(req, &emu).await }
    })
    .await
}

fn request_id() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill(&mut b);
    let h = sign::hex(&b).to_uppercase();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn reply(status: StatusCode, rid: &str, body: Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json;charset=utf-8"),
    );
    if let Ok(v) = http::HeaderValue::from_str(rid) {
        h.insert("x-acs-request-id", v);
    }
    r
}

/// Product-level error: camelCase envelope.
fn product_error(status: StatusCode, rid: &str, code: &str, message: &str) -> Reply {
    reply(
        status,
        rid,
        json!({"requestId": rid, "code": code, "message": message}),
    )
}

/// Gateway-level error (authentication, throttling): PascalCase envelope.
fn gateway_error(status: StatusCode, rid: &str, host: &str, code: &str, message: &str) -> Reply {
    reply(
        status,
        rid,
        json!({
            "RequestId": rid,
            "HostId": host,
            "Code": code,
            "Message": message,
            "Recommend": format!("https://api.aliyun.com/troubleshoot?q={code}&product=emr-serverless-spark&requestId={rid}"),
        }),
    )
}

fn ok(rid: &str, data: Option<Value>) -> Reply {
    match data {
        Some(d) => reply(StatusCode::OK, rid, json!({"requestId": rid, "data": d})),
        None => reply(StatusCode::OK, rid, json!({"requestId": rid})),
    }
}

/// Query pairs with decoded values. `+` means space here, as the official
/// Python SDK sends it (it signs `%20`).
fn query_pairs(q: Option<&str>) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent::decode(k, true)?, percent::decode(v, true)?));
    }
    Some(out)
}

/// Seconds since the epoch for `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // days from civil (inverse of the client's conversion)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Checks the ACS3 signature; on failure returns the gateway's answer.
fn verify(
    emu: &Emulator,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &[u8],
    rid: &str,
) -> Result<(), Reply> {
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let deny = |status, code: &str, msg: &str| gateway_error(status, rid, &host, code, msg);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            deny(
                StatusCode::BAD_REQUEST,
                "MissingAuthorization",
                "Authorization header is missing",
            )
        })?;
    let rest = auth.strip_prefix("ACS3-HMAC-SHA256 ").ok_or_else(|| {
        deny(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            "only ACS3-HMAC-SHA256 is accepted",
        )
    })?;
    let mut cred = None;
    let mut signed = None;
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => cred = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", _)) => {}
            _ => {
                return Err(deny(
                    StatusCode::BAD_REQUEST,
                    "IncompleteSignature",
                    "malformed Authorization header",
                ))
            }
        }
    }
    let (Some(cred), Some(signed)) = (cred, signed) else {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            "Authorization lacks Credential or SignedHeaders",
        ));
    };
    if cred != emu.cfg.access_key_id {
        return Err(deny(
            StatusCode::NOT_FOUND,
            "InvalidAccessKeyId.NotFound",
            "Specified access key is not found.",
        ));
    }
    let names: Vec<&str> = signed.split(';').collect();
    for required in [
        "host",
        "x-acs-action",
        "x-acs-content-sha256",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-version",
    ] {
        if !names.contains(&required) {
            return Err(deny(
                StatusCode::BAD_REQUEST,
                "IncompleteSignature",
                &format!("{required} is not signed"),
            ));
        }
    }
    let mut signed_headers = Vec::new();
    for n in &names {
        let values: Vec<&str> = headers
            .get_all(*n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            return Err(deny(
                StatusCode::BAD_REQUEST,
                "IncompleteSignature",
                &format!("signed header {n} is missing"),
            ));
        }
        for v in values {
            signed_headers.push((n.to_string(), v.to_string()));
        }
    }
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if get("x-acs-version") != VERSION {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "InvalidVersion",
            "Specified parameter Version is not valid.",
        ));
    }
    if get("x-acs-content-sha256") != sign::sha256_hex(body) {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            "x-acs-content-sha256 does not match the body",
        ));
    }
    let sent_at = parse_timestamp(get("x-acs-date")).ok_or_else(|| {
        deny(
            StatusCode::BAD_REQUEST,
            "InvalidTimeStamp.Format",
            "x-acs-date is not YYYY-MM-DDTHH:MM:SSZ",
        )
    })?;
    if (now_ms() / 1000 - sent_at).abs() > 15 * 60 {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired.",
        ));
    }
    let query = query_pairs(uri.query()).ok_or_else(|| {
        deny(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "query is not valid percent-encoding",
        )
    })?;
    let expected = sign::sign(
        &SignInput {
            method: method.as_str(),
            path: uri.path(),
            query: &query,
            headers: &signed_headers,
            body,
        },
        cred,
        emu.cfg.access_key_secret.expose(),
    );
    if !Secret::new(expected.authorization).ct_eq(auth) {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            "Specified signature does not match our calculation.",
        ));
    }
    if !emu.remember_nonce(get("x-acs-signature-nonce")) {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ));
    }
    Ok(())
}

async fn handle(req: Request<Incoming>, emu: &Emulator) -> Reply {
    let rid = request_id();
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return product_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &rid,
                "InvalidParameter",
                "body too large",
            )
        }
    };
    if let Some(ctl) = parts.uri.path().strip_prefix("/_emulator/") {
        return control(emu, &parts.method, ctl, &body, &rid);
    }
    let faults = {
        let mut s = emu.state();
        s.requests += 1;
        s.faults.clone()
    };
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if let Err(r) = verify(emu, &parts.method, &parts.uri, &parts.headers, &body, &rid) {
        return r;
    }
    let action = parts
        .headers
        .get("x-acs-action")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    *emu.state().calls.entry(action.to_string()).or_default() += 1;
    if let Some(r) = take_fault(emu, &rid, &parts.headers, action) {
        return r;
    }
    let segs: Option<Vec<String>> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent::decode(s, false))
        .collect();
    let Some(segs) = segs else {
        return product_error(
            StatusCode::BAD_REQUEST,
            &rid,
            "InvalidParameter",
            "path is not valid percent-encoding",
        );
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = query_pairs(parts.uri.query()).unwrap_or_default();
    let r = route(emu, &parts.method, action, &segs, &query, &body, &rid);
    info!(method = %parts.method, path = %parts.uri.path(), action, status = r.status().as_u16(), "emulator");
    r
}

fn take_fault(emu: &Emulator, rid: &str, headers: &HeaderMap, action: &str) -> Option<Reply> {
    let mut s = emu.state();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if s.faults.throttle > 0 {
        s.faults.throttle -= 1;
        let mut r = gateway_error(
            StatusCode::BAD_REQUEST,
            rid,
            &host,
            "Throttling",
            "Request was denied due to request throttling.",
        );
        if let Some(ms) = s.faults.retry_after_ms {
            r.headers_mut()
                .insert("x-acs-retry-after", http::HeaderValue::from(ms));
        }
        return Some(r);
    }
    let outage = s.faults.fail_actions.iter().any(|a| a == action);
    if outage || s.faults.server_errors > 0 {
        if !outage {
            s.faults.server_errors -= 1;
        }
        return Some(gateway_error(
            StatusCode::SERVICE_UNAVAILABLE,
            rid,
            &host,
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        ));
    }
    None
}

fn control(emu: &Emulator, method: &Method, what: &str, body: &[u8], rid: &str) -> Reply {
    match (method, what) {
        (&Method::POST, "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                emu.state().faults = f;
                ok(rid, None)
            }
            Err(e) => product_error(
                StatusCode::BAD_REQUEST,
                rid,
                "InvalidParameter",
                &e.to_string(),
            ),
        },
        (&Method::GET, "state") => reply(
            StatusCode::OK,
            rid,
            serde_json::to_value(emu.snapshot()).unwrap_or_default(),
        ),
        _ => product_error(
            StatusCode::NOT_FOUND,
            rid,
            "NotFound",
            "unknown emulator control path",
        ),
    }
}

fn token_json(id: &str, t: &Token, with_auto_expire: bool) -> Value {
    let mut v = json!({
        "tokenId": id,
        "name": t.name,
        "token": mask(&t.value),
        "createdBy": "kyuubi-broker-emulator",
        "createTime": t.created_ms,
        "expireTime": t.expire_ms,
        "lastUsedTime": t.last_used_ms,
        "memberArns": t.member_arns,
        "sparkRole": [],
    });
    if with_auto_expire {
        v["autoExpireConfiguration"] =
            json!({"enable": t.expire_days.is_some(), "expireDays": t.expire_days});
    } else {
        v["accountNames"] = json!([]);
    }
    v
}

fn route(
    emu: &Emulator,
    method: &Method,
    action: &str,
    segs: &[&str],
    query: &[(String, String)],
    body: &[u8],
    rid: &str,
) -> Reply {
    let cfg = &emu.cfg;
    let expect = |want: &str| -> Option<Reply> {
        (action != want).then(|| {
            product_error(
                StatusCode::BAD_REQUEST,
                rid,
                "InvalidAction.Mismatch",
                &format!("x-acs-action {action} does not match {method} on this path ({want})"),
            )
        })
    };
    let not_found = |what: &str| {
        product_error(
            StatusCode::NOT_FOUND,
            rid,
            "NotFound",
            &format!("{what} not found"),
        )
    };
    let workspace = json!({"workspaceId": cfg.workspace, "workspaceName": "emulated", "workspaceStatus": "RUNNING", "regionId": cfg.region});
    let service = |state: &str| {
        json!({
            "kyuubiServiceId": cfg.kyuubi_service, "name": "emulated-gateway", "state": state,
            "queue": "root_queue", "releaseVersion": "esr-4.3.0 (Spark 3.5.2, Scala 2.12)",
            "innerEndpoint": "127.0.0.1", "publicEndpoint": "127.0.0.1",
        })
    };
    match (method, segs) {
        (&Method::DELETE, ["api", "v1", "workspaces", _]) => {
            emu.state().delete_workspace_attempts += 1;
            warn!("DeleteWorkspace attempted against the emulator");
            product_error(StatusCode::FORBIDDEN, rid, "OperationDenied", "DeleteWorkspace is not allowed")
        }
        (&Method::GET, ["api", "v1", "workspaces"]) => expect("ListWorkspaces").unwrap_or_else(|| {
            reply(StatusCode::OK, rid, json!({"requestId": rid, "workspaces": [workspace], "totalCount": 1, "maxResults": 20}))
        }),
        (&Method::GET, ["api", "v1", "workspaces", ws]) => expect("GetWorkspace").unwrap_or_else(|| {
            if *ws != cfg.workspace {
                return not_found("workspace");
            }
            reply(StatusCode::OK, rid, json!({"requestId": rid, "workspace": workspace}))
        }),
        (&Method::GET, ["api", "v1", "workspaces", ws, "queues"]) => expect("ListWorkspaceQueues").unwrap_or_else(|| {
            if *ws != cfg.workspace {
                return not_found("workspace");
            }
            reply(StatusCode::OK, rid, json!({"requestId": rid, "queues": [{"queueName": "root_queue", "queueStatus": "RUNNING"}], "totalCount": 1}))
        }),
        (&Method::GET, ["api", "v1", "releaseVersions"]) => expect("ListReleaseVersions").unwrap_or_else(|| {
            // paged like the service: maxResults (here 2 by default) and nextToken
            let all = ["esr-4.3.0", "esr-3.3.0", "esr-2.7.0"];
            let param = |k: &str| query.iter().find(|(qk, _)| qk == k).and_then(|(_, v)| v.parse::<usize>().ok());
            let start = param("nextToken").unwrap_or(0).min(all.len());
            let end = (start + param("maxResults").unwrap_or(2).max(1)).min(all.len());
            let page: Vec<Value> = all[start..end]
                .iter()
                .map(|v| json!({"releaseVersion": format!("{v} (Spark 3.5.2, Scala 2.12)"), "state": "ONLINE"}))
                .collect();
            let next = if end < all.len() { json!(end.to_string()) } else { json!("") };
            reply(
                StatusCode::OK,
                rid,
                json!({"requestId": rid, "releaseVersions": page, "nextToken": next, "totalCount": all.len()}),
            )
        }),
        (&Method::GET, ["api", "v1", "kyuubi", ws]) => expect("ListKyuubiServices").unwrap_or_else(|| {
            if *ws != cfg.workspace {
                return not_found("workspace");
            }
            let state = emu.state().kyuubi_state.clone();
            ok(rid, Some(json!({"kyuubiServices": [service(&state)]})))
        }),
        (m, ["api", "v1", "kyuubi", ws, kb, rest @ ..]) => {
            if *ws != cfg.workspace || *kb != cfg.kyuubi_service {
                return not_found("Kyuubi service");
            }
            match (m, rest) {
                (&Method::GET, []) => expect("GetKyuubiService").unwrap_or_else(|| {
                    let state = emu.state().kyuubi_state.clone();
                    ok(rid, Some(service(&state)))
                }),
                (&Method::POST, ["start"]) => expect("StartKyuubiService").unwrap_or_else(|| {
                    emu.state().kyuubi_state = "RUNNING".into();
                    ok(rid, Some(json!(true)))
                }),
                (&Method::POST, ["stop"]) => expect("StopKyuubiService").unwrap_or_else(|| {
                    emu.state().kyuubi_state = "NOT_STARTED".into();
                    ok(rid, Some(json!(true)))
                }),
                _ => product_error(StatusCode::NOT_FOUND, rid, "InvalidAction.NotFound", "no such operation"),
            }
        }
        (m, ["api", "v1", "workspaces", ws, "kyuubiService", kb, "token", rest @ ..]) => {
            if *ws != cfg.workspace || *kb != cfg.kyuubi_service {
                return not_found("Kyuubi service");
            }
            tokens(emu, m, rest, body, rid, &expect)
        }
        _ => product_error(StatusCode::NOT_FOUND, rid, "InvalidAction.NotFound", "no such operation in the emulator"),
    }
}

fn tokens(
    emu: &Emulator,
    m: &Method,
    rest: &[&str],
    body: &[u8],
    rid: &str,
    expect: &dyn Fn(&str) -> Option<Reply>,
) -> Reply {
    let parse = || -> Result<Value, Reply> {
        serde_json::from_slice::<Value>(body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                product_error(
                    StatusCode::BAD_REQUEST,
                    rid,
                    "InvalidParameter",
                    "body must be a JSON object",
                )
            })
    };
    let mut s = emu.state();
    match (m, rest) {
        (&Method::GET, []) => expect("ListKyuubiToken").unwrap_or_else(|| {
            let list: Vec<Value> = s
                .tokens
                .iter()
                .map(|(id, t)| token_json(id, t, false))
                .collect();
            ok(rid, Some(json!({"tokens": list})))
        }),
        (&Method::POST, []) => {
            if let Some(r) = expect("CreateKyuubiToken") {
                return r;
            }
            let v = match parse() {
                Ok(v) => v,
                Err(r) => return r,
            };
            let value = v["token"].as_str().unwrap_or("").to_string();
            if !valid_token_value(&value) {
                return product_error(
                    StatusCode::BAD_REQUEST,
                    rid,
                    "InvalidParameter",
                    "token must be 32 characters of lowercase letters and digits",
                );
            }
            if s.tokens.values().any(|t| t.value == value) {
                return product_error(
                    StatusCode::BAD_REQUEST,
                    rid,
                    "InvalidParameter",
                    "token already exists",
                );
            }
            let id = {
                let mut b = [0u8; 8];
                rand::thread_rng().fill(&mut b);
                format!("tk-{}", sign::hex(&b))
            };
            let token = new_token(&v, value, now_ms());
            s.tokens.insert(id.clone(), token);
            s.creates += 1;
            ok(rid, Some(json!({"tokenId": id})))
        }
        (m, [id]) => {
            let id = id.to_string();
            if !s.tokens.contains_key(&id) {
                let action = match *m {
                    Method::GET => "GetKyuubiToken",
                    Method::PUT => "UpdateKyuubiToken",
                    _ => "DeleteKyuubiToken",
                };
                return expect(action).unwrap_or_else(|| {
                    product_error(
                        StatusCode::NOT_FOUND,
                        rid,
                        "NotFound",
                        &format!("token {id} not found"),
                    )
                });
            }
            match *m {
                Method::GET => expect("GetKyuubiToken")
                    .unwrap_or_else(|| ok(rid, Some(token_json(&id, &s.tokens[&id], true)))),
                Method::DELETE => expect("DeleteKyuubiToken").unwrap_or_else(|| {
                    s.tokens.remove(&id);
                    s.deletes += 1;
                    ok(rid, None)
                }),
                Method::PUT => {
                    if let Some(r) = expect("UpdateKyuubiToken") {
                        return r;
                    }
                    let v = match parse() {
                        Ok(v) => v,
                        Err(r) => return r,
                    };
                    if let Some(value) = v["token"].as_str() {
                        if !valid_token_value(value) {
                            return product_error(
                                StatusCode::BAD_REQUEST,
                                rid,
                                "InvalidParameter",
                                "token must be 32 characters of lowercase letters and digits",
                            );
                        }
                    }
                    let old = s.tokens[&id].clone();
                    let value = v["token"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or(old.value.clone());
                    let mut t = new_token(&v, value, old.created_ms);
                    if v.get("name").is_none() {
                        t.name = old.name;
                    }
                    t.last_used_ms = old.last_used_ms;
                    s.tokens.insert(id, t);
                    ok(rid, None)
                }
                _ => product_error(
                    StatusCode::NOT_FOUND,
                    rid,
                    "InvalidAction.NotFound",
                    "no such operation",
                ),
            }
        }
        _ => product_error(
            StatusCode::NOT_FOUND,
            rid,
            "InvalidAction.NotFound",
            "no such operation",
        ),
    }
}

fn new_token(v: &Value, value: String, created_ms: i64) -> Token {
    let auto = &v["autoExpireConfiguration"];
    let expire_days = (auto["enable"].as_bool() == Some(true))
        .then(|| auto["expireDays"].as_i64().unwrap_or(365) as i32);
    Token {
        name: v["name"].as_str().unwrap_or("").to_string(),
        value,
        created_ms,
        expire_ms: expire_days.map(|d| created_ms + i64::from(d) * 86_400_000),
        expire_days,
        last_used_ms: None,
        member_arns: v["memberArns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_the_client_formatter() {
        for secs in [0u64, 951_782_400, 1_735_787_045, 4_102_444_800] {
            let s = crate::cloud::client::utc_timestamp(
                std::time::UNIX_EPOCH + Duration::from_secs(secs),
            );
            assert_eq!(parse_timestamp(&s), Some(secs as i64), "{s}");
        }
        assert_eq!(parse_timestamp("2025-01-02 03:04:05"), None);
    }

    #[test]
    fn query_decoding_accepts_the_sdks_plus_for_space() {
        let q = query_pairs(Some("name=a+b%2Bc&x=%E5%B7%A5&empty=")).unwrap();
        assert_eq!(
            q,
            vec![
                ("name".into(), "a b+c".into()),
                ("x".into(), "工".into()),
                ("empty".into(), String::new())
            ]
        );
    }

    #[test]
    fn token_values_are_masked_like_the_service() {
        assert_eq!(mask("dxjabcdefghijklmnopqrstuvwxyzwfg"), "dxj**********wfg");
        assert!(valid_token_value("0123456789abcdefghijklmnopqrstuv"));
        assert!(!valid_token_value("0123456789ABCDEFGHIJKLMNOPQRSTUV"));
        assert!(!valid_token_value("short"));
    }
}
