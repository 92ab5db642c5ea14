//! Honest lag from heartbeats: a pure tracker (no I/O, no clock of its own; every call gets
//! `now` in ms since the epoch).
//!
//! With `[heartbeat] enabled`, the heartbeat writer (in the backfill module) writes the
//! row `heartbeat:<destination>/<client_id>` of the watermark table every `interval`, its
//! `watermark` column set to `hb:<unix ms when written>`. It tells the Manager *before* each
//! write ([`Tracker::written`]), so the note is always in the Manager's mailbox ahead of the
//! batch that brings the row back. The Manager feeds every batch through [`Tracker::scan`]:
//! a heartbeat row of ours that comes through is [`Tracker::seen`], any other event counts as a
//! change that came through ([`Tracker::change`]).
//!
//! The lag ([`Tracker::lag_ms`]):
//! - every heartbeat written has come through: the trip time of the newest one (near 0 on an
//!   idle database, whatever the time since the last change);
//! - otherwise `now` minus the write time of the oldest heartbeat not yet seen (grows while the
//!   stream is stuck), never less than the newest trip;
//! - a tick at which the stream was not connected (reconnecting, stalled, in conflict) or the
//!   write failed counts as a heartbeat written and not seen ([`Tracker::missed`]), so the lag
//!   grows while Canal is down too; the next heartbeat that comes through clears it;
//! - a replica that does not stream (ZooKeeper standby) owes nothing and has no lag
//!   ([`Note::Idle`]: `None` until it streams and a heartbeat comes through again);
//! - then the smaller of that and the age of the newest change that came through (`now` minus
//!   its `executed_at`): a change committed after the oldest unseen heartbeat shows the stream
//!   got at least that far. `executed_at` is the binlog's second, so that age is never below the
//!   truth.
//!
//! A heartbeat value this tracker was not told about (a redelivery after a rollback, a row
//! written by an earlier process) is ignored. Nothing here fails; the set of heartbeats not yet
//! seen is bounded ([`MAX_PENDING`]: past it the oldest and the newest are kept).

use super::snapshot::WatermarkTable;
use crate::event::{ChangeEvent, EventType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The prefix of a heartbeat's value in the watermark column.
pub const PREFIX: &str = "hb:";

/// Most heartbeats kept while not seen (a day of 10 s ticks).
pub const MAX_PENDING: usize = 10_000;

/// What the heartbeat writer tells the Manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// About to write `hb:<ms>`.
    Written(i64),
    /// A tick at `ms` at which no heartbeat could be written while the stream should run.
    Missed(i64),
    /// This replica does not stream (ZooKeeper standby, stopped): nothing is owed, and what
    /// it measured while it streamed no longer says anything (the lag is unknown again).
    Idle,
}

/// The heartbeat figures `status` shows (and `/metrics` exports).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// The lag (see the module docs); `None` until a first heartbeat came through or is owed.
    pub lag_seconds: Option<f64>,
    /// Heartbeats of this process that came through.
    pub trips: u64,
    /// Trip time of the newest one (ms).
    pub last_trip_ms: Option<i64>,
    /// Write time of the newest one that came through (ms since the epoch).
    pub last_seen: Option<i64>,
    /// Heartbeats written (or missed) and not seen yet.
    pub pending: usize,
    /// Write time of the oldest of them.
    pub oldest_pending: Option<i64>,
}

/// The tracker; see the module docs.
#[derive(Debug, Default)]
pub struct Tracker {
    pending: BTreeSet<i64>,
    last_trip: Option<i64>,
    last_seen: Option<i64>,
    newest_change: Option<i64>,
    trips: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Apply what the writer said.
    pub fn note(&mut self, note: Note) {
        match note {
            Note::Written(ms) => self.written(ms),
            Note::Missed(ms) => self.missed(ms),
            Note::Idle => {
                self.pending.clear();
                self.last_trip = None;
                self.newest_change = None;
            }
        }
    }

    /// A heartbeat `hb:<ms>` is being written.
    pub fn written(&mut self, ms: i64) {
        if self.pending.len() >= MAX_PENDING {
            // keep the oldest (the lag) and the newest (its arrival clears the rest)
            self.pending.pop_last();
        }
        self.pending.insert(ms);
    }

    /// A tick at `ms` without a heartbeat written: owed until a later one comes through.
    pub fn missed(&mut self, ms: i64) {
        self.written(ms);
    }

    /// Heartbeat `hb:<ms>` came through at `now`. Returns its trip time (ms) if it was ours.
    pub fn seen(&mut self, ms: i64, now: i64) -> Option<i64> {
        if !self.pending.contains(&ms) {
            return None;
        }
        // binlog order: everything owed up to it came (or will never come) through
        self.pending = self.pending.split_off(&(ms + 1));
        let trip = (now - ms).max(0);
        self.last_trip = Some(trip);
        self.last_seen = Some(ms);
        self.trips += 1;
        Some(trip)
    }

    /// A change executed at `executed_at` came through.
    pub fn change(&mut self, executed_at: i64) {
        if executed_at > 0 && self.newest_change.is_none_or(|t| executed_at > t) {
            self.newest_change = Some(executed_at);
        }
    }

    /// The heartbeats and changes in one batch, in binlog order.
    pub fn scan(&mut self, table: &WatermarkTable, events: &[ChangeEvent], now: i64) {
        for e in events {
            if table.is(e) {
                if let Some(ms) = heartbeat_value(e) {
                    self.seen(ms, now);
                }
            } else if e.event_type != EventType::Snapshot {
                self.change(e.executed_at);
            }
        }
    }

    /// The lag at `now` in ms (see the module docs); `None` before any heartbeat.
    pub fn lag_ms(&self, now: i64) -> Option<i64> {
        let trip = self.last_trip;
        let heartbeat = match self.pending.first() {
            Some(&oldest) => (now - oldest).max(trip.unwrap_or(0)),
            None => trip?,
        };
        let change = self.newest_change.map(|t| (now - t).max(0));
        Some(change.map_or(heartbeat, |c| heartbeat.min(c)).max(0))
    }

    pub fn status(&self, now: i64) -> HeartbeatStatus {
        HeartbeatStatus {
            lag_seconds: self.lag_ms(now).map(|ms| ms as f64 / 1000.0),
            trips: self.trips,
            last_trip_ms: self.last_trip,
            last_seen: self.last_seen,
            pending: self.pending.len(),
            oldest_pending: self.pending.first().copied(),
        }
    }
}

/// `hb:<ms>` in a watermark-table row's `watermark` column.
fn heartbeat_value(e: &ChangeEvent) -> Option<i64> {
    WatermarkTable::mark(e)?.strip_prefix(PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_lag_is_the_newest_trip_not_the_time_since_the_last_change() {
        let mut t = Tracker::new();
        assert_eq!(t.lag_ms(1_000), None);
        t.change(1_000); // a change, then an idle database
        t.written(3_000);
        assert_eq!(t.seen(3_000, 3_004), Some(4));
        t.written(6_000);
        assert_eq!(t.seen(6_000, 6_002), Some(2));
        // 60 s after the last change: still the trip of the newest heartbeat
        assert_eq!(t.lag_ms(61_000), Some(2));
        let s = t.status(61_000);
        assert_eq!(s.trips, 2);
        assert_eq!(s.last_seen, Some(6_000));
        assert_eq!(s.pending, 0);
    }

    #[test]
    fn a_stuck_stream_grows_from_the_oldest_heartbeat_not_seen() {
        let mut t = Tracker::new();
        t.written(3_000);
        t.seen(3_000, 3_010);
        t.written(6_000);
        // just written: the newest trip still bounds it from below
        assert_eq!(t.lag_ms(6_001), Some(10));
        t.written(9_000);
        assert_eq!(t.lag_ms(9_500), Some(3_500));
        assert_eq!(t.lag_ms(20_000), Some(14_000));
        // the stream moves again: the newer heartbeat clears the older one
        assert_eq!(t.seen(9_000, 20_100), Some(11_100));
        assert_eq!(t.status(20_100).pending, 0);
        assert_eq!(t.lag_ms(20_100), Some(11_100));
        t.written(21_000);
        t.seen(21_000, 21_003);
        assert_eq!(t.lag_ms(22_000), Some(3));
    }

    #[test]
    fn missed_ticks_count_while_canal_is_down_and_idle_forgets_them() {
        let mut t = Tracker::new();
        t.written(1_000);
        t.seen(1_000, 1_005);
        t.missed(4_000);
        t.missed(7_000);
        assert_eq!(t.lag_ms(8_000), Some(4_000));
        t.written(10_000);
        t.seen(10_000, 10_020);
        assert_eq!(t.lag_ms(10_500), Some(20));
        t.missed(13_000);
        t.note(Note::Idle); // a standby owes nothing and knows no lag
        assert_eq!(t.lag_ms(60_000), None);
        assert_eq!(t.status(60_000).trips, 2);
        // active again: the first heartbeat through gives the lag
        t.written(61_000);
        t.seen(61_000, 61_007);
        assert_eq!(t.lag_ms(62_000), Some(7));
    }

    #[test]
    fn a_newer_change_bounds_the_lag_and_unknown_heartbeats_are_ignored() {
        let mut t = Tracker::new();
        t.written(1_000);
        t.seen(1_000, 1_002);
        t.written(4_000);
        // a change committed after the unseen heartbeat came through
        t.change(9_000);
        assert_eq!(t.lag_ms(10_000), Some(1_000));
        // a heartbeat value nobody announced (a redelivery, another process): no trip
        assert_eq!(t.seen(2_500, 10_000), None);
        assert_eq!(t.status(10_000).trips, 1);
        // and the same heartbeat twice counts once
        assert_eq!(t.seen(4_000, 10_001), Some(6_001));
        assert_eq!(t.seen(4_000, 10_002), None);
        assert_eq!(t.status(10_002).trips, 2);
    }

    #[test]
    fn pending_is_bounded_and_keeps_the_oldest() {
        let mut t = Tracker::new();
        for i in 0..(MAX_PENDING as i64 + 50) {
            t.written(1_000 + i);
        }
        let s = t.status(0);
        assert_eq!(s.pending, MAX_PENDING);
        assert_eq!(s.oldest_pending, Some(1_000));
        let newest = 1_000 + MAX_PENDING as i64 + 49;
        assert_eq!(t.seen(newest, newest + 1), Some(1));
        assert_eq!(t.status(0).pending, 0);
    }

    #[test]
    fn scan_reads_heartbeat_rows_of_the_watermark_table_only() {
        use crate::event::{Columns, Position, Row, Value};
        use std::sync::Arc;
        let table = WatermarkTable {
            database: "canal_consumer".into(),
            table: "watermark".into(),
        };
        let cols = Arc::new(Columns::new(vec!["id".into(), "watermark".into()]));
        let ev = |db: &str, tbl: &str, wm: &str, at: i64| ChangeEvent {
            destination: "d".into(),
            database: db.into(),
            table: tbl.into(),
            event_type: EventType::Update,
            data: Row::from_values(
                cols.clone(),
                vec![Value::Text("heartbeat:x".into()), Value::Text(wm.into())],
            ),
            old: None,
            changed: Default::default(),
            primary_keys: Default::default(),
            position: Position::default(),
            executed_at: at,
            is_ddl: false,
            sql: None,
            snapshot: None,
        };
        let mut t = Tracker::new();
        t.written(5_000);
        t.written(5_100);
        t.scan(
            &table,
            &[
                ev("other", "watermark", "hb:5000", 4_000),
                ev("canal_consumer", "watermark", "low:n1", 5_000),
                ev("canal_consumer", "watermark", "hb:5000", 5_000),
            ],
            5_030,
        );
        let s = t.status(5_030);
        assert_eq!(s.trips, 1);
        assert_eq!(s.last_trip_ms, Some(30));
        assert_eq!(s.oldest_pending, Some(5_100));
        // the other table's row counted as a change only
        assert_eq!(t.lag_ms(5_130), Some(30));
    }
}
