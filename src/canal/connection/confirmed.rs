//! The rewind guard's file: the newest confirmed position, so a restarted service still knows
//! what it confirmed when Canal sends it again (`canal.rewind_guard`). The decision is the
//! core's ([`super::core`]); this module only reads and writes the file.
//!
//! The file is JSON (`{"position": {...}, "executed_at": ms}`), replaced atomically (a
//! temporary file in the same directory, then a rename). How it fails: a file that cannot be
//! read or parsed is logged and ignored (the guard starts empty: a rewind then costs duplicates,
//! never a lost row); a write that fails is logged and retried at the next move.

use crate::event::Position;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
struct Confirmed {
    position: Position,
    executed_at: i64,
}

/// The position in `path`, if there is a readable one.
pub(super) fn load(path: &Path) -> Option<(Position, i64)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the rewind guard's file; starting without it");
            return None;
        }
    };
    match serde_json::from_str::<Confirmed>(&text) {
        Ok(c) => {
            tracing::info!(file = %path.display(), position = %c.position, "rewind guard: confirmed position of the last run");
            Some((c.position, c.executed_at))
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the rewind guard's file is not valid; starting without it");
            None
        }
    }
}

/// Write `confirmed` to `path`, atomically.
pub(super) fn save(path: &Path, confirmed: &(Position, i64)) {
    let c = Confirmed {
        position: confirmed.0.clone(),
        executed_at: confirmed.1,
    };
    let write = || -> std::io::Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, &c)?;
        tmp.flush()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(file = %path.display(), error = %e, "cannot write the rewind guard's file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_position_loads_back_and_a_bad_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("c.json");
        assert_eq!(load(&path), None);
        let p = Position {
            log_file: "mysql-bin.000007".into(),
            offset: 1234,
            row_index: 2,
            server_id: 1,
            gtid: None,
        };
        save(&path, &(p.clone(), 99));
        assert_eq!(load(&path), Some((p, 99)));
        std::fs::write(&path, "{").unwrap();
        assert_eq!(load(&path), None);
    }
}
