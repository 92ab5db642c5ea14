//! Backfills: existing rows (all of a table, or those a `--where` picks) brought through the
//! consumers as SNAPSHOT events while the live stream keeps flowing, with no table lock.
//!
//! The algorithm is DBLog's (Andreakis & Papapanagiotou, 2020): the table is read in
//! primary-key chunks, each chunk between a low and a high watermark written to the watermark
//! table; the watermarks come back through Canal in binlog order, and the Manager emits the
//! chunk's rows at the high watermark, except those whose key changed between the two (their
//! live event is newer). The window logic is [`crate::manager::snapshot`] (pure, simulated);
//! this module owns the rest:
//! - [`Backfills::start`] and the operator's actions (`pause`, `resume`, `cancel`), checked
//!   here (a table without a primary key, a consumer that does not take SNAPSHOT events of the
//!   table and a `where` the server refuses are refused with what to do);
//! - the runner ([`Backfills::run`]), a thin loop over [`Chunks`] (when a chunk may be read,
//!   what progress may be stored): one read at a time, the next chunk read while earlier ones
//!   are confirmed (`backfill.chunks_in_flight`), only while this replica's Canal connection
//!   streams (so only the active HA replica reads), and only while the live stream has at most
//!   `backfill.max_live_batches` batches in flight besides the backfills' own (live changes go
//!   first), at most `rate` rows per second; while live rows went to a consumer within
//!   `backfill.live_window` (the Manager's `live_at`), at most `backfill.rate_while_live` rows
//!   per second in reads of at most `backfill.chunk_while_live` rows, a whole number of its
//!   bulks for a backfill a bulk rule takes ([`Yield`], [`Taker::bulk_period`]);
//! - the records: every backfill is a row of the watermark table ([`record`]), so a restarted
//!   service or the other replica finds it; its progress moves only once a chunk's triggers are
//!   all confirmed, in key order, and is stored with the next low watermark (or alone), so
//!   after a crash the chunks after it are read again and their messages carry the same ids
//!   (made of backfill, table and key).
//!
//! How it fails: a request the source cannot serve is [`BackfillError::Invalid`] (definite,
//! nothing stored); the source database failing on the way is [`BackfillError::Source`]
//! (transient: the runner waits and tries the chunk again). A chunk whose rows do not come
//! back confirmed within `backfill.chunk_timeout` (a rolled-back batch, a DDL on the table
//! inside the window, a stream that does not move) is read again; a table that loses its
//! primary key, changes it or disappears fails the backfill with that reason.

pub mod heartbeat;
pub mod record;
mod runner;
#[cfg(test)]
mod snapshot_bytes;
pub mod source;

use crate::canal::connection::{ConnectionState, GetConnectionStatus};
use crate::clock::now_ms;
use crate::consumer::TableFilter;
use crate::consumer::filter::NameMatch;
use crate::event::EventType;
use crate::manager::snapshot::chunks::{Chunks, Pace, Yield};
use crate::manager::{
    ChunkPlan, ChunkRows, DdlSeen, ExpectChunk, ForgetChunk, GetManagerStatus, Manager, Outcome,
};
use actix::{Addr, Recipient};
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use record::{Action, Backfill, Progress, Spec, State};
use serde::{Deserialize, Serialize};
use source::{ProgressWrite, Source, TableMeta, key_values};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a backfill request or step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The request cannot be served as asked (definite; nothing was stored).
    #[error("{0}")]
    Invalid(String),
    #[error("no backfill {0}")]
    NotFound(String),
    /// The action does not fit the backfill's state (definite).
    #[error("{0}")]
    Conflict(String),
    /// The service has no source database to read (definite until configured).
    #[error(
        "backfills need canal.source_url: a MySQL account that can SELECT the tables and create and write backfill.watermark_table"
    )]
    NotConfigured,
    /// The source database failed on the way (transient).
    #[error("{what}: {source}")]
    Source {
        what: String,
        source: mysql_async::Error,
    },
    /// The source database did not answer in time (transient): the operation was abandoned.
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
}

impl BackfillError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackfillError::Source { .. } | BackfillError::Timeout { .. }
        )
    }
}

/// What `backfill start` asks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    /// `database.table`.
    pub table: String,
    #[serde(default)]
    pub consumer: Option<String>,
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
    #[serde(default)]
    pub chunk: Option<usize>,
    #[serde(default)]
    pub rate: Option<f64>,
}

/// A backfill as the admin API and `status` show it: its record, and while it runs here,
/// its rate and the time it still needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackfillView {
    #[serde(flatten)]
    pub backfill: Backfill,
    /// Rows per second over the last chunks (this replica, while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_second: Option<f64>,
    /// Seconds left at that rate, from the estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// This replica is reading (or waiting for the confirms of) one of its chunks now: a
    /// pause or cancel takes effect once that chunk is done.
    #[serde(default)]
    pub reading: bool,
    /// Live changes flow, so it yields to them: its reads keep to `backfill.rate_while_live`
    /// in reads of at most `backfill.chunk_while_live` rows (this replica, while it runs).
    #[serde(default)]
    pub yielding: bool,
}

impl BackfillView {
    /// What `/metrics` shows of it.
    pub fn figures(&self) -> crate::metrics::BackfillFigures {
        let b = &self.backfill;
        crate::metrics::BackfillFigures {
            id: b.id.clone(),
            table: b.spec.full_table(),
            state: b.state.as_str(),
            rows_read: b.progress.rows_read,
            rows_emitted: b.progress.rows_emitted,
            rows_estimated: b.progress.estimate,
            rows_per_second: self.rows_per_second,
            rereads: b.progress.rereads,
        }
    }
}

/// Settings of the runner.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rows per chunk by default and chunks outstanding, per-row and bulk-only.
    pub pace: Pace,
    pub chunk_timeout: Duration,
    pub max_live_batches: usize,
    /// How backfills yield while live changes flow (`backfill.rate_while_live`,
    /// `backfill.chunk_while_live`); a backfill whose rows a bulk rule takes reads whole
    /// periods of its bulks ([`Yield::bulk`]).
    pub live: Yield,
    /// SNAPSHOT rows per lane part (`backfill.lane_rows`): where a consumer that gets live
    /// events too cuts its bulks.
    pub lane_rows: usize,
    /// Live changes flow while one went to a consumer less than this long ago
    /// (`backfill.live_window`).
    pub live_window: Duration,
    /// `destination/client_id`: the stream these backfills ride on.
    pub owner: String,
}

/// The smallest `--rate` (rows per second); `backfill.rate_while_live` has the same floor.
pub use crate::config::MIN_BACKFILL_RATE as MIN_RATE;

/// The longest a chunk waits for the live stream to leave room.
pub const MAX_YIELD: Duration = Duration::from_secs(1);

/// How long a table's layout (columns, primary key) read for a backfill is used before it is
/// read again. A DDL on the table the stream brings meanwhile makes the next chunk fail (see
/// [`ChunkPlan::layout`]) and the layout is read again then; this bounds the time a layout
/// is trusted without a DDL in sight.
pub const LAYOUT_TTL: Duration = Duration::from_secs(10);

/// How often the runner reads the records (backfills started, or stopped by an operator, on
/// the other replica); an action on this replica wakes it at once.
pub const LIST_EVERY: Duration = Duration::from_secs(1);

/// A consumer a backfill may be for: its filters, and its rules' `when` (which must take
/// SNAPSHOT events of the table too) and whether they batch their rows.
#[derive(Debug, Clone)]
pub struct Taker {
    pub name: String,
    pub filters: Vec<TableFilter>,
    pub rules: Vec<TakerRule>,
}

/// What a backfill needs to know of one rule of a [`Taker`].
#[derive(Debug, Clone)]
pub struct TakerRule {
    /// `when.database`, `when.table`, `when.events` (empty: any).
    pub database: Option<NameMatch>,
    pub table: Option<NameMatch>,
    pub events: BTreeSet<EventType>,
    /// The rule batches its rows into bulk messages of at most this many rows
    /// (`batch.max_rows`); `None`: one message per row.
    pub batch: Option<usize>,
}

impl TakerRule {
    /// Whether this rule may fire on SNAPSHOT events of `database.table` (its condition
    /// aside).
    fn fires(&self, database: &str, table: &str) -> bool {
        (self.events.is_empty() || self.events.contains(&EventType::Snapshot))
            && self.database.as_ref().is_none_or(|d| d.matches(database))
            && self.table.as_ref().is_none_or(|t| t.matches(table))
    }
}

impl Taker {
    /// Whether SNAPSHOT events of `database.table` reach this consumer and fire a rule.
    pub fn takes(&self, database: &str, table: &str) -> bool {
        let filtered = self.filters.iter().any(|f| {
            f.event_types.contains(&EventType::Snapshot)
                && f.database.matches(database)
                && f.table.matches(table)
        });
        filtered && self.rules.iter().any(|r| r.fires(database, table))
    }

    /// Whether every rule that may fire on SNAPSHOT events of `database.table` batches its
    /// rows: a backfill for this consumer alone makes a few bulk messages per chunk, not one
    /// message per row.
    pub fn bulk_only(&self, database: &str, table: &str) -> bool {
        self.rules
            .iter()
            .filter(|r| r.fires(database, table))
            .all(|r| r.batch.is_some())
    }

    /// Every how many rows of a chunk this consumer's bulk messages of SNAPSHOT rows of
    /// `database.table` repeat their cut, counted from the chunk's first row; `None` when no
    /// rule that may fire on them batches. A bulk message's id names its first and last row,
    /// so reads that start a whole number of periods into a chunk cut the same bulks as the
    /// whole chunk read at once.
    ///
    /// A consumer that gets live events too takes a chunk's rows in lane parts of `lane_rows`
    /// and each bulk rule cuts within a part: the period is `lane_rows`. One that gets only
    /// SNAPSHOT events takes the chunk whole and each rule cuts at its `max_rows`: the period is
    /// their least common multiple (saturating).
    pub fn bulk_period(&self, database: &str, table: &str, lane_rows: usize) -> Option<usize> {
        let mut sizes = self
            .rules
            .iter()
            .filter(|r| r.fires(database, table))
            .filter_map(|r| r.batch)
            .peekable();
        sizes.peek()?;
        if self.filters.iter().any(TableFilter::takes_live) {
            return Some(lane_rows.max(1));
        }
        Some(sizes.fold(1, lcm))
    }
}

/// The least common multiple of two periods (at least 1; `usize::MAX` when it overflows).
fn lcm(a: usize, b: usize) -> usize {
    let (a, b) = (a.max(1), b.max(1));
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    (a / x).saturating_mul(b)
}

/// Live figures per backfill (this replica).
#[derive(Debug, Default, Clone)]
struct Rate {
    /// Exponentially weighted rows per second.
    rows_per_second: f64,
}

/// The backfills of one service: control and runner.
pub struct Backfills {
    source: Source,
    settings: Settings,
    consumers: Vec<Taker>,
    manager: Addr<Manager>,
    connection: Recipient<GetConnectionStatus>,
    rates: Mutex<HashMap<String, Rate>>,
    /// The records as the runner last read them (for `status` without a query).
    seen: Mutex<Vec<Backfill>>,
    /// What the runner holds, as of the end of its last step.
    held: Mutex<Held>,
    /// Since when the live stream has had no room for a chunk.
    busy_since: Mutex<Option<Instant>>,
    wake: tokio::sync::Notify,
}

/// What the runner holds (see [`Backfills::view`]).
#[derive(Debug, Default, Clone)]
struct Held {
    /// Backfills with chunks read and not yet confirmed, or stopped with what they did not yet
    /// stored.
    reading: HashSet<String>,
    /// Every backfill the runner has taken on and not yet let go of.
    active: HashSet<String>,
    /// Backfills whose last chunk yielded to live changes.
    yielding: HashSet<String>,
}

/// `--where` must be one condition: no statement separator, no comment that could hide the
/// rest of the query, balanced parentheses (outside quotes).
pub fn check_condition(c: &str) -> Result<(), String> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut chars = c.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\\' {
            // whether a backslash escapes depends on the server's sql_mode
            // (NO_BACKSLASH_ESCAPES) and the quote it is in: refuse it rather than guess
            return Err("--where must not contain a backslash".into());
        }
        if let Some(q) = quote {
            if ch == q {
                quote = None;
            }
            continue;
        }
        match ch {
            '\'' | '"' | '`' => quote = Some(ch),
            ';' => {
                return Err("--where must not contain `;` (one condition, not statements)".into());
            }
            '#' => return Err("--where must not contain a `#` comment".into()),
            '-' if chars.peek() == Some(&'-') => {
                return Err("--where must not contain a `--` comment".into());
            }
            '/' if chars.peek() == Some(&'*') => {
                return Err("--where must not contain a `/* */` comment".into());
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("--where has a `)` without its `(`".into());
                }
            }
            _ => {}
        }
    }
    if quote.is_some() {
        return Err("--where has an unterminated quote".into());
    }
    if depth != 0 {
        return Err("--where has a `(` without its `)`".into());
    }
    if c.trim().is_empty() {
        return Err("--where is empty".into());
    }
    Ok(())
}

impl Backfills {
    pub fn new(
        source: Source,
        settings: Settings,
        consumers: Vec<Taker>,
        manager: Addr<Manager>,
        connection: Recipient<GetConnectionStatus>,
    ) -> Backfills {
        Backfills {
            source,
            settings,
            consumers,
            manager,
            connection,
            rates: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            held: Mutex::new(Held::default()),
            busy_since: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The consumers that would get SNAPSHOT rows of `database.table`.
    fn takers(&self, database: &str, table: &str) -> Vec<&str> {
        self.takers_for(database, table, None)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Whether every consumer a backfill of `database.table` (for `consumer`, or for every
    /// consumer that takes it) is for only has bulk rules for its rows.
    fn bulk_only(&self, database: &str, table: &str, consumer: Option<&str>) -> bool {
        let mut takers = self.takers_for(database, table, consumer).peekable();
        takers.peek().is_some() && takers.all(|c| c.bulk_only(database, table))
    }

    /// Every how many rows of a chunk the bulk messages of a backfill of `database.table`
    /// (for `consumer`, or every consumer that takes it) repeat their cut, for all its
    /// consumers at once (see [`Taker::bulk_period`]); `None`: none batches its rows.
    fn bulk_period(&self, database: &str, table: &str, consumer: Option<&str>) -> Option<usize> {
        let lane_rows = self.settings.lane_rows;
        self.takers_for(database, table, consumer)
            .filter_map(|c| c.bulk_period(database, table, lane_rows))
            .reduce(lcm)
    }

    /// The consumers a backfill of `database.table` (for `consumer` alone, if named) reaches.
    fn takers_for<'s, 'q>(
        &'s self,
        database: &'q str,
        table: &'q str,
        consumer: Option<&'q str>,
    ) -> impl Iterator<Item = &'s Taker> + use<'s, 'q> {
        self.consumers
            .iter()
            .filter(move |c| c.takes(database, table))
            .filter(move |c| consumer.is_none_or(|n| c.name == n))
    }

    /// Check and store a new backfill; it starts with the runner's next round.
    pub async fn start(&self, req: StartRequest) -> Result<Backfill, BackfillError> {
        let (database, table) = req
            .table
            .trim()
            .split_once('.')
            .filter(|(d, t)| !d.is_empty() && !t.is_empty())
            .ok_or_else(|| {
                BackfillError::Invalid(format!(
                    "the table must be given as database.table, got {:?}",
                    req.table
                ))
            })?;
        let takers = self.takers(database, table);
        match &req.consumer {
            Some(c) if !self.consumers.iter().any(|t| t.name == *c) => {
                return Err(BackfillError::Invalid(format!(
                    "no consumer named `{c}` (see `canal-consumer list`)"
                )));
            }
            Some(c) if !takers.contains(&c.as_str()) => {
                return Err(BackfillError::Invalid(format!(
                    "consumer `{c}` takes no SNAPSHOT events of {database}.{table}: add SNAPSHOT to the `events` of its filter on that table and of a rule's `when` (where it lists events)"
                )));
            }
            None if takers.is_empty() => {
                return Err(BackfillError::Invalid(format!(
                    "no consumer takes SNAPSHOT events of {database}.{table}: add SNAPSHOT to the `events` of a consumer's filter on that table and of a rule's `when` (where it lists events)"
                )));
            }
            _ => {}
        }
        let condition = req
            .condition
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty());
        if let Some(c) = condition {
            check_condition(c).map_err(BackfillError::Invalid)?;
        }
        let bulk_only = self.bulk_only(database, table, req.consumer.as_deref());
        let chunk = self.settings.pace.chunk(req.chunk, bulk_only);
        if chunk == 0 || chunk > 100_000 {
            return Err(BackfillError::Invalid(format!(
                "--chunk must be between 1 and 100000 rows, got {chunk}"
            )));
        }
        if let Some(r) = req.rate
            && !(MIN_RATE..=1e9).contains(&r)
        {
            return Err(BackfillError::Invalid(format!(
                "--rate must be between {MIN_RATE} and 1e9 rows per second, got {r}"
            )));
        }
        self.source.ensure_table().await?;
        let meta = self.source.table_meta(database, table).await?;
        let estimate = self.source.estimate(&meta, condition).await?;
        let max_key = self.source.max_key(&meta, condition).await?;
        let now = chrono::Utc::now();
        let id = format!(
            "bf-{}-{:04x}",
            now.format("%Y%m%d%H%M%S"),
            fastrand::u16(..)
        );
        let nothing = max_key.is_none();
        let b = Backfill {
            id,
            state: if nothing { State::Done } else { State::Running },
            spec: Spec {
                database: database.into(),
                table: table.into(),
                consumer: req.consumer.clone(),
                condition: condition.map(str::to_string),
                chunk,
                rate: req.rate,
                owner: self.settings.owner.clone(),
                key_columns: meta.key.iter().map(|k| k.to_string()).collect(),
            },
            progress: Progress {
                max_key,
                estimate: if nothing { 0 } else { estimate },
                started_at: now.timestamp_millis(),
                finished_at: nothing.then_some(now.timestamp_millis()),
                ..Default::default()
            },
        };
        self.source.insert(&b).await?;
        tracing::info!(
            backfill = %b.id,
            table = %b.spec.full_table(),
            consumer = b.spec.consumer.as_deref().unwrap_or("*"),
            condition = b.spec.condition.as_deref().unwrap_or(""),
            estimate = b.progress.estimate,
            state = %b.state,
            "backfill started"
        );
        self.wake.notify_one();
        Ok(b)
    }

    /// Every backfill of this service, with live figures.
    pub async fn list(&self) -> Result<Vec<BackfillView>, BackfillError> {
        let held = self.held();
        let all = self.source.list(&self.settings.owner).await?;
        Ok(all.into_iter().map(|b| self.view(b, &held)).collect())
    }

    /// One backfill, with live figures.
    pub async fn get(&self, id: &str) -> Result<BackfillView, BackfillError> {
        let held = self.held();
        let b = self.source.get(&self.settings.owner, id).await?;
        Ok(self.view(b, &held))
    }

    /// The records as the runner last saw them (no query), for `status`.
    pub fn seen(&self) -> Vec<BackfillView> {
        let held = self.held();
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        seen.into_iter().map(|b| self.view(b, &held)).collect()
    }

    fn held(&self) -> Held {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// `b` with live figures. `held`: what the runner held *before* `b` was read, so that a
    /// backfill an operator stopped shows `reading` until the runner has let go of it, which it
    /// does only after storing what it did: a view that says it is no longer reading has that
    /// progress (the runner may not have seen the stop yet, or may hold progress no chunk has
    /// stored yet).
    fn view(&self, b: Backfill, held: &Held) -> BackfillView {
        let rate = (b.state == State::Running)
            .then(|| {
                self.rates
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&b.id).map(|r| r.rows_per_second))
            })
            .flatten()
            .filter(|r| *r > 0.0);
        let eta = rate.map(|r| {
            (b.progress.estimate.saturating_sub(b.progress.rows_read) as f64 / r).ceil() as u64
        });
        let reading = held.reading.contains(&b.id)
            || (b.state != State::Running && held.active.contains(&b.id));
        let yielding = b.state == State::Running && held.yielding.contains(&b.id);
        BackfillView {
            backfill: b,
            rows_per_second: rate,
            eta_seconds: eta,
            reading,
            yielding,
        }
    }

    /// Pause, resume or cancel backfill `id`.
    pub async fn act(&self, id: &str, action: Action) -> Result<BackfillView, BackfillError> {
        let b = self.source.get(&self.settings.owner, id).await?;
        let to = action.apply(b.state).map_err(BackfillError::Conflict)?;
        let write = match to {
            State::Cancelled => ProgressWrite::FinishedAt(now_ms()),
            _ => ProgressWrite::Keep,
        };
        if !self.source.set_state(id, b.state, to, write).await? {
            return Err(BackfillError::Conflict(format!(
                "backfill {id} changed state meanwhile; look again"
            )));
        }
        tracing::info!(backfill = %id, from = %b.state, to = %to, "backfill {}", action.as_str());
        self.wake.notify_one();
        self.get(id).await
    }

    /// The source's table layout (for tests and `status`).
    pub async fn table_meta(
        &self,
        database: &str,
        table: &str,
    ) -> Result<TableMeta, BackfillError> {
        self.source.table_meta(database, table).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_conditions_cannot_smuggle_statements_or_comments() {
        assert!(check_condition("updated_at >= '2026-12-01'").is_ok());
        assert!(check_condition("name = 'a;b' AND (x > 1)").is_ok());
        assert!(check_condition("note = 'it''s -- fine'").is_ok());
        assert!(check_condition("1); DROP TABLE t; --").is_err());
        assert!(check_condition("1 -- LIMIT").is_err());
        assert!(check_condition("1 /* x */").is_err());
        assert!(check_condition("1 # x").is_err());
        assert!(check_condition("(1").is_err());
        assert!(check_condition("1)").is_err());
        assert!(check_condition("'open").is_err());
        assert!(check_condition("  ").is_err());
        // a backslash inside backticks escapes nothing for MySQL: refused, not guessed at
        let smuggled = "1 = (SELECT 1 AS `a\\`)) ; UPDATE t SET v = 1 WHERE ((1 #`\n)";
        assert!(check_condition(smuggled).is_err());
        assert!(check_condition("name LIKE 'a\\_b'").is_err());
        assert!(check_condition("`we``ird` = 1").is_ok());
    }

    fn rule(table: Option<&str>, events: &[EventType], batch: Option<usize>) -> TakerRule {
        TakerRule {
            database: None,
            table: table.map(NameMatch::exact),
            events: events.iter().copied().collect(),
            batch,
        }
    }

    #[test]
    fn a_consumer_is_bulk_only_for_a_table_when_every_rule_that_may_fire_batches() {
        let taker = |rules| Taker {
            name: "c".into(),
            filters: ["t", "other"]
                .iter()
                .map(|t| TableFilter::new("db", t, &[EventType::Snapshot]))
                .collect(),
            rules,
        };
        let bulk = taker(vec![
            rule(None, &[EventType::Snapshot], Some(500)),
            // per row, but never for SNAPSHOT events or not for this table
            rule(None, &[EventType::Insert], None),
            rule(Some("other"), &[], None),
        ]);
        assert!(bulk.takes("db", "t") && bulk.bulk_only("db", "t"));
        assert!(!bulk.bulk_only("db", "other"));
        // a rule without `events` takes SNAPSHOT events too
        let mixed = taker(vec![
            rule(None, &[EventType::Snapshot], Some(500)),
            rule(None, &[], None),
        ]);
        assert!(mixed.takes("db", "t") && !mixed.bulk_only("db", "t"));
    }

    #[test]
    fn a_consumers_bulk_period_is_its_rules_cuts_or_its_lane_parts() {
        let taker = |events: &[EventType], rules| Taker {
            name: "c".into(),
            filters: vec![TableFilter::new("db", "t", events)],
            rules,
        };
        let snap = &[EventType::Snapshot];
        // only SNAPSHOT events: one part per chunk, each bulk rule cutting at its max_rows
        let two = taker(
            snap,
            vec![
                rule(None, snap, Some(500)),
                rule(None, &[], Some(200)),
                rule(None, &[], None),
                // never fires on this table's SNAPSHOT rows
                rule(Some("other"), snap, Some(7)),
                rule(None, &[EventType::Insert], Some(3)),
            ],
        );
        assert_eq!(two.bulk_period("db", "t", 64), Some(1000));
        // live events too: lane parts of lane_rows, each rule cutting within a part
        let lane = taker(
            &[EventType::Insert, EventType::Snapshot],
            vec![rule(None, &[], Some(500))],
        );
        assert_eq!(lane.bulk_period("db", "t", 64), Some(64));
        // no rule batches: no period
        let per_row = taker(snap, vec![rule(None, &[], None)]);
        assert_eq!(per_row.bulk_period("db", "t", 64), None);
        // periods too large to multiply saturate (no smaller reads then)
        let huge = taker(
            snap,
            vec![
                rule(None, &[], Some(usize::MAX - 1)),
                rule(None, &[], Some(3)),
            ],
        );
        assert_eq!(huge.bulk_period("db", "t", 64), Some(usize::MAX));
        assert_eq!((lcm(4, 6), lcm(1, 1), lcm(0, 5)), (12, 1, 5));
    }
}
