//! A backfill's progress: how far it got, moved only after a chunk is confirmed. Plain data,
//! stored with the backfill's record (`backfill::record`) and moved by [`super::chunks::Chunks`].

use crate::event::Value;
use serde::{Deserialize, Serialize};

/// How far it got. Updated only after a chunk is confirmed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The key of the last row of the last confirmed chunk; `None` before the first.
    #[serde(default)]
    pub last_key: Option<Vec<Value>>,
    /// The largest key when it started (matching `where`); `None`: nothing to read.
    #[serde(default)]
    pub max_key: Option<Vec<Value>>,
    /// The server's estimate of the rows to read, when it started.
    #[serde(default)]
    pub estimate: u64,
    /// Rows read by confirmed chunks.
    #[serde(default)]
    pub rows_read: u64,
    /// Rows emitted as SNAPSHOT events (confirmed).
    #[serde(default)]
    pub rows_emitted: u64,
    /// Rows left to their live events (changed while their chunk was read).
    #[serde(default)]
    pub rows_dropped: u64,
    #[serde(default)]
    pub chunks: u64,
    /// Reads of a chunk that had to be done again (timeouts, DDL, rollbacks).
    #[serde(default)]
    pub rereads: u64,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    /// Why it failed, or the last reason a chunk was read again.
    #[serde(default)]
    pub error: Option<String>,
}

impl Progress {
    /// A chunk of `read` rows ending at `last` was confirmed. Returns true when that was the
    /// last chunk (fewer rows than asked, or the largest key reached).
    pub fn chunk_done(
        &mut self,
        read: usize,
        asked: usize,
        last: Option<Vec<Value>>,
        emitted: u64,
        dropped: u64,
    ) -> bool {
        self.chunks += 1;
        self.rows_read += read as u64;
        self.rows_emitted += emitted;
        self.rows_dropped += dropped;
        let reached_max = last.is_some() && last == self.max_key;
        if last.is_some() {
            self.last_key = last;
        }
        read < asked || reached_max
    }
}
