//! The rewind guard's file: the newest confirmed position, so a restarted service still knows
//! what it confirmed when Canal sends it again (`canal.rewind_guard`), and where the deliveries
//! Canal has not acked yet ended, so a restarted service cuts the rows Canal sends again the
//! same way ([`super::core::recut`]). The decisions are the core's ([`super::core`]); this
//! module only reads and writes the file.
//!
//! The file is JSON (`{"position": {...}, "executed_at": ms, "cuts": [[{...}, ms], ...]}`;
//! `position` may be null, `cuts` absent in files of older versions), replaced atomically (a
//! temporary file in the same directory, then a rename). How it fails: a file that cannot be
//! read or parsed is logged and ignored (the guard starts empty: a rewind then costs duplicates,
//! and bulk messages sent again may be cut differently; never a lost row); a write that fails
//! is logged and retried at the next move.

use crate::event::Position;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
struct Confirmed {
    position: Option<Position>,
    #[serde(default)]
    executed_at: i64,
    #[serde(default)]
    cuts: Vec<(Position, i64)>,
}

/// What the file holds: the confirmed position (and its execution time), and the delivery ends.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Saved {
    pub confirmed: Option<(Position, i64)>,
    pub cuts: Vec<(Position, i64)>,
}

/// What `path` holds, if it is readable.
pub(super) fn load(path: &Path) -> Saved {
    load_file(path).unwrap_or_default()
}

fn load_file(path: &Path) -> Option<Saved> {
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
            if let Some(p) = &c.position {
                tracing::info!(file = %path.display(), position = %p, cuts = c.cuts.len(), "rewind guard: confirmed position of the last run");
            }
            Some(Saved {
                confirmed: c.position.map(|p| (p, c.executed_at)),
                cuts: c.cuts,
            })
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the rewind guard's file is not valid; starting without it");
            None
        }
    }
}

/// Write `confirmed` and the delivery ends to `path`, atomically.
pub(super) fn save<'a>(
    path: &Path,
    confirmed: Option<&(Position, i64)>,
    cuts: impl Iterator<Item = &'a (Position, i64)>,
) {
    let c = Confirmed {
        position: confirmed.map(|c| c.0.clone()),
        executed_at: confirmed.map_or(0, |c| c.1),
        cuts: cuts.cloned().collect(),
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
        assert_eq!(load(&path), Saved::default());
        let p = Position {
            log_file: "mysql-bin.000007".into(),
            offset: 1234,
            row_index: 2,
            server_id: 1,
            gtid: None,
        };
        let mut q = p.clone();
        q.offset = 2000;
        let cuts = [(q.clone(), 100)];
        save(&path, Some(&(p.clone(), 99)), cuts.iter());
        assert_eq!(
            load(&path),
            Saved {
                confirmed: Some((p.clone(), 99)),
                cuts: vec![(q, 100)]
            }
        );
        // a file of an older version: no cuts
        std::fs::write(
            &path,
            r#"{"position":{"log_file":"mysql-bin.000007","offset":1234,"row_index":2,"server_id":1,"gtid":null},"executed_at":99}"#,
        )
        .unwrap();
        assert_eq!(
            load(&path),
            Saved {
                confirmed: Some((p, 99)),
                cuts: vec![]
            }
        );
        std::fs::write(&path, "{").unwrap();
        assert_eq!(load(&path), Saved::default());
    }
}
