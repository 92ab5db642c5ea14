//! One service per Canal client on a host: an exclusive lock taken before anything starts.
//!
//! Canal serves one client identity (destination + client id) per destination; two processes
//! using the same identity take each other's batches, roll each other back and duplicate rows.
//! [`InstanceLock`] holds an OS file lock (released by the kernel when the process dies, so a
//! crash never leaves a stale lock) on a file beside the state file, named after the Canal
//! address, destination and client id, and records the holder's pid for the error message.
//! A second instance on another host is detected by the connection instead (Canal's batch ids
//! jump; see `canal::window`). In ZooKeeper mode (`canal.zk_servers`) the lock is named after
//! the ensemble and root instead of a Canal address: replicas on one host then need their own
//! state directories, and which of them works is decided by Canal's client running node
//! (`crate::ha`), not by this lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The held lock; released on drop (or when the process exits).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another canal-consumer (pid {pid}) already consumes destination '{destination}' as client {client_id} from this host (lock {path}); stop it first, or give this one another canal.client_id"
    )]
    Held {
        pid: String,
        destination: String,
        client_id: String,
        path: PathBuf,
    },
    #[error("cannot create the instance lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The lock file for this Canal identity, in `dir`.
pub fn lock_path(dir: &Path, server: &str, destination: &str, client_id: &str) -> PathBuf {
    dir.join(format!(
        ".canal-consumer-{}-{}-{}.lock",
        sanitize(server),
        sanitize(destination),
        sanitize(client_id)
    ))
}

/// The rewind guard's file for this Canal identity, in `dir` (beside the lock).
pub fn confirmed_path(dir: &Path, server: &str, destination: &str, client_id: &str) -> PathBuf {
    dir.join(format!(
        ".canal-consumer-{}-{}-{}.confirmed.json",
        sanitize(server),
        sanitize(destination),
        sanitize(client_id)
    ))
}

impl InstanceLock {
    /// Take the lock or say who holds it.
    pub fn acquire(
        dir: &Path,
        server: &str,
        destination: &str,
        client_id: &str,
    ) -> Result<InstanceLock, LockError> {
        let path = lock_path(dir, server, destination, client_id);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    pid: pid.trim().to_string(),
                    destination: destination.to_string(),
                    client_id: client_id.to_string(),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(InstanceLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path(), "127.0.0.1:11111", "example", "1001")
            .expect("first lock");
        let err = InstanceLock::acquire(dir.path(), "127.0.0.1:11111", "example", "1001")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(
            err.contains("destination 'example' as client 1001"),
            "{err}"
        );
        // another identity is independent
        InstanceLock::acquire(dir.path(), "127.0.0.1:11111", "example", "1002").expect("other id");
        drop(first);
        InstanceLock::acquire(dir.path(), "127.0.0.1:11111", "example", "1001").expect("released");
    }
}
