//! The EMR Serverless Spark operations the broker uses (ROA, 2023-08-08), and
//! the single path through which every request is built. That path refuses
//! DeleteWorkspace in any spelling, and no constructor for it exists.

use serde::Serialize;

use crate::percent;

pub const PRODUCT: &str = "emr-serverless-spark";
pub const VERSION: &str = "2023-08-08";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// A request ready to sign and send. Only the constructors in this module
/// make one, so every request has passed [`refuse_forbidden`].
#[derive(Debug, Clone)]
pub struct ApiRequest {
    action: &'static str,
    method: Method,
    /// Encoded path, e.g. `/api/v1/workspaces/w-1/kyuubiService/kb-1/token`.
    path: String,
    query: Vec<(String, String)>,
    /// Compact JSON, if the operation has a body.
    body: Option<Vec<u8>>,
    /// Safe to send again after a 5xx or a lost reply.
    idempotent: bool,
}

impl ApiRequest {
    pub fn action(&self) -> &'static str {
        self.action
    }
    pub fn method(&self) -> Method {
        self.method
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn query(&self) -> &[(String, String)] {
        &self.query
    }
    pub fn body(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }
    pub fn idempotent(&self) -> bool {
        self.idempotent
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("refused to build {action} ({method} {path}): {reason}")]
pub struct Refused {
    pub action: String,
    pub method: String,
    pub path: String,
    pub reason: &'static str,
}

/// The one place requests are assembled. Every operation below goes through
/// it; it refuses to express DeleteWorkspace, whatever the call site.
fn build(
    action: &'static str,
    method: Method,
    segments: &[&str],
    query: Vec<(String, String)>,
    body: Option<Vec<u8>>,
) -> Result<ApiRequest, Refused> {
    // each segment is encoded whole (fixed words are unchanged by it)
    let path: String = segments
        .iter()
        .map(|s| format!("/{}", percent::encode(s)))
        .collect();
    refuse_forbidden(action, method, &path)?;
    Ok(ApiRequest {
        action,
        idempotent: matches!(method, Method::Get | Method::Put | Method::Delete),
        method,
        path,
        query,
        body,
    })
}

/// DeleteWorkspace is `DELETE /api/v1/workspaces/{id}`, or any request whose
/// action says so. The path is decoded and normalised before the check, so
/// `//`, a trailing `/`, case or percent-encoding cannot hide it.
pub fn refuse_forbidden(action: &str, method: Method, path: &str) -> Result<(), Refused> {
    let refused = |reason| Refused {
        action: action.to_string(),
        method: method.as_str().to_string(),
        path: path.to_string(),
        reason,
    };
    if action.eq_ignore_ascii_case("DeleteWorkspace") {
        return Err(refused("kyuubi-broker never deletes workspaces"));
    }
    let decoded = percent::decode(path, false)
        .ok_or_else(|| refused("path is not valid percent-encoding"))?;
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(refused("path contains '.' or '..' segments"));
    }
    if method == Method::Delete
        && segments.len() == 4
        && segments[0].eq_ignore_ascii_case("api")
        && segments[1].eq_ignore_ascii_case("v1")
        && segments[2].eq_ignore_ascii_case("workspaces")
    {
        return Err(refused(
            "DELETE on a workspace is DeleteWorkspace; kyuubi-broker never deletes workspaces",
        ));
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain structs serialise")
}

fn hex_id(s: &str, prefix: &str, len: usize) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| h.len() == len && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `w-<16 hex>`
pub fn is_workspace_id(s: &str) -> bool {
    hex_id(s, "w-", 16)
}

/// `kb-<32 hex>`
pub fn is_kyuubi_service_id(s: &str) -> bool {
    hex_id(s, "kb-", 32)
}

/// Where a workspace's Kyuubi service lives.
#[derive(Debug, Clone)]
pub struct KyuubiRef {
    pub region: String,
    pub workspace: String,
    pub kyuubi_service: String,
}

fn region_q(region: &str) -> Vec<(String, String)> {
    vec![("regionId".into(), region.into())]
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoExpire {
    pub enable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_days: Option<i32>,
}

/// Body of CreateKyuubiToken / UpdateKyuubiToken. The token value is the
/// secret; this type is only ever serialised into a request body.
#[derive(Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_expire_configuration: Option<AutoExpire>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member_arns: Option<Vec<String>>,
}

impl std::fmt::Debug for TokenBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBody")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "****"))
            .field("auto_expire_configuration", &self.auto_expire_configuration)
            .finish()
    }
}

/// `regionId`, and `nextToken` when following pages.
fn page_q(region: &str, next_token: Option<&str>) -> Vec<(String, String)> {
    let mut q = region_q(region);
    q.extend(next_token.map(|t| ("nextToken".to_string(), t.to_string())));
    q
}

pub fn list_workspaces(region: &str, next_token: Option<&str>) -> Result<ApiRequest, Refused> {
    build(
        "ListWorkspaces",
        Method::Get,
        &["api", "v1", "workspaces"],
        page_q(region, next_token),
        None,
    )
}

pub fn get_workspace(region: &str, workspace: &str) -> Result<ApiRequest, Refused> {
    build(
        "GetWorkspace",
        Method::Get,
        &["api", "v1", "workspaces", workspace],
        region_q(region),
        None,
    )
}

pub fn list_workspace_queues(region: &str, workspace: &str) -> Result<ApiRequest, Refused> {
    build(
        "ListWorkspaceQueues",
        Method::Get,
        &["api", "v1", "workspaces", workspace, "queues"],
        region_q(region),
        None,
    )
}

pub fn list_release_versions(
    region: &str,
    next_token: Option<&str>,
) -> Result<ApiRequest, Refused> {
    build(
        "ListReleaseVersions",
        Method::Get,
        &["api", "v1", "releaseVersions"],
        page_q(region, next_token),
        None,
    )
}

// Kyuubi services live under /api/v1/kyuubi/{ws}[/{kb}]. regionId is sent
// on them too: the query is signed, and the server is known to ask for it.
pub fn list_kyuubi_services(r: &KyuubiRef) -> Result<ApiRequest, Refused> {
    build(
        "ListKyuubiServices",
        Method::Get,
        &["api", "v1", "kyuubi", &r.workspace],
        region_q(&r.region),
        None,
    )
}

pub fn get_kyuubi_service(r: &KyuubiRef) -> Result<ApiRequest, Refused> {
    build(
        "GetKyuubiService",
        Method::Get,
        &["api", "v1", "kyuubi", &r.workspace, &r.kyuubi_service],
        region_q(&r.region),
        None,
    )
}

/// StartKyuubiService / StopKyuubiService: `POST .../{kb}/start|stop`, no body.
fn kyuubi_service_verb(
    r: &KyuubiRef,
    action: &'static str,
    verb: &str,
) -> Result<ApiRequest, Refused> {
    build(
        action,
        Method::Post,
        &["api", "v1", "kyuubi", &r.workspace, &r.kyuubi_service, verb],
        region_q(&r.region),
        None,
    )
}

pub fn start_kyuubi_service(r: &KyuubiRef) -> Result<ApiRequest, Refused> {
    kyuubi_service_verb(r, "StartKyuubiService", "start")
}

pub fn stop_kyuubi_service(r: &KyuubiRef) -> Result<ApiRequest, Refused> {
    kyuubi_service_verb(r, "StopKyuubiService", "stop")
}

fn token_path<'a>(r: &'a KyuubiRef, token_id: Option<&'a str>) -> Vec<&'a str> {
    let mut p = vec![
        "api",
        "v1",
        "workspaces",
        &r.workspace,
        "kyuubiService",
        &r.kyuubi_service,
        "token",
    ];
    p.extend(token_id);
    p
}

pub fn create_kyuubi_token(r: &KyuubiRef, body: &TokenBody) -> Result<ApiRequest, Refused> {
    build(
        "CreateKyuubiToken",
        Method::Post,
        &token_path(r, None),
        region_q(&r.region),
        Some(json(body)),
    )
}

pub fn list_kyuubi_token(r: &KyuubiRef) -> Result<ApiRequest, Refused> {
    build(
        "ListKyuubiToken",
        Method::Get,
        &token_path(r, None),
        region_q(&r.region),
        None,
    )
}

pub fn get_kyuubi_token(r: &KyuubiRef, token_id: &str) -> Result<ApiRequest, Refused> {
    build(
        "GetKyuubiToken",
        Method::Get,
        &token_path(r, Some(token_id)),
        region_q(&r.region),
        None,
    )
}

pub fn update_kyuubi_token(
    r: &KyuubiRef,
    token_id: &str,
    body: &TokenBody,
) -> Result<ApiRequest, Refused> {
    build(
        "UpdateKyuubiToken",
        Method::Put,
        &token_path(r, Some(token_id)),
        region_q(&r.region),
        Some(json(body)),
    )
}

pub fn delete_kyuubi_token(r: &KyuubiRef, token_id: &str) -> Result<ApiRequest, Refused> {
    build(
        "DeleteKyuubiToken",
        Method::Delete,
        &token_path(r, Some(token_id)),
        region_q(&r.region),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kref() -> KyuubiRef {
        KyuubiRef {
            region: "cn-hangzhou".into(),
            workspace: "w-1234567890abcdef".into(),
            kyuubi_service: "kb-0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn delete_workspace_is_refused_in_every_spelling() {
        for (action, method, path) in [
            ("DeleteWorkspace", Method::Get, "/anything"),
            ("deleteworkspace", Method::Post, "/api/v1/workspaces"),
            ("X", Method::Delete, "/api/v1/workspaces/w-1"),
            ("X", Method::Delete, "/api/v1/workspaces/w-1/"),
            ("X", Method::Delete, "//api//v1//workspaces//w-1"),
            ("X", Method::Delete, "/API/V1/Workspaces/w-1"),
            ("X", Method::Delete, "/api/v1/%77orkspaces/w-1"),
            ("X", Method::Delete, "/api/v1/workspaces/w-1/token/../.."),
        ] {
            assert!(
                refuse_forbidden(action, method, path).is_err(),
                "{action} {method:?} {path}"
            );
        }
    }

    #[test]
    fn the_request_builder_cannot_express_delete_workspace() {
        let err = build(
            "Sneaky",
            Method::Delete,
            &["api", "v1", "workspaces", "w-1"],
            vec![],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("never deletes workspaces"),
            "{err}"
        );
    }

    #[test]
    fn other_deletes_under_a_workspace_are_allowed() {
        let r = delete_kyuubi_token(&kref(), "tk-1").unwrap();
        assert_eq!(r.method, Method::Delete);
        assert!(refuse_forbidden(
            "CancelJobRun",
            Method::Delete,
            "/api/v1/workspaces/w-1/jobRuns/jr-1"
        )
        .is_ok());
        assert!(refuse_forbidden("GetWorkspace", Method::Get, "/api/v1/workspaces/w-1").is_ok());
    }

    #[test]
    fn token_operations_use_the_reference_paths() {
        let r = kref();
        let base = "/api/v1/workspaces/w-1234567890abcdef/kyuubiService/kb-0123456789abcdef0123456789abcdef/token";
        let create = create_kyuubi_token(&r, &TokenBody::default()).unwrap();
        assert_eq!((create.method, create.path.as_str()), (Method::Post, base));
        assert_eq!(create.body.as_deref(), Some(&b"{}"[..]));
        assert_eq!(
            get_kyuubi_token(&r, "tk-9").unwrap().path,
            format!("{base}/tk-9")
        );
        assert_eq!(
            start_kyuubi_service(&r).unwrap().path,
            "/api/v1/kyuubi/w-1234567890abcdef/kb-0123456789abcdef0123456789abcdef/start"
        );
        assert_eq!(
            create.query,
            vec![("regionId".to_string(), "cn-hangzhou".to_string())]
        );
    }

    #[test]
    fn path_parameters_are_encoded_as_whole_segments() {
        assert_eq!(
            get_workspace("r", "w-a b/c").unwrap().path,
            "/api/v1/workspaces/w-a%20b%2Fc"
        );
    }

    #[test]
    fn token_body_serialises_compactly_and_hides_the_token_in_debug() {
        let b = TokenBody {
            name: Some("n".into()),
            token: Some("0123456789abcdefghijklmnopqrstuv".into()),
            auto_expire_configuration: Some(AutoExpire {
                enable: true,
                expire_days: Some(30),
            }),
            member_arns: None,
        };
        assert_eq!(
            String::from_utf8(json(&b)).unwrap(),
            r#"{"name":"n","token":"0123456789abcdefghijklmnopqrstuv","autoExpireConfiguration":{"enable":true,"expireDays":30}}"#
        );
        assert!(!format!("{b:?}").contains("0123456789"));
    }
}
