use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// Overrides the regional endpoint, e.g. `http://127.0.0.1:18080`.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub region: String,
    /// Use the VPC endpoint instead of the public one.
    #[serde(default)]
    pub vpc: bool,
    pub workspace: String,
    pub kyuubi_service: String,
    /// Where a single broker keeps the tokens it created (mode 0600). With
    /// `[cluster]` the fleet's record in ZooKeeper holds them; a state file
    /// named there is imported into it once, when the fleet has no record.
    #[serde(default)]
    pub state_file: Option<std::path::PathBuf>,
    /// Auto-expiry of created tokens, in days; 0 = none.
    #[serde(default = "default_expire_days")]
    pub expire_days: u32,
    /// Rotate after this share of the token lifetime.
    #[serde(default = "default_fraction")]
    pub rotate_fraction: f64,
    #[serde(default = "default_min_interval", with = "duration")]
    pub min_interval: Duration,
    #[serde(default = "default_max_interval", with = "duration")]
    pub max_interval: Duration,
    /// How long a replaced token keeps working before it is deleted.
    #[serde(default = "default_grace", with = "duration")]
    pub grace: Duration,
}

fn default_expire_days() -> u32 {
    7
}
fn default_fraction() -> f64 {
    0.5
}
fn default_min_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_interval() -> Duration {
    Duration::from_secs(3 * 86400)
}
fn default_grace() -> Duration {
    Duration::from_secs(600)
}

impl TokensConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.rotate_fraction > 0.0 && self.rotate_fraction <= 1.0) {
            return Err(invalid(
                "tokens.rotate_fraction",
                "must be above 0 and at most 1",
                "e.g. 0.5",
            ));
        }
        if self.min_interval > self.max_interval || self.min_interval.is_zero() {
            return Err(invalid(
                "tokens.min_interval",
                "must be above zero and not above tokens.max_interval",
                "e.g. min_interval = \"1h\", max_interval = \"3d\"",
            ));
        }
        if !crate::cloud::request::is_workspace_id(&self.workspace) {
            return Err(invalid(
                "tokens.workspace",
                format!("'{}' is not a workspace id", self.workspace),
                "use w-<16 hex>",
            ));
        }
        if !crate::cloud::request::is_kyuubi_service_id(&self.kyuubi_service) {
            return Err(invalid(
                "tokens.kyuubi_service",
                format!("'{}' is not a Kyuubi service id", self.kyuubi_service),
                "use kb-<32 hex>",
            ));
        }
        if let Some(e) = &self.endpoint {
            crate::cloud::client::Endpoint::parse(e).map_err(|p| {
                invalid(
                    "tokens.endpoint",
                    p,
                    "use e.g. https://emr-serverless-spark.cn-hangzhou.aliyuncs.com",
                )
            })?;
        }
        Ok(())
    }
}
