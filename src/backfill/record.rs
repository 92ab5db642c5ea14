//! A backfill as it is stored (one row of the watermark table) and shown: what was asked
//! ([`Spec`]), how far it got ([`Progress`]), and its [`State`] with the operator's transitions.
//! Pure data; the `source` module reads and writes it.

use serde::{Deserialize, Serialize};

/// Where a backfill is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Reading chunks (on the active replica, while its Canal connection streams).
    Running,
    /// Stopped by the operator after its last confirmed chunk; `resume` goes on from there.
    Paused,
    /// Stopped for good by the operator.
    Cancelled,
    /// Every chunk up to the largest key at its start is confirmed.
    Done,
    /// Stopped by something it cannot get past on its own (the table lost its primary key or
    /// was dropped); `progress.error` says what. `resume` tries again.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Cancelled => "cancelled",
            State::Done => "done",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Running,
            State::Paused,
            State::Cancelled,
            State::Done,
            State::Failed,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// True once nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, State::Cancelled | State::Done)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asks of a backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pause,
    Resume,
    Cancel,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
        }
    }

    /// The state `action` leads to from `from`, or why it cannot be done.
    pub fn apply(self, from: State) -> Result<State, String> {
        match (self, from) {
            (Action::Pause, State::Running) => Ok(State::Paused),
            (Action::Resume, State::Paused | State::Failed) => Ok(State::Running),
            (Action::Cancel, State::Running | State::Paused | State::Failed) => {
                Ok(State::Cancelled)
            }
            (a, s) => Err(format!("cannot {} a backfill that is {s}", a.as_str())),
        }
    }
}

/// What was asked: which rows, for whom, how fast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub database: String,
    pub table: String,
    /// Deliver only to this consumer (its filters must take SNAPSHOT events of the table).
    #[serde(default)]
    pub consumer: Option<String>,
    /// An SQL condition on the table's rows (`updated_at >= '2026-12-01'`).
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
    pub chunk: usize,
    /// Rows per second at most; `None`: as fast as live traffic allows.
    #[serde(default)]
    pub rate: Option<f64>,
    /// The Canal destination and client whose stream carries it (several services may share
    /// one watermark table).
    pub owner: String,
    /// The primary key's columns when it started (a backfill never changes key).
    pub key_columns: Vec<String>,
}

impl Spec {
    pub fn full_table(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }
}

pub use crate::manager::snapshot::Progress;

/// One backfill, as `backfill list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backfill {
    pub id: String,
    pub state: State,
    pub spec: Spec,
    pub progress: Progress,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Value;

    #[test]
    fn operator_transitions_are_the_documented_ones() {
        use Action::*;
        use State::*;
        assert_eq!(Pause.apply(Running), Ok(Paused));
        assert_eq!(Resume.apply(Paused), Ok(Running));
        assert_eq!(Resume.apply(Failed), Ok(Running));
        assert_eq!(Cancel.apply(Paused), Ok(Cancelled));
        assert!(Pause.apply(Paused).is_err());
        assert!(Resume.apply(Done).is_err());
        assert!(
            Cancel
                .apply(Done)
                .unwrap_err()
                .contains("cannot cancel a backfill that is done")
        );
        assert!(Resume.apply(Cancelled).is_err());
    }

    #[test]
    fn the_last_chunk_is_short_or_ends_at_the_largest_key() {
        let mut p = Progress {
            max_key: Some(vec![Value::Int(10)]),
            ..Default::default()
        };
        assert!(!p.chunk_done(3, 3, Some(vec![Value::Int(3)]), 3, 0));
        assert!(p.chunk_done(3, 3, Some(vec![Value::Int(10)]), 2, 1));
        assert_eq!(
            (p.rows_read, p.rows_emitted, p.rows_dropped, p.chunks),
            (6, 5, 1, 2)
        );
        let mut q = Progress::default();
        assert!(q.chunk_done(0, 3, None, 0, 0));
        assert_eq!(q.last_key, None);
    }
}
