//! The audit log: security-relevant events (logins, mapping decisions,
//! refused handles, cap refusals, token lifecycle) as JSON lines in a file
//! of their own.
//!
//! Events are ordinary `tracing` events with the target [`TARGET`], so the
//! code that emits them needs nothing from this module, and with no audit
//! file configured they stay in the ordinary log. The file is written by one
//! thread of its own through a bounded queue: a flood of refused logins
//! costs the async workers a channel send per event, never a disk write.
//! When the queue is full, events are dropped and counted
//! ([`dropped`], shown as `kyuubi_broker_audit_events_dropped_total`)
//! rather than slowing the broker down.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};

use tracing_subscriber::fmt::MakeWriter;

/// The `tracing` target of every audit event.
pub const TARGET: &str = "audit";

/// Events waiting for the writer thread.
const QUEUE: usize = 4096;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Audit events lost because the writer could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Where the audit layer writes: one queued line per event.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<Vec<u8>>,
}

impl AuditSink {
    /// Opens (appends to, creating with mode 0600) `path` and starts the
    /// writer thread. The file holds user names and addresses: it is not
    /// world-readable.
    pub fn open(path: &Path) -> io::Result<AuditSink> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditSink::start(file))
    }

    fn start(file: File) -> AuditSink {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("kyuubi-audit".into())
            .spawn(move || {
                let mut out = BufWriter::new(file);
                while let Ok(line) = rx.recv() {
                    let mut ok = out.write_all(&line).is_ok();
                    // flush when the queue is drained: one write per burst
                    while let Ok(more) = rx.try_recv() {
                        ok &= out.write_all(&more).is_ok();
                    }
                    if !(ok && out.flush().is_ok()) {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = out.flush();
            })
            .expect("spawning the audit writer thread");
        AuditSink { tx }
    }
}

/// One event's bytes, sent as a whole when the formatter is done with it.
pub struct AuditLine {
    buf: Vec<u8>,
    tx: SyncSender<Vec<u8>>,
}

impl Write for AuditLine {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for AuditLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for AuditSink {
    type Writer = AuditLine;

    fn make_writer(&'a self) -> AuditLine {
        AuditLine {
            buf: Vec::with_capacity(256),
            tx: self.tx.clone(),
        }
    }
}

/// A layer writing audit events, and only those, as JSON lines to `sink`.
pub fn layer<S>(sink: AuditSink) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(sink)
        // a static per-callsite filter: other targets' callsites stay
        // disabled (cached), so debug! elsewhere costs nothing
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn audit_events_and_only_those_reach_the_audit_file_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::open(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer(sink));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "audit", event = "login_ok", user = "alice", "login");
            tracing::info!(user = "bob", "an ordinary log line");
            tracing::warn!(target: "audit", event = "cap_refused", reason = "per_ip", "refused");
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                .collect();
            if lines.len() >= 2 || std::time::Instant::now() > deadline {
                break lines;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let events: Vec<&str> = lines
            .iter()
            .map(|l| l["fields"]["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["login_ok", "cap_refused"]);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("bob"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
