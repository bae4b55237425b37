//! Who a client is upstream (account mapping) and which session settings
//! go with it. Pure functions: the broker core calls them at OpenSession.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Carry, CredentialsConfig, MappingConfig, MappingType, SessionPolicy};
use crate::identity::{ClientIdentity, Credential};
use crate::kerberos::Initiator;
use crate::secret::Secret;

/// The client is known but may not use this resource: there is no
/// fallback identity.
#[derive(Debug, Clone, thiserror::Error)]
#[error("user {user} has no account mapping on computing resource {resource}")]
pub struct NoMapping {
    pub user: String,
    pub resource: String,
}

/// Keys a client could use to act as someone else.
pub const IMPERSONATION_KEYS: [&str; 2] = ["hive.server2.proxy.user", "kyuubi.session.proxy.user"];
/// Set by the broker from the real peer address; never taken from clients.
pub const CLIENT_IP_KEY: &str = "kyuubi.client.ipAddress";
const HIVECONF: &str = "set:hiveconf:";

/// The identity used upstream, and settings that must go with it.
#[derive(Debug)]
pub struct UpstreamIdentity {
    pub credential: Credential,
    /// Session settings the client cannot override (e.g. the proxy user).
    pub forced: Vec<(String, String)>,
}

/// The broker's Kerberos identities, one per principal, built once per route.
pub type Initiators = BTreeMap<String, Arc<Initiator>>;

/// Every principal a route may use upstream (its mapping accounts and its
/// own credentials), each with its own credential cache.
pub fn initiators(credentials: &CredentialsConfig, mapping: Option<&MappingConfig>) -> Initiators {
    let mut out = Initiators::new();
    if let CredentialsConfig::Kerberos { principal, keytab } = credentials {
        out.insert(
            principal.clone(),
            Arc::new(Initiator::new(principal, keytab)),
        );
    }
    for a in mapping.map(|m| m.accounts.values()).into_iter().flatten() {
        if let Some(kt) = &a.keytab {
            out.entry(a.principal.clone())
                .or_insert_with(|| Arc::new(Initiator::new(&a.principal, kt)));
        }
    }
    out
}

/// Maps a client to its upstream identity on `resource`. Users without a
/// mapping are refused; there is no fallback identity.
pub fn upstream_identity(
    resource: &str,
    credentials: &CredentialsConfig,
    mapping: Option<&MappingConfig>,
    client: &ClientIdentity,
    initiators: &Initiators,
) -> Result<UpstreamIdentity, NoMapping> {
    let kerberos = |principal: &str| Credential {
        user: principal.to_string(),
        password: Secret::default(),
        kerberos: initiators.get(principal).cloned(),
    };
    let broker_cred = match credentials {
        CredentialsConfig::Static { user, password, .. } => Some(Credential {
            user: user.clone(),
            password: password.clone().unwrap_or_default(),
            kerberos: None,
        }),
        CredentialsConfig::Kerberos { principal, .. } => Some(kerberos(principal)),
        CredentialsConfig::Passthrough => None,
    };
    let own = || Credential {
        user: client.user.clone(),
        password: client.password.clone(),
        kerberos: None,
    };
    let Some(m) = mapping else {
        return Ok(UpstreamIdentity {
            credential: broker_cred.unwrap_or_else(own),
            forced: Vec::new(),
        });
    };
    let refuse = || NoMapping {
        user: client.user.clone(),
        resource: resource.to_string(),
    };
    match m.kind {
        MappingType::Ldap => {
            let acct = m.accounts.get(&client.user).ok_or_else(refuse)?;
            Ok(UpstreamIdentity {
                credential: Credential {
                    user: acct.user.clone(),
                    password: acct.password.clone().unwrap_or_default(),
                    kerberos: None,
                },
                forced: Vec::new(),
            })
        }
        MappingType::Kerberos => {
            let acct = m.accounts.get(&client.user).ok_or_else(refuse)?;
            Ok(UpstreamIdentity {
                credential: kerberos(&acct.principal),
                forced: Vec::new(),
            })
        }
        MappingType::System => {
            let name = match m.users.get(&client.user) {
                Some(n) => n.clone(),
                None if m.same_name_for_unlisted => client.user.clone(),
                None => return Err(refuse()),
            };
            match m.carry {
                Carry::User => Ok(UpstreamIdentity {
                    credential: Credential {
                        user: name,
                        password: broker_cred
                            .map(|c| c.password)
                            .unwrap_or_else(|| client.password.clone()),
                        kerberos: None,
                    },
                    forced: Vec::new(),
                }),
                Carry::ProxyUser => Ok(UpstreamIdentity {
                    credential: broker_cred.unwrap_or_else(own),
                    forced: IMPERSONATION_KEYS
                        .iter()
                        .map(|k| (k.to_string(), name.clone()))
                        .collect(),
                }),
            }
        }
    }
}

fn base_key(k: &str) -> &str {
    k.strip_prefix(HIVECONF).unwrap_or(k)
}

/// The OpenSession configuration sent upstream, built in this order:
/// the client's settings (minus impersonation keys unless allowed, and minus
/// any client IP it claims); `defaults` where the client set nothing;
/// `spark_conf` by the precedence flag; then `forced`. Returns the map and
/// the client keys that were stripped.
pub fn session_conf(
    policy: &SessionPolicy,
    client: &[(String, String)],
    forced: &[(String, String)],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut stripped = Vec::new();
    let mut conf: Vec<(String, String)> = Vec::new();
    for (k, v) in client {
        let base = base_key(k);
        if (IMPERSONATION_KEYS.contains(&base) && !policy.allow_impersonation)
            || base == CLIENT_IP_KEY
        {
            stripped.push(k.clone());
        } else {
            conf.push((k.clone(), v.clone()));
        }
    }
    let has = |conf: &[(String, String)], k: &str| conf.iter().any(|(ck, _)| base_key(ck) == k);
    for (k, v) in &policy.defaults {
        if !has(&conf, k) {
            conf.push((k.clone(), v.clone()));
        }
    }
    // sent as `set:hiveconf:<key>`, the form JDBC's `?key=value` produces:
    // Spark Thrift Server ignores a bare `spark.*` key, Kyuubi takes both
    for (k, v) in &policy.spark_conf {
        if policy.global_takes_precedence {
            conf.retain(|(ck, _)| base_key(ck) != k);
            conf.push((format!("{HIVECONF}{k}"), v.clone()));
        } else if !has(&conf, k) {
            conf.push((format!("{HIVECONF}{k}"), v.clone()));
        }
    }
    for (k, v) in forced {
        conf.retain(|(ck, _)| base_key(ck) != k);
        conf.push((k.clone(), v.clone()));
    }
    (conf, stripped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Account;

    fn client(user: &str) -> ClientIdentity {
        ClientIdentity {
            user: user.into(),
            password: Secret::new("client-pw"),
            addr: "10.1.2.3:5000".parse().unwrap(),
        }
    }

    fn system(users: &[(&str, &str)], carry: Carry) -> MappingConfig {
        MappingConfig {
            kind: MappingType::System,
            carry,
            users: users
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            same_name_for_unlisted: false,
            accounts: BTreeMap::new(),
            krb5_conf: None,
        }
    }

    /// `user` mapped by `m` on resource `r`, with no broker identity.
    fn passthrough(r: &str, m: &MappingConfig, user: &str) -> Result<UpstreamIdentity, NoMapping> {
        upstream_identity(
            r,
            &CredentialsConfig::Passthrough,
            Some(m),
            &client(user),
            &Initiators::new(),
        )
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn unmapped_user_gets_the_exact_refusal() {
        let m = system(&[("alice", "etl_alice")], Carry::User);
        let e = passthrough("sales", &m, "bob").unwrap_err();
        assert_eq!(
            e.to_string(),
            "user bob has no account mapping on computing resource sales"
        );
    }

    #[test]
    fn system_mapping_carries_the_name_as_user_or_proxy_user() {
        let m = system(&[("alice", "etl_alice")], Carry::User);
        let u = passthrough("r", &m, "alice").unwrap();
        assert_eq!(
            (u.credential.user.as_str(), u.credential.password.expose()),
            ("etl_alice", "client-pw")
        );
        let broker = CredentialsConfig::Static {
            user: "svc".into(),
            password: Some(Secret::new("svc-pw")),
            password_env: None,
        };
        let m = system(&[("alice", "etl_alice")], Carry::ProxyUser);
        let u = upstream_identity("r", &broker, Some(&m), &client("alice"), &Initiators::new())
            .unwrap();
        assert_eq!(u.credential.user, "svc");
        assert_eq!(
            u.forced,
            pairs(&[
                ("hive.server2.proxy.user", "etl_alice"),
                ("kyuubi.session.proxy.user", "etl_alice")
            ])
        );
    }

    #[test]
    fn ldap_mapping_uses_the_mapped_account() {
        let mut accounts = BTreeMap::new();
        accounts.insert(
            "alice".to_string(),
            Account {
                user: "bob".into(),
                password: Some(Secret::new("bob-pw")),
                ..Account::default()
            },
        );
        let m = MappingConfig {
            kind: MappingType::Ldap,
            carry: Carry::User,
            users: BTreeMap::new(),
            same_name_for_unlisted: false,
            accounts,
            krb5_conf: None,
        };
        let u = passthrough("r", &m, "alice").unwrap();
        assert_eq!(
            (u.credential.user.as_str(), u.credential.password.expose()),
            ("bob", "bob-pw")
        );
        assert!(passthrough("r", &m, "carol").is_err());
    }

    #[test]
    fn kerberos_mapping_presents_the_mapped_principal_with_its_own_initiator() {
        let mut accounts = BTreeMap::new();
        accounts.insert(
            "alice".to_string(),
            Account {
                principal: "bob@R".into(),
                keytab: Some("/k/bob.keytab".into()),
                ..Account::default()
            },
        );
        let m = MappingConfig {
            kind: MappingType::Kerberos,
            carry: Carry::User,
            users: BTreeMap::new(),
            same_name_for_unlisted: false,
            accounts,
            krb5_conf: None,
        };
        let inits = initiators(&CredentialsConfig::Passthrough, Some(&m));
        let u = upstream_identity(
            "r",
            &CredentialsConfig::Passthrough,
            Some(&m),
            &client("alice"),
            &inits,
        )
        .unwrap();
        assert_eq!(u.credential.user, "bob@R");
        let init = u.credential.kerberos.expect("a Kerberos credential");
        assert!(Arc::ptr_eq(&init, &inits["bob@R"]));
        assert!(u.credential.password.is_empty());
        assert!(matches!(
            upstream_identity(
                "r",
                &CredentialsConfig::Passthrough,
                Some(&m),
                &client("bob"),
                &inits
            ),
            Err(NoMapping { .. })
        ));
    }

    #[test]
    fn global_spark_conf_precedence_in_all_four_cases() {
        // (global wins?, client sets the key?) -> value sent
        for (global_wins, client_sets, expect) in [
            (false, false, "global"),
            (false, true, "client"),
            (true, false, "global"),
            (true, true, "global"),
        ] {
            let policy = SessionPolicy {
                spark_conf: [(
                    "spark.sql.shuffle.partitions".to_string(),
                    "global".to_string(),
                )]
                .into(),
                global_takes_precedence: global_wins,
                ..SessionPolicy::default()
            };
            let client = if client_sets {
                pairs(&[("set:hiveconf:spark.sql.shuffle.partitions", "client")])
            } else {
                vec![]
            };
            let (conf, _) = session_conf(&policy, &client, &[]);
            let values: Vec<&str> = conf
                .iter()
                .filter(|(k, _)| base_key(k) == "spark.sql.shuffle.partitions")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(
                values,
                vec![expect],
                "global_wins={global_wins} client_sets={client_sets}"
            );
        }
    }

    #[test]
    fn defaults_apply_only_where_the_client_is_silent() {
        let policy = SessionPolicy {
            defaults: [
                ("queue".to_string(), "dev".to_string()),
                ("engine".to_string(), "esr-4".to_string()),
            ]
            .into(),
            ..SessionPolicy::default()
        };
        let (conf, _) = session_conf(&policy, &pairs(&[("set:hiveconf:queue", "prod")]), &[]);
        assert!(conf.contains(&("set:hiveconf:queue".into(), "prod".into())));
        assert!(conf.contains(&("engine".into(), "esr-4".into())));
        assert!(!conf.contains(&("queue".into(), "dev".into())));
    }

    #[test]
    fn impersonation_and_client_ip_from_clients_are_stripped_unless_allowed() {
        let client = pairs(&[
            ("hive.server2.proxy.user", "admin"),
            ("set:hiveconf:kyuubi.session.proxy.user", "admin"),
            ("kyuubi.client.ipAddress", "1.1.1.1"),
            ("use:database", "default"),
        ]);
        let forced = pairs(&[(CLIENT_IP_KEY, "10.1.2.3")]);
        let (conf, stripped) = session_conf(&SessionPolicy::default(), &client, &forced);
        assert_eq!(stripped.len(), 3);
        assert_eq!(
            conf,
            pairs(&[("use:database", "default"), (CLIENT_IP_KEY, "10.1.2.3")])
        );
        let allow = SessionPolicy {
            allow_impersonation: true,
            ..SessionPolicy::default()
        };
        let (conf, stripped) = session_conf(&allow, &client, &forced);
        assert_eq!(stripped, vec!["kyuubi.client.ipAddress".to_string()]);
        assert!(conf.contains(&("hive.server2.proxy.user".into(), "admin".into())));
    }
}
