//! Hive/Kyuubi JDBC connection strings: a builder for the forms clients
//! need (token in httpPath, Kerberos principal, user/LDAP, TLS, ZooKeeper
//! discovery, the broker's own endpoints) and a parser that follows Hive
//! JDBC's `Utils.parseURL`. Values the grammar cannot carry are refused:
//! there is no escape for `;`, and `=` inside a value is split wrongly.

use std::fmt::Write as _;

use crate::secret::Secret;

pub const PREFIX: &str = "jdbc:hive2://";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnError {
    #[error("{what} contains '{ch}', which a JDBC URL cannot carry: {why}")]
    Unrepresentable {
        what: String,
        ch: char,
        why: &'static str,
    },
    #[error("bad JDBC URL: {0}")]
    Parse(String),
}

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Gateway token in the HTTP path (`<http_path>/token/<token>`).
    Token { value: Secret, http_path: String },
    /// Kerberos: the server principal, e.g. `kyuubi/_HOST@REALM`.
    Kerberos { principal: String },
    /// User name (LDAP or plain); the password is given to the client separately.
    User { name: String },
    /// Nothing in the URL.
    None,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub trust_store: Option<String>,
    pub trust_store_password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct ConnSpec {
    /// One `host[:port]`, or the ZooKeeper ensemble with `zookeeper_namespace`.
    pub hosts: Vec<String>,
    pub db: Option<String>,
    pub auth: Auth,
    /// HTTP transport with this path (implied by a token).
    pub http_path: Option<String>,
    pub tls: Option<Tls>,
    pub zookeeper_namespace: Option<String>,
    /// Extra `;k=v` session variables, `?k=v` confs and `#k=v` variables.
    pub session: Vec<(String, String)>,
    pub conf: Vec<(String, String)>,
    pub vars: Vec<(String, String)>,
}

impl ConnSpec {
    pub fn new(host: impl Into<String>, auth: Auth) -> ConnSpec {
        ConnSpec {
            hosts: vec![host.into()],
            db: None,
            auth,
            http_path: None,
            tls: None,
            zookeeper_namespace: None,
            session: Vec::new(),
            conf: Vec::new(),
            vars: Vec::new(),
        }
    }
}

/// Percent-encodes what `java.net.URI` would reject; refuses `;` (no escape
/// exists: Hive decodes before splitting) and, in values, `=`.
fn component(what: &str, v: &str, allow_eq: bool) -> Result<String, ConnError> {
    let refuse = |ch, why| {
        Err(ConnError::Unrepresentable {
            what: what.to_string(),
            ch,
            why,
        })
    };
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            ';' => return refuse(';', "';' separates parameters and has no escape"),
            '=' if !allow_eq => return refuse('=', "Hive splits each parameter at its last '='"),
            'a'..='z'
            | 'A'..='Z'
            | '0'..='9'
            | '-'
            | '_'
            | '.'
            | '~'
            | '/'
            | ':'
            | '@'
            | '='
            | ','
            | '!'
            | '$'
            | '&'
            | '\''
            | '('
            | ')'
            | '*'
            | '+' => out.push(c),
            other => {
                let mut buf = [0u8; 4];
                for b in other.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            }
        }
    }
    Ok(out)
}

fn kv(section: &str, k: &str, v: &str) -> Result<String, ConnError> {
    Ok(format!(
        "{}={}",
        component(&format!("{section} key '{k}'"), k, false)?,
        component(&format!("{section} value of '{k}'"), v, false)?
    ))
}

/// Builds the URL. Secrets appear as `****` unless `show_secret`.
pub fn build(spec: &ConnSpec, show_secret: bool) -> Result<String, ConnError> {
    let mask = |s: &Secret| {
        if show_secret {
            s.expose().to_string()
        } else {
            "****".into()
        }
    };
    let mut session: Vec<String> = Vec::new();
    match &spec.auth {
        Auth::Token { value, http_path } => {
            let v = value.expose();
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ConnError::Unrepresentable {
                    what: "token".into(),
                    ch: v
                        .chars()
                        .find(|c| !c.is_ascii_alphanumeric())
                        .unwrap_or(' '),
                    why: "a token goes into the URL path and must be letters and digits",
                });
            }
            session.push("transportMode=http".into());
            let path = component("httpPath", http_path.trim_matches('/'), false)?;
            session.push(format!("httpPath={path}/token/{}", mask(value)));
        }
        Auth::Kerberos { principal } => session.push(format!(
            "principal={}",
            component("principal", principal, false)?
        )),
        Auth::User { name } => session.push(format!("user={}", component("user", name, false)?)),
        Auth::None => {}
    }
    if let (Some(p), false) = (&spec.http_path, matches!(spec.auth, Auth::Token { .. })) {
        session.push("transportMode=http".into());
        session.push(format!(
            "httpPath={}",
            component("httpPath", p.trim_matches('/'), false)?
        ));
    }
    if let Some(t) = &spec.tls {
        session.push("ssl=true".into());
        if let Some(ts) = &t.trust_store {
            session.push(format!(
                "sslTrustStore={}",
                component("sslTrustStore", ts, false)?
            ));
        }
        if let Some(pw) = &t.trust_store_password {
            component("trustStorePassword", pw.expose(), false)?;
            session.push(format!("trustStorePassword={}", mask(pw)));
        }
    }
    if let Some(ns) = &spec.zookeeper_namespace {
        session.push("serviceDiscoveryMode=zooKeeper".into());
        session.push(format!(
            "zooKeeperNamespace={}",
            component("zooKeeperNamespace", ns, false)?
        ));
    }
    for (k, v) in &spec.session {
        session.push(kv("session", k, v)?);
    }
    let db = match &spec.db {
        Some(d) if d.contains('/') => {
            return Err(ConnError::Unrepresentable {
                what: "database".into(),
                ch: '/',
                why: "the database is one path segment",
            })
        }
        Some(d) => component("database", d, false)?,
        None => String::new(),
    };
    for h in &spec.hosts {
        if h.is_empty() || h.contains(['/', '?', '#', ';', ',', ' ']) {
            return Err(ConnError::Parse(format!("'{h}' is not a host[:port]")));
        }
    }
    let mut url = format!("{PREFIX}{}/{db}", spec.hosts.join(","));
    for s in session {
        url.push(';');
        url.push_str(&s);
    }
    let join = |pairs: &[(String, String)], what: &str| -> Result<String, ConnError> {
        Ok(pairs
            .iter()
            .map(|(k, v)| kv(what, k, v))
            .collect::<Result<Vec<_>, _>>()?
            .join(";"))
    };
    if !spec.conf.is_empty() {
        url.push('?');
        url.push_str(&join(&spec.conf, "conf")?);
    }
    if !spec.vars.is_empty() {
        url.push('#');
        url.push_str(&join(&spec.vars, "var")?);
    }
    Ok(url)
}

/// A URL as Hive JDBC reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub authority: String,
    pub db: String,
    pub session: Vec<(String, String)>,
    pub conf: Vec<(String, String)>,
    pub vars: Vec<(String, String)>,
}

impl Parsed {
    pub fn session_var(&self, k: &str) -> Option<&str> {
        self.session
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn decode(s: &str) -> Result<String, ConnError> {
    crate::percent::decode(s, false)
        .ok_or_else(|| ConnError::Parse(format!("bad percent-encoding in '{s}'")))
}

/// Hive's `([^;]*)=([^;]*)[;]?`: each `;`-token splits at its last `=`;
/// tokens without `=` are ignored; a repeated key is an error.
fn pairs(s: &str, section: &str) -> Result<Vec<(String, String)>, ConnError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for tok in s.split(';') {
        let Some((k, v)) = tok.rsplit_once('=') else {
            continue;
        };
        if out.iter().any(|(x, _)| x == k) {
            return Err(ConnError::Parse(format!(
                "multiple values for {section} property {k}"
            )));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

pub fn parse(url: &str) -> Result<Parsed, ConnError> {
    let rest = url
        .strip_prefix(PREFIX)
        .ok_or_else(|| ConnError::Parse(format!("must start with {PREFIX}")))?;
    // Hive looks for '/', then '?', then '#' (in that order, not the earliest)
    let cut = ['/', '?', '#']
        .iter()
        .find_map(|c| rest.find(*c).filter(|i| *i > 0));
    let (authority, tail) = match cut {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains(';') {
        return Err(ConnError::Parse(format!(
            "hostname not found in '{authority}'; is a '/' missing after the host?"
        )));
    }
    let (before_frag, frag) = tail.split_once('#').unwrap_or((tail, ""));
    let (path, query) = before_frag.split_once('?').unwrap_or((before_frag, ""));
    let path = decode(path.strip_prefix('/').unwrap_or(path))?;
    let (db, session) = path.split_once(';').unwrap_or((&path, ""));
    Ok(Parsed {
        authority: authority.to_string(),
        db: if db.is_empty() {
            "default".into()
        } else {
            db.to_string()
        },
        session: pairs(session, "session")?,
        conf: pairs(&decode(query)?, "conf")?,
        vars: pairs(&decode(frag)?, "var")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(v: &str) -> Auth {
        Auth::Token {
            value: Secret::new(v),
            http_path: "cliservice".into(),
        }
    }

    #[test]
    fn token_form_matches_the_gateway_form_and_masks_by_default() {
        let spec = ConnSpec::new(
            "kyuubi-cn-hangzhou-internal.spark.emr.aliyuncs.com:80",
            token("abc123"),
        );
        assert_eq!(
            build(&spec, true).unwrap(),
            "jdbc:hive2://kyuubi-cn-hangzhou-internal.spark.emr.aliyuncs.com:80/;transportMode=http;httpPath=cliservice/token/abc123"
        );
        assert!(build(&spec, false).unwrap().ends_with("/token/****"));
    }

    #[test]
    fn kerberos_user_tls_and_zookeeper_forms() {
        let k = ConnSpec::new(
            "h:10009",
            Auth::Kerberos {
                principal: "kyuubi/_HOST@EMR.C-X.COM".into(),
            },
        );
        assert_eq!(
            build(&k, false).unwrap(),
            "jdbc:hive2://h:10009/;principal=kyuubi/_HOST@EMR.C-X.COM"
        );
        let mut u = ConnSpec::new(
            "h:10009",
            Auth::User {
                name: "alice".into(),
            },
        );
        u.tls = Some(Tls {
            trust_store: Some("/etc/ts.jks".into()),
            trust_store_password: Some(Secret::new("pw")),
        });
        assert_eq!(
            build(&u, false).unwrap(),
            "jdbc:hive2://h:10009/;user=alice;ssl=true;sslTrustStore=/etc/ts.jks;trustStorePassword=****"
        );
        let mut z = ConnSpec::new("zk1:2181", Auth::None);
        z.hosts.push("zk2:2181".into());
        z.zookeeper_namespace = Some("kyuubi".into());
        assert_eq!(
            build(&z, false).unwrap(),
            "jdbc:hive2://zk1:2181,zk2:2181/;serviceDiscoveryMode=zooKeeper;zooKeeperNamespace=kyuubi"
        );
    }

    #[test]
    fn values_the_grammar_cannot_carry_are_refused() {
        let mut s = ConnSpec::new("h:1", Auth::User { name: "a;b".into() });
        assert!(matches!(
            build(&s, false),
            Err(ConnError::Unrepresentable { ch: ';', .. })
        ));
        s.auth = Auth::None;
        s.session
            .push(("http.header.Authorization".into(), "Bearer ab==".into()));
        let e = build(&s, false).unwrap_err();
        assert!(
            matches!(e, ConnError::Unrepresentable { ch: '=', .. }),
            "{e}"
        );
        assert!(build(&ConnSpec::new("h:1", token("ab-cd")), true).is_err());
    }

    #[test]
    fn round_trips_through_the_parser_with_encoding() {
        let mut s = ConnSpec::new(
            "h:10009",
            Auth::User {
                name: "alice".into(),
            },
        );
        s.db = Some("sales db".into());
        s.conf
            .push(("kyuubi.engine.share.level".into(), "CONNECTION".into()));
        s.conf.push(("spark.app.name".into(), "a#b?c d%".into()));
        s.vars.push(("x".into(), "ünï".into()));
        let url = build(&s, true).unwrap();
        let p = parse(&url).unwrap();
        assert_eq!(p.authority, "h:10009");
        assert_eq!(p.db, "sales db");
        assert_eq!(p.session_var("user"), Some("alice"));
        assert_eq!(p.conf, s.conf);
        assert_eq!(p.vars, s.vars);
    }

    #[test]
    fn parser_follows_hive_quirks() {
        let p = parse("jdbc:hive2://h:1/db;a=b;flag;k=v=w?c=d#e=f").unwrap();
        assert_eq!(p.db, "db");
        assert_eq!(
            p.session,
            vec![("a".into(), "b".into()), ("k=v".into(), "w".into())]
        );
        assert!(
            parse("jdbc:hive2://h:1;a=b").is_err(),
            "missing '/' after the host"
        );
        assert!(
            parse("jdbc:hive2://h:1/;a=1;a=2").is_err(),
            "duplicates refused"
        );
        assert_eq!(parse("jdbc:hive2://h:1/").unwrap().db, "default");
    }
}
