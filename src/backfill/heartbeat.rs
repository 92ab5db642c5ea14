//! The heartbeat writer (`[heartbeat] enabled`): besides backfills, the only writer of the
//! watermark table. Every `heartbeat.interval` it writes the row
//! `heartbeat:<destination>/<client_id>` (state `heartbeat`, watermark `hb:<unix ms>`, with
//! `INSERT ... ON DUPLICATE KEY UPDATE`) and tells the Manager first
//! ([`crate::manager::HeartbeatNote`]), which measures the row's trip back through Canal
//! (the manager's heartbeat tracker). Backfill listings skip the row (its id has no `bf-`).
//!
//! It writes only while this replica's Canal connection is `connected`: a ZooKeeper standby
//! (or a stopped connection) writes nothing and owes nothing. A tick while the connection is
//! reconnecting, stalled or in conflict, and a write that fails, is a missed heartbeat, which
//! the Manager counts as not come through: the lag grows until one comes through again.
//!
//! How it fails: a write the source refuses or cannot take (down, no grant) is logged (the
//! first of a run of failures as a warning, then every [`LOG_EVERY`]th) and tried again at the
//! next tick, not sooner; nothing stops the service. A write slower than the interval delays
//! the next tick instead of bunching the missed ones; one unanswered for [`WRITE_TIMEOUT`] (a
//! frozen source, a link that drops packets) is abandoned as a failed write
//! ([`BackfillError::Timeout`]), so the writer does not wait on it for the minutes TCP takes to
//! give up, and the lag of an idle database comes back as soon as the source does. It ends
//! when the connection actor is gone.
//!
//! The table ([`HeartbeatTable`]) and the clock are arguments, so `tests/actor_timers.rs` runs
//! the writer on tokio's paused clock with a fake table.

use super::BackfillError;
use super::source::Source;
use crate::canal::connection::{ConnectionState, GetConnectionStatus};
use crate::manager::HeartbeatNote;
use crate::manager::heartbeat::{Note, PREFIX};
use actix::Recipient;
use std::future::Future;
use std::time::Duration;

pub use crate::config::{HEARTBEAT_MAX_ID as MAX_ID, heartbeat_row_id as row_id};

/// A run of failed writes is logged again every this many ticks.
pub const LOG_EVERY: u32 = 100;

/// A table check or write still unanswered after this long is abandoned as failed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a tick at `now` does in connection state `state`: write (`Written`) only while
/// connected; a replica that does not stream owes nothing (`Idle`); otherwise the stream
/// should run and does not (`Missed`).
pub fn decide(state: ConnectionState, now: i64) -> Note {
    match state {
        ConnectionState::Connected => Note::Written(now),
        ConnectionState::Standby | ConnectionState::Stopped => Note::Idle,
        ConnectionState::Connecting
        | ConnectionState::Reconnecting
        | ConnectionState::Conflict
        | ConnectionState::Stalled => Note::Missed(now),
    }
}

/// Where the writer writes: the source database's watermark table ([`Source`]).
pub trait HeartbeatTable {
    /// Create the table if it is not there.
    fn ensure_table(&self) -> impl Future<Output = Result<(), BackfillError>>;
    /// Write row `id` with `value` in its watermark column.
    fn write_heartbeat(
        &self,
        id: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), BackfillError>>;
}

impl HeartbeatTable for Source {
    fn ensure_table(&self) -> impl Future<Output = Result<(), BackfillError>> {
        Source::ensure_table(self)
    }

    fn write_heartbeat(
        &self,
        id: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), BackfillError>> {
        Source::write_heartbeat(self, id, value)
    }
}

/// Write heartbeats into `table` every `interval` (the first at once) for as long as the
/// connection actor lives. `clock` gives the heartbeat's value, ms since the epoch
/// ([`crate::clock::now_ms`] in the service).
pub async fn run(
    table: impl HeartbeatTable,
    id: String,
    interval: Duration,
    manager: Recipient<HeartbeatNote>,
    connection: Recipient<GetConnectionStatus>,
    clock: impl Fn() -> i64,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut table_ready = false;
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        let Ok(status) = connection.send(GetConnectionStatus).await else {
            return; // the connection is gone: the service is stopping
        };
        let now = clock();
        let note = decide(status.state, now);
        // announced first: the note is in the Manager's mailbox before the row can come back
        manager.do_send(HeartbeatNote(note));
        if !matches!(note, Note::Written(_)) {
            continue;
        }
        let written = async {
            if !table_ready {
                table.ensure_table().await?;
                table_ready = true;
            }
            table.write_heartbeat(&id, &format!("{PREFIX}{now}")).await
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, written)
            .await
            .unwrap_or_else(|_| {
                let what = if table_ready {
                    "writing a heartbeat"
                } else {
                    "checking the watermark table before a heartbeat"
                };
                Err(BackfillError::Timeout {
                    what: what.into(),
                    after: WRITE_TIMEOUT,
                })
            });
        match written {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "heartbeat written again");
                }
                failures = 0;
            }
            Err(e) => {
                // never written, so never seen: it counts as missed until a later one comes
                if failures.is_multiple_of(LOG_EVERY) {
                    tracing::warn!(error = %e, transient = e.is_transient(), failures, "could not write a heartbeat; the lag grows until one comes through");
                }
                failures = failures.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_id_is_not_a_backfill_id() {
        let id = row_id("example", "1001");
        assert_eq!(id, "heartbeat:example/1001");
        assert!(!id.starts_with("bf-"));
    }

    #[test]
    fn only_a_connected_replica_writes_and_a_standby_owes_nothing() {
        use ConnectionState::*;
        assert_eq!(decide(Connected, 5), Note::Written(5));
        assert_eq!(decide(Standby, 5), Note::Idle);
        assert_eq!(decide(Stopped, 5), Note::Idle);
        for s in [Connecting, Reconnecting, Conflict, Stalled] {
            assert_eq!(decide(s, 5), Note::Missed(5), "{s:?}");
        }
    }
}
