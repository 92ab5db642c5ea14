//! The persisted enable/disable state of consumers (`consumers.state_file`).
//!
//! A JSON object mapping a consumer's name to `true` (enabled) or `false` (disabled). It holds
//! only overrides: a consumer that is not in the file keeps the `enabled` of its definition.
//! `enable`/`disable` write it, live through the admin endpoint or directly when the service is
//! not running, so the choice survives restarts.
//!
//! Writes are serialized and atomic: one writer at a time in the process (a lock held across
//! the read-modify-write of [`StateFile::set`]), and the new content goes to a temporary file
//! with a unique, unpredictable name created exclusively in the same directory (so it never
//! follows a planted symlink), is synced, then renamed over the old file; a crash leaves the
//! old or the new state, never half of one. Parent directories are created. A missing file is
//! an empty state. How it fails: a file that cannot be read, is not a JSON object of booleans,
//! or cannot be written is a [`StateError`] naming the file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One writer at a time, for every state file of the process.
static WRITER: Mutex<()> = Mutex::new(());

/// Name → enabled.
pub type ConsumerStates = BTreeMap<String, bool>;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {}: not a JSON object of consumer names to true/false: {message} \
         (fix or delete it; deleting resets every consumer to its definition)",
        path.display()
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("state file {}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The state file at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved states; empty when the file does not exist.
    pub fn load(&self) -> Result<ConsumerStates, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if text.trim().is_empty() {
            return Ok(BTreeMap::new());
        }
        serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Replace the saved states, atomically.
    pub fn save(&self, states: &ConsumerStates) -> Result<(), StateError> {
        let _one = WRITER.lock().unwrap_or_else(|p| p.into_inner());
        self.save_locked(states)
    }

    fn save_locked(&self, states: &ConsumerStates) -> Result<(), StateError> {
        let werr = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(werr)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".into());
        let mut body = serde_json::to_string_pretty(states).expect("a map of bools serializes");
        body.push('\n');
        // Created with O_EXCL under a random name; removed on drop unless persisted.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(werr)?;
        tmp.write_all(body.as_bytes()).map_err(werr)?;
        tmp.as_file().sync_all().map_err(werr)?;
        tmp.persist(&self.path).map_err(|e| werr(e.error))?;
        // Make the rename itself durable where directories can be synced.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Record one consumer's state (read, change, write), as one writer: concurrent calls in
    /// this process never interleave their read-modify-write.
    pub fn set(&self, name: &str, enabled: bool) -> Result<ConsumerStates, StateError> {
        let _one = WRITER.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = self.load()?;
        states.insert(name.to_string(), enabled);
        self.save_locked(&states)?;
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_creates_parent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("a/b/consumers.json"));
        assert!(file.load().unwrap().is_empty());
        file.set("example_consumer", false).unwrap();
        let states = file.set("teacher_consumer", true).unwrap();
        assert_eq!(states.len(), 2);
        let back = file.load().unwrap();
        assert_eq!(back.get("example_consumer"), Some(&false));
        assert_eq!(back.get("teacher_consumer"), Some(&true));
        file.set("example_consumer", true).unwrap();
        assert_eq!(file.load().unwrap().get("example_consumer"), Some(&true));
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("consumers.json")]);
    }

    #[test]
    fn concurrent_sets_lose_no_update_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("consumers.json"));
        let names: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
        std::thread::scope(|s| {
            for (i, n) in names.iter().enumerate() {
                let file = file.clone();
                s.spawn(move || {
                    for round in 0..20 {
                        file.set(n, (i + round) % 2 == 0).unwrap();
                    }
                });
            }
        });
        let back = file.load().unwrap();
        // every writer's last value (round 19) is there: no read-modify-write was lost
        for (i, n) in names.iter().enumerate() {
            assert_eq!(back.get(n), Some(&((i + 19) % 2 == 0)), "{n}");
        }
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_symlink_at_the_old_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("consumers.json");
        let old_tmp = dir
            .path()
            .join(format!(".consumers.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        StateFile::new(&path).set("a", true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumers.json");
        std::fs::write(&path, "{\"a\": \"yes\"").unwrap();
        let err = StateFile::new(&path).load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }));
        assert!(err.to_string().contains("consumers.json"), "{err}");
        // And a write does not silently replace it.
        assert!(StateFile::new(&path).set("a", true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\": \"yes\"");
    }
}
