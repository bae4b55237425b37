//! Warm upstream sessions. Opening a session on a serverless gateway waits
//! for an engine, and every BI connection pays it again. For each kind of
//! OpenSession it has seen recently (same route, upstream identity, client
//! address and rewritten request: protocol version and settings alike), the
//! broker keeps a few sessions already opened and checked, and hands one to
//! the next matching OpenSession at once.
//!
//! A session is used by one client only: when it is handed out, another is
//! opened in the background; the client's CloseSession closes it upstream.
//! Nothing a client does (current database, SET, temporary views) can reach
//! another. Fills happen only on demand (a miss or a hit of that kind), so an
//! upstream that is down costs one failed attempt per client OpenSession,
//! not a retry loop.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::debug;

use crate::governor::{Governor, Permit};
use crate::identity::Credential;
use crate::tcli::{self, Guid};
use crate::upstream::{HttpPool, Link, Target};
use crate::wire::thrift::{peek_header, ttype, MessageType, Writer};

/// A route's warm-session settings.
#[derive(Debug, Clone, Copy)]
pub struct WarmPolicy {
    /// Ready sessions per kind of OpenSession.
    pub per_key: usize,
    /// Ready sessions on the route, over all kinds.
    pub per_route: usize,
    /// A kind not asked for this long is forgotten, and a ready session
    /// this old is closed rather than handed out.
    pub idle: Duration,
}

/// One kind of OpenSession: who, from where, and the exact request the
/// upstream would be sent (sequence id zeroed).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WarmKey {
    route: Arc<str>,
    user: String,
    /// A keyed digest of the password the session logs in with upstream:
    /// a client naming alice with another password (on a listener that
    /// leaves the check to the upstream) never gets alice's session.
    password: [u8; 32],
    kerberos: bool,
    client_ip: std::net::IpAddr,
    request: Bytes,
}

/// What opening another session of a kind needs.
#[derive(Clone)]
pub struct Recipe {
    pub target: Arc<Target>,
    pub cred: Credential,
    pub pool: HttpPool,
    pub client_ip: std::net::IpAddr,
    /// The route's governor: a warm session holds a place of its own.
    pub governor: Arc<Governor>,
}

/// The governor's name for places held by warm sessions (no client user
/// can be named with a NUL).
const WARM_USER: &str = "\0warm";

/// A ready session: its link and the upstream's OpenSession reply.
pub struct Warm {
    pub link: Link,
    pub reply: Bytes,
    born: Instant,
    /// Given back when the client that takes this session holds its own.
    _place: Permit,
}

struct Slot {
    recipe: Recipe,
    ready: VecDeque<Warm>,
    /// Opens in flight.
    filling: usize,
    asked: Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    route: Arc<str>,
    /// hit, miss
    result: &'static str,
}

/// Kinds of OpenSession kept per route, and the largest request kept.
const KINDS_PER_ROUTE: usize = 64;
const MAX_REQUEST: usize = 64 * 1024;

pub struct WarmPool {
    slots: Mutex<HashMap<WarmKey, Slot>>,
    /// The key of the password digests, made at startup.
    digest_key: [u8; 32],
    /// Set at shutdown: fills still running close what they open.
    closed: std::sync::atomic::AtomicBool,
    policies: HashMap<Arc<str>, WarmPolicy>,
    ready: Family<RouteLabels, Gauge>,
    handed: Family<ResultLabels, Counter>,
    failed: Family<RouteLabels, Counter>,
}

impl WarmKey {
    /// `None` for a request too big to keep.
    pub fn new(
        pool: &WarmPool,
        route: &Arc<str>,
        cred: &Credential,
        client_ip: std::net::IpAddr,
        request: &[u8],
    ) -> Option<WarmKey> {
        if request.len() > MAX_REQUEST {
            return None;
        }
        let h = peek_header(request).ok()?;
        let mut request = request.to_vec();
        request[h.body_offset - 4..h.body_offset].fill(0);
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&pool.digest_key).ok()?;
        mac.update(cred.password.expose().as_bytes());
        Some(WarmKey {
            route: route.clone(),
            user: cred.user.clone(),
            password: mac.finalize().into_bytes().into(),
            kerberos: cred.kerberos.is_some(),
            client_ip,
            request: Bytes::from(request),
        })
    }
}

impl WarmPool {
    /// `policies`: the routes that keep warm sessions.
    pub fn new(policies: HashMap<Arc<str>, WarmPolicy>, registry: &mut Registry) -> WarmPool {
        let p = WarmPool {
            slots: Mutex::new(HashMap::new()),
            digest_key: rand::random(),
            closed: Default::default(),
            policies,
            ready: Family::default(),
            handed: Family::default(),
            failed: Family::default(),
        };
        registry.register(
            "warm_sessions",
            "Upstream sessions opened ahead and ready to hand to a client's OpenSession, by route",
            p.ready.clone(),
        );
        registry.register(
            "warm_session_opens",
            "Client OpenSessions by route and result (hit: answered with a warm session; miss: opened upstream while the client waited)",
            p.handed.clone(),
        );
        registry.register(
            "warm_session_failures",
            "Warm sessions that failed to open or failed their check, by route",
            p.failed.clone(),
        );
        p
    }

    pub fn enabled(&self, route: &str) -> bool {
        self.policies.contains_key(route)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WarmKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_ready(&self, slots: &HashMap<WarmKey, Slot>, route: &Arc<str>) -> usize {
        slots
            .iter()
            .filter(|(k, _)| k.route == *route)
            .map(|(_, s)| s.ready.len() + s.filling)
            .sum()
    }

    fn set_gauge(&self, slots: &HashMap<WarmKey, Slot>, route: &Arc<str>) {
        let n: usize = slots
            .iter()
            .filter(|(k, _)| k.route == *route)
            .map(|(_, s)| s.ready.len())
            .sum();
        self.ready
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .set(n as i64);
    }

    /// A ready session of this kind, if there is one; either way the kind
    /// is (re)filled in the background.
    pub async fn take(self: &Arc<Self>, key: &WarmKey, recipe: Recipe) -> Option<Warm> {
        let policy = *self.policies.get(&key.route)?;
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut stale = Vec::new();
        let (found, wanted) = {
            let mut slots = self.lock();
            let kinds = slots.keys().filter(|k| k.route == key.route).count();
            if !slots.contains_key(key) && kinds >= KINDS_PER_ROUTE {
                return None;
            }
            let slot = slots.entry(key.clone()).or_insert_with(|| Slot {
                recipe: recipe.clone(),
                ready: VecDeque::new(),
                filling: 0,
                asked: Instant::now(),
            });
            slot.asked = Instant::now();
            let mut found = None;
            while let Some(w) = slot.ready.pop_front() {
                if w.born.elapsed() < policy.idle {
                    found = Some(w);
                    break;
                }
                stale.push(w);
            }
            let have = slot.ready.len() + slot.filling;
            let room = policy
                .per_route
                .saturating_sub(self.count_ready(&slots, &key.route));
            let wanted = policy.per_key.saturating_sub(have).min(room);
            if let Some(slot) = slots.get_mut(key) {
                slot.filling += wanted;
            }
            self.set_gauge(&slots, &key.route);
            (found, wanted)
        };
        for w in stale {
            tokio::spawn(close_warm(w));
        }
        // a connection the upstream (or a load balancer) dropped while it
        // waited is not handed out
        let found = match found {
            Some(w) if w.link.is_usable().await => Some(w),
            Some(w) => {
                tokio::spawn(close_warm(w));
                None
            }
            None => None,
        };
        for _ in 0..wanted {
            let (pool, key) = (self.clone(), key.clone());
            tokio::spawn(async move { pool.fill(key).await });
        }
        let result = if found.is_some() { "hit" } else { "miss" };
        self.handed
            .get_or_create(&ResultLabels {
                route: key.route.clone(),
                result,
            })
            .inc();
        found
    }

    /// Opens one session of a kind and checks it.
    async fn fill(self: Arc<Self>, key: WarmKey) {
        let recipe = {
            let slots = self.lock();
            match slots.get(&key) {
                Some(s) => s.recipe.clone(),
                None => return,
            }
        };
        let opened = match recipe.governor.try_acquire(WARM_USER) {
            Some(place) => open_checked(&recipe, &key.request, place).await,
            None => Err("no free place under the route's governor".to_string()),
        };
        // opened while clients queued for a place, or while shutting down:
        // the place is theirs, the session is not kept
        let opened = match opened {
            Ok(w)
                if recipe.governor.has_waiters()
                    || self.closed.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                close_warm(w).await;
                Err("not kept: clients wait for places, or the broker stops".to_string())
            }
            other => other,
        };
        let leftover = {
            let mut slots = self.lock();
            let leftover = match (slots.get_mut(&key), opened) {
                (Some(slot), Ok(w)) => {
                    slot.filling = slot.filling.saturating_sub(1);
                    slot.ready.push_back(w);
                    None
                }
                (Some(slot), Err(e)) => {
                    slot.filling = slot.filling.saturating_sub(1);
                    debug!(route = %key.route, error = %e, "a warm session did not open");
                    self.failed
                        .get_or_create(&RouteLabels {
                            route: key.route.clone(),
                        })
                        .inc();
                    None
                }
                // the kind was forgotten meanwhile
                (None, Ok(w)) => Some(w),
                (None, Err(_)) => None,
            };
            self.set_gauge(&slots, &key.route);
            leftover
        };
        if let Some(w) = leftover {
            close_warm(w).await;
        }
    }

    /// Forgets kinds nobody asked for within their route's `idle`, and
    /// closes ready sessions that old.
    pub async fn housekeep(&self) {
        let mut closing = Vec::new();
        {
            let mut slots = self.lock();
            let policies = &self.policies;
            slots.retain(|k, s| {
                let idle = policies.get(&k.route).map_or(Duration::ZERO, |p| p.idle);
                let (old, young): (VecDeque<Warm>, VecDeque<Warm>) =
                    s.ready.drain(..).partition(|w| w.born.elapsed() >= idle);
                s.ready = young;
                closing.extend(old);
                let keep = s.asked.elapsed() < idle;
                if !keep {
                    closing.extend(s.ready.drain(..));
                }
                keep || s.filling > 0
            });
            for route in policies.keys() {
                self.set_gauge(&slots, route);
            }
        }
        for w in closing {
            close_warm(w).await;
        }
    }

    /// A client is about to queue on `route`'s governor: close one ready
    /// session there, so that its place goes to the client.
    pub fn shed(&self, route: &str) {
        let w = {
            let mut slots = self.lock();
            let w = slots
                .iter_mut()
                .filter(|(k, _)| &*k.route == route)
                .find_map(|(_, s)| s.ready.pop_front());
            if let Some(r) = self.policies.keys().find(|r| &***r == route) {
                self.set_gauge(&slots, r);
            }
            w
        };
        if let Some(w) = w {
            tokio::spawn(close_warm(w));
        }
    }

    /// On shutdown: close every ready session.
    pub async fn close_all(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<Warm> = {
            let mut slots = self.lock();
            slots.values_mut().flat_map(|s| s.ready.drain(..)).collect()
        };
        for w in all {
            close_warm(w).await;
        }
    }
}

/// Opens a link, sends the OpenSession, and checks the session with a
/// GetInfo(CLI_DBMS_VER): a Kyuubi gateway answers that from the engine, so
/// a session whose engine is still launching is not ready yet.
async fn open_checked(recipe: &Recipe, request: &Bytes, place: Permit) -> Result<Warm, String> {
    let link = Link::open(&recipe.target, &recipe.cred, &recipe.pool, recipe.client_ip)
        .await
        .map_err(|e| e.to_string())?;
    let reply = link
        .call(request.clone())
        .await
        .map_err(|e| e.to_string())?;
    let h = peek_header(&reply).map_err(|e| e.to_string())?;
    let Some((guid, secret)) = tcli::reply_session_handle(&reply, &h).map_err(|e| e.to_string())?
    else {
        link.close().await;
        return Err("OpenSession was refused".into());
    };
    let info = match link.call(get_info(&guid, &secret)).await {
        Ok(info) => info,
        Err(e) => {
            close_session(&link, &guid, &secret).await;
            return Err(e.to_string());
        }
    };
    if !tcli::reply_succeeded(&info) {
        close_session(&link, &guid, &secret).await;
        return Err("the new session failed its GetInfo check".into());
    }
    Ok(Warm {
        link,
        reply,
        born: Instant::now(),
        _place: place,
    })
}

fn handle(w: &mut Writer, guid: &Guid, secret: &[u8]) {
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRING, 1);
    w.binary(guid);
    w.field(ttype::STRING, 2);
    w.binary(secret);
    w.stop();
    w.stop();
}

fn get_info(guid: &Guid, secret: &[u8]) -> Bytes {
    let mut w = Writer::default();
    w.message_begin("GetInfo", MessageType::Call, 1);
    w.field(ttype::STRUCT, 1);
    handle(&mut w, guid, secret);
    w.field(ttype::I32, 2);
    w.i32(crate::tcli::gen::TGetInfoType::CLI_DBMS_VER.0);
    w.stop();
    w.stop();
    Bytes::from(w.buf)
}

async fn close_session(link: &Link, guid: &Guid, secret: &[u8]) {
    let mut w = Writer::default();
    w.message_begin("CloseSession", MessageType::Call, 2);
    w.field(ttype::STRUCT, 1);
    handle(&mut w, guid, secret);
    w.stop();
    w.stop();
    let _ = link.call(Bytes::from(w.buf)).await;
    link.close().await;
}

async fn close_warm(w: Warm) {
    if let Ok(h) = peek_header(&w.reply) {
        if let Ok(Some((guid, secret))) = tcli::reply_session_handle(&w.reply, &h) {
            close_session(&w.link, &guid, &secret).await;
            return;
        }
    }
    w.link.close().await;
}
