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
//!   first), at most `rate` rows per second;
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
pub mod source;

use crate::canal::connection::{ConnectionState, GetConnectionStatus};
use crate::clock::now_ms;
use crate::consumer::TableFilter;
use crate::consumer::filter::NameMatch;
use crate::event::EventType;
use crate::manager::snapshot::chunks::Chunks;
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
}

impl BackfillError {
    pub fn is_transient(&self) -> bool {
        matches!(self, BackfillError::Source { .. })
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
    pub chunk: usize,
    pub chunk_timeout: Duration,
    pub max_live_batches: usize,
    /// Chunks of one backfill read and not yet confirmed, at most (`backfill.chunks_in_flight`).
    pub chunks_in_flight: usize,
    /// `destination/client_id`: the stream these backfills ride on.
    pub owner: String,
}

/// The smallest `--rate` (rows per second).
pub const MIN_RATE: f64 = 0.01;

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

/// A backfill this replica runs.
struct Active {
    /// As listed when it started here (its progress lives in `chunks`).
    b: Backfill,
    chunks: Chunks,
    layout: Option<Layout>,
    /// Every consumer it is for is disabled: no reads.
    held: bool,
    /// When it last moved (for its rate figure).
    since: Instant,
}

/// What the runner keeps between steps.
#[derive(Default)]
struct Runner {
    active: BTreeMap<String, Active>,
    /// The outcomes of chunks read: (backfill, nonce, outcome or `None` when timed out).
    pending: FuturesUnordered<LocalBoxFuture<'static, (String, String, Option<Outcome>)>>,
    /// When the records were last read (`None`: read them now).
    listed: Option<Instant>,
    turn: usize,
}

/// A table's layout as a backfill last read it.
#[derive(Debug, Clone)]
struct Layout {
    meta: TableMeta,
    /// The stream's DDL count of the table before it was read ([`DdlSeen`]).
    ddl_seen: u64,
    read_at: Instant,
}

/// A consumer a backfill may be for: its filters, and the names and event types of its rules
/// (`when`), which must take SNAPSHOT events of the table too.
#[derive(Debug, Clone)]
pub struct Taker {
    pub name: String,
    pub filters: Vec<TableFilter>,
    /// Per rule: `when.database`, `when.table`, `when.events` (empty: any).
    pub rules: Vec<(Option<NameMatch>, Option<NameMatch>, BTreeSet<EventType>)>,
}

impl Taker {
    /// Whether SNAPSHOT events of `database.table` reach this consumer and fire a rule.
    pub fn takes(&self, database: &str, table: &str) -> bool {
        let filtered = self.filters.iter().any(|f| {
            f.event_types.contains(&EventType::Snapshot)
                && f.database.matches(database)
                && f.table.matches(table)
        });
        let fires = self.rules.iter().any(|(d, t, events)| {
            (events.is_empty() || events.contains(&EventType::Snapshot))
                && d.as_ref().is_none_or(|d| d.matches(database))
                && t.as_ref().is_none_or(|t| t.matches(table))
        });
        filtered && fires
    }
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
        self.consumers
            .iter()
            .filter(|c| c.takes(database, table))
            .map(|c| c.name.as_str())
            .collect()
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
        let chunk = req.chunk.unwrap_or(self.settings.chunk);
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
        BackfillView {
            backfill: b,
            rows_per_second: rate,
            eta_seconds: eta,
            reading,
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

    /// The runner: read chunks of running backfills, one read at a time, and wait for their
    /// outcomes, for as long as the service runs. While a backfill's chunk waits for its
    /// confirms, its next chunk (or another backfill's) may be read.
    pub async fn run(self: Arc<Self>) {
        let backoff =
            crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut failures = 0u32;
        let mut r = Runner::default();
        loop {
            match self.step(&mut r).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    let wait = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, transient = e.is_transient(), "backfill runner: the source database failed; trying again");
                    r.listed = None;
                    tokio::time::sleep(wait).await;
                }
            }
            if let Ok(mut held) = self.held.lock() {
                held.reading = r
                    .active
                    .iter()
                    // a stopped one until what it did is stored
                    .filter(|(_, a)| a.chunks.outstanding() > 0 || a.chunks.stopping())
                    .map(|(id, _)| id.clone())
                    .collect();
                held.active = r.active.keys().cloned().collect();
            }
        }
    }

    /// Whether this replica streams and the live stream leaves room for a chunk. Live batches
    /// go first, but a stream that never leaves room does not starve the backfill: after
    /// [`MAX_YIELD`] of waiting a chunk goes anyway. `own`: chunks in flight, whose watermark
    /// batches (a low and a high each, at most) are not live batches.
    async fn may_read(&self, own: usize) -> bool {
        let st = match self.connection.send(GetConnectionStatus).await {
            Ok(st) if st.state == ConnectionState::Connected => st,
            _ => return false,
        };
        let Ok(mut busy) = self.busy_since.lock() else {
            return false;
        };
        if st.inflight_batches <= self.settings.max_live_batches + 2 * own {
            *busy = None;
            return true;
        }
        let since = *busy.get_or_insert_with(Instant::now);
        if since.elapsed() >= MAX_YIELD {
            *busy = None;
            return true;
        }
        false
    }

    /// One step of the runner: the outcomes that came, the records when due, progress to
    /// store, then one read, or a wait for the next thing to do.
    async fn step(&self, r: &mut Runner) -> Result<(), BackfillError> {
        while let Some(Some((id, nonce, o))) = r.pending.next().now_or_never() {
            self.outcome(r, id, nonce, o).await;
        }
        let now = Instant::now();
        if r.listed.is_none_or(|t| now >= t + LIST_EVERY) {
            self.sync(r).await?;
            r.listed = Some(now);
        }
        self.settle(r).await?;
        let mut busy = false;
        if let Some(id) = self.next_read(r, now) {
            let own = r.active.values().map(|a| a.chunks.outstanding()).sum();
            if self.may_read(own).await {
                return self.read(r, &id).await;
            }
            busy = true;
        }
        // nothing to do now: wait for an outcome, an operator, or the next due time
        let mut until = r.listed.unwrap_or(now) + LIST_EVERY;
        for a in r.active.values() {
            let read_at = (!a.held).then(|| a.chunks.not_before()).flatten();
            for t in [a.chunks.save_at(), read_at].into_iter().flatten() {
                until = until.min(t);
            }
        }
        if busy {
            until = until.min(now + Duration::from_millis(20));
        }
        let until = until.max(now + Duration::from_millis(1));
        tokio::select! {
            Some((id, nonce, o)) = r.pending.next(), if !r.pending.is_empty() => {
                self.outcome(r, id, nonce, o).await;
            }
            _ = self.wake.notified() => r.listed = None,
            _ = tokio::time::sleep_until(until.into()) => {}
        }
        Ok(())
    }

    /// Read the records: backfills to run here, the ones an operator stopped, the ones whose
    /// consumers are all disabled.
    async fn sync(&self, r: &mut Runner) -> Result<(), BackfillError> {
        let mut all = self.source.list(&self.settings.owner).await?;
        let now = Instant::now();
        for b in &all {
            match (b.state, r.active.get_mut(&b.id)) {
                (State::Running, None) => {
                    let chunks = Chunks::new(
                        b.progress.clone(),
                        b.spec.chunk,
                        b.spec.rate,
                        self.settings.chunks_in_flight,
                    );
                    r.active.insert(
                        b.id.clone(),
                        Active {
                            b: b.clone(),
                            chunks,
                            layout: None,
                            held: false,
                            since: now,
                        },
                    );
                }
                (State::Running, Some(_)) => {}
                (_, Some(a)) => {
                    a.chunks.stop();
                }
                _ => {}
            }
        }
        for (id, a) in r.active.iter_mut() {
            if !all.iter().any(|b| b.id == *id) {
                a.chunks.stop();
            }
        }
        for a in r.active.values_mut() {
            let why = self.no_taker_enabled(&a.b).await;
            a.held = why.is_some();
            if why.is_some() {
                // rows emitted now would reach nobody
                a.chunks.note(why, now);
            }
        }
        for b in all.iter_mut() {
            if let Some(a) = r.active.get(&b.id) {
                b.progress = a.chunks.progress().clone();
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            *s = all;
        }
        Ok(())
    }

    /// Show `id`'s progress in `status` (see [`Self::seen`]).
    fn show(&self, id: &str, p: &Progress) {
        if let Ok(mut s) = self.seen.lock()
            && let Some(b) = s.iter_mut().find(|b| b.id == id)
        {
            b.progress = p.clone();
        }
    }

    /// Store what is due: the progress no low watermark will carry soon, and the backfills
    /// done or stopped here.
    async fn settle(&self, r: &mut Runner) -> Result<(), BackfillError> {
        let now = Instant::now();
        let ids: Vec<String> = r.active.keys().cloned().collect();
        for id in ids {
            let Some(a) = r.active.get_mut(&id) else {
                continue;
            };
            if a.chunks.finished() {
                let p = a.chunks.progress().clone();
                self.finish(&a.b, p).await?;
                r.active.remove(&id);
            } else if a.chunks.stopped() {
                // what it did before the operator stopped it
                if let Some((_, p)) = a.chunks.to_fold() {
                    self.source.save_progress(&id, &p).await?;
                }
                r.active.remove(&id);
            } else if a.chunks.save_due(now)
                && let Some((version, p)) = a.chunks.to_fold()
            {
                self.source.save_progress(&id, &p).await?;
                a.chunks.stored(version);
            }
        }
        Ok(())
    }

    /// The backfill whose chunk is read next (in turn among those that may read now).
    fn next_read(&self, r: &mut Runner, now: Instant) -> Option<String> {
        let ready: Vec<&String> = r
            .active
            .iter()
            .filter(|(_, a)| !a.held && a.chunks.may_read(now))
            .map(|(id, _)| id)
            .collect();
        if ready.is_empty() {
            return None;
        }
        r.turn = (r.turn + 1) % ready.len();
        Some(ready[r.turn].clone())
    }

    /// `b`'s table layout, read again: the stream's DDL count first, so that a DDL after the
    /// read makes its chunks fail ([`ChunkPlan::layout`]).
    async fn read_layout(&self, b: &Backfill) -> Result<Layout, BackfillError> {
        let ddl_seen = self
            .manager
            .send(DdlSeen(b.spec.database.clone(), b.spec.table.clone()))
            .await
            .unwrap_or(0);
        let read_at = Instant::now();
        let meta = self
            .source
            .table_meta(&b.spec.database, &b.spec.table)
            .await?;
        Ok(Layout {
            meta,
            ddl_seen,
            read_at,
        })
    }

    /// Read one chunk of backfill `id` (low watermark with its unstored progress, SELECT,
    /// rows to the Manager, high watermark); its outcome comes later.
    async fn read(&self, r: &mut Runner, id: &str) -> Result<(), BackfillError> {
        let Some(a) = r.active.get_mut(id) else {
            return Ok(());
        };
        let layout = match a
            .layout
            .clone()
            .filter(|l| l.read_at.elapsed() < LAYOUT_TTL)
        {
            Some(l) => l,
            None => match self.read_layout(&a.b).await {
                Ok(l) => {
                    a.layout = Some(l.clone());
                    l
                }
                Err(BackfillError::Invalid(why)) => return self.fail(r, id, why).await,
                Err(e) => return Err(e),
            },
        };
        let meta = layout.meta;
        let key: Vec<String> = meta.key.iter().map(|k| k.to_string()).collect();
        if key != a.b.spec.key_columns {
            let why = format!(
                "the primary key of {} changed from ({}) to ({}) during the backfill; start a new one",
                a.b.spec.full_table(),
                a.b.spec.key_columns.join(", "),
                key.join(", ")
            );
            return self.fail(r, id, why).await;
        }
        let Some(max) = a.chunks.progress().max_key.clone() else {
            return Ok(()); // nothing to read: finished
        };
        let nonce = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let after = a.chunks.begin(&nonce, Instant::now());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let plan = ChunkPlan {
            nonce: nonce.clone(),
            backfill: Arc::<str>::from(id),
            database: Arc::<str>::from(meta.database.as_str()),
            table: Arc::<str>::from(meta.table.as_str()),
            key_columns: meta.key.clone(),
            consumer: a.b.spec.consumer.as_deref().map(Arc::<str>::from),
            layout: layout.ddl_seen,
        };
        if self
            .manager
            .send(ExpectChunk {
                plan,
                done: done_tx,
            })
            .await
            .is_err()
        {
            a.chunks.abandon(&nonce);
            return Ok(()); // the service is stopping
        }
        let fold = a.chunks.to_fold();
        let read = async {
            if !self
                .source
                .write_low_watermark(id, &format!("low:{nonce}"), fold.as_ref().map(|f| &f.1))
                .await?
            {
                return Ok(None); // paused or cancelled meanwhile
            }
            let rows = self
                .source
                .read_chunk(
                    &meta,
                    a.b.spec.condition.as_deref(),
                    after.as_deref(),
                    &max,
                    a.b.spec.chunk,
                )
                .await?;
            Ok::<_, BackfillError>(Some(rows))
        };
        let rows = match read.await {
            Ok(Some(rows)) => rows,
            Ok(None) => {
                // paused or cancelled meanwhile: read the records before storing what it did
                self.manager.do_send(ForgetChunk(nonce.clone()));
                a.chunks.abandon(&nonce);
                a.chunks.stop();
                r.listed = None;
                return Ok(());
            }
            Err(e) => {
                self.manager.do_send(ForgetChunk(nonce.clone()));
                a.chunks.abandon(&nonce);
                a.layout = None;
                return Err(e);
            }
        };
        if let Some((version, _)) = fold {
            a.chunks.stored(version);
        }
        a.chunks.read(
            &nonce,
            rows.len(),
            rows.last().map(|r| key_values(r, &meta.key)),
        );
        let handed = self
            .manager
            .send(ChunkRows {
                nonce: nonce.clone(),
                rows,
            })
            .await
            .unwrap_or(false);
        if !handed {
            a.chunks.abandon(&nonce);
            return Ok(());
        }
        if let Err(e) = self
            .source
            .write_watermark(id, &format!("high:{nonce}"))
            .await
        {
            self.manager.do_send(ForgetChunk(nonce.clone()));
            a.chunks.abandon(&nonce);
            return Err(e);
        }
        a.chunks.high_written(&nonce);
        let timeout = self.settings.chunk_timeout;
        let id = id.to_string();
        r.pending.push(Box::pin(async move {
            let o = match tokio::time::timeout(timeout, done_rx).await {
                Ok(Ok(o)) => Some(o),
                Ok(Err(_)) => Some(Outcome::Failed("the service dropped the chunk".into())),
                Err(_) => None,
            };
            (id, nonce, o)
        }));
        Ok(())
    }

    /// How read `nonce` of backfill `id` ended (`None`: not within `backfill.chunk_timeout`).
    async fn outcome(&self, r: &mut Runner, id: String, nonce: String, o: Option<Outcome>) {
        let o = match o {
            Some(o) => o,
            None => {
                let why = self
                    .manager
                    .send(ForgetChunk(nonce.clone()))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "it was not done".into());
                Outcome::Failed(format!(
                    "{why} (backfill.chunk_timeout {:?})",
                    self.settings.chunk_timeout
                ))
            }
        };
        let Some(a) = r.active.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        match o {
            Outcome::Confirmed { emitted, dropped } => {
                let moved = a.chunks.confirmed(&nonce, emitted, dropped, now);
                if moved.chunks > 0 {
                    self.note_rate(&id, moved.rows, now.duration_since(a.since));
                    a.since = now;
                }
            }
            Outcome::Failed(why) => {
                if !a.chunks.nonces().any(|n| n == nonce) {
                    return; // forgotten: an earlier chunk failed
                }
                tracing::info!(backfill = %id, table = %a.b.spec.full_table(), reason = %why, "backfill chunk read again");
                for later in a.chunks.failed(&nonce, &why, now) {
                    self.manager.do_send(ForgetChunk(later));
                }
                a.layout = None;
            }
        }
        self.show(&id, a.chunks.progress());
    }

    /// Why `b` must wait: every consumer it is for is disabled (its rows would reach nobody).
    async fn no_taker_enabled(&self, b: &Backfill) -> Option<String> {
        let status = self.manager.send(GetManagerStatus).await.ok()?;
        let targets: Vec<&str> = match &b.spec.consumer {
            Some(c) => vec![c.as_str()],
            None => self.takers(&b.spec.database, &b.spec.table),
        };
        let enabled = status
            .consumers
            .iter()
            .any(|c| c.enabled && targets.contains(&c.name.as_str()));
        (!enabled).then(|| {
            format!(
                "waiting: every consumer it is for is disabled ({}); enable one to go on",
                targets.join(", ")
            )
        })
    }

    fn note_rate(&self, id: &str, rows: u64, took: Duration) {
        let now = rows as f64 / took.as_secs_f64().max(1e-3);
        if let Ok(mut r) = self.rates.lock() {
            let e = r.entry(id.to_string()).or_default();
            e.rows_per_second = if e.rows_per_second == 0.0 {
                now
            } else {
                0.7 * e.rows_per_second + 0.3 * now
            };
        }
    }

    async fn finish(&self, b: &Backfill, mut p: Progress) -> Result<(), BackfillError> {
        p.error = None;
        let mut done = p.clone();
        done.finished_at = Some(now_ms());
        if !self
            .source
            .set_state(
                &b.id,
                State::Running,
                State::Done,
                ProgressWrite::Replace(&done),
            )
            .await?
        {
            // paused or cancelled while its last chunk was in flight: keep what it did
            return self.source.save_progress(&b.id, &p).await;
        }
        let p = done;
        tracing::info!(
            backfill = %b.id,
            table = %b.spec.full_table(),
            rows_read = p.rows_read,
            rows_emitted = p.rows_emitted,
            rows_dropped = p.rows_dropped,
            chunks = p.chunks,
            "backfill done"
        );
        Ok(())
    }

    /// Backfill `id` cannot go on (`why`): forget its reads, store it failed.
    async fn fail(&self, r: &mut Runner, id: &str, why: String) -> Result<(), BackfillError> {
        let Some(a) = r.active.get_mut(id) else {
            return Ok(());
        };
        for nonce in a.chunks.nonces() {
            self.manager.do_send(ForgetChunk(nonce.to_string()));
        }
        let mut p = a.chunks.progress().clone();
        p.error = Some(why.clone());
        self.source
            .set_state(
                id,
                State::Running,
                State::Failed,
                ProgressWrite::Replace(&p),
            )
            .await?;
        tracing::error!(backfill = %id, table = %a.b.spec.full_table(), error = %why, "backfill failed");
        r.active.remove(id);
        Ok(())
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
}
