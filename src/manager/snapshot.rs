//! Where a backfill's rows enter the stream: the watermark windows of DBLog, as a plain state
//! machine (no I/O, no actix).
//!
//! A backfill (the `backfill` module) reads a table in primary-key chunks. For each chunk it
//! announces a *read* ([`ChunkPlan`], with a fresh nonce), writes a low watermark
//! (`low:<nonce>`) to the watermark table, SELECTs the chunk, hands the rows here
//! ([`Windows::rows`]), then writes a high watermark (`high:<nonce>`). Both watermark writes
//! come back through Canal in binlog order, among the live changes. [`Windows::scan`] runs on
//! every batch, in order, before it is routed:
//! - between the read's low and high watermark it records the key of every live change to the
//!   chunk's table (for an UPDATE that changes the key, the old key too);
//! - at the high watermark it emits the chunk's rows whose key was *not* changed in the window
//!   as SNAPSHOT events, right after the watermark event (a changed row's live event is newer
//!   than what the SELECT saw, and it is delivered anyway);
//! - a DDL on the chunk's table inside the window spoils the read: nothing is emitted and the
//!   read fails (the backfill reads the table's layout again and redoes the chunk). So does a
//!   DDL on the table anywhere after the backfill read its layout ([`ChunkPlan::layout`]):
//!   the backfill keeps a table's layout across chunks, and such a DDL may have come before
//!   the low watermark, after the layout read.
//!
//! Why this is enough (DBLog, section 3): every live change to a key either comes before the
//! low watermark (and so before the SNAPSHOT row, which shows the row at or after it), or after
//! the high watermark (after the SNAPSHOT row), or inside the window (then the row is not
//! emitted at all). So for each key the last event a consumer sees carries its latest state.
//!
//! What it does not decide: when a read counts as done. The emitted rows ride in the batch of
//! the high watermark, so the read is done exactly when that batch is acked (every trigger of
//! it confirmed); the Manager reports that ([`Outcome`]). A read that fails, or whose batch is
//! abandoned, is read again under a new nonce; a watermark whose nonce is unknown (a
//! redelivery of an old read, another replica's read) is ignored.

pub mod chunks;
mod progress;

pub use progress::Progress;

use crate::canal::connection::BatchRef;
use crate::event::{ChangeEvent, EventType, Row, SnapshotOrigin, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// One read of one chunk, announced before its low watermark is written.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkPlan {
    /// Unique per read; the watermark values carry it.
    pub nonce: String,
    pub backfill: Arc<str>,
    pub database: Arc<str>,
    pub table: Arc<str>,
    /// The primary key's columns, in key order.
    pub key_columns: Vec<Arc<str>>,
    /// Deliver only to this consumer.
    pub consumer: Option<Arc<str>>,
    /// [`Windows::ddl_seen`] of the table when its layout (columns, key) was read, before
    /// that read: a DDL on the table since then, anywhere before the high watermark, spoils
    /// the read (its SELECT may have used a stale layout).
    pub layout: u64,
}

/// How a read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its rows were emitted and every trigger they made is confirmed: `emitted` rows went
    /// out, `dropped` were left to their live events.
    Confirmed { emitted: u64, dropped: u64 },
    /// Read it again (under a new nonce).
    Failed(String),
}

/// The watermark table, as Canal names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkTable {
    pub database: String,
    pub table: String,
}

impl WatermarkTable {
    /// The column of the watermark table that carries `low:<nonce>` / `high:<nonce>`.
    pub const COLUMN: &'static str = "watermark";

    /// Whether `e` is a change of this table.
    pub(crate) fn is(&self, e: &ChangeEvent) -> bool {
        *e.database == *self.database && *e.table == *self.table
    }

    /// The text an INSERT or UPDATE of a watermark-table row carries in [`Self::COLUMN`]
    /// (`low:`/`high:` watermarks, `hb:` heartbeats); the caller checks [`Self::is`].
    pub(crate) fn mark(e: &ChangeEvent) -> Option<&str> {
        if !matches!(e.event_type, EventType::Insert | EventType::Update) {
            return None;
        }
        match e.data.get(Self::COLUMN) {
            Some(Value::Text(v)) => Some(v),
            _ => None,
        }
    }
}

/// How far a read had come when it was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPhase {
    /// Neither watermark came through.
    NoWatermark,
    /// The low watermark came, the high one did not.
    LowOnly,
    /// Its rows were emitted; their confirms were still out.
    Emitted,
}

impl ReadPhase {
    /// Why a read in this phase was not done in time, for the operator.
    pub fn explain(self, watermark: &WatermarkTable) -> String {
        match self {
            ReadPhase::NoWatermark => format!(
                "its low watermark never came back through Canal: check that Canal sends {}.{} (the service subscribes to it; canal.instance.filter.black.regex must not exclude it) and that the stream is moving",
                watermark.database, watermark.table
            ),
            ReadPhase::LowOnly => {
                "its high watermark did not come back through Canal in time (is the stream stalled or far behind?)".into()
            }
            ReadPhase::Emitted => "its rows were not confirmed in time (is the broker slow or refusing?)".into(),
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Announced; its low watermark has not come through yet.
    Expecting,
    /// Between its low and high watermark.
    Open,
    /// Its rows were emitted in a batch; waiting for the Manager's verdict on it.
    Emitted,
}

#[derive(Debug)]
struct Read {
    plan: ChunkPlan,
    phase: Phase,
    rows: Option<Vec<Row>>,
    /// Keys (see [`key_text`]) of live changes inside the window.
    changed: HashSet<String>,
    /// A DDL on the table inside the window.
    spoiled: Option<String>,
}

/// What [`Windows::scan`] found in one batch.
#[derive(Debug, Default)]
pub struct Scan {
    /// The batch with SNAPSHOT rows spliced in after their high watermarks; `None` when
    /// nothing was spliced (route the batch as it came).
    pub events: Option<Vec<ChangeEvent>>,
    /// Reads whose rows are in this batch, with their counts: done when the batch is acked.
    pub emitted: Vec<(String, u64, u64)>,
    /// Reads that ended here without rows (a DDL in the window, rows never handed over).
    pub failed: Vec<(String, String)>,
}

/// A table as (`database`, `table`).
type TableName = (Arc<str>, Arc<str>);

/// Every announced read, by nonce.
#[derive(Debug)]
pub struct Windows {
    table: WatermarkTable,
    reads: HashMap<String, Read>,
    /// Reads whose rows ride in a batch, with their counts: settled when it is acked or
    /// abandoned.
    batches: BTreeMap<BatchRef, Vec<(String, u64, u64)>>,
    /// DDL events seen per table (`database`, `table`), in or out of any window: a backfill
    /// that caches a table's layout reads this before the layout and puts it in its plans.
    ddl: HashMap<(Arc<str>, Arc<str>), u64>,
    /// The key columns of every table whose rows this emitted (`database`, `table`), as the
    /// last read of it planned them: the Manager names live rows of those tables by key, so a
    /// live change waits only for the SNAPSHOT rows of its own key (`manager::core`).
    key_columns: HashMap<TableName, Vec<Arc<str>>>,
}

impl Windows {
    pub fn new(table: WatermarkTable) -> Windows {
        Windows {
            table,
            reads: HashMap::new(),
            batches: BTreeMap::new(),
            ddl: HashMap::new(),
            key_columns: HashMap::new(),
        }
    }

    /// The key columns of `database.table` if this emitted rows of it (see the field).
    pub fn key_columns(&self, database: &Arc<str>, table: &Arc<str>) -> Option<&[Arc<str>]> {
        if self.key_columns.is_empty() {
            return None;
        }
        self.key_columns
            .get(&(database.clone(), table.clone()))
            .map(Vec::as_slice)
    }

    /// How many DDL events on `database.table` this has seen (a redelivered one counts
    /// again). A layout read after this was taken is stale once it moves.
    pub fn ddl_seen(&self, database: &str, table: &str) -> u64 {
        self.ddl
            .get(&(Arc::<str>::from(database), Arc::<str>::from(table)))
            .copied()
            .unwrap_or(0)
    }

    /// The watermark table this watches.
    pub fn table(&self) -> &WatermarkTable {
        &self.table
    }

    /// Reads announced and not yet settled.
    pub fn pending(&self) -> usize {
        self.reads.len()
    }

    /// Announce a read (before its low watermark is written).
    pub fn expect(&mut self, plan: ChunkPlan) {
        self.reads.insert(
            plan.nonce.clone(),
            Read {
                plan,
                phase: Phase::Expecting,
                rows: None,
                changed: HashSet::new(),
                spoiled: None,
            },
        );
    }

    /// The rows a read's SELECT returned (before its high watermark is written). False if the
    /// read is unknown (forgotten after a timeout).
    pub fn rows(&mut self, nonce: &str, rows: Vec<Row>) -> bool {
        match self.reads.get_mut(nonce) {
            Some(r) => {
                r.rows = Some(rows);
                true
            }
            None => false,
        }
    }

    /// Drop a read (the backfill gave up waiting for it, or its batch was settled); says how
    /// far it had come.
    pub fn forget(&mut self, nonce: &str) -> Option<ReadPhase> {
        self.reads.remove(nonce).map(|r| match r.phase {
            Phase::Expecting => ReadPhase::NoWatermark,
            Phase::Open => ReadPhase::LowOnly,
            Phase::Emitted => ReadPhase::Emitted,
        })
    }

    /// Look at batch `batch` in binlog order (see the module docs): the events to route in its
    /// place, and the reads that failed in it. The reads whose rows it carries are settled by
    /// [`Windows::settled`] once the batch is acked or abandoned.
    pub fn route(&mut self, batch: BatchRef, events: &[ChangeEvent]) -> Scan {
        let scan = self.scan(events);
        if !scan.emitted.is_empty() {
            self.batches.insert(batch, scan.emitted.clone());
        }
        scan
    }

    /// `batch` was acked (every trigger of it confirmed) or abandoned (rolled back, its epoch
    /// ended): how each read whose rows it carried ended. The reads are forgotten.
    pub fn settled(&mut self, batch: BatchRef, acked: bool) -> Vec<(String, Outcome)> {
        let mut out = Vec::new();
        for (nonce, emitted, dropped) in self.batches.remove(&batch).unwrap_or_default() {
            self.reads.remove(&nonce);
            out.push((
                nonce,
                if acked {
                    Outcome::Confirmed { emitted, dropped }
                } else {
                    Outcome::Failed(format!(
                        "batch {batch} with the chunk's rows was rolled back"
                    ))
                },
            ));
        }
        out
    }

    /// Look at one batch in binlog order; see the module docs.
    pub fn scan(&mut self, events: &[ChangeEvent]) -> Scan {
        let mut scan = Scan::default();
        for e in events.iter().filter(|e| e.is_ddl) {
            *self
                .ddl
                .entry((e.database.clone(), e.table.clone()))
                .or_default() += 1;
        }
        if self.reads.is_empty() {
            return scan;
        }
        let mut out: Option<Vec<ChangeEvent>> = None;
        for (i, e) in events.iter().enumerate() {
            if let Some(o) = out.as_mut() {
                o.push(e.clone());
            }
            if self.table.is(e) {
                if let Some((high, nonce)) = watermark(e)
                    && let Some(emit) = self.watermark(high, &nonce, e, &mut scan)
                {
                    let o = out.get_or_insert_with(|| events[..=i].to_vec());
                    o.extend(emit);
                }
                continue;
            }
            self.live(e);
        }
        scan.events = out;
        scan
    }

    /// A live event: record its keys in every open window on its table.
    fn live(&mut self, e: &ChangeEvent) {
        for r in self.reads.values_mut() {
            if !matches!(r.phase, Phase::Open)
                || e.table != r.plan.table
                || e.database != r.plan.database
            {
                continue;
            }
            if e.is_ddl || !e.event_type.is_row() {
                if e.is_ddl && r.spoiled.is_none() {
                    r.spoiled = Some(format!(
                        "{} on {}.{} during the chunk: {}",
                        e.event_type,
                        e.database,
                        e.table,
                        e.sql.as_deref().unwrap_or("")
                    ));
                }
                continue;
            }
            r.changed.extend(live_keys(e, &r.plan.key_columns));
        }
    }

    /// A watermark of read `nonce`; returns the SNAPSHOT events to emit after it.
    fn watermark(
        &mut self,
        high: bool,
        nonce: &str,
        at: &ChangeEvent,
        scan: &mut Scan,
    ) -> Option<Vec<ChangeEvent>> {
        let r = self.reads.get_mut(nonce)?;
        match (&r.phase, high) {
            (Phase::Expecting, false) => {
                r.phase = Phase::Open;
                None
            }
            (Phase::Expecting, true) => {
                // its low watermark never came through (skipped as already delivered)
                let nonce = nonce.to_string();
                self.reads.remove(&nonce);
                scan.failed.push((
                    nonce,
                    "the high watermark came without its low watermark".into(),
                ));
                None
            }
            (Phase::Open, true) => {
                let ddl = self
                    .ddl
                    .get(&(r.plan.database.clone(), r.plan.table.clone()))
                    .copied()
                    .unwrap_or(0);
                let stale = (ddl != r.plan.layout).then(|| {
                    format!(
                        "a DDL on {}.{} since the backfill read its layout",
                        r.plan.database, r.plan.table
                    )
                });
                if let Some(why) = r.spoiled.take().or(stale) {
                    let nonce = nonce.to_string();
                    self.reads.remove(&nonce);
                    scan.failed.push((nonce, why));
                    return None;
                }
                let Some(rows) = r.rows.take() else {
                    let nonce = nonce.to_string();
                    self.reads.remove(&nonce);
                    scan.failed
                        .push((nonce, "the chunk's rows were not handed over".into()));
                    return None;
                };
                r.phase = Phase::Emitted;
                self.key_columns.insert(
                    (r.plan.database.clone(), r.plan.table.clone()),
                    r.plan.key_columns.clone(),
                );
                let (emit, dropped) = emit(&r.plan, &r.changed, rows, at);
                scan.emitted
                    .push((nonce.to_string(), emit.len() as u64, dropped));
                Some(emit)
            }
            // a low watermark again (a redelivery), or a watermark of an emitted read
            _ => None,
        }
    }
}

/// The watermark an event of the watermark table carries: (is high, nonce).
fn watermark(e: &ChangeEvent) -> Option<(bool, String)> {
    let v = WatermarkTable::mark(e)?;
    if let Some(n) = v.strip_prefix("low:") {
        Some((false, n.to_string()))
    } else {
        v.strip_prefix("high:").map(|n| (true, n.to_string()))
    }
}

/// The keys (see [`key_text`]) a live row event touches: its row's, and for an UPDATE that
/// changed the key, the key before.
pub fn live_keys(e: &ChangeEvent, key_columns: &[Arc<str>]) -> Vec<String> {
    let mut out = Vec::new();
    out.extend(key_text(&e.data, key_columns));
    if let Some(old) = &e.old
        && key_columns.iter().any(|c| old.contains_key(c))
    {
        let mut before = e.data.clone();
        for (c, v) in old.iter_shared() {
            before.insert(c.clone(), v.clone());
        }
        out.extend(key_text(&before, key_columns));
    }
    out
}

/// A row's key as a JSON array of its key columns' values, in key order; `None` if a key
/// column is missing.
pub fn key_text(row: &Row, key_columns: &[Arc<str>]) -> Option<String> {
    let mut values = Vec::with_capacity(key_columns.len());
    for c in key_columns {
        values.push(row.get(c)?);
    }
    serde_json::to_string(&values).ok()
}

/// The rows of a read not changed in its window, as SNAPSHOT events at `at`'s position.
fn emit(
    plan: &ChunkPlan,
    changed: &HashSet<String>,
    rows: Vec<Row>,
    at: &ChangeEvent,
) -> (Vec<ChangeEvent>, u64) {
    let mut out = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    // the rows of a read share their columns: their key columns' set is made once
    let mut keys: Option<(Arc<crate::event::Columns>, crate::event::ColumnSet)> = None;
    for row in rows {
        let Some(key) = key_text(&row, &plan.key_columns) else {
            dropped += 1;
            continue;
        };
        if changed.contains(&key) {
            dropped += 1;
            continue;
        }
        let primary_keys = match &keys {
            Some((cols, set)) if Arc::ptr_eq(cols, row.columns()) => set.clone(),
            _ => {
                let mut b = crate::event::ColumnSetBuilder::new(row.columns().len());
                for c in &plan.key_columns {
                    if let Some(i) = row.columns().find(c) {
                        b.set(i);
                    }
                }
                let set = b.build(row.columns().clone());
                keys = Some((row.columns().clone(), set.clone()));
                set
            }
        };
        out.push(ChangeEvent {
            destination: at.destination.clone(),
            database: plan.database.clone(),
            table: plan.table.clone(),
            event_type: EventType::Snapshot,
            data: row,
            old: None,
            changed: Default::default(),
            primary_keys,
            position: at.position.clone(),
            executed_at: at.executed_at,
            is_ddl: false,
            sql: None,
            snapshot: Some(Arc::new(SnapshotOrigin {
                backfill: plan.backfill.clone(),
                key,
                consumer: plan.consumer.clone(),
            })),
        });
    }
    (out, dropped)
}

#[cfg(test)]
pub(crate) mod tests;
