//! What the benchmark binaries (`proxy`, `bi`, `bridges`) need to run the
//! broker as a process of its own.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (by PID) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 20 s) until something listens on 127.0.0.1:`port`.
pub fn wait_port(port: u16, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The broker of this build serving `config`, logging warnings only.
pub fn serve_broker(config: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_kyuubi-broker"))
            .args(["serve", "--config"])
            .arg(config)
            .env("KYUUBI_BROKER_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the broker"),
    )
}

/// A `/proc/PID/status` figure in kB (`key` as written there, e.g.
/// `VmRSS:`), 0 when unreadable.
#[allow(dead_code)] // `bi` reads no memory figures
pub fn status_kb(pid: u32, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}
