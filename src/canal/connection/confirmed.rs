//! The rewind guard's file: the newest confirmed position, so a restarted service still knows
//! what it confirmed when Canal sends it again (`canal.rewind_guard`), and where the deliveries
//! Canal has not acked yet ended, so a restarted service cuts the rows Canal sends again the
//! same way ([`super::core::recut`]). The decisions are the core's ([`super::core`]); this
//! module only reads and writes the file.
//!
//! The file is JSON (`{"position": {...}, "executed_at": ms, "cuts": [[{...}, ms], ...]}`;
//! `position` may be null, `cuts` absent in files of older versions), replaced atomically (a
//! temporary file in the same directory, then a rename) at most once a second. A delivery's
//! end must be on disk before its messages can reach the broker, and a rename per delivery
//! costs too much on the live path, so each end is also appended, one JSON line, to a log
//! beside it ([`EndsLog`], the same name with `.ends` added: one `write` per delivery), which
//! each rewrite of the file empties. How it fails: a file that cannot be read or parsed is
//! logged and ignored (the guard starts empty: a rewind then costs duplicates, and bulk
//! messages sent again may be cut differently; never a lost row), and so is a log line that
//! does not parse (a torn last line); a write that fails is logged and retried at the next
//! move.

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

/// What `path` holds, if it is readable, with what its log adds: ends, and a newer confirmed
/// position.
pub(super) fn load(path: &Path) -> Saved {
    let mut saved = load_file(path).unwrap_or_default();
    for line in EndsLog::read(&EndsLog::path(path)) {
        match line {
            Line::End(end) => saved.cuts.push(end),
            Line::Confirmed { confirmed } => saved.confirmed = Some(confirmed),
        }
    }
    saved
}

/// A line of the log: a delivery's end, or the confirmed position after an ack.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    End((Position, i64)),
    Confirmed { confirmed: (Position, i64) },
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

/// The log of what moved since the file was last replaced: one JSON line per delivery's end
/// (`[{position}, ms]`) and per ack (`{"confirmed": [{position}, ms]}`), each appended with one
/// `write`.
#[derive(Debug)]
pub(super) struct EndsLog {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    line: Vec<u8>,
}

impl EndsLog {
    /// The log beside the file at `confirmed`.
    pub fn path(confirmed: &Path) -> std::path::PathBuf {
        let mut name = confirmed.as_os_str().to_owned();
        name.push(".ends");
        name.into()
    }

    pub fn new(confirmed: &Path) -> Self {
        EndsLog {
            path: Self::path(confirmed),
            file: None,
            line: Vec::new(),
        }
    }

    /// Append one delivery's end.
    pub fn append(&mut self, end: &(Position, i64)) {
        self.write_line(&Line::End(end.clone()));
    }

    /// Append the confirmed position after an ack (a restart then knows it even if the file
    /// was not rewritten since).
    pub fn confirmed(&mut self, confirmed: &(Position, i64)) {
        self.write_line(&Line::Confirmed {
            confirmed: confirmed.clone(),
        });
    }

    fn write_line(&mut self, line: &Line) {
        if self.file.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot open the log of delivery ends");
                    return;
                }
            }
        }
        self.line.clear();
        if serde_json::to_writer(&mut self.line, line).is_err() {
            return;
        }
        self.line.push(b'\n');
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(&self.line)
        {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot append to the log of delivery ends");
            self.file = None;
        }
    }

    /// The file was replaced with every end: start the log again.
    pub fn clear(&mut self) {
        let res = match &self.file {
            Some(f) => f.set_len(0),
            None => match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = res {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot empty the log of delivery ends");
        }
    }

    fn read(path: &Path) -> Vec<Line> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
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
                cuts: vec![(q.clone(), 100)]
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
                confirmed: Some((p.clone(), 99)),
                cuts: vec![]
            }
        );
        std::fs::write(&path, "{").unwrap();
        assert_eq!(load(&path), Saved::default());
        // ends appended to the log come back with the file's, a newer confirmed position
        // replaces the file's, a torn last line is ignored
        let mut e = p.clone();
        e.offset = 3000;
        save(&path, None, [(q.clone(), 100)].iter());
        let mut log = EndsLog::new(&path);
        log.append(&(e.clone(), 101));
        log.confirmed(&(q.clone(), 100));
        std::fs::OpenOptions::new()
            .append(true)
            .open(EndsLog::path(&path))
            .unwrap()
            .write_all(b"[{\"log_fi")
            .unwrap();
        assert_eq!(
            load(&path),
            Saved {
                confirmed: Some((q.clone(), 100)),
                cuts: vec![(q.clone(), 100), (e, 101)]
            }
        );
        // a rewrite of the file empties the log
        log.clear();
        assert_eq!(load(&path).cuts, vec![(q, 100)]);
    }
}
