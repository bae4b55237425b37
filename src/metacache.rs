//! The metadata cache. BI tools ask the same metadata questions (GetTables,
//! GetColumns, GetTypeInfo, GetInfo, ...) on every connect and schema
//! refresh, and a Kyuubi gateway answers each one slowly. The broker records
//! the upstream's complete answer once and replays it to later identical
//! calls, with operation handles of its own.
//!
//! - [`MetaCache`]: the entries, keyed by route, upstream identity
//!   ([`SessionScope`]), protocol version, method and the request's
//!   arguments; a TTL per route and one byte bound for all routes.
//! - [`Recording`]: follows one upstream operation its client drives
//!   (result-set metadata, status, every row page) and becomes an entry when
//!   the client closes it; the broker fetches whatever the client left.
//! - [`Replay`]: one client operation served from an entry: status, metadata,
//!   rows in whatever batch size the client asks for, close.
//!
//! A replay is byte for byte what the upstream sent, apart from handles and
//! sequence ids: row pages are re-cut to the client's batch size and encoded
//! as the upstream encoded them (its null-bitmap layout and its `hasMoreRows`
//! habit are learned from the pages it sent; an answer that fits none of the
//! known layouts is not cached).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::Expiry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TInputProtocol, TSerializable,
};

use crate::tcli::gen::{
    TBinaryColumn, TBoolColumn, TByteColumn, TColumn, TDoubleColumn, TFetchOrientation,
    TFetchResultsResp, TGetOperationStatusResp, TI16Column, TI32Column, TI64Column,
    TOperationState, TRow, TRowSet, TStatus, TStatusCode, TStringColumn,
};
use crate::tcli::{self, reply_succeeded, with_seqid, Call};
use crate::wire::thrift::{find_field, peek_header, ttype, MessageType, Reader, WireError, Writer};

/// Methods whose answers are cached. GetInfo is answered whole; the others
/// create an operation whose rows are recorded.
pub fn cacheable(method: &str) -> bool {
    matches!(
        method,
        "GetInfo"
            | "GetTypeInfo"
            | "GetCatalogs"
            | "GetSchemas"
            | "GetTables"
            | "GetTableTypes"
            | "GetColumns"
            | "GetFunctions"
            | "GetPrimaryKeys"
            | "GetCrossReference"
    )
}

/// A statement's first keyword, after blanks and comments, upper-cased
/// (at most 10 letters: enough to tell the keywords below apart).
fn first_keyword(sql: &str) -> String {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    s.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .take(10)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Statements that read only, as far as metadata goes.
const QUERIES: [&str; 10] = [
    "SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "VALUES", "FROM", "TABLE", "INSERT",
];

/// Whether a statement may change what metadata calls return. Denied by
/// default: anything but a query, an INSERT or a session setting (SET,
/// RESET, USE) counts, so DDL under any spelling, procedure calls and code
/// in another language (Kyuubi's `kyuubi.operation.language`) all do.
pub fn changes_metadata(sql: &str) -> bool {
    let word = first_keyword(sql);
    !(word.is_empty()
        || QUERIES.contains(&word.as_str())
        || ["SET", "RESET", "USE"].contains(&word.as_str()))
}

/// Whether a GetOperationStatus reply says the operation is over (finished,
/// cancelled, closed, failed or timed out).
pub fn operation_ended(reply: &[u8]) -> bool {
    let Ok(h) = peek_header(reply) else {
        return false;
    };
    match find_field(reply, h.body_offset, &[0, 2]) {
        Ok(Some((ttype::I32, mut r))) => matches!(r.i32(), Ok(2..=5 | 8)),
        _ => false,
    }
}

/// Who a session is upstream and how it speaks: a cached answer is only
/// given to a session with the same scope. `who` holds the upstream user
/// (or principal) and every setting the session was opened with (the
/// impersonated user, database, catalog, engine, client address, ...).
// no Debug: `who` holds session settings, which may carry secrets
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionScope {
    pub protocol: i32,
    pub who: Arc<str>,
    /// The database a `USE` chose, after the session opened.
    pub database: Option<Arc<str>>,
}

impl SessionScope {
    /// The scope after `sql` ran in the session: the same after a query,
    /// one naming the database after `USE` (PyHive sends one on every
    /// connect), none after anything else (SET, a temporary view, DDL): the
    /// session then has state of its own that answers could show, and
    /// neither uses nor feeds the cache.
    pub fn after(&self, sql: &str) -> Option<SessionScope> {
        let word = first_keyword(sql);
        if QUERIES.contains(&word.as_str()) {
            return Some(self.clone());
        }
        if word != "USE" {
            return None;
        }
        let rest = sql.trim_start();
        let db = rest[rest.find(|c: char| c.is_whitespace())?..]
            .trim()
            .trim_end_matches(';')
            .trim();
        if db.is_empty() || db.len() > 256 || db.contains(|c: char| c.is_whitespace()) {
            return None;
        }
        Some(SessionScope {
            database: Some(db.into()),
            ..self.clone()
        })
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    route: Arc<str>,
    scope: SessionScope,
    method: &'static str,
    /// The request's fields other than its session handle, as sent.
    args: Box<[u8]>,
}

impl Key {
    /// The key of a cacheable call on a session of `scope`.
    pub fn of(
        route: &Arc<str>,
        scope: &SessionScope,
        call: &Call,
        msg: &[u8],
    ) -> Result<Key, WireError> {
        let h = peek_header(msg)?;
        let Some((ttype::STRUCT, r)) = find_field(msg, h.body_offset, &[1])? else {
            return Err(WireError::Malformed(format!(
                "{} without a request struct",
                call.method
            )));
        };
        let mut r = Reader::at(msg, r.pos());
        let mut args = Vec::new();
        loop {
            let start = r.pos();
            let Some((t, id)) = r.field_begin()? else {
                break;
            };
            r.skip(t)?;
            if id != 1 {
                args.extend_from_slice(&msg[start..r.pos()]);
            }
        }
        Ok(Key {
            route: route.clone(),
            scope: scope.clone(),
            method: call.method,
            args: args.into(),
        })
    }
}

/// One cached answer.
pub struct Entry {
    ttl: Duration,
    weight: u32,
    body: Body,
}

enum Body {
    /// GetInfo: the reply itself.
    Whole(Bytes),
    Operation(Box<Operation>),
}

/// A recorded metadata operation.
struct Operation {
    /// The reply that created it (its handle is replaced on replay).
    create: Bytes,
    handle: HandleAt,
    metadata: Bytes,
    /// A GetOperationStatus reply in FINISHED state, if the client asked.
    status: Option<Bytes>,
    /// The TStatus of the row pages.
    fetch_status: TStatus,
    rows: Rows,
    total: usize,
    layout: Layout,
}

/// Where the operation handle sits in a reply: guid and secret (value
/// offsets past the 4-byte length) and the whole handle struct.
#[derive(Clone, Copy)]
struct HandleAt {
    guid: usize,
    secret: usize,
    secret_len: usize,
    handle: (usize, usize),
}

enum Rows {
    /// Protocol V6 and later.
    Columns(Vec<Col>),
    /// Older protocols.
    Rows(Vec<TRow>),
}

/// One column: every value, and its nulls one flag per row.
struct Col {
    values: TColumn,
    nulls: Vec<bool>,
}

/// How the upstream encodes what the Thrift types leave open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    nulls: Nulls,
    more: More,
    offsets: Offsets,
}

/// What `startRowOffset` says: HiveServer2 and Spark give the position of
/// the page's first row; Kyuubi's engines always 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offsets {
    Position,
    Zero,
}

impl Offsets {
    fn value(self, from: usize) -> i64 {
        match self {
            Offsets::Position => from as i64,
            Offsets::Zero => 0,
        }
    }
}

/// Null-bitmap lengths seen in servers: HiveServer2 / Spark Thrift Server
/// (`1 + length/8`, so one byte when nothing is null), `BitSet.toByteArray`
/// (no trailing zero bytes), and one bit per row rounded up to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nulls {
    Hive,
    Compact,
    Padded,
}

const NULLS: [Nulls; 3] = [Nulls::Hive, Nulls::Compact, Nulls::Padded];

impl Nulls {
    fn len(self, bits: &[bool]) -> usize {
        let last = bits.iter().rposition(|b| *b).map_or(0, |i| i + 1);
        match self {
            Nulls::Hive => 1 + last / 8,
            Nulls::Compact => last.div_ceil(8),
            Nulls::Padded => bits.len().div_ceil(8),
        }
    }

    fn encode(self, bits: &[bool]) -> Vec<u8> {
        let mut v = vec![0u8; self.len(bits)];
        for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
            v[i / 8] |= 1 << (i % 8);
        }
        v
    }
}

/// What `hasMoreRows` says: HiveServer2 and Spark always say false (clients
/// read until an empty page); others say whether rows remain, or whether the
/// page was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum More {
    Absent,
    False,
    Remaining,
    FullPage,
}

const MORE: [More; 4] = [More::Absent, More::False, More::Remaining, More::FullPage];

impl More {
    fn value(self, rows_after: usize, n: usize, asked: usize) -> Option<bool> {
        match self {
            More::Absent => None,
            More::False => Some(false),
            More::Remaining => Some(rows_after > 0),
            More::FullPage => Some(n > 0 && n >= asked),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    route: Arc<str>,
    /// size, expired, invalidated
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    route: Arc<str>,
    /// Why an answer was not stored: too_big, unusual (orientation, layout
    /// or status the cache cannot replay exactly), incomplete, stale (a DDL
    /// statement ran meanwhile), error.
    reason: &'static str,
}

/// The cache: entries, the recordings' byte budget and the counters.
pub struct MetaCache {
    entries: Cache<Key, Arc<Entry>>,
    ddl: Arc<DdlState>,
    /// Bytes of entries held by replays in flight (an entry evicted while
    /// a client reads it stays in memory until the client is done).
    pinned: Arc<AtomicUsize>,
    /// Per route, the `hasMoreRows` habit learned from answers that showed
    /// it unambiguously.
    habits: Mutex<HashMap<Arc<str>, More>>,
    /// Bytes held by recordings in flight, bounded like the entries.
    recording: Arc<AtomicUsize>,
    capacity: usize,
    max_entry: usize,
    hits: Family<RouteLabels, Counter>,
    misses: Family<RouteLabels, Counter>,
    evictions: Family<EvictionLabels, Counter>,
    skipped: Family<SkipLabels, Counter>,
    invalidations: Family<RouteLabels, Counter>,
    size: Gauge,
}

/// Per route: statements that change metadata in flight, and a generation
/// bumped whenever one begins or ends.
struct DdlState {
    entries: Cache<Key, Arc<Entry>>,
    routes: Mutex<HashMap<Arc<str>, (u64, usize)>>,
    invalidations: Family<RouteLabels, Counter>,
}

impl DdlState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, (u64, usize)>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self, route: &Arc<str>) {
        let mut m = self.lock();
        let e = m.entry(route.clone()).or_default();
        e.0 += 1;
        e.1 += 1;
    }

    fn end(&self, route: &Arc<str>, clear: bool) {
        {
            let mut m = self.lock();
            let e = m.entry(route.clone()).or_default();
            e.0 += 1;
            e.1 = e.1.saturating_sub(1);
        }
        if clear {
            let r = route.clone();
            // only fails if closures were not enabled at build time
            let _ = self.entries.invalidate_entries_if(move |k, _| k.route == r);
            self.invalidations
                .get_or_create(&RouteLabels {
                    route: route.clone(),
                })
                .inc();
        }
    }

    fn generation(&self, route: &Arc<str>) -> u64 {
        self.lock().get(route).map_or(0, |e| e.0)
    }

    /// Nothing began or ended since `generation`, and nothing runs now.
    fn quiet_since(&self, route: &Arc<str>, generation: u64) -> bool {
        self.lock()
            .get(route)
            .is_none_or(|&(g, running)| g == generation && running == 0)
    }
}

/// A statement that changes metadata, in flight: dropping it ends it.
pub struct Ddl {
    state: Arc<DdlState>,
    route: Arc<str>,
    clear: bool,
}

impl Ddl {
    /// The statement was refused before it ran: nothing to clear.
    pub fn refused(mut self) {
        self.clear = false;
    }
}

impl Drop for Ddl {
    fn drop(&mut self) {
        self.state.end(&self.route, self.clear);
    }
}

struct PerEntry;

impl Expiry<Key, Arc<Entry>> for PerEntry {
    fn expire_after_create(&self, _: &Key, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.ttl)
    }
}

impl MetaCache {
    /// `capacity`: bytes for all entries; one answer may take an eighth.
    /// The counters are registered in `registry` (the broker's `/metrics`).
    pub fn new(capacity: usize, registry: &mut Registry) -> MetaCache {
        let evictions = Family::<EvictionLabels, Counter>::default();
        let ev = evictions.clone();
        let entries = Cache::builder()
            .max_capacity(capacity as u64)
            .weigher(|_: &Key, e: &Arc<Entry>| e.weight)
            .expire_after(PerEntry)
            .support_invalidation_closures()
            .eviction_listener(move |k: Arc<Key>, _, cause| {
                let reason = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit => "invalidated",
                    RemovalCause::Replaced => return,
                };
                ev.get_or_create(&EvictionLabels {
                    route: k.route.clone(),
                    reason,
                })
                .inc();
            })
            .build();
        let invalidations = Family::<RouteLabels, Counter>::default();
        let m = MetaCache {
            ddl: Arc::new(DdlState {
                entries: entries.clone(),
                routes: Mutex::new(HashMap::new()),
                invalidations: invalidations.clone(),
            }),
            entries,
            pinned: Arc::new(AtomicUsize::new(0)),
            habits: Mutex::new(HashMap::new()),
            recording: Arc::new(AtomicUsize::new(0)),
            capacity,
            max_entry: (capacity / 8).max(64 * 1024),
            hits: Family::default(),
            misses: Family::default(),
            evictions,
            skipped: Family::default(),
            invalidations,
            size: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("metadata_cache");
        r.register(
            "hits",
            "Metadata calls answered from the cache, by route",
            m.hits.clone(),
        );
        r.register(
            "misses",
            "Cacheable metadata calls sent upstream (not cached yet, expired or invalidated), by route",
            m.misses.clone(),
        );
        r.register(
            "evictions",
            "Cached answers removed, by route and reason (size: the byte bound; expired: the route's cache_ttl; invalidated: a DDL statement)",
            m.evictions.clone(),
        );
        r.register(
            "skipped",
            "Upstream answers not stored, by route and reason (too_big, unusual, incomplete, stale, error)",
            m.skipped.clone(),
        );
        r.register(
            "invalidations",
            "DDL statements that cleared a route's cached answers, by route",
            m.invalidations.clone(),
        );
        r.register_with_unit(
            "size",
            "Bytes held by cached answers",
            Unit::Bytes,
            m.size.clone(),
        );
        m
    }

    /// A cached answer, counted as a hit or a miss.
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let found = self.entries.get(key).await;
        let labels = RouteLabels {
            route: key.route.clone(),
        };
        match &found {
            Some(_) => self.hits.get_or_create(&labels).inc(),
            None => self.misses.get_or_create(&labels).inc(),
        };
        found
    }

    /// A statement that may change metadata is about to run on `route`:
    /// until the returned guard is dropped (the client closed the statement,
    /// saw it end, or went away) nothing is stored for the route, and when
    /// it is dropped the route's answers go, for every identity (a table one
    /// user creates is seen by others). Answers already stored keep being
    /// served meanwhile: the statement has not changed anything yet.
    pub fn ddl_begin(&self, route: &Arc<str>) -> Ddl {
        self.ddl.begin(route);
        Ddl {
            state: self.ddl.clone(),
            route: route.clone(),
            clear: true,
        }
    }

    /// Taken before a cacheable call goes upstream: an answer is stored
    /// only if no statement that changes metadata began or ended meanwhile.
    pub fn generation(&self, route: &Arc<str>) -> u64 {
        self.ddl.generation(route)
    }

    fn skip(&self, route: &Arc<str>, reason: &'static str) {
        self.skipped
            .get_or_create(&SkipLabels {
                route: route.clone(),
                reason,
            })
            .inc();
    }

    /// Stores a GetInfo reply.
    pub async fn store_whole(&self, key: Key, ttl: Duration, reply: &Bytes, generation: u64) {
        if !reply_succeeded(reply) {
            return self.skip(&key.route, "error");
        }
        if reply.len() > self.max_entry {
            return self.skip(&key.route, "too_big");
        }
        if !self.ddl.quiet_since(&key.route, generation) {
            return self.skip(&key.route, "stale");
        }
        let weight = (reply.len() + key.args.len() + 128) as u32;
        let e = Entry {
            ttl,
            weight,
            body: Body::Whole(reply.clone()),
        };
        self.entries.insert(key, Arc::new(e)).await;
        self.size.set(self.entries.weighted_size() as i64);
    }

    /// Starts recording the operation `create` (a reply to the call that
    /// made it) opened; `None` if the reply is not a success. `generation`
    /// was taken before the call went upstream.
    pub fn record(
        &self,
        key: Key,
        ttl: Duration,
        create: &Bytes,
        generation: u64,
    ) -> Option<Recording> {
        let route = key.route.clone();
        let handle = match handle_at(create) {
            Ok(Some(h)) if reply_succeeded(create) => h,
            _ => {
                self.skip(&route, "error");
                return None;
            }
        };
        let mut r = Recording {
            key,
            ttl,
            generation,
            create: create.clone(),
            handle,
            metadata: None,
            status: None,
            fetch_status: None,
            rows: None,
            pages: Vec::new(),
            nulls: NULLS.to_vec(),
            offsets: vec![Offsets::Position, Offsets::Zero],
            total: 0,
            ended: false,
            spoiled: None,
            held: 0,
            budget: self.recording.clone(),
            capacity: self.capacity,
            max_entry: self.max_entry,
        };
        r.hold(create.len());
        Some(r)
    }

    /// Stores a finished recording, unless it is unusable or a DDL statement
    /// ran on its route since it began.
    pub async fn store(&self, mut r: Recording) {
        let route = r.key.route.clone();
        if let Some(reason) = r.spoiled {
            return self.skip(&route, reason);
        }
        if !self.ddl.quiet_since(&route, r.generation) {
            return self.skip(&route, "stale");
        }
        let (Some(metadata), Some(fetch_status), Some(rows), true) = (
            r.metadata.take(),
            r.fetch_status.take(),
            r.rows.take(),
            r.ended,
        ) else {
            return self.skip(&route, "incomplete");
        };
        let habit = {
            let h = self.habits.lock().unwrap_or_else(|p| p.into_inner());
            h.get(&route).copied()
        };
        let Some((layout, learned)) = r.layout(habit) else {
            return self.skip(&route, "unusual");
        };
        if learned {
            let mut h = self.habits.lock().unwrap_or_else(|p| p.into_inner());
            h.insert(route.clone(), layout.more);
        }
        // decoded rows take a few times their wire size
        let weight = (4 * r.held + r.key.args.len() + 256).min(u32::MAX as usize) as u32;
        let op = Operation {
            create: r.create.clone(),
            handle: r.handle,
            metadata,
            status: r.status.take(),
            fetch_status,
            rows,
            total: r.total,
            layout,
        };
        let e = Entry {
            ttl: r.ttl,
            weight,
            body: Body::Operation(Box::new(op)),
        };
        let key = r.key.clone();
        self.entries.insert(key, Arc::new(e)).await;
        self.size.set(self.entries.weighted_size() as i64);
    }
}

/// Where the operation handle is in a reply of a method that creates one.
fn handle_at(reply: &[u8]) -> Result<Option<HandleAt>, WireError> {
    let h = peek_header(reply)?;
    let Some((ttype::STRUCT, r)) = find_field(reply, h.body_offset, &[0, 2])? else {
        return Ok(None);
    };
    let start = r.pos();
    let mut end = Reader::at(reply, start);
    end.skip(ttype::STRUCT)?;
    let binary_at = |path: &[i16]| -> Result<(usize, usize), WireError> {
        match find_field(reply, start, path)? {
            Some((ttype::STRING, mut r)) => {
                let at = r.pos() + 4;
                Ok((at, r.binary()?.len()))
            }
            _ => Err(WireError::Malformed(
                "operation handle without guid/secret".into(),
            )),
        }
    };
    let (guid, glen) = binary_at(&[1, 1])?;
    let (secret, secret_len) = binary_at(&[1, 2])?;
    if glen != 16 {
        return Err(WireError::Malformed(
            "operation guid is not 16 bytes".into(),
        ));
    }
    Ok(Some(HandleAt {
        guid,
        secret,
        secret_len,
        handle: (start, end.pos()),
    }))
}

fn decode_reply<T>(
    reply: &[u8],
    read: fn(&mut dyn TInputProtocol) -> thrift::Result<T>,
) -> Option<T> {
    let h = peek_header(reply).ok()?;
    if h.kind != MessageType::Reply {
        return None;
    }
    // declared sizes bounded by the reply: an upstream claiming a list of a
    // hundred million values gets an error, not an allocation
    let body = &reply[h.body_offset..];
    let config = thrift::TConfiguration::builder()
        .max_string_size(Some(body.len()))
        .max_container_size(Some(body.len()))
        .build()
        .ok()?;
    let mut p = TBinaryInputProtocol::with_config(body, true, config);
    p.read_struct_begin().ok()?;
    let f = p.read_field_begin().ok()?;
    if f.id != Some(0) {
        return None;
    }
    read(&mut p).ok()
}

fn encode_reply<T: TSerializable>(method: &str, seqid: i32, resp: &T) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin(method, MessageType::Reply, seqid);
    w.field(ttype::STRUCT, 0);
    {
        let mut p = TBinaryOutputProtocol::new(&mut w.buf, true);
        // writing into a Vec cannot fail
        let _ = resp.write_to_out_protocol(&mut p);
    }
    w.stop();
    w.buf
}

/// A FetchResults request's orientation, batch size and fetch type.
fn fetch_args(msg: &[u8]) -> Result<(TFetchOrientation, i64, i16), WireError> {
    let h = peek_header(msg)?;
    let i32_at = |id| -> Result<Option<i32>, WireError> {
        Ok(match find_field(msg, h.body_offset, &[1, id])? {
            Some((ttype::I32, mut r)) => Some(r.i32()?),
            _ => None,
        })
    };
    let orientation = TFetchOrientation(i32_at(2)?.unwrap_or(0));
    let max_rows = match find_field(msg, h.body_offset, &[1, 3])? {
        Some((ttype::I64, mut r)) => {
            let hi = r.i32()? as i64;
            let lo = r.i32()? as u32 as i64;
            (hi << 32) | lo
        }
        _ => 0,
    };
    let fetch_type = match find_field(msg, h.body_offset, &[1, 4])? {
        Some((ttype::I16, mut r)) => r.i16()?,
        _ => 0,
    };
    Ok((orientation, max_rows, fetch_type))
}

/// A request the broker sends on an operation it records (`method` is
/// GetResultSetMetadata or FetchResults), with the handle's bytes as the
/// upstream sent them.
fn op_request(method: &str, handle: &[u8], fetch: Option<i64>) -> Bytes {
    let mut w = Writer::default();
    w.message_begin(method, MessageType::Call, 0);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::STRUCT, 1);
    w.buf.extend_from_slice(handle);
    if let Some(max_rows) = fetch {
        w.field(ttype::I32, 2);
        w.i32(TFetchOrientation::FETCH_NEXT.0);
        w.field(ttype::I64, 3);
        w.buf.extend_from_slice(&max_rows.to_be_bytes());
    }
    w.stop();
    w.stop();
    Bytes::from(w.buf)
}

/// The rows one page carries.
fn page_rows(rs: &TRowSet) -> usize {
    match &rs.columns {
        Some(cols) => cols.first().map_or(0, col_len),
        None => rs.rows.len(),
    }
}

fn col_len(c: &TColumn) -> usize {
    match c {
        TColumn::BoolVal(x) => x.values.len(),
        TColumn::ByteVal(x) => x.values.len(),
        TColumn::I16Val(x) => x.values.len(),
        TColumn::I32Val(x) => x.values.len(),
        TColumn::I64Val(x) => x.values.len(),
        TColumn::DoubleVal(x) => x.values.len(),
        TColumn::StringVal(x) => x.values.len(),
        TColumn::BinaryVal(x) => x.values.len(),
    }
}

fn col_nulls(c: &TColumn) -> &[u8] {
    match c {
        TColumn::BoolVal(x) => &x.nulls,
        TColumn::ByteVal(x) => &x.nulls,
        TColumn::I16Val(x) => &x.nulls,
        TColumn::I32Val(x) => &x.nulls,
        TColumn::I64Val(x) => &x.nulls,
        TColumn::DoubleVal(x) => &x.nulls,
        TColumn::StringVal(x) => &x.nulls,
        TColumn::BinaryVal(x) => &x.nulls,
    }
}

/// Appends `page`'s values to `acc`; false if the column types differ.
fn append(acc: &mut TColumn, page: TColumn) -> bool {
    use TColumn::*;
    match (acc, page) {
        (BoolVal(a), BoolVal(b)) => a.values.extend(b.values),
        (ByteVal(a), ByteVal(b)) => a.values.extend(b.values),
        (I16Val(a), I16Val(b)) => a.values.extend(b.values),
        (I32Val(a), I32Val(b)) => a.values.extend(b.values),
        (I64Val(a), I64Val(b)) => a.values.extend(b.values),
        (DoubleVal(a), DoubleVal(b)) => a.values.extend(b.values),
        (StringVal(a), StringVal(b)) => a.values.extend(b.values),
        (BinaryVal(a), BinaryVal(b)) => a.values.extend(b.values),
        _ => return false,
    }
    true
}

/// Rows `from..to` of a column, with its nulls encoded as `style`.
fn cut(c: &Col, from: usize, to: usize, style: Nulls) -> TColumn {
    let nulls = style.encode(&c.nulls[from..to]);
    macro_rules! slice {
        ($variant:ident, $ty:ident, $x:expr) => {
            TColumn::$variant($ty {
                values: $x.values[from..to].to_vec(),
                nulls,
            })
        };
    }
    match &c.values {
        TColumn::BoolVal(x) => slice!(BoolVal, TBoolColumn, x),
        TColumn::ByteVal(x) => slice!(ByteVal, TByteColumn, x),
        TColumn::I16Val(x) => slice!(I16Val, TI16Column, x),
        TColumn::I32Val(x) => slice!(I32Val, TI32Column, x),
        TColumn::I64Val(x) => slice!(I64Val, TI64Column, x),
        TColumn::DoubleVal(x) => slice!(DoubleVal, TDoubleColumn, x),
        TColumn::StringVal(x) => slice!(StringVal, TStringColumn, x),
        TColumn::BinaryVal(x) => slice!(BinaryVal, TBinaryColumn, x),
    }
}

/// The null flags of a page's column, and the layouts its bitmap fits.
fn read_nulls(c: &TColumn) -> (Vec<bool>, Vec<Nulls>) {
    let n = col_len(c);
    let bytes = col_nulls(c);
    let bits: Vec<bool> = (0..n)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))
        .collect();
    let fits = NULLS
        .iter()
        .copied()
        .filter(|s| s.encode(&bits) == bytes)
        .collect();
    (bits, fits)
}

/// One page as recorded: rows, what the client asked for, `hasMoreRows`,
/// and the rows before it.
struct Page {
    before: usize,
    n: usize,
    asked: usize,
    more: Option<bool>,
}

/// One upstream operation being recorded.
pub struct Recording {
    key: Key,
    ttl: Duration,
    generation: u64,
    create: Bytes,
    handle: HandleAt,
    metadata: Option<Bytes>,
    status: Option<Bytes>,
    fetch_status: Option<TStatus>,
    rows: Option<Rows>,
    pages: Vec<Page>,
    /// Null layouts every page so far fits.
    nulls: Vec<Nulls>,
    /// Offset habits every page so far fits.
    offsets: Vec<Offsets>,
    total: usize,
    /// An empty page came: every row is here.
    ended: bool,
    /// Why this answer cannot be stored.
    spoiled: Option<&'static str>,
    held: usize,
    budget: Arc<AtomicUsize>,
    capacity: usize,
    max_entry: usize,
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// The batch size the broker asks for when it reads what a client left.
const COMPLETION_BATCH: i64 = 10_000;

impl Recording {
    /// Counts `n` more bytes against the entry's and the recordings' bounds.
    fn hold(&mut self, n: usize) {
        self.held += n;
        let all = self.budget.fetch_add(n, Ordering::Relaxed) + n;
        if self.held > self.max_entry || all > self.capacity {
            self.spoil("too_big");
        }
    }

    fn spoil(&mut self, reason: &'static str) {
        if self.spoiled.is_none() {
            self.spoiled = Some(reason);
        }
        // what was recorded is no longer needed, nor its share of the budget
        self.rows = None;
        self.metadata = None;
        self.pages = Vec::new();
        self.budget.fetch_sub(self.held, Ordering::Relaxed);
        self.held = 0;
    }

    /// Whether this recording still wants to see replies: a spoiled one
    /// lets the client's calls go the usual way (big replies relayed).
    pub fn wanted(&self) -> bool {
        self.spoiled.is_none()
    }

    /// Every part of the answer is here: it can be stored now, without
    /// waiting for the client to close the operation (some never do).
    pub fn complete(&self) -> bool {
        self.spoiled.is_none() && self.ended && self.metadata.is_some()
    }

    /// Learns from a call the client made on the operation and its reply.
    pub fn observe(&mut self, call: &Call, msg: &[u8], reply: &Bytes) {
        if self.spoiled.is_some() {
            return;
        }
        match call.method {
            "GetResultSetMetadata" if reply_succeeded(reply) => {
                self.hold(reply.len());
                if self.spoiled.is_none() {
                    self.metadata = Some(reply.clone());
                }
            }
            "GetOperationStatus" => {
                let finished = decode_reply(reply, TGetOperationStatusResp::read_from_in_protocol)
                    .is_some_and(|r| r.operation_state == Some(TOperationState::FINISHED_STATE));
                if finished {
                    self.hold(reply.len());
                    if self.spoiled.is_none() {
                        self.status = Some(reply.clone());
                    }
                }
            }
            "FetchResults" => self.observe_page(msg, reply),
            _ => {}
        }
    }

    fn observe_page(&mut self, msg: &[u8], reply: &Bytes) {
        let Ok((orientation, max_rows, fetch_type)) = fetch_args(msg) else {
            return self.spoil("unusual");
        };
        if fetch_type != 0 {
            return; // the operation log, not rows
        }
        let restart = orientation == TFetchOrientation::FETCH_FIRST && self.total == 0;
        if orientation != TFetchOrientation::FETCH_NEXT && !restart {
            return self.spoil("unusual");
        }
        if self.ended {
            return; // more empty pages
        }
        // counted before it is decoded: a reply too big to keep is not read
        self.hold(reply.len());
        if self.spoiled.is_some() {
            return;
        }
        let Some(resp) = decode_reply(reply, TFetchResultsResp::read_from_in_protocol) else {
            return self.spoil("unusual");
        };
        if !matches!(
            resp.status.status_code,
            TStatusCode::SUCCESS_STATUS | TStatusCode::SUCCESS_WITH_INFO_STATUS
        ) {
            return self.spoil("error");
        }
        match &self.fetch_status {
            Some(s) if *s != resp.status => return self.spoil("unusual"),
            Some(_) => {}
            None => self.fetch_status = Some(resp.status.clone()),
        }
        let Some(rs) = resp.results else {
            return self.spoil("unusual");
        };
        if rs.binary_columns.is_some() || rs.column_count.is_some() {
            return self.spoil("unusual");
        }
        let at = rs.start_row_offset;
        self.offsets.retain(|o| o.value(self.total) == at);
        if self.offsets.is_empty() {
            return self.spoil("unusual");
        }
        let n = page_rows(&rs);
        self.pages.push(Page {
            before: self.total,
            n,
            asked: max_rows.max(0) as usize,
            more: resp.has_more_rows,
        });
        if self.add_rows(rs, n).is_err() {
            return self.spoil("unusual");
        }
        self.total += n;
        if n == 0 {
            self.ended = true;
        }
    }

    fn add_rows(&mut self, rs: TRowSet, n: usize) -> Result<(), ()> {
        match (rs.columns, self.rows.take()) {
            (Some(cols), None) => {
                let mut acc = Vec::with_capacity(cols.len());
                for c in cols {
                    if col_len(&c) != n {
                        return Err(());
                    }
                    let (nulls, fits) = read_nulls(&c);
                    self.nulls.retain(|s| fits.contains(s));
                    acc.push(Col { values: c, nulls });
                }
                self.rows = Some(Rows::Columns(acc));
            }
            (Some(cols), Some(Rows::Columns(mut acc))) => {
                if cols.len() != acc.len() {
                    return Err(());
                }
                for (a, c) in acc.iter_mut().zip(cols) {
                    if col_len(&c) != n {
                        return Err(());
                    }
                    let (nulls, fits) = read_nulls(&c);
                    self.nulls.retain(|s| fits.contains(s));
                    a.nulls.extend(nulls);
                    if !append(&mut a.values, c) {
                        return Err(());
                    }
                }
                self.rows = Some(Rows::Columns(acc));
            }
            (None, None) => self.rows = Some(Rows::Rows(rs.rows)),
            (None, Some(Rows::Rows(mut acc))) => {
                acc.extend(rs.rows);
                self.rows = Some(Rows::Rows(acc));
            }
            _ => return Err(()),
        }
        if self.nulls.is_empty() {
            return Err(());
        }
        Ok(())
    }

    /// The request the broker sends next to finish this recording (the
    /// result-set metadata, then rows until an empty page), or `None` when
    /// it is complete or unusable.
    pub fn next_request(&self) -> Option<Bytes> {
        if self.spoiled.is_some() {
            return None;
        }
        let (a, b) = self.handle.handle;
        let handle = &self.create[a..b];
        if self.metadata.is_none() {
            return Some(op_request("GetResultSetMetadata", handle, None));
        }
        if !self.ended {
            return Some(op_request("FetchResults", handle, Some(COMPLETION_BATCH)));
        }
        None
    }

    /// The reply to a request from [`Recording::next_request`]: it must
    /// complete what it asked for, or the recording gives up (so the
    /// broker's loop always ends).
    pub fn observe_own(&mut self, call: &Call, msg: &[u8], reply: &Bytes) {
        let (total, ended) = (self.total, self.ended);
        self.observe(call, msg, reply);
        let progressed = match call.method {
            "GetResultSetMetadata" => self.metadata.is_some(),
            _ => self.total > total || self.ended != ended,
        };
        if !progressed {
            self.spoil("incomplete");
        }
    }

    /// A request from [`Recording::next_request`] failed upstream.
    pub fn give_up(&mut self) {
        self.spoil("incomplete");
    }

    /// The layout every recorded page fits, and whether its `hasMoreRows`
    /// habit was the only one that fits (then the route learns it). When
    /// several fit, the route's learned habit is taken, else "rows remain"
    /// (a client that trusts `hasMoreRows` then reads on rather than
    /// stopping early).
    fn layout(&self, habit: Option<More>) -> Option<(Layout, bool)> {
        let total = self.total;
        let fits: Vec<More> = MORE
            .iter()
            .copied()
            .filter(|m| {
                self.pages
                    .iter()
                    .all(|p| p.more == m.value(total - p.before - p.n, p.n, p.asked))
            })
            .collect();
        let more = match (fits.as_slice(), habit) {
            ([], _) => return None,
            ([only], _) => *only,
            (_, Some(h)) if fits.contains(&h) => h,
            _ if fits.contains(&More::Remaining) => More::Remaining,
            _ => fits[0],
        };
        let layout = Layout {
            nulls: *self.nulls.first()?,
            more,
            offsets: *self.offsets.first()?,
        };
        Some((layout, fits.len() == 1))
    }
}

/// One client operation answered from an entry.
pub struct Replay {
    entry: Arc<Entry>,
    /// The client's session, so that closing it closes this too.
    pub session: tcli::Guid,
    pos: usize,
    _pin: Pin,
}

impl MetaCache {
    /// The reply to the call that hit `entry`, and for an operation the new
    /// handle's GUID with its replay. `None` when replays in flight already
    /// hold as many bytes as the cache may: the call then goes upstream.
    pub fn answer(
        &self,
        entry: &Arc<Entry>,
        seqid: i32,
        session: tcli::Guid,
    ) -> Result<Option<Answer>, WireError> {
        let weight = match entry.body {
            Body::Operation(_) => entry.weight as usize,
            Body::Whole(_) => 0,
        };
        if weight > 0 {
            let held = self.pinned.fetch_add(weight, Ordering::Relaxed) + weight;
            if held > self.capacity {
                self.pinned.fetch_sub(weight, Ordering::Relaxed);
                return Ok(None);
            }
        }
        let pin = Pin {
            budget: self.pinned.clone(),
            bytes: weight,
        };
        entry.answer(seqid, session, pin).map(Some)
    }
}

/// The reply to a call that hit an entry, and for an operation the new
/// handle's GUID with its replay.
pub type Answer = (Bytes, Option<(tcli::Guid, Replay)>);

/// An entry's bytes counted while a replay reads it.
struct Pin {
    budget: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Entry {
    fn answer(
        self: &Arc<Self>,
        seqid: i32,
        session: tcli::Guid,
        pin: Pin,
    ) -> Result<Answer, WireError> {
        match &self.body {
            Body::Whole(reply) => Ok((Bytes::from(with_seqid(reply, seqid)?), None)),
            Body::Operation(op) => {
                let guid: tcli::Guid = rand::random();
                let mut v = with_seqid(&op.create, seqid)?;
                let HandleAt {
                    guid: g,
                    secret,
                    secret_len,
                    ..
                } = op.handle;
                v[g..g + 16].copy_from_slice(&guid);
                for b in &mut v[secret..secret + secret_len] {
                    *b = rand::random();
                }
                let replay = Replay {
                    entry: self.clone(),
                    session,
                    pos: 0,
                    _pin: pin,
                };
                Ok((Bytes::from(v), Some((guid, replay))))
            }
        }
    }
}

fn success_status() -> TStatus {
    TStatus {
        status_code: TStatusCode::SUCCESS_STATUS,
        info_messages: None,
        sql_state: None,
        error_code: None,
        error_message: None,
    }
}

impl Replay {
    /// The reply to a call on this operation. CloseOperation's reply is a
    /// plain success; the caller forgets the replay.
    pub fn serve(&mut self, call: &Call, msg: &[u8]) -> Result<Bytes, WireError> {
        let entry = self.entry.clone();
        let Body::Operation(op) = &entry.body else {
            return Err(WireError::Malformed("a replay of a whole reply".into()));
        };
        let seqid = call.seqid;
        Ok(match call.method {
            "GetResultSetMetadata" => Bytes::from(with_seqid(&op.metadata, seqid)?),
            "GetOperationStatus" => match &op.status {
                Some(s) => Bytes::from(with_seqid(s, seqid)?),
                None => {
                    let resp = TGetOperationStatusResp {
                        status: success_status(),
                        operation_state: Some(TOperationState::FINISHED_STATE),
                        sql_state: None,
                        error_code: None,
                        error_message: None,
                        task_status: None,
                        operation_started: None,
                        operation_completed: None,
                        has_result_set: Some(true),
                        progress_update_response: None,
                        num_modified_rows: None,
                    };
                    Bytes::from(encode_reply(call.method, seqid, &resp))
                }
            },
            "FetchResults" => self.fetch(op, call, msg)?,
            "CloseOperation" | "CancelOperation" => {
                Bytes::from(tcli::status_reply(call.method, seqid))
            }
            "other" => {
                // what a Thrift server says of a method it lacks (Impala's
                // GetLog: impyla then reads the log with FetchResults)
                let name = call.wire_name();
                let mut w = Writer::default();
                w.message_begin(name, MessageType::Exception, seqid);
                w.field(ttype::STRING, 1);
                w.string(&format!("Invalid method name: '{name}'"));
                w.field(ttype::I32, 2);
                w.i32(1); // TApplicationException.UNKNOWN_METHOD
                w.stop();
                Bytes::from(w.buf)
            }
            other => Bytes::from(tcli::error_reply(
                other,
                seqid,
                tcli::ReplyStatus::Error,
                "HY000",
                &format!("{other} is not available for a metadata result"),
            )),
        })
    }

    fn fetch(&mut self, op: &Operation, call: &Call, msg: &[u8]) -> Result<Bytes, WireError> {
        let (orientation, max_rows, fetch_type) = fetch_args(msg)?;
        let layout = op.layout;
        if fetch_type != 0 {
            // a metadata operation writes no log
            let log = TRowSet {
                start_row_offset: 0,
                rows: Vec::new(),
                columns: Some(vec![TColumn::StringVal(TStringColumn {
                    values: Vec::new(),
                    nulls: layout.nulls.encode(&[]),
                })]),
                binary_columns: None,
                column_count: None,
            };
            let resp = TFetchResultsResp {
                status: success_status(),
                has_more_rows: layout.more.value(0, 0, 0),
                results: Some(log),
            };
            return Ok(Bytes::from(encode_reply(call.method, call.seqid, &resp)));
        }
        match orientation {
            TFetchOrientation::FETCH_NEXT => {}
            TFetchOrientation::FETCH_FIRST => self.pos = 0,
            other => {
                // HiveServer2's answer for a result set that only goes forward
                let name = match other.0 {
                    1 => "FETCH_PRIOR",
                    2 => "FETCH_RELATIVE",
                    3 => "FETCH_ABSOLUTE",
                    5 => "FETCH_LAST",
                    _ => "FETCH_UNKNOWN",
                };
                return Ok(Bytes::from(tcli::error_reply(
                    call.method,
                    call.seqid,
                    tcli::ReplyStatus::Error,
                    "HY106",
                    &format!("The fetch type {name} is not supported for this resultset"),
                )));
            }
        }
        let asked = usize::try_from(max_rows.max(0)).unwrap_or(usize::MAX);
        let from = self.pos.min(op.total);
        let to = from.saturating_add(asked).min(op.total);
        self.pos = to;
        let rs = match &op.rows {
            Rows::Columns(cols) => TRowSet {
                start_row_offset: layout.offsets.value(from),
                rows: Vec::new(),
                columns: Some(
                    cols.iter()
                        .map(|c| cut(c, from, to, layout.nulls))
                        .collect(),
                ),
                binary_columns: None,
                column_count: None,
            },
            Rows::Rows(rows) => TRowSet {
                start_row_offset: layout.offsets.value(from),
                rows: rows[from..to].to_vec(),
                columns: None,
                binary_columns: None,
                column_count: None,
            },
        };
        let resp = TFetchResultsResp {
            status: op.fetch_status.clone(),
            has_more_rows: layout.more.value(op.total - to, to - from, asked),
            results: Some(rs),
        };
        Ok(Bytes::from(encode_reply(call.method, call.seqid, &resp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_may_change_metadata_are_all_but_queries_and_settings() {
        for sql in [
            "CREATE TABLE t (a int)",
            "  drop table t",
            "-- note\nALTER TABLE t ADD COLUMNS (b int)",
            "/* x */ msck repair table t",
            "refresh table t",
            "Truncate table t",
            "cache table c as select 1",
            "spark.sql(\"create table t (a int)\")",
        ] {
            assert!(changes_metadata(sql), "{sql}");
            assert!(scope().after(sql).is_none(), "{sql}");
        }
        for sql in [
            "select 1",
            "insert into t values (1)",
            "-- create table\nselect 1",
            "/* drop */ show tables",
            "WITH a AS (select 1) select * from a",
            "",
        ] {
            assert!(!changes_metadata(sql), "{sql}");
        }
        for sql in ["set spark.sql.shuffle.partitions=7", "reset", "use"] {
            assert!(!changes_metadata(sql), "{sql}");
            assert!(
                scope().after(sql).is_none(),
                "{sql}: the session has state of its own"
            );
        }
        assert!(scope().after("select 1") == Some(scope()));
        let used = scope().after("USE `sales`;").unwrap();
        assert_eq!(used.database.as_deref(), Some("`sales`"));
        assert!(used != scope(), "another database, another scope");
        assert!(used.after("use sales").unwrap() != used);
    }

    #[test]
    fn null_bitmaps_follow_each_servers_layout() {
        let none = [false; 5];
        let third = [false, false, true, false, false];
        let ninth: Vec<bool> = (0..10).map(|i| i == 8).collect();
        assert_eq!(Nulls::Hive.encode(&none), vec![0]);
        assert_eq!(Nulls::Compact.encode(&none), Vec::<u8>::new());
        assert_eq!(Nulls::Padded.encode(&none), vec![0]);
        assert_eq!(Nulls::Hive.encode(&third), vec![4]);
        assert_eq!(Nulls::Hive.encode(&ninth), vec![0, 1]);
        assert_eq!(Nulls::Compact.encode(&ninth), vec![0, 1]);
        // HiveServer2's `1 + length/8` gives a spare byte at a multiple of 8
        let eighth: Vec<bool> = (0..8).map(|i| i == 7).collect();
        assert_eq!(Nulls::Hive.encode(&eighth), vec![128, 0]);
        assert_eq!(Nulls::Compact.encode(&eighth), vec![128]);
    }

    fn string_page(values: &[&str], nulls: Vec<u8>, offset: i64, more: Option<bool>) -> Bytes {
        let resp = TFetchResultsResp {
            status: success_status(),
            has_more_rows: more,
            results: Some(TRowSet {
                start_row_offset: offset,
                rows: Vec::new(),
                columns: Some(vec![TColumn::StringVal(TStringColumn {
                    values: values.iter().map(|s| s.to_string()).collect(),
                    nulls,
                })]),
                binary_columns: None,
                column_count: None,
            }),
        };
        Bytes::from(encode_reply("FetchResults", 7, &resp))
    }

    fn fetch_call(orientation: i32, max_rows: i64, seqid: i32) -> (Call, Vec<u8>) {
        let mut w = Writer::default();
        w.message_begin("FetchResults", MessageType::Call, seqid);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRING, 1);
        w.binary(&[1; 16]);
        w.field(ttype::STRING, 2);
        w.binary(&[2; 16]);
        w.stop();
        w.field(ttype::I32, 2);
        w.i32(0);
        w.field(ttype::BOOL, 3);
        w.u8(1);
        w.stop();
        w.field(ttype::I32, 2);
        w.i32(orientation);
        w.field(ttype::I64, 3);
        w.buf.extend_from_slice(&max_rows.to_be_bytes());
        w.stop();
        w.stop();
        (Call::parse(&w.buf).unwrap(), w.buf)
    }

    fn create_reply() -> Bytes {
        let mut w = Writer::default();
        w.message_begin("GetTables", MessageType::Reply, 3);
        w.field(ttype::STRUCT, 0);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::I32, 1);
        w.i32(0);
        w.stop();
        w.field(ttype::STRUCT, 2);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::STRING, 1);
        w.binary(&[1; 16]);
        w.field(ttype::STRING, 2);
        w.binary(&[2; 16]);
        w.stop();
        w.field(ttype::I32, 2);
        w.i32(3);
        w.field(ttype::BOOL, 3);
        w.u8(1);
        w.stop();
        w.stop();
        w.stop();
        Bytes::from(w.buf)
    }

    fn metadata_reply() -> Bytes {
        let mut w = Writer::default();
        w.message_begin("GetResultSetMetadata", MessageType::Reply, 4);
        w.field(ttype::STRUCT, 0);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::I32, 1);
        w.i32(0);
        w.stop();
        w.stop();
        w.stop();
        Bytes::from(w.buf)
    }

    fn scope() -> SessionScope {
        SessionScope {
            protocol: 9,
            who: "etl".into(),
            database: None,
        }
    }

    fn key() -> Key {
        Key {
            route: "r".into(),
            scope: scope(),
            method: "GetTables",
            args: Box::new([]),
        }
    }

    /// Records pages of 2, 2, 1 and an empty one (HiveServer2's layout),
    /// then replays them in batches of 3: the same bytes as the upstream
    /// would send for that batch size.
    #[tokio::test]
    async fn a_replay_recuts_pages_in_the_upstreams_encoding() {
        let mut reg = Registry::default();
        let cache = MetaCache::new(1 << 20, &mut reg);
        let mut rec = cache
            .record(key(), Duration::from_secs(60), &create_reply(), 0)
            .unwrap();
        let (md_call, md_msg) = {
            let mut w = Writer::default();
            w.message_begin("GetResultSetMetadata", MessageType::Call, 4);
            w.stop();
            (Call::parse(&w.buf).unwrap(), w.buf)
        };
        rec.observe(&md_call, &md_msg, &metadata_reply());
        let pages: [(&[&str], Vec<u8>); 4] = [
            (&["a", "b"], vec![0]),
            (&["c", ""], vec![2]),
            (&["e"], vec![0]),
            (&[], vec![0]),
        ];
        let mut at = 0;
        for (values, nulls) in pages {
            let (c, m) = fetch_call(0, 2, 7);
            rec.observe(&c, &m, &string_page(values, nulls, at, Some(false)));
            at += values.len() as i64;
        }
        assert!(rec.next_request().is_none(), "complete");
        cache.store(rec).await;
        let entry = cache.get(&key()).await.expect("stored");
        let (reply, replay) = cache.answer(&entry, 11, [0; 16]).unwrap().unwrap();
        let (guid, mut replay) = replay.unwrap();
        let h = peek_header(&reply).unwrap();
        assert_eq!(h.seqid, 11);
        assert_eq!(tcli::reply_operation_guid(&reply, &h).unwrap(), Some(guid));
        assert_ne!(guid, [1; 16]);
        let (c, m) = fetch_call(0, 3, 8);
        assert_eq!(
            replay.serve(&c, &m).unwrap(),
            string_page(&["a", "b", "c"], vec![0], 0, Some(false)).then_seqid(8)
        );
        let (c, m) = fetch_call(0, 3, 9);
        assert_eq!(
            replay.serve(&c, &m).unwrap(),
            string_page(&["", "e"], vec![1], 3, Some(false)).then_seqid(9)
        );
        let (c, m) = fetch_call(0, 3, 10);
        assert_eq!(
            replay.serve(&c, &m).unwrap(),
            string_page(&[], vec![0], 5, Some(false)).then_seqid(10)
        );
        // FETCH_FIRST starts again; FETCH_PRIOR is refused as HiveServer2 does
        let (c, m) = fetch_call(4, 1, 11);
        assert_eq!(
            replay.serve(&c, &m).unwrap(),
            string_page(&["a"], vec![0], 0, Some(false)).then_seqid(11)
        );
        let (c, m) = fetch_call(1, 1, 12);
        let refused = replay.serve(&c, &m).unwrap();
        assert!(!reply_succeeded(&refused));
    }

    trait ThenSeqid {
        fn then_seqid(self, seqid: i32) -> Bytes;
    }

    impl ThenSeqid for Bytes {
        fn then_seqid(self, seqid: i32) -> Bytes {
            Bytes::from(with_seqid(&self, seqid).unwrap())
        }
    }

    #[tokio::test]
    async fn a_recording_missing_rows_asks_for_them_and_one_that_is_too_big_is_not_stored() {
        let mut reg = Registry::default();
        let cache = MetaCache::new(64 * 1024, &mut reg);
        let rec = cache
            .record(key(), Duration::from_secs(60), &create_reply(), 0)
            .unwrap();
        let first = rec.next_request().unwrap();
        assert_eq!(peek_header(&first).unwrap().name, "GetResultSetMetadata");
        let mut rec = rec;
        let (md_call, md_msg) = {
            let mut w = Writer::default();
            w.message_begin("GetResultSetMetadata", MessageType::Call, 4);
            w.stop();
            (Call::parse(&w.buf).unwrap(), w.buf)
        };
        rec.observe(&md_call, &md_msg, &metadata_reply());
        let next = rec.next_request().unwrap();
        let (o, max, _) = fetch_args(&next).unwrap();
        assert_eq!((o, max), (TFetchOrientation::FETCH_NEXT, COMPLETION_BATCH));
        // a page bigger than the entry bound spoils the recording
        let big: Vec<String> = (0..20_000).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = big.iter().map(String::as_str).collect();
        let (c, m) = fetch_call(0, 20_000, 7);
        rec.observe(&c, &m, &string_page(&refs, vec![0], 0, Some(false)));
        assert!(!rec.wanted());
        assert!(rec.next_request().is_none());
        cache.store(rec).await;
        assert!(cache.get(&key()).await.is_none());
        assert_eq!(
            cache.recording.load(Ordering::Relaxed),
            0,
            "budget released"
        );
    }

    #[tokio::test]
    async fn ddl_on_a_route_drops_its_answers_and_stale_recordings() {
        let mut reg = Registry::default();
        let cache = MetaCache::new(1 << 20, &mut reg);
        let mut w = Writer::default();
        w.message_begin("GetInfo", MessageType::Reply, 1);
        w.field(ttype::STRUCT, 0);
        w.field(ttype::STRUCT, 1);
        w.field(ttype::I32, 1);
        w.i32(0);
        w.stop();
        w.stop();
        w.stop();
        let info = Bytes::from(w.buf);
        cache
            .store_whole(key(), Duration::from_secs(60), &info, 0)
            .await;
        assert!(cache.get(&key()).await.is_some());
        let rec = cache
            .record(key(), Duration::from_secs(60), &create_reply(), 0)
            .unwrap();
        let ddl = cache.ddl_begin(&"r".into());
        // still served while the statement runs; nothing new is stored
        assert!(cache.get(&key()).await.is_some());
        let during = cache.generation(&"r".into());
        let other = Key {
            method: "GetInfo",
            args: Box::new([1]),
            ..key()
        };
        cache
            .store_whole(other.clone(), Duration::from_secs(60), &info, during)
            .await;
        assert!(cache.get(&other).await.is_none(), "not stored during DDL");
        drop(ddl);
        cache.entries.run_pending_tasks().await;
        assert!(cache.get(&key()).await.is_none(), "cleared when it ended");
        // a recording begun before the statement is not stored after it
        cache.store(rec).await;
        assert!(cache.get(&key()).await.is_none());
        // a refused statement clears nothing
        let after = cache.generation(&"r".into());
        cache
            .store_whole(key(), Duration::from_secs(60), &info, after)
            .await;
        cache.ddl_begin(&"r".into()).refused();
        cache.entries.run_pending_tasks().await;
        assert!(cache.get(&key()).await.is_some());
    }

    /// Whatever a client puts in a FetchResults on a replayed operation, it
    /// gets an answer (or a clear error), never a panic or a huge page.
    #[tokio::test]
    async fn a_replay_answers_hostile_fetch_requests() {
        let mut reg = Registry::default();
        let cache = MetaCache::new(1 << 20, &mut reg);
        let mut rec = cache
            .record(key(), Duration::from_secs(60), &create_reply(), 0)
            .unwrap();
        let mut w = Writer::default();
        w.message_begin("GetResultSetMetadata", MessageType::Call, 4);
        w.stop();
        let md = w.buf;
        rec.observe(&Call::parse(&md).unwrap(), &md, &metadata_reply());
        for (values, at) in [(&["a", "b"][..], 0), (&[][..], 2)] {
            let (c, m) = fetch_call(0, 2, 7);
            rec.observe(&c, &m, &string_page(values, vec![0], at, Some(false)));
        }
        cache.store(rec).await;
        let entry = cache.get(&key()).await.unwrap();
        let (_, replay) = cache.answer(&entry, 1, [0; 16]).unwrap().unwrap();
        let (_, mut replay) = replay.unwrap();
        for (orientation, max_rows) in [(0, -5), (0, i64::MAX), (0, 0), (99, 1), (-1, 1), (5, 1)] {
            let (c, m) = fetch_call(orientation, max_rows, 3);
            let reply = replay.serve(&c, &m).unwrap();
            let resp = decode_reply(&reply, TFetchResultsResp::read_from_in_protocol);
            if matches!(orientation, 0 | 4) {
                let n = resp.and_then(|r| r.results).map_or(99, |rs| page_rows(&rs));
                assert!(n <= 2, "{orientation} {max_rows}: {n} rows");
            } else {
                assert!(
                    !reply_succeeded(&reply),
                    "orientation {orientation} refused"
                );
            }
        }
        // a truncated request is an error, not a panic
        let (c, m) = fetch_call(0, 1, 3);
        assert!(replay.serve(&c, &m[..m.len() - 6]).is_err());
    }
}
