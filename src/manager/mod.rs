//! The Manager actor: routes Canal batches to consumers and decides when a batch is acked.
//!
//! For each batch from the `CanalConnection` it picks, per enabled consumer, the events that
//! consumer's filters match, and hands them to the pure [`core::Router`], which decides
//! everything else: each consumer gets one part at a time, its live parts in batch order, so
//! their triggers leave in binlog order; a batch is acked once every consumer part of it is
//! processed *and* confirmed by the publisher; the connection then acks batches to Canal
//! strictly in order. This actor only carries the router's commands out (messages to consumer
//! actors, the connection and the publisher) and feeds the answers back in.
//!
//! SNAPSHOT rows (a backfill's, spliced in after their high watermark by [`snapshot`]) go to a
//! consumer that also gets live events as parts of at most [`LaneConfig::rows`] rows in the
//! router's SNAPSHOT lane ([`core::Lane`]), each naming the keys of its rows; its live parts name
//! the keys of their rows on the tables a backfill has emitted rows of. So a live change waits
//! only for the SNAPSHOT rows of its own key routed before it, and behind at most
//! [`LaneConfig::parts`] such parts at the publisher, not behind a whole chunk. A consumer that
//! gets only SNAPSHOT events takes a batch's rows in one part, as before.
//!
//! Failures:
//! - a consumer that fails a part is restarted by its supervisor (a fresh instance); the router,
//!   the one owner of supervision, counts the restart and retries that same part after a
//!   backoff, or quarantines the consumer (see [`core`]). Other consumers keep going (up to the
//!   Canal in-flight window), so one slow or failing consumer does not stop the rest;
//! - a quarantined consumer, or a publish that fails (nack, return, timeout, lost broker),
//!   rolls the batch back: Canal redelivers it and every consumer sees it again (duplicates
//!   carry the same message ids);
//! - when the connection starts a new epoch (reconnect or rollback) the router drops queued
//!   parts of older epochs, the publisher cancels their unpublished messages, and each abandoned
//!   batch is *released* to the connection once nothing of it is running any more.
//!
//! The Canal subscription filter is the union of the enabled consumers' filters. `enable` and
//! `disable` answer only once Canal has accepted the new subscription.
//!
//! Lossy text (UTF-8 mode, [`ManagerConfig::lossy_text`]): every batch is scanned for text that
//! carries U+FFFD ([`crate::canal::lossy`]); such rows are counted per table and column, each
//! column is logged once, and with `canal.on_lossy_text = "park"` the rows go to the
//! dead-letter queue (through their consumers, like a poison row) instead of being delivered.
//!
//! Heartbeats (`[heartbeat] enabled`, [`ManagerConfig::heartbeat`]): the heartbeat writer
//! announces each heartbeat row ([`HeartbeatNote`]) before writing it to the watermark table;
//! every batch is scanned for those rows and for the changes that came through
//! ([`heartbeat::Tracker`]), which gives the lag `status` and `canal_lag_seconds` show. When a
//! part's triggers are confirmed, the time from each of its live events' commit to now is
//! observed in [`ManagerConfig::commit_to_confirm`] (SNAPSHOT events are left out: a backfill's
//! row was not committed then).

pub mod core;
pub mod heartbeat;
pub mod snapshot;

use crate::canal::connection::{
    AckBatch, Batch, BatchRef, CanalConnection, CanalEvent, ReleaseBatch, RollbackBatch, SetFilter,
};
use crate::canal::lossy::{self, LossyColumn, LossyText, OnLossyText};
use crate::clock::now_ms;
use crate::consumer::ProcessFailure;
use crate::consumer::TableFilter;
use crate::consumer::actor::{ConsumerActor, ProcessBatch};
use crate::consumer::filter::canal_filter;
use crate::event::{ChangeEvent, other_read};
use crate::publisher::{CancelBefore, PublishError};
use actix::prelude::*;
pub use core::ConsumerState;
use core::{Command, Lane, Mode, PartError, Processed, Router, Segment};
pub use core::{OnPoison, PoisonPolicy, SupervisionConfig};
pub use heartbeat::HeartbeatStatus;
use serde::{Deserialize, Serialize};
use snapshot::Windows;
pub use snapshot::{ChunkPlan, Outcome, WatermarkTable};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long `enable`/`disable` wait for Canal to accept the new subscription.
pub const FILTER_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A consumer as the Manager knows it.
pub struct ConsumerEntry {
    pub name: String,
    pub filters: Vec<TableFilter>,
    pub enabled: bool,
    pub poison: PoisonPolicy,
    /// When its failures are retried and when it is quarantined (the router keeps the count).
    pub supervision: SupervisionConfig,
    pub addr: Addr<ConsumerActor>,
}

/// The events of one batch a consumer must process.
#[derive(Debug, Clone)]
pub struct Part {
    pub events: Arc<Vec<ChangeEvent>>,
    pub indices: Arc<Vec<usize>>,
    /// Events of the batch (indices into `events`) to dead-letter unprocessed, with the reason,
    /// whatever the mode (lossy text with `canal.on_lossy_text = "park"`).
    pub park: Arc<BTreeMap<usize, String>>,
}

/// One consumer as `status`, `list` and `/metrics` show it: the one place its counters are
/// spelled. The Manager keeps one per consumer and updates it in place; `GET /status` serves it
/// as it is (the JSON field names are what `tests/` and `deploy/` rely on), the command line
/// reads it back typed, and the admin endpoint encodes its metrics from it at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub enabled: bool,
    pub state: ConsumerState,
    /// Events routed to it.
    pub events: u64,
    /// Plugin triggers it emitted.
    pub triggers: u64,
    /// Events it failed to handle.
    pub errors: u64,
    /// Supervisor restarts.
    pub restarts: u64,
    /// Events (or refused triggers) parked in the dead-letter queue.
    #[serde(default)]
    pub parked: u64,
    /// Seconds between now and the source time of the newest event whose triggers were
    /// confirmed; 0 when nothing is queued or unconfirmed anywhere (caught up).
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Manager settings.
#[derive(Debug, Clone, Default)]
pub struct ManagerConfig {
    /// Extra Canal filter ORed into the consumers' one.
    pub extra_filter: String,
    /// The backfills' watermark table: its changes are watched for watermarks (and it is
    /// added to the subscription).
    pub watermark: Option<WatermarkTable>,
    /// Check text for Canal's lossy decoding, and what to do with such rows (UTF-8 mode,
    /// `canal.on_lossy_text`); None: no check (raw text mode, where U+FFFD is data).
    pub lossy_text: Option<OnLossyText>,
    /// Track heartbeats (`[heartbeat] enabled`; needs `watermark`).
    pub heartbeat: bool,
    /// Where commit-to-confirm latencies are observed (`canal_commit_to_confirm_seconds`).
    pub commit_to_confirm: Option<crate::metrics::LatencyHistogram>,
    /// How SNAPSHOT rows are cut for the SNAPSHOT lane.
    pub lane: LaneConfig,
}

/// The SNAPSHOT lane (`backfill.lane_rows`, `backfill.lane_parts`): see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneConfig {
    /// SNAPSHOT rows per part, at most, for a consumer that also gets live events.
    pub rows: usize,
    /// SNAPSHOT parts of one consumer out (in its actor or awaiting confirms) at a time.
    pub parts: usize,
}

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            rows: 64,
            parts: core::LANE_PARTS,
        }
    }
}

/// Give the Manager its connection (the connection is created with the Manager's address).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachConnection(pub ConnectionLink);

/// What the Manager sends to the connection.
#[derive(Clone)]
pub struct ConnectionLink {
    pub ack: Recipient<AckBatch>,
    pub rollback: Recipient<RollbackBatch>,
    pub release: Recipient<ReleaseBatch>,
    pub filter: Recipient<SetFilter>,
}

impl From<&Addr<CanalConnection>> for ConnectionLink {
    fn from(addr: &Addr<CanalConnection>) -> Self {
        ConnectionLink {
            ack: addr.clone().recipient(),
            rollback: addr.clone().recipient(),
            release: addr.clone().recipient(),
            filter: addr.clone().recipient(),
        }
    }
}

/// Enable or disable a consumer live. Answers once Canal applies the new subscription.
#[derive(Message)]
#[rtype(result = "Result<(), SetEnabledError>")]
pub struct SetEnabled {
    pub name: String,
    pub enabled: bool,
}

/// Why `enable`/`disable` did not (yet) take effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetEnabledError {
    #[error("no consumer named '{0}'")]
    UnknownConsumer(String),
    /// The change is recorded and routing follows it, but Canal has not accepted the new
    /// subscription yet (it is applied when the connection is back).
    #[error(
        "consumer '{name}' is {state} in the service, but canal has not applied the new subscription within {timeout:?} (not connected?); it applies when the connection is back"
    )]
    NotInForce {
        name: String,
        state: &'static str,
        timeout: Duration,
    },
}

/// Ask for a status snapshot.
#[derive(Message)]
#[rtype(result = "ManagerStatus")]
pub struct GetManagerStatus;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ManagerStatus {
    pub batches_in_flight: usize,
    pub consumers: Vec<ConsumerStatus>,
    pub filter: String,
    /// Columns whose text arrived with U+FFFD (UTF-8 mode), with their counts and the fix.
    #[serde(default)]
    pub lossy_text: Vec<LossyColumn>,
    /// With heartbeats on: the lag they measure, and their trips.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatStatus>,
    /// When live rows last went to a consumer (not SNAPSHOT rows, not the watermark table's):
    /// a backfill yields while they flow (`backfill.rate_while_live`). In-process only.
    #[serde(skip)]
    pub live_at: Option<std::time::Instant>,
}

/// What the heartbeat writer did (or could not do) at a tick; see [`heartbeat`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct HeartbeatNote(pub heartbeat::Note);

/// Announce a backfill's read of one chunk (before its low watermark is written); `done`
/// gets how it ended (see [`snapshot`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ExpectChunk {
    pub plan: ChunkPlan,
    pub done: tokio::sync::oneshot::Sender<Outcome>,
}

/// The rows a read's SELECT returned (before its high watermark is written). Answers false if
/// the read is not known (forgotten, or the service has no watermark table).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ChunkRows {
    pub nonce: String,
    pub rows: Vec<crate::event::Row>,
}

/// How many DDL events on a table (`database`, `table`) the stream has brought
/// ([`Windows::ddl_seen`]); asked before a backfill reads the table's layout.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct DdlSeen(pub String, pub String);

/// Give up on a read (its backfill stopped waiting); answers why it was not done, when the
/// read was still known.
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct ForgetChunk(pub String);

/// A part's publish settled (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct PartDone {
    slot: usize,
    batch: BatchRef,
    seq: u32,
    result: Result<(), PublishError>,
    executed_at: Option<i64>,
    /// The part's live events by commit time: (executed_at, events), for the latency histogram.
    commits: Vec<(i64, u32)>,
}

struct Slot {
    name: String,
    filters: Vec<TableFilter>,
    addr: Addr<ConsumerActor>,
    /// Its counters and last error (`enabled`, `state` and `lag_seconds` are filled in from
    /// the router when a snapshot is taken).
    stats: ConsumerStatus,
    /// Source execution time of the newest event whose triggers were confirmed (ms).
    confirmed_executed_at: Option<i64>,
    /// Its filters take live events, not only SNAPSHOT ones: its SNAPSHOT rows go in the lane.
    live_too: bool,
}

/// The Manager actor.
pub struct Manager {
    cfg: ManagerConfig,
    connection: Option<ConnectionLink>,
    publisher: Option<Recipient<CancelBefore>>,
    slots: Vec<Slot>,
    router: Router<Part>,
    lossy: Option<LossyText>,
    /// Backfill reads in progress (when the service has a watermark table).
    windows: Option<Windows>,
    /// How each announced read is reported back.
    reads: BTreeMap<String, tokio::sync::oneshot::Sender<Outcome>>,
    /// Heartbeats and the lag they give (`[heartbeat] enabled`).
    heartbeat: Option<heartbeat::Tracker>,
    /// When live rows (not SNAPSHOT, not the service's own) last went to a consumer.
    live_at: Option<std::time::Instant>,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, consumers: Vec<ConsumerEntry>) -> Self {
        let router = Router::with_policies(
            consumers
                .iter()
                .map(|c| (c.enabled, c.poison, c.supervision.clone())),
        )
        .with_lane_parts(cfg.lane.parts);
        let slots = consumers
            .into_iter()
            .map(|c| Slot {
                stats: ConsumerStatus {
                    name: c.name.clone(),
                    ..Default::default()
                },
                confirmed_executed_at: None,
                live_too: c.filters.iter().any(TableFilter::takes_live),
                name: c.name,
                filters: c.filters,
                addr: c.addr,
            })
            .collect();
        Manager {
            lossy: cfg.lossy_text.map(LossyText::new),
            windows: cfg.watermark.clone().map(Windows::new),
            heartbeat: (cfg.heartbeat && cfg.watermark.is_some()).then(heartbeat::Tracker::new),
            cfg,
            connection: None,
            publisher: None,
            slots,
            router,
            reads: BTreeMap::new(),
            live_at: None,
        }
    }

    /// Tell the backfill how read `nonce` ended, and forget it.
    fn settle_read(&mut self, nonce: &str, outcome: Outcome) {
        if let Some(w) = self.windows.as_mut() {
            w.forget(nonce);
        }
        if let Some(tx) = self.reads.remove(nonce) {
            let _ = tx.send(outcome);
        }
    }

    /// Reads whose rows rode in `batch`: confirmed if it was acked, to be read again if not.
    fn settle_batch(&mut self, batch: BatchRef, acked: bool) {
        let settled = match self.windows.as_mut() {
            Some(w) => w.settled(batch, acked),
            None => return,
        };
        for (nonce, outcome) in settled {
            self.settle_read(&nonce, outcome);
        }
    }

    /// Let the Manager cancel stale publishes at once when an epoch ends (without it the
    /// publisher cancels them when it sees the first publish of the new epoch).
    pub fn with_publisher(mut self, publisher: Recipient<CancelBefore>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// The Canal subscription filter for the enabled consumers.
    pub fn filter(&self) -> String {
        let mut parts = vec![canal_filter(
            self.slots
                .iter()
                .enumerate()
                .filter(|(i, _)| self.router.is_enabled(*i))
                .flat_map(|(_, s)| s.filters.iter()),
        )];
        if !self.cfg.extra_filter.is_empty() {
            parts.push(self.cfg.extra_filter.clone());
        }
        if let Some(w) = &self.cfg.watermark {
            parts.push(TableFilter::new(&w.database, &w.table, &[]).canal_regex());
        }
        parts.retain(|p| !p.is_empty());
        parts.join(",")
    }

    /// Lossy text in `events`: counted, new columns logged; with the park policy, the rows to
    /// dead-letter with their reason.
    fn check_lossy(&mut self, events: &[ChangeEvent]) -> BTreeMap<usize, String> {
        let Some(tracker) = self.lossy.as_mut() else {
            return BTreeMap::new();
        };
        let found = lossy::scan(events);
        if found.is_empty() {
            return BTreeMap::new();
        }
        for c in tracker.record(events, &found) {
            tracing::warn!(
                table = %format!("{}.{}", c.database, c.table),
                column = %c.column,
                position = %c.first_position,
                policy = ?c.policy,
                fix = lossy::LOSSY_FIX,
                "text arrived with U+FFFD: canal decoded a non-UTF-8 column lossily"
            );
        }
        if tracker.policy() != OnLossyText::Park {
            return BTreeMap::new();
        }
        found
            .rows
            .iter()
            .filter_map(|(i, cols)| {
                let e = events.get(*i)?;
                Some((*i, LossyText::park_reason(e, cols)))
            })
            .collect()
    }

    fn route(&mut self, mut batch: Batch, ctx: &mut Context<Self>) {
        if let (Some(t), Some(wm)) = (self.heartbeat.as_mut(), &self.cfg.watermark) {
            t.scan(wm, &batch.events, now_ms());
        }
        if let Some(w) = self.windows.as_mut() {
            let scan = w.route(batch.batch, &batch.events);
            if let Some(events) = scan.events {
                batch.events = Arc::new(events);
            }
            for (nonce, why) in scan.failed {
                self.settle_read(&nonce, Outcome::Failed(why));
            }
        }
        let park = Arc::new(self.check_lossy(&batch.events));
        let keys = self
            .windows
            .as_ref()
            .map(|w| row_keys(w, &batch.events))
            .unwrap_or_default();
        let lane_rows = self.cfg.lane.rows.max(1);
        let watermark = self.cfg.watermark.as_ref();
        let mut parts = Vec::new();
        // live rows (not SNAPSHOT, not the service's own) went to a consumer
        let mut live = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !self.router.is_enabled(i) {
                continue;
            }
            let indices: Vec<usize> = batch
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    e.snapshot
                        .as_ref()
                        .and_then(|s| s.consumer.as_ref())
                        .is_none_or(|c| **c == *slot.name)
                })
                // the watermark table's changes are the service's own bookkeeping
                .filter(|(_, e)| watermark.is_none_or(|w| !w.is(e)))
                .filter(|(_, e)| slot.filters.iter().any(|f| f.matches(e)))
                .map(|(i, _)| i)
                .collect();
            if indices.is_empty() {
                continue;
            }
            live = live
                || indices.iter().any(|&j| {
                    batch
                        .events
                        .get(j)
                        .is_some_and(|e| e.event_type.is_row() && e.snapshot.is_none())
                });
            slot.stats.events += indices.len() as u64;
            let part = |indices: Vec<usize>| Part {
                events: batch.events.clone(),
                indices: Arc::new(indices),
                park: park.clone(),
            };
            parts.push((
                i,
                segments(
                    &batch.events,
                    indices,
                    slot.live_too,
                    lane_rows,
                    &keys,
                    part,
                ),
            ));
        }
        if live {
            self.live_at = Some(std::time::Instant::now());
        }
        self.router.route_segments(batch.batch, parts);
        self.run(ctx);
    }

    /// Carry out what the router decided.
    fn run(&mut self, ctx: &mut Context<Self>) {
        for cmd in self.router.take_commands() {
            match cmd {
                Command::Process {
                    slot,
                    batch,
                    seq,
                    part,
                    mode,
                } => self.process(slot, batch, seq, part, mode, ctx),
                Command::RetryAfter { slot, delay } => {
                    ctx.run_later(delay, move |act, ctx| {
                        act.router.retry(slot);
                        act.run(ctx);
                    });
                }
                Command::Ack(b) => {
                    self.settle_batch(b, true);
                    if let Some(c) = &self.connection {
                        c.ack.do_send(AckBatch(b));
                    }
                }
                Command::Rollback { batch, reason } => {
                    if let Some(c) = &self.connection {
                        c.rollback.do_send(RollbackBatch { batch, reason });
                    }
                }
                Command::Release(b) => {
                    self.settle_batch(b, false);
                    if let Some(c) = &self.connection {
                        c.release.do_send(ReleaseBatch(b));
                    }
                }
                Command::CancelBefore(epoch) => {
                    if let Some(p) = &self.publisher {
                        p.do_send(CancelBefore(epoch));
                    }
                }
            }
        }
    }

    fn process(
        &mut self,
        i: usize,
        batch: BatchRef,
        seq: u32,
        part: Part,
        mode: Mode,
        ctx: &mut Context<Self>,
    ) {
        let last_at = part
            .indices
            .last()
            .and_then(|&j| part.events.get(j))
            .map(|e| e.executed_at);
        let commits = if self.cfg.commit_to_confirm.is_some() {
            commit_times(&part)
        } else {
            Vec::new()
        };
        let msg = ProcessBatch {
            batch,
            mode,
            events: part.events,
            indices: part.indices,
            park: part.park,
        };
        let fut = self.slots[i].addr.send(msg);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let outcome = match res {
                Ok(Ok(processed)) => {
                    let stats = &mut act.slots[i].stats;
                    stats.triggers += processed.triggers as u64;
                    stats.errors += processed.event_errors as u64;
                    if processed.last_error.is_some() {
                        stats.last_error = processed.last_error;
                    }
                    stats.parked += processed.parked as u64;
                    let me = ctx.address();
                    actix::spawn(async move {
                        let result = match processed.confirmed.await {
                            Ok(r) => r,
                            Err(_) => Err(PublishError::Unavailable(
                                "the publisher dropped the confirmation".into(),
                            )),
                        };
                        me.do_send(PartDone {
                            slot: i,
                            batch,
                            seq,
                            result,
                            executed_at: last_at,
                            commits,
                        });
                    });
                    Processed::Published
                }
                Ok(Err(failure)) => act.part_failed(i, failure),
                Err(mailbox) => {
                    // the actor stopped while handling it (restart in progress)
                    tracing::debug!(error = %mailbox, "consumer mailbox error");
                    Processed::Unavailable {
                        retry_in: Duration::from_millis(50),
                    }
                }
            };
            let failed = matches!(outcome, Processed::Failed { .. });
            act.router
                .processed(i, batch, seq, outcome, std::time::Instant::now());
            if failed {
                act.log_restart(i);
            }
            act.run(ctx);
        }));
    }

    fn part_failed(&mut self, i: usize, failure: ProcessFailure) -> Processed {
        let stats = &mut self.slots[i].stats;
        stats.errors += 1;
        stats.last_error = Some(failure.to_string());
        Processed::Failed { error: failure }
    }

    /// Say what the router decided about a consumer that failed.
    fn log_restart(&self, i: usize) {
        let slot = &self.slots[i];
        let restarts = self.router.restarts(i);
        let error = slot.stats.last_error.as_deref().unwrap_or("-");
        if self.router.state(i) == ConsumerState::Quarantined {
            tracing::error!(
                consumer = %slot.name,
                restarts,
                error,
                "consumer quarantined: its batches are parked or rolled back (on_poison) until it is enabled again"
            );
        } else {
            tracing::warn!(consumer = %slot.name, restarts, error, "consumer failed; retrying its part after a backoff");
        }
    }
}

/// The keys each event of a batch touches, for the SNAPSHOT lane (see the module docs): a
/// SNAPSHOT row's, and a live row's on a table whose rows a backfill emitted.
pub(crate) fn row_keys(windows: &Windows, events: &[ChangeEvent]) -> Vec<Vec<String>> {
    let name = |e: &ChangeEvent, key: &str| format!("{}\0{}\0{key}", e.database, e.table);
    events
        .iter()
        .map(|e| match &e.snapshot {
            Some(s) => vec![name(e, &s.key)],
            None if e.event_type.is_row() => windows
                .key_columns(&e.database, &e.table)
                .map(|cols| {
                    snapshot::live_keys(e, cols)
                        .iter()
                        .map(|k| name(e, k))
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        })
        .collect()
}

/// A consumer's events of one batch (`indices`, in order) as the router's parts: one live part
/// for a consumer that gets only SNAPSHOT events (`live_too` false); otherwise the runs of live
/// and of SNAPSHOT events in order, SNAPSHOT runs cut every `lane_rows` rows and where one
/// backfill read's rows end (so a read's parts, and the bulks cut in them, are the same
/// whether its rows came alone or with another's), each part with the keys of its events
/// (`keys`, by event index; empty: none known).
pub(crate) fn segments<P>(
    events: &[ChangeEvent],
    indices: Vec<usize>,
    live_too: bool,
    lane_rows: usize,
    keys: &[Vec<String>],
    part: impl Fn(Vec<usize>) -> P,
) -> Vec<Segment<P>> {
    if !live_too {
        return vec![Segment {
            part: part(indices),
            lane: Lane::Live,
            keys: Vec::new(),
        }];
    }
    let is_snapshot = |i: usize| {
        events
            .get(i)
            .is_some_and(|e| e.event_type == crate::event::EventType::Snapshot)
    };
    let mut out = Vec::new();
    let mut run: Vec<usize> = Vec::new();
    let mut run_keys: Vec<String> = Vec::new();
    let mut flush = |run: &mut Vec<usize>, run_keys: &mut Vec<String>| {
        if let Some(&first) = run.first() {
            out.push(Segment {
                lane: if is_snapshot(first) {
                    Lane::Snapshot
                } else {
                    Lane::Live
                },
                part: part(std::mem::take(run)),
                keys: std::mem::take(run_keys),
            });
        }
    };
    let read = |i: usize| events.get(i).and_then(ChangeEvent::read);
    for i in indices {
        let snap = is_snapshot(i);
        if let Some(&first) = run.first()
            && (snap != is_snapshot(first)
                || (snap && (run.len() >= lane_rows || other_read(read(first), read(i)))))
        {
            flush(&mut run, &mut run_keys);
        }
        run.push(i);
        if let Some(k) = keys.get(i) {
            run_keys.extend(k.iter().cloned());
        }
    }
    flush(&mut run, &mut run_keys);
    out
}

/// The live (not SNAPSHOT) events of a part by commit time: `(executed_at, count)`, in order.
/// `executed_at` has the binlog's one-second resolution, so a part has few distinct values.
fn commit_times(part: &Part) -> Vec<(i64, u32)> {
    let mut out: Vec<(i64, u32)> = Vec::new();
    for e in part.indices.iter().filter_map(|&i| part.events.get(i)) {
        if e.event_type == crate::event::EventType::Snapshot || e.executed_at <= 0 {
            continue;
        }
        match out.last_mut() {
            Some((at, n)) if *at == e.executed_at => *n += 1,
            _ => out.push((e.executed_at, 1)),
        }
    }
    out
}

impl Actor for Manager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<AttachConnection> for Manager {
    type Result = ();

    fn handle(&mut self, msg: AttachConnection, _: &mut Context<Self>) {
        self.connection = Some(msg.0);
    }
}

impl Handler<CanalEvent> for Manager {
    type Result = ();

    fn handle(&mut self, msg: CanalEvent, ctx: &mut Context<Self>) {
        match msg {
            CanalEvent::Batch(batch) => self.route(batch, ctx),
            CanalEvent::Reset { epoch, reason } => {
                tracing::info!(epoch, reason = %reason, "batch tracking reset");
                self.router.reset(epoch);
                self.run(ctx);
            }
            CanalEvent::Fatal { error } => {
                tracing::error!(error = %error, "canal connection gave up; stopping");
                System::current().stop_with_code(2);
            }
        }
    }
}

impl Handler<ExpectChunk> for Manager {
    type Result = ();

    fn handle(&mut self, msg: ExpectChunk, _: &mut Context<Self>) {
        match self.windows.as_mut() {
            Some(w) => {
                self.reads.insert(msg.plan.nonce.clone(), msg.done);
                w.expect(msg.plan);
            }
            None => {
                let _ = msg.done.send(Outcome::Failed(
                    "the service watches no watermark table".into(),
                ));
            }
        }
    }
}

impl Handler<ChunkRows> for Manager {
    type Result = bool;

    fn handle(&mut self, msg: ChunkRows, _: &mut Context<Self>) -> bool {
        self.windows
            .as_mut()
            .is_some_and(|w| w.rows(&msg.nonce, msg.rows))
    }
}

impl Handler<DdlSeen> for Manager {
    type Result = u64;

    fn handle(&mut self, msg: DdlSeen, _: &mut Context<Self>) -> u64 {
        self.windows
            .as_ref()
            .map_or(0, |w| w.ddl_seen(&msg.0, &msg.1))
    }
}

impl Handler<ForgetChunk> for Manager {
    type Result = Option<String>;

    fn handle(&mut self, msg: ForgetChunk, _: &mut Context<Self>) -> Option<String> {
        self.reads.remove(&msg.0);
        let w = self.windows.as_mut()?;
        let phase = w.forget(&msg.0)?;
        Some(phase.explain(w.table()))
    }
}

impl Handler<HeartbeatNote> for Manager {
    type Result = ();

    fn handle(&mut self, msg: HeartbeatNote, _: &mut Context<Self>) {
        if let Some(t) = self.heartbeat.as_mut() {
            t.note(msg.0);
        }
    }
}

impl Handler<PartDone> for Manager {
    type Result = ();

    fn handle(&mut self, msg: PartDone, ctx: &mut Context<Self>) {
        if let Ok(()) = msg.result
            && let Some(at) = msg.executed_at
        {
            self.slots[msg.slot].confirmed_executed_at = Some(at);
        }
        if msg.result.is_ok()
            && let Some(h) = &self.cfg.commit_to_confirm
        {
            let now = now_ms();
            for &(at, n) in &msg.commits {
                let secs = (now - at).max(0) as f64 / 1000.0;
                for _ in 0..n {
                    h.observe(secs);
                }
            }
        }
        if let Err(e) = &msg.result
            && !matches!(e, PublishError::Cancelled { .. })
        {
            let slot = &mut self.slots[msg.slot];
            slot.stats.last_error = Some(e.to_string());
            if matches!(e, PublishError::Unroutable { .. }) {
                tracing::warn!(
                    consumer = %slot.name,
                    batch = %msg.batch,
                    error = %e,
                    "the broker could not route some triggers"
                );
            } else {
                tracing::warn!(
                    consumer = %slot.name,
                    batch = %msg.batch,
                    error = %e,
                    transient = e.is_transient(),
                    "publish failed; rolling back the batch"
                );
            }
        }
        let result = msg.result.map_err(PartError::from);
        self.router.confirmed(msg.slot, msg.batch, msg.seq, result);
        self.run(ctx);
    }
}

impl Handler<SetEnabled> for Manager {
    type Result = ResponseFuture<Result<(), SetEnabledError>>;

    fn handle(&mut self, msg: SetEnabled, ctx: &mut Context<Self>) -> Self::Result {
        let Some(i) = self.slots.iter().position(|s| s.name == msg.name) else {
            return Box::pin(async move { Err(SetEnabledError::UnknownConsumer(msg.name)) });
        };
        self.router.set_enabled(i, msg.enabled);
        tracing::info!(consumer = %msg.name, enabled = msg.enabled, "consumer state changed");
        self.run(ctx);
        let (tx, rx) = tokio::sync::oneshot::channel();
        match &self.connection {
            Some(conn) => conn.filter.do_send(SetFilter {
                filter: self.filter(),
                applied: Some(tx),
            }),
            None => {
                let _ = tx.send(());
            }
        }
        let state = if msg.enabled { "enabled" } else { "disabled" };
        Box::pin(async move {
            match tokio::time::timeout(FILTER_APPLY_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(SetEnabledError::NotInForce {
                    name: msg.name,
                    state,
                    timeout: FILTER_APPLY_TIMEOUT,
                }),
            }
        })
    }
}

impl Handler<GetManagerStatus> for Manager {
    type Result = MessageResult<GetManagerStatus>;

    fn handle(&mut self, _: GetManagerStatus, _: &mut Context<Self>) -> Self::Result {
        let now = now_ms();
        let in_flight = self.router.batches_in_flight();
        let consumers = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut st = s.stats.clone();
                st.enabled = self.router.is_enabled(i);
                st.state = self.router.state(i);
                st.restarts = u64::from(self.router.restarts(i));
                // nothing queued or unconfirmed anywhere: the consumer is caught up
                let caught_up = in_flight == 0 && self.router.queued(i) == 0;
                st.lag_seconds = s.confirmed_executed_at.map(|t| {
                    if caught_up {
                        0.0
                    } else {
                        (now - t).max(0) as f64 / 1000.0
                    }
                });
                st
            })
            .collect();
        MessageResult(ManagerStatus {
            batches_in_flight: in_flight,
            consumers,
            filter: self.filter(),
            lossy_text: self
                .lossy
                .as_ref()
                .map(LossyText::columns)
                .unwrap_or_default(),
            heartbeat: self.heartbeat.as_ref().map(|t| t.status(now)),
            live_at: self.live_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Row, SnapshotOrigin};

    fn event(t: EventType) -> ChangeEvent {
        let mut e = ChangeEvent {
            destination: "d".into(),
            database: "db".into(),
            table: "t".into(),
            event_type: t,
            data: Row::default(),
            old: None,
            changed: Default::default(),
            primary_keys: Default::default(),
            position: Default::default(),
            executed_at: 0,
            is_ddl: false,
            sql: None,
            snapshot: None,
        };
        if t == EventType::Snapshot {
            e.snapshot = Some(Arc::new(SnapshotOrigin {
                backfill: "b".into(),
                key: "[1]".into(),
                consumer: None,
            }));
        }
        e
    }

    /// A consumer that gets live events too takes SNAPSHOT runs in the lane, cut every
    /// `lane_rows` rows, with their keys; one that gets only SNAPSHOT events takes it whole.
    #[test]
    fn snapshot_runs_are_cut_for_the_lane() {
        use EventType::{Insert as I, Snapshot as S};
        let events: Vec<ChangeEvent> = [I, S, S, S, I, S].into_iter().map(event).collect();
        let keys: Vec<Vec<String>> = (0..events.len()).map(|i| vec![format!("k{i}")]).collect();
        let cut = |live_too| {
            segments(&events, (0..6).collect(), live_too, 2, &keys, |ix| ix)
                .into_iter()
                .map(|s| (s.lane, s.part, s.keys.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cut(true),
            vec![
                (Lane::Live, vec![0], 1),
                (Lane::Snapshot, vec![1, 2], 2),
                (Lane::Snapshot, vec![3], 1),
                (Lane::Live, vec![4], 1),
                (Lane::Snapshot, vec![5], 1),
            ]
        );
        assert_eq!(cut(false), vec![(Lane::Live, (0..6).collect(), 0)]);
    }

    /// Two backfill reads' rows in one batch (each read's rows share its high watermark's
    /// position): the lane cuts them where one read ends, so each read's parts are those it
    /// makes alone.
    #[test]
    fn lane_parts_never_span_two_backfill_reads() {
        use EventType::Snapshot as S;
        let mut events: Vec<ChangeEvent> = (0..5).map(|_| event(S)).collect();
        for (i, e) in events.iter_mut().enumerate() {
            e.position.offset = if i < 3 { 100 } else { 200 };
        }
        let parts = segments(&events, (0..5).collect(), true, 2, &[], |ix| ix)
            .into_iter()
            .map(|s| (s.lane, s.part))
            .collect::<Vec<_>>();
        assert_eq!(
            parts,
            vec![
                (Lane::Snapshot, vec![0, 1]),
                (Lane::Snapshot, vec![2]),
                (Lane::Snapshot, vec![3, 4]),
            ]
        );
    }
}
