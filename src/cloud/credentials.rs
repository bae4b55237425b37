//! Finds Alibaba Cloud credentials the way the official tools do, in this
//! order (the first provider that yields a credential wins):
//!
//! 1. environment: `ALIBABA_CLOUD_ACCESS_KEY_ID` + `ALIBABA_CLOUD_ACCESS_KEY_SECRET`
//!    (+ `ALIBABA_CLOUD_SECURITY_TOKEN` for STS);
//! 2. the CLI profile file `~/.aliyun/config.json` (profile `ALIBABA_CLOUD_PROFILE`,
//!    else `current`), modes `AK`, `StsToken`, `EcsRamRole`; skipped when
//!    `ALIBABA_CLOUD_CLI_PROFILE_DISABLED=true`;
//! 3. the INI file `ALIBABA_CLOUD_CREDENTIALS_FILE` or `~/.alibabacloud/credentials.ini`
//!    (section `ALIBABA_CLOUD_PROFILE`, else `default`), types `access_key`, `ecs_ram_role`;
//! 4. the ECS instance RAM role from the metadata service, unless
//!    `ALIBABA_CLOUD_ECS_METADATA_DISABLED=true` (role name from
//!    `ALIBABA_CLOUD_ECS_METADATA` or the service itself).
//!
//! Not supported (a clear error names them): OIDC, RamRoleArn, CredentialsURI.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::secret::Secret;

/// A credential for signing.
#[derive(Debug, Clone)]
pub struct CloudCredential {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    /// Present for STS credentials.
    pub security_token: Option<Secret>,
    /// Which provider found it, e.g. `env` or `cli_profile/AK`.
    pub provider: String,
}

#[derive(Debug, thiserror::Error)]
#[error("no Alibaba Cloud credentials found; tried: {}", .tried.join("; "))]
pub struct NoCredentials {
    pub tried: Vec<String>,
}

/// Reads one environment variable.
pub type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The inputs of the chain, injectable so tests never touch the real
/// environment, home directory or metadata service.
pub struct Chain {
    pub env: EnvLookup,
    pub home: Option<PathBuf>,
    /// Base URL of the ECS metadata service.
    pub metadata_base: String,
}

impl Chain {
    /// The process environment, `$HOME`, and the real metadata service.
    pub fn from_process() -> Chain {
        Chain {
            env: Box::new(|k| std::env::var(k).ok()),
            home: std::env::var_os("HOME").map(PathBuf::from),
            metadata_base: "http://100.100.100.200".into(),
        }
    }

    fn var(&self, k: &str) -> Option<String> {
        (self.env)(k).filter(|v| !v.is_empty())
    }

    fn flag(&self, k: &str) -> bool {
        self.var(k).is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    pub async fn resolve(&self) -> Result<CloudCredential, NoCredentials> {
        let mut tried = Vec::new();
        match self.env_provider() {
            Ok(c) => return Ok(c),
            Err(e) => tried.push(format!("env: {e}")),
        }
        if self.flag("ALIBABA_CLOUD_CLI_PROFILE_DISABLED") {
            tried.push("cli_profile: disabled by ALIBABA_CLOUD_CLI_PROFILE_DISABLED".into());
        } else {
            match self.cli_profile().await {
                Ok(c) => return Ok(c),
                Err(e) => tried.push(format!("cli_profile: {e}")),
            }
        }
        match self.ini_profile().await {
            Ok(c) => return Ok(c),
            Err(e) => tried.push(format!("profile: {e}")),
        }
        if self.flag("ALIBABA_CLOUD_ECS_METADATA_DISABLED") {
            tried.push("ecs_ram_role: disabled by ALIBABA_CLOUD_ECS_METADATA_DISABLED".into());
        } else {
            match self
                .ecs_ram_role(self.var("ALIBABA_CLOUD_ECS_METADATA"), "ecs_ram_role")
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => tried.push(format!("ecs_ram_role: {e}")),
            }
        }
        Err(NoCredentials { tried })
    }

    fn env_provider(&self) -> Result<CloudCredential, String> {
        let id = self.var("ALIBABA_CLOUD_ACCESS_KEY_ID");
        let secret = self.var("ALIBABA_CLOUD_ACCESS_KEY_SECRET");
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(CloudCredential {
                access_key_id: id,
                access_key_secret: Secret::new(secret),
                security_token: self.var("ALIBABA_CLOUD_SECURITY_TOKEN").map(Secret::new),
                provider: "env".into(),
            }),
            _ => Err(
                "ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET are not both set"
                    .into(),
            ),
        }
    }

    async fn cli_profile(&self) -> Result<CloudCredential, String> {
        let path = self
            .home
            .as_ref()
            .ok_or("no home directory")?
            .join(".aliyun/config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: CliConfig =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = self.var("ALIBABA_CLOUD_PROFILE").unwrap_or(file.current);
        let p = file
            .profiles
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("profile '{name}' not found in {}", path.display()))?;
        let provider = format!("cli_profile/{}", p.mode);
        match p.mode.as_str() {
            "AK" | "StsToken" => {
                if p.access_key_id.is_empty() || p.access_key_secret.is_empty() {
                    return Err(format!(
                        "profile '{name}' lacks access_key_id/access_key_secret"
                    ));
                }
                let token = (p.mode == "StsToken").then(|| Secret::new(p.sts_token));
                Ok(CloudCredential {
                    access_key_id: p.access_key_id,
                    access_key_secret: Secret::new(p.access_key_secret),
                    security_token: token,
                    provider,
                })
            }
            "EcsRamRole" => {
                self.ecs_ram_role(Some(p.ram_role_name).filter(|r| !r.is_empty()), &provider)
                    .await
            }
            other => Err(format!(
                "profile '{name}' has mode '{other}', which kyuubi-broker does not support"
            )),
        }
    }

    async fn ini_profile(&self) -> Result<CloudCredential, String> {
        let path = match self.var("ALIBABA_CLOUD_CREDENTIALS_FILE") {
            Some(p) => PathBuf::from(p),
            None => self
                .home
                .as_ref()
                .ok_or("no home directory")?
                .join(".alibabacloud/credentials.ini"),
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let section = self
            .var("ALIBABA_CLOUD_PROFILE")
            .unwrap_or_else(|| "default".into());
        let kv = ini_section(&text, &section)
            .ok_or_else(|| format!("no [{section}] in {}", path.display()))?;
        let get = |k: &str| {
            kv.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        match get("type").as_str() {
            "access_key" => {
                let (id, secret) = (get("access_key_id"), get("access_key_secret"));
                if id.is_empty() || secret.is_empty() {
                    return Err(format!("[{section}] lacks access_key_id/access_key_secret"));
                }
                Ok(CloudCredential {
                    access_key_id: id,
                    access_key_secret: Secret::new(secret),
                    security_token: None,
                    provider: "profile/access_key".into(),
                })
            }
            "ecs_ram_role" => {
                self.ecs_ram_role(
                    Some(get("role_name")).filter(|r| !r.is_empty()),
                    "profile/ecs_ram_role",
                )
                .await
            }
            other => Err(format!(
                "[{section}] has type '{other}', which kyuubi-broker does not support"
            )),
        }
    }

    /// The instance RAM role's STS credential from the metadata service.
    async fn ecs_ram_role(
        &self,
        role: Option<String>,
        provider: &str,
    ) -> Result<CloudCredential, String> {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(Duration::from_secs(1)));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(conn);
        let call = |method: Method, path: String, header: Option<(&'static str, String)>| {
            let client = client.clone();
            let url = format!("{}{path}", self.metadata_base);
            async move {
                let mut req = Request::builder().method(method).uri(&url);
                if let Some((k, v)) = header {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
                    .await
                    .map_err(|_| format!("{url}: timed out"))?
                    .map_err(|e| format!("{url}: {e}"))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                if !status.is_success() {
                    return Err(format!("{url}: HTTP {status}"));
                }
                String::from_utf8(body.to_vec()).map_err(|_| format!("{url}: reply is not UTF-8"))
            }
        };
        let token = call(
            Method::PUT,
            "/latest/api/token".into(),
            Some(("X-aliyun-ecs-metadata-token-ttl-seconds", "21600".into())),
        )
        .await;
        let token = match token {
            Ok(t) => Some(t),
            Err(_) if !self.flag("ALIBABA_CLOUD_IMDSV1_DISABLED") => None,
            Err(e) => return Err(format!("metadata token: {e}")),
        };
        let auth = token.map(|t| ("X-aliyun-ecs-metadata-token", t));
        let role = match role {
            Some(r) => r,
            None => call(
                Method::GET,
                "/latest/meta-data/ram/security-credentials/".into(),
                auth.clone(),
            )
            .await?
            .trim()
            .to_string(),
        };
        let body = call(
            Method::GET,
            format!("/latest/meta-data/ram/security-credentials/{role}"),
            auth,
        )
        .await?;
        let c: EcsCredential =
            serde_json::from_str(&body).map_err(|e| format!("role '{role}': {e}"))?;
        if c.code != "Success" {
            return Err(format!(
                "role '{role}': metadata service answered Code={}",
                c.code
            ));
        }
        Ok(CloudCredential {
            access_key_id: c.access_key_id,
            access_key_secret: Secret::new(c.access_key_secret),
            security_token: Some(Secret::new(c.security_token)),
            provider: provider.into(),
        })
    }
}

#[derive(Deserialize)]
struct CliConfig {
    #[serde(default)]
    current: String,
    #[serde(default)]
    profiles: Vec<CliProfile>,
}

#[derive(Deserialize)]
struct CliProfile {
    #[serde(default)]
    name: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    access_key_id: String,
    #[serde(default)]
    access_key_secret: String,
    #[serde(default)]
    sts_token: String,
    #[serde(default)]
    ram_role_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EcsCredential {
    #[serde(default)]
    code: String,
    #[serde(default)]
    access_key_id: String,
    #[serde(default)]
    access_key_secret: String,
    #[serde(default)]
    security_token: String,
}

/// The key/value pairs of one INI section; text after `#` is dropped.
fn ini_section(text: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut current: Option<&str> = None;
    let mut out: Option<Vec<(String, String)>> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim());
            if current == Some(section) {
                out.get_or_insert_with(Vec::new);
            }
        } else if let (Some(s), Some((k, v))) = (current, line.split_once('=')) {
            if s == section {
                out.get_or_insert_with(Vec::new)
                    .push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn chain(vars: &[(&str, &str)], home: &std::path::Path) -> Chain {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Chain {
            env: Box::new(move |k| vars.get(k).cloned()),
            home: Some(home.to_path_buf()),
            // nothing listens here; only used where a test enables it
            metadata_base: "http://127.0.0.1:9".into(),
        }
    }

    fn write_cli(home: &std::path::Path) {
        std::fs::create_dir_all(home.join(".aliyun")).unwrap();
        std::fs::write(
            home.join(".aliyun/config.json"),
            r#"{"current":"dev","profiles":[
              {"name":"default","mode":"AK","access_key_id":"cliDefaultAK","access_key_secret":"s1"},
              {"name":"dev","mode":"StsToken","access_key_id":"cliDevSTSAK","access_key_secret":"s2","sts_token":"cliDevToken"},
              {"name":"role","mode":"RamRoleArn","access_key_id":"x","access_key_secret":"y"}]}"#,
        )
        .unwrap();
    }

    fn write_ini(home: &std::path::Path) {
        std::fs::create_dir_all(home.join(".alibabacloud")).unwrap();
        std::fs::write(
            home.join(".alibabacloud/credentials.ini"),
            "[default]\ntype = access_key # a comment\naccess_key_id = iniAK\naccess_key_secret = iniSecret\n\n\
             [other]\ntype = access_key\naccess_key_id = iniOtherAK\naccess_key_secret = s\n",
        )
        .unwrap();
    }

    const NO_IMDS: (&str, &str) = ("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true");

    async fn found(
        vars: &[(&str, &str)],
        home: &std::path::Path,
    ) -> (String, String, Option<String>) {
        let c = chain(vars, home).resolve().await.unwrap();
        (
            c.provider,
            c.access_key_id,
            c.security_token.map(|t| t.expose().to_string()),
        )
    }

    #[tokio::test]
    async fn chain_order_matches_the_official_tools() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        write_cli(h);
        write_ini(h);
        let env = [
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "envAK"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "envSecret"),
            NO_IMDS,
        ];
        assert_eq!(found(&env, h).await, ("env".into(), "envAK".into(), None));
        let env_sts = [
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "envAK"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "envSecret"),
            ("ALIBABA_CLOUD_SECURITY_TOKEN", "envTok"),
            NO_IMDS,
        ];
        assert_eq!(found(&env_sts, h).await.2.as_deref(), Some("envTok"));
        // no env: the CLI file's current profile
        assert_eq!(
            found(&[NO_IMDS], h).await,
            (
                "cli_profile/StsToken".into(),
                "cliDevSTSAK".into(),
                Some("cliDevToken".into())
            )
        );
        assert_eq!(
            found(&[("ALIBABA_CLOUD_PROFILE", "default"), NO_IMDS], h)
                .await
                .1,
            "cliDefaultAK"
        );
        // CLI disabled: the INI file
        let off = ("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true");
        assert_eq!(
            found(&[off, NO_IMDS], h).await,
            ("profile/access_key".into(), "iniAK".into(), None)
        );
        assert_eq!(
            found(&[off, ("ALIBABA_CLOUD_PROFILE", "other"), NO_IMDS], h)
                .await
                .1,
            "iniOtherAK"
        );
    }

    #[tokio::test]
    async fn nothing_found_lists_every_provider_tried() {
        let home = tempfile::tempdir().unwrap();
        let err = chain(&[NO_IMDS], home.path())
            .resolve()
            .await
            .unwrap_err()
            .to_string();
        for p in ["env:", "cli_profile:", "profile:", "ecs_ram_role: disabled"] {
            assert!(err.contains(p), "{err}");
        }
    }

    #[tokio::test]
    async fn unsupported_profile_mode_is_named() {
        let home = tempfile::tempdir().unwrap();
        write_cli(home.path());
        let err = chain(&[("ALIBABA_CLOUD_PROFILE", "role"), NO_IMDS], home.path())
            .resolve()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode 'RamRoleArn'"), "{err}");
    }

    #[tokio::test]
    async fn ecs_ram_role_comes_from_a_metadata_service() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // a loopback stand-in for the metadata service
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if head.starts_with("PUT /latest/api/token") {
                    "tok123".to_string()
                } else if !head.contains("x-aliyun-ecs-metadata-token: tok123") {
                    String::new()
                } else if head.starts_with("GET /latest/meta-data/ram/security-credentials/ ") {
                    "myrole".to_string()
                } else if head.starts_with("GET /latest/meta-data/ram/security-credentials/myrole ")
                {
                    r#"{"Code":"Success","AccessKeyId":"STS.ecsAK","AccessKeySecret":"ecsSecret","SecurityToken":"ecsTok","Expiration":"2099-01-01T00:00:00Z"}"#.to_string()
                } else {
                    String::new()
                };
                let status = if body.is_empty() {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let home = tempfile::tempdir().unwrap();
        let mut c = chain(&[], home.path());
        c.metadata_base = base;
        let cred = c.resolve().await.unwrap();
        assert_eq!(cred.provider, "ecs_ram_role");
        assert_eq!(cred.access_key_id, "STS.ecsAK");
        assert_eq!(cred.security_token.unwrap().expose(), "ecsTok");
    }

    #[test]
    fn ini_parsing_drops_comments_and_finds_sections() {
        let kv = ini_section("[a]\nx = 1 # c\n[b]\ny=2\n", "b").unwrap();
        assert_eq!(kv, vec![("y".to_string(), "2".to_string())]);
        assert!(ini_section("[a]\n", "z").is_none());
    }
}
