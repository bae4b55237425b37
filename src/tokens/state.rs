//! The token state file: what the broker created and which value is live.
//! Written atomically (a new temp file of a random name, fsync, rename,
//! fsync of the directory), mode 0600, and never logged.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// One token this broker created; `value` is the secret.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnedToken {
    pub token_id: String,
    pub name: String,
    pub value: String,
    pub created_ms: i64,
    /// When the API will expire it (auto-expiry), if set.
    #[serde(default)]
    pub expires_ms: Option<i64>,
}

impl std::fmt::Debug for OwnedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedToken")
            .field("token_id", &self.token_id)
            .field("name", &self.name)
            .field("value", &"****")
            .finish()
    }
}

impl Drop for OwnedToken {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl ZeroizeOnDrop for OwnedToken {}

/// A token being replaced; deleted once `delete_after_ms` has passed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Retiring {
    pub token: OwnedToken,
    pub delete_after_ms: i64,
}

/// Written before CreateKyuubiToken, so a crash right after the create
/// can still find (by name) and adopt the token.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Intent {
    pub name: String,
    pub value: String,
    pub started_ms: i64,
    #[serde(default)]
    pub expires_ms: Option<i64>,
}

impl std::fmt::Debug for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intent")
            .field("name", &self.name)
            .field("value", &"****")
            .finish()
    }
}

impl Drop for Intent {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl ZeroizeOnDrop for Intent {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenState {
    pub version: u32,
    /// Random id in every token name this broker creates.
    pub instance: String,
    pub active: Option<OwnedToken>,
    #[serde(default)]
    pub retiring: Vec<Retiring>,
    #[serde(default)]
    pub intent: Option<Intent>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("token state file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("token state file {path} is not valid: {detail}; restore it or move it away to start afresh")]
    Corrupt { path: String, detail: String },
    /// The fleet's record in ZooKeeper (`crate::cluster`) could not be
    /// written; the text says what ZooKeeper answered.
    #[error("the fleet's token record in ZooKeeper: {0}")]
    Fleet(String),
    #[error("{}", locked_message(path, *holder))]
    Locked {
        path: String,
        /// Who holds it, as its lock file says (unknown while the holder
        /// has not written it yet).
        holder: Option<(u32, Holder)>,
    },
}

fn locked_message(path: &str, holder: Option<(u32, Holder)>) -> String {
    match holder {
        Some((pid, Holder::Broker)) => format!(
            "token state file {path} is in use by a running broker (pid {pid}); \
             to rotate now, ask it: kill -USR1 {pid}"
        ),
        Some((pid, Holder::Command)) => format!(
            "token state file {path} is in use by another `kyuubi-broker token` command \
             (pid {pid}); wait for it to finish"
        ),
        None => format!(
            "token state file {path} is in use by another process; \
             if it is a running broker, ask it to rotate: kill -USR1 <its pid>"
        ),
    }
}

/// Who holds a state file's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// `serve`, for its whole lifetime; it rotates on SIGUSR1.
    Broker,
    /// A `kyuubi-broker token` command, while it runs.
    Command,
}

impl Holder {
    fn as_str(self) -> &'static str {
        match self {
            Holder::Broker => "broker",
            Holder::Command => "token-command",
        }
    }
}

/// An exclusive `flock` on `<state>.lock`, released when dropped (or when
/// the process dies, however it dies). The lock is on a sibling file, not
/// on the state file itself: every save replaces the state file by a
/// rename, so a lock on it would stay on the replaced inode while the next
/// process locked the new one. For the same reason the lock file is never
/// deleted. It holds the holder's pid and kind, for the refusal message.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock of the state file at `state` without waiting.
    pub fn acquire(state: &Path, holder: Holder) -> Result<StateLock, StateError> {
        let lock = lock_path(state);
        let io = |source| StateError::Io {
            path: lock.display().to_string(),
            source,
        };
        std::fs::create_dir_all(parent_dir(state)).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: state.display().to_string(),
                    holder: read_holder(&lock),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{} {}", std::process::id(), holder.as_str()))
            .map_err(io)?;
        Ok(StateLock { _file: file })
    }
}

/// `<state>.lock`, beside the state file.
pub fn lock_path(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

fn read_holder(lock: &Path) -> Option<(u32, Holder)> {
    let text = std::fs::read_to_string(lock).ok()?;
    let (pid, kind) = text.trim().split_once(' ')?;
    let holder = [Holder::Broker, Holder::Command]
        .into_iter()
        .find(|h| h.as_str() == kind)?;
    Some((pid.parse().ok()?, holder))
}

impl TokenState {
    pub fn fresh() -> TokenState {
        let mut b = [0u8; 4];
        rand::rngs::OsRng.fill(&mut b);
        TokenState {
            version: 1,
            instance: crate::cloud::sign::hex(&b),
            active: None,
            retiring: Vec::new(),
            intent: None,
        }
    }

    /// Name prefix of every token this broker instance creates.
    pub fn prefix(&self) -> String {
        format!("{}{}-", super::NAME_PREFIX, self.instance)
    }

    pub fn owns_name(&self, name: &str) -> bool {
        name.starts_with(&self.prefix())
    }

    /// Loads the state, or a fresh one if the file does not exist.
    pub fn load(path: &Path) -> Result<TokenState, StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenState::fresh()),
            Err(e) => Err(io(e)),
        }
    }

    /// Replaces the file atomically: after a crash it holds either the old
    /// or the new state, never a mix.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        self.save_via(path, std::iter::repeat_with(random_suffix))
    }

    /// [`TokenState::save`], naming its temp file with the first of
    /// `suffixes` that is not taken.
    fn save_via(
        &self,
        path: &Path,
        suffixes: impl Iterator<Item = String>,
    ) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = parent_dir(path);
        std::fs::create_dir_all(dir).map_err(io)?;
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokens");
        let bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        let (tmp, mut f) = create_temp(dir, base, suffixes).map_err(io)?;
        let replaced = f
            .write_all(&bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        drop(f);
        if let Err(e) = replaced {
            // it holds token values: do not leave a copy lying around
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill(&mut b);
    crate::cloud::sign::hex(&b)
}

/// A new, empty temp file beside the state file, mode 0600. `create_new`
/// (O_CREAT|O_EXCL) never opens a name that exists, symlinks included, so
/// a link planted in the directory cannot redirect the token values
/// elsewhere; a taken name is skipped rather than reused.
fn create_temp(
    dir: &Path,
    base: &str,
    suffixes: impl Iterator<Item = String>,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    for suffix in suffixes.take(8) {
        let tmp = dir.join(format!(".{base}.{suffix}.tmp"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "every temporary file name tried is taken",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_is_atomic_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/tokens.json");
        let mut s = TokenState::fresh();
        s.active = Some(OwnedToken {
            token_id: "tk-1".into(),
            name: format!("{}x", s.prefix()),
            value: "v".repeat(32),
            created_ms: 1,
            expires_ms: None,
        });
        s.save(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(TokenState::load(&p).unwrap(), s);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn a_symlink_planted_at_a_temp_name_is_not_followed_and_the_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.json");
        // an older state file that was world-readable
        std::fs::write(&p, b"{}").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        // the name the next save tries first, and the pid-based name saves
        // once used
        let planted = [
            dir.path().join(".tokens.json.planted.tmp"),
            dir.path()
                .join(format!(".tokens.json.tmp{}", std::process::id())),
        ];
        for link in &planted {
            std::os::unix::fs::symlink(&victim, link).unwrap();
        }
        let mut s = TokenState::fresh();
        s.active = Some(OwnedToken {
            token_id: "tk-1".into(),
            name: format!("{}x", s.prefix()),
            value: "v".repeat(32),
            created_ms: 1,
            expires_ms: None,
        });
        s.save_via(&p, ["planted", "free"].map(String::from).into_iter())
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_file(), "a regular file, not a link");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(TokenState::load(&p).unwrap(), s);
        for link in &planted {
            assert!(std::fs::symlink_metadata(link).unwrap().is_symlink());
        }
        assert!(!dir.path().join(".tokens.json.free.tmp").exists());
    }

    #[test]
    fn a_save_that_fails_removes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // a non-empty directory where the file should be: rename fails
        let p = dir.path().join("tokens.json");
        std::fs::create_dir_all(p.join("x")).unwrap();
        let e = TokenState::fresh().save(&p).unwrap_err().to_string();
        assert!(e.contains("tokens.json"), "{e}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tokens.json"], "no temp file left");
    }

    #[test]
    fn a_held_state_lock_refuses_a_second_holder_and_says_how_to_ask_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/tokens.json");
        let held = StateLock::acquire(&p, Holder::Broker).unwrap();
        let pid = std::process::id();
        let lock = dir.path().join("sub/tokens.json.lock");
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            format!("{pid} broker\n")
        );
        let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // flock is per open file: a second open in this process is refused too
        let e = StateLock::acquire(&p, Holder::Command).unwrap_err();
        assert!(
            matches!(e, StateError::Locked { holder: Some((h, Holder::Broker)), .. } if h == pid)
        );
        assert_eq!(
            e.to_string(),
            format!(
                "token state file {} is in use by a running broker (pid {pid}); \
                 to rotate now, ask it: kill -USR1 {pid}",
                p.display()
            )
        );
        drop(held);
        let cmd = StateLock::acquire(&p, Holder::Command).unwrap();
        let e = StateLock::acquire(&p, Holder::Broker)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "another `kyuubi-broker token` command (pid {pid})"
            )),
            "{e}"
        );
        drop(cmd);
    }

    #[test]
    fn missing_file_gives_a_fresh_state_and_garbage_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.json");
        assert!(TokenState::load(&p).unwrap().active.is_none());
        std::fs::write(&p, b"{not json").unwrap();
        let e = TokenState::load(&p).unwrap_err().to_string();
        assert!(e.contains("not valid") && e.contains("move it away"), "{e}");
    }

    #[test]
    fn token_values_are_wiped_when_dropped() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<OwnedToken>();
        wiped_on_drop::<Intent>();
        // what their Drop runs; and serde and Clone still work with it
        let t = OwnedToken {
            token_id: "tk-1".into(),
            name: "n".into(),
            value: "secretvalue0123456789abcdefghijk".into(),
            created_ms: 0,
            expires_ms: None,
        };
        let json = serde_json::to_string(&t.clone()).unwrap();
        let mut back: OwnedToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        back.value.zeroize();
        assert!(back.value.is_empty());
    }

    #[test]
    fn debug_output_hides_token_values() {
        let t = OwnedToken {
            token_id: "tk-1".into(),
            name: "n".into(),
            value: "secretvalue0123456789abcdefghijk".into(),
            created_ms: 0,
            expires_ms: None,
        };
        assert!(!format!("{t:?}").contains("secretvalue"));
    }
}
