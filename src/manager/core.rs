//! The Manager's bookkeeping as a plain state machine (no I/O, no actix).
//!
//! [`Router`] owns, per consumer *slot*, the queue of parts (the events of one batch that the
//! consumer's filters match) and, per batch, the set of slots whose part is not finished. It
//! turns inputs (a routed batch, a part processed or failed by its consumer, a publish confirmed
//! or failed, an epoch reset, enable/disable) into [`Command`]s for the actor shell: hand a part
//! to a consumer, retry later, ack, roll back, release, cancel stale publishes.
//!
//! Rules:
//! - each consumer has at most one part in its actor at a time; its *live* parts are taken in
//!   batch order, so their triggers leave in binlog order;
//! - SNAPSHOT parts (a backfill's rows, [`Lane::Snapshot`]) travel in a lane of their own per
//!   consumer, so a live change is not queued behind a chunk's rows. The per-key order the
//!   backfill promises is kept by two rules on the order the parts were routed in (batch, then
//!   position in the batch): a SNAPSHOT part goes to the consumer only once every live part
//!   routed before it has gone (a row's earlier live events leave before its SNAPSHOT); a live
//!   part goes only once no SNAPSHOT part routed before it that carries one of its keys is
//!   unconfirmed (a row's SNAPSHOT is at the broker before its later live events leave). At most
//!   `lane_parts` SNAPSHOT parts of a consumer are out (in its actor or awaiting their confirms)
//!   at a time, so a live part waits behind at most that many parts' messages at the publisher;
//!   live parts go first when both may;
//! - a batch is acked only when every slot's parts of it (live and SNAPSHOT) are processed *and*
//!   confirmed; a failed part rolls the batch back (the connection then starts a new epoch). A
//!   later batch may be confirmed first: the connection acks in batch order anyway;
//! - a batch is *released* (it holds nothing downstream any more) when it was abandoned — its
//!   epoch ended or it failed — and its last part finished; the connection counts abandoned
//!   batches against its in-flight bounds until then, so abandoned work cannot pile up;
//! - pending parts are tracked as a *set* of (slot, part number) per batch, so finishing a part
//!   twice (a disable racing with its completion) can never ack a batch early;
//! - disabling a consumer drops its queued parts (their batches no longer wait for it) but the
//!   part inside its actor finishes normally, so its triggers are confirmed before any ack;
//! - poison (`on_poison = "park"`, the default): a part that fails in its consumer `attempts`
//!   times is run once more in *park* mode (events that fail become dead letters, the rest
//!   triggers normally); triggers the broker cannot route are re-run as dead letters; a
//!   quarantined consumer dead-letters its parts unprocessed. The batch then proceeds for
//!   everyone: no rollback, so the healthy consumers see no duplicates. With
//!   `on_poison = "stall"` failures are retried forever and unroutable triggers or a quarantine
//!   roll the batch back (nothing is acked until an operator acts);
//! - supervision has one owner, here: a consumer that fails a part is restarted by its actor's
//!   supervisor (a fresh instance), and the Router counts that restart, retries the part after
//!   the backoff ([`SupervisionConfig`]) and quarantines the consumer after more than
//!   `max_restarts` restarts within `quarantine_window` (enabling it lifts the quarantine). The
//!   consumer actor keeps no supervision state of its own.

use crate::canal::connection::BatchRef;
pub use crate::consumer::policy::{Mode, OnPoison, PoisonPolicy, ProcessFailure};
use crate::publisher::{PublishError, Returned};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a failing consumer is restarted and when it is quarantined (`[consumers]` settings).
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisionConfig {
    /// The backoff before a failed part is retried: `restart_min`, doubling per restart up to
    /// `restart_max`.
    pub restart_min: Duration,
    pub restart_max: Duration,
    /// More restarts than this within `quarantine_window` quarantine the consumer.
    pub max_restarts: u32,
    pub quarantine_window: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig::from(&crate::config::ConsumersConfig::default())
    }
}

impl From<&crate::config::ConsumersConfig> for SupervisionConfig {
    fn from(c: &crate::config::ConsumersConfig) -> Self {
        SupervisionConfig {
            restart_min: c.restart_min,
            restart_max: c.restart_max,
            max_restarts: c.max_restarts.get(),
            quarantine_window: c.quarantine_window,
        }
    }
}

/// Index of a consumer in the Manager.
pub type SlotId = usize;

/// What a consumer is doing, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerState {
    /// Enabled and processing (or idle).
    #[default]
    Running,
    /// Its last part failed; it is restarted and retries that part after a backoff.
    Restarting,
    /// It failed too often; its batches are rolled back until it is enabled again.
    Quarantined,
    /// Disabled by the operator: its events are not routed to it.
    Disabled,
}

impl ConsumerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Running => "running",
            ConsumerState::Restarting => "restarting",
            ConsumerState::Quarantined => "quarantined",
            ConsumerState::Disabled => "disabled",
        }
    }
}

impl std::fmt::Display for ConsumerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a consumer answered a part.
#[derive(Debug, Clone, PartialEq)]
pub enum Processed {
    /// Its triggers were handed to the publisher; a [`Router::confirmed`] follows.
    Published,
    /// It failed (error or panic) and its actor restarts it: the Router counts the restart,
    /// then retries the same part after the backoff, or quarantines the consumer.
    Failed { error: ProcessFailure },
    /// It could not be asked (its actor was between instances): transient; retry the same part
    /// after `retry_in`; not a restart.
    Unavailable { retry_in: Duration },
}

/// What a park run says of a part that could not be asked ([`Processed::Unavailable`]).
const UNAVAILABLE: &str = "the consumer was between instances (its mailbox was closed)";

/// Why a part's publish failed, as it bears on the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// The batch rolls back and comes again: transient or definite as the [`PublishError`]
    /// says (a definite one, such as a queue topology mismatch, comes back the same way until
    /// an operator acts, so nothing is lost in the meantime).
    #[error(transparent)]
    Publish(PublishError),
    /// Definite: the broker could not route these triggers (a rule's exchange or queue does
    /// not exist); parked or rolled back by the poison policy.
    #[error("{}", unroutable_text(.0))]
    Unroutable(Vec<Returned>),
}

/// How a failed publish bears on its part: messages the broker could not route as configured
/// (returned, or refused because their exchange is gone) are [`PartError::Unroutable`], to be
/// parked by policy; every other failure rolls the batch back and it comes again.
/// One mapping for the Manager and the delivery simulation.
impl From<PublishError> for PartError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Unroutable { returned } => PartError::Unroutable(returned),
            e => PartError::Publish(e),
        }
    }
}

/// [`PartError::Unroutable`]'s text: [`PublishError::Unroutable`]'s.
fn unroutable_text(returned: &[Returned]) -> String {
    PublishError::Unroutable {
        returned: returned.to_vec(),
    }
    .to_string()
}

impl PartError {
    /// Transient or definite: see [the crate docs](crate#errors).
    pub fn is_transient(&self) -> bool {
        match self {
            PartError::Publish(e) => e.is_transient(),
            PartError::Unroutable(_) => false,
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command<P> {
    /// Hand this part to the slot's consumer; answer with [`Router::processed`]. `seq` is the
    /// part's number within its batch (for this slot): answers carry it back.
    Process {
        slot: SlotId,
        batch: BatchRef,
        seq: u32,
        part: P,
        mode: Mode,
    },
    /// Call [`Router::retry`] for this slot after `delay`.
    RetryAfter { slot: SlotId, delay: Duration },
    /// Every trigger of this batch is confirmed: ack it (the connection acks in order).
    Ack(BatchRef),
    /// Roll back: the batch cannot be completed.
    Rollback { batch: BatchRef, reason: String },
    /// An abandoned batch holds no work downstream any more.
    Release(BatchRef),
    /// Publishes of epochs below this one are stale: cancel what is unpublished.
    CancelBefore(u64),
}

/// The lane a part travels in (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Live changes (and everything of a consumer that gets no live events): in batch order.
    Live,
    /// A backfill's SNAPSHOT rows, beside the live parts.
    Snapshot,
}

/// One part of a batch for one slot, as [`Router::route_segments`] takes it: the events (`P`),
/// the lane, and the keys of the rows it touches. A key is any text naming one row of one table
/// (the shell uses database, table and the primary key's values); a live part without keys never
/// waits for a SNAPSHOT part.
#[derive(Debug, Clone)]
pub struct Segment<P> {
    pub part: P,
    pub lane: Lane,
    pub keys: Vec<String>,
}

/// Where a part stands in the order of routing: the batch's arrival number, then its number
/// within the batch.
type Order = (u64, u32);

#[derive(Debug)]
struct Item<P> {
    batch: BatchRef,
    seq: u32,
    order: Order,
    lane: Lane,
    /// The rows it touches (see [`Segment`]).
    keys: Arc<HashSet<String>>,
    part: P,
    mode: Mode,
    /// Failures of this part in its consumer so far.
    failures: u32,
}

#[derive(Debug)]
struct Slot<P> {
    enabled: bool,
    quarantined: bool,
    retrying: bool,
    policy: PoisonPolicy,
    supervision: SupervisionConfig,
    /// Restarts since start.
    restarts: u32,
    /// When the restarts within `quarantine_window` happened.
    recent: VecDeque<Instant>,
    /// Live parts, in order.
    queue: VecDeque<Item<P>>,
    /// SNAPSHOT parts, in order.
    lane: VecDeque<Item<P>>,
    /// Parts handed to the publisher, kept until confirmed (a park run may need them; a
    /// SNAPSHOT part holds back the live parts after it that touch its keys until then).
    awaiting: BTreeMap<(BatchRef, u32), Item<P>>,
    /// The front of this lane's queue is inside the consumer actor.
    in_consumer: Option<Lane>,
    /// A `RetryAfter` is outstanding.
    waiting_retry: bool,
}

impl<P> Slot<P> {
    /// Its consumer was restarted at `now`: the delay before the part is retried, or `None`
    /// when that is one restart too many within the window (quarantined).
    fn restarted(&mut self, now: Instant) -> Option<Duration> {
        let sup = &self.supervision;
        let delay =
            crate::backoff::Backoff::new(sup.restart_min, sup.restart_max).base(self.restarts);
        self.restarts = self.restarts.saturating_add(1);
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > sup.quarantine_window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() > sup.max_restarts as usize {
            self.quarantined = true;
            None
        } else {
            Some(delay)
        }
    }

    fn queue_mut(&mut self, lane: Lane) -> &mut VecDeque<Item<P>> {
        match lane {
            Lane::Live => &mut self.queue,
            Lane::Snapshot => &mut self.lane,
        }
    }

    /// The part inside the consumer actor.
    fn current_mut(&mut self) -> Option<&mut Item<P>> {
        let lane = self.in_consumer?;
        self.queue_mut(lane).front_mut()
    }

    /// SNAPSHOT parts out: in the consumer or awaiting their confirms.
    fn lane_out(&self) -> usize {
        usize::from(self.in_consumer == Some(Lane::Snapshot))
            + self
                .awaiting
                .values()
                .filter(|i| i.lane == Lane::Snapshot)
                .count()
    }

    /// Whether the live part `v` must wait: an unconfirmed SNAPSHOT part routed before it
    /// carries one of its keys.
    fn held(&self, v: &Item<P>) -> bool {
        if v.keys.is_empty() {
            return false;
        }
        self.lane
            .iter()
            .chain(self.awaiting.values().filter(|i| i.lane == Lane::Snapshot))
            .any(|l| l.order < v.order && l.keys.iter().any(|k| v.keys.contains(k)))
    }

    /// The lane whose front goes to the consumer next, if any may (see the module docs).
    fn next_lane(&self, lane_parts: usize) -> Option<Lane> {
        if let Some(v) = self.queue.front()
            && !self.held(v)
        {
            return Some(Lane::Live);
        }
        let l = self.lane.front()?;
        let after_live = self.queue.front().is_none_or(|v| v.order > l.order);
        (after_live && self.lane_out() < lane_parts).then_some(Lane::Snapshot)
    }
}

#[derive(Debug, Default)]
struct Track {
    /// (slot, part number) not yet finished.
    pending: BTreeSet<(SlotId, u32)>,
    /// A part of it failed or was dropped: it can only be released, never acked.
    failed: bool,
    rolled_back: bool,
}

/// SNAPSHOT parts of one consumer out at a time, by default ([`Router::with_lane_parts`]).
pub const LANE_PARTS: usize = 2;

/// The Manager's core. See the module docs.
#[derive(Debug)]
pub struct Router<P> {
    slots: Vec<Slot<P>>,
    batches: BTreeMap<BatchRef, Track>,
    epoch: u64,
    /// Batches routed so far (their arrival numbers).
    routed: u64,
    lane_parts: usize,
    out: Vec<Command<P>>,
}

impl<P: Clone> Router<P> {
    /// A router for consumers with these enabled flags and the default poison policy and
    /// supervision.
    pub fn new(enabled: impl IntoIterator<Item = bool>) -> Self {
        Self::with_policies(
            enabled
                .into_iter()
                .map(|e| (e, PoisonPolicy::default(), SupervisionConfig::default())),
        )
    }

    /// A router for consumers with these enabled flags, poison policies and supervision.
    pub fn with_policies(
        slots: impl IntoIterator<Item = (bool, PoisonPolicy, SupervisionConfig)>,
    ) -> Self {
        Router {
            slots: slots
                .into_iter()
                .map(|(enabled, policy, supervision)| Slot {
                    enabled,
                    quarantined: false,
                    retrying: false,
                    supervision,
                    restarts: 0,
                    recent: VecDeque::new(),
                    policy: PoisonPolicy {
                        attempts: policy.attempts.max(1),
                        ..policy
                    },
                    queue: VecDeque::new(),
                    lane: VecDeque::new(),
                    awaiting: BTreeMap::new(),
                    in_consumer: None,
                    waiting_retry: false,
                })
                .collect(),
            batches: BTreeMap::new(),
            epoch: 0,
            routed: 0,
            lane_parts: LANE_PARTS,
            out: Vec::new(),
        }
    }

    /// At most `n` (at least 1) SNAPSHOT parts of a consumer out at a time.
    pub fn with_lane_parts(mut self, n: usize) -> Self {
        self.lane_parts = n.max(1);
        self
    }

    pub fn is_enabled(&self, slot: SlotId) -> bool {
        self.slots.get(slot).is_some_and(|s| s.enabled)
    }

    pub fn state(&self, slot: SlotId) -> ConsumerState {
        let s = &self.slots[slot];
        if !s.enabled {
            ConsumerState::Disabled
        } else if s.quarantined {
            ConsumerState::Quarantined
        } else if s.retrying {
            ConsumerState::Restarting
        } else {
            ConsumerState::Running
        }
    }

    /// Restarts of this slot's consumer since start.
    pub fn restarts(&self, slot: SlotId) -> u32 {
        self.slots[slot].restarts
    }

    /// Parts waiting for (or inside) this slot's consumer, in both lanes.
    pub fn queued(&self, slot: SlotId) -> usize {
        self.slots[slot].queue.len() + self.slots[slot].lane.len()
    }

    /// Batches of the current epoch not yet acked or rolled back.
    pub fn batches_in_flight(&self) -> usize {
        self.batches
            .keys()
            .filter(|b| b.epoch == self.epoch)
            .count()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Per slot: its live and SNAPSHOT queues (batch, part number, order) and what is in its
    /// consumer (tests).
    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.slots.iter().enumerate() {
            let q = |q: &VecDeque<Item<P>>| -> Vec<_> {
                q.iter().map(|i| (i.batch.id, i.seq, i.order)).collect()
            };
            out += &format!(
                "slot {i}: live {:?} lane {:?} awaiting {:?} in consumer {:?} retry {}; ",
                q(&s.queue),
                q(&s.lane),
                s.awaiting.keys().collect::<Vec<_>>(),
                s.in_consumer,
                s.waiting_retry
            );
        }
        out + &format!("batches {:?}", self.batches.keys().collect::<Vec<_>>())
    }

    /// Commands decided since the last call, in order.
    pub fn take_commands(&mut self) -> Vec<Command<P>> {
        std::mem::take(&mut self.out)
    }

    /// A new batch: `parts` are the slots whose filters match some of its events, with their
    /// part (one live part each, without keys). Parts for disabled slots are ignored.
    pub fn route(&mut self, batch: BatchRef, parts: Vec<(SlotId, P)>) {
        self.route_segments(
            batch,
            parts
                .into_iter()
                .map(|(slot, part)| {
                    (
                        slot,
                        vec![Segment {
                            part,
                            lane: Lane::Live,
                            keys: Vec::new(),
                        }],
                    )
                })
                .collect(),
        )
    }

    /// A new batch: per slot whose filters match some of its events, its parts in the batch's
    /// order, each in its lane (numbered from 0 in that order). Slots without parts, disabled
    /// slots and a second entry for a slot are ignored.
    pub fn route_segments(&mut self, batch: BatchRef, parts: Vec<(SlotId, Vec<Segment<P>>)>) {
        if batch.epoch < self.epoch {
            // fetched before an epoch we already know ended: nothing of it runs
            self.out.push(Command::Release(batch));
            return;
        }
        if batch.epoch > self.epoch {
            self.reset(batch.epoch);
        }
        self.routed += 1;
        let arrival = self.routed;
        let mut track = Track::default();
        let mut touched = BTreeSet::new();
        for (slot, segments) in parts {
            let Some(s) = self.slots.get_mut(slot) else {
                continue;
            };
            if !s.enabled || segments.is_empty() || !touched.insert(slot) {
                continue;
            }
            for (seq, seg) in (0u32..).zip(segments) {
                track.pending.insert((slot, seq));
                s.queue_mut(seg.lane).push_back(Item {
                    batch,
                    seq,
                    order: (arrival, seq),
                    lane: seg.lane,
                    keys: Arc::new(seg.keys.into_iter().collect()),
                    part: seg.part,
                    mode: Mode::Normal,
                    failures: 0,
                });
            }
        }
        if track.pending.is_empty() {
            self.out.push(Command::Ack(batch));
            return;
        }
        self.batches.insert(batch, track);
        for slot in touched {
            self.dispatch(slot);
        }
    }

    fn dispatch(&mut self, slot: SlotId) {
        let lane_parts = self.lane_parts;
        let s = &mut self.slots[slot];
        if s.in_consumer.is_some() || s.waiting_retry {
            return;
        }
        let parks = s.policy.on_poison == OnPoison::Park;
        let quarantined = s.quarantined;
        if quarantined && !parks {
            // nothing of it can be processed: its batches roll back until it is enabled again
            return self.refuse_all(slot);
        }
        let Some(lane) = s.next_lane(lane_parts) else {
            return;
        };
        s.in_consumer = Some(lane);
        if let Some(item) = s.queue_mut(lane).front_mut() {
            if quarantined && parks && item.mode == Mode::Normal {
                item.mode = Mode::ParkAll {
                    reason: "the consumer is quarantined".into(),
                };
            }
            self.out.push(Command::Process {
                slot,
                batch: item.batch,
                seq: item.seq,
                part: item.part.clone(),
                mode: item.mode.clone(),
            });
        }
    }

    /// The slot's consumer answered part `seq` of `batch`; `now` times its restarts.
    pub fn processed(
        &mut self,
        slot: SlotId,
        batch: BatchRef,
        seq: u32,
        outcome: Processed,
        now: Instant,
    ) {
        let s = &mut self.slots[slot];
        let is_current = s
            .current_mut()
            .is_some_and(|i| i.batch == batch && i.seq == seq);
        if !is_current {
            return;
        }
        let Some(lane) = s.in_consumer.take() else {
            return;
        };
        match outcome {
            Processed::Published => {
                // its publish is confirmed or cancelled later; `confirmed` follows either way
                let Some(item) = s.queue_mut(lane).pop_front() else {
                    return;
                };
                if !matches!(item.mode, Mode::ParkAll { .. }) {
                    s.retrying = false;
                }
                s.awaiting.insert((batch, seq), item);
                self.dispatch(slot);
            }
            Processed::Failed { error } => {
                let retry_in = s.restarted(now);
                self.failed(slot, lane, retry_in, &error);
            }
            Processed::Unavailable { retry_in } => {
                self.failed(slot, lane, Some(retry_in), &UNAVAILABLE)
            }
        }
    }

    /// The front part of `lane` failed in the slot's consumer: retry it after `retry_in`, or,
    /// with `None`, the consumer is quarantined.
    fn failed(
        &mut self,
        slot: SlotId,
        lane: Lane,
        retry_in: Option<Duration>,
        error: &dyn std::fmt::Display,
    ) {
        let epoch = self.epoch;
        let s = &mut self.slots[slot];
        s.retrying = true;
        let Some(front) = s.queue_mut(lane).front() else {
            return;
        };
        let (batch, seq) = (front.batch, front.seq);
        if batch.epoch < epoch || !s.enabled {
            // abandoned or disabled while it was inside the consumer: do not retry it
            s.queue_mut(lane).pop_front();
            let ok = batch.epoch == epoch;
            self.part_finished(slot, batch, seq, ok);
            self.dispatch(slot);
            return;
        }
        let parks = s.policy.on_poison == OnPoison::Park;
        let attempts = s.policy.attempts;
        if let Some(item) = s.queue_mut(lane).front_mut() {
            item.failures += 1;
            if parks && item.mode == Mode::Normal && item.failures >= attempts {
                item.mode = Mode::ParkFailures {
                    reason: format!("failed {} times: {error}", item.failures),
                };
            }
        }
        match retry_in {
            Some(delay) => {
                s.waiting_retry = true;
                self.out.push(Command::RetryAfter { slot, delay });
            }
            // quarantined: dead-letter its parts (park), or roll their batches back (stall)
            None => self.dispatch(slot),
        }
    }

    /// A quarantined slot that stalls: every queued part is dropped and its batch rolled back.
    fn refuse_all(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot];
        let mut dropped: Vec<(Order, BatchRef, u32)> = s
            .queue
            .drain(..)
            .chain(s.lane.drain(..))
            .map(|i| (i.order, i.batch, i.seq))
            .collect();
        dropped.sort_unstable_by_key(|d| d.0);
        if let Some(&(_, first, _)) = dropped.first() {
            self.fail(first, format!("consumer slot {slot} is quarantined"));
        }
        for (_, b, seq) in dropped {
            self.part_finished(slot, b, seq, false);
        }
    }

    /// The retry timer of `slot` fired.
    pub fn retry(&mut self, slot: SlotId) {
        self.slots[slot].waiting_retry = false;
        self.dispatch(slot);
    }

    /// The publish of the slot's part `seq` of `batch` is settled.
    pub fn confirmed(
        &mut self,
        slot: SlotId,
        batch: BatchRef,
        seq: u32,
        result: Result<(), PartError>,
    ) {
        let awaited = self.slots[slot].awaiting.remove(&(batch, seq));
        let err = match result {
            Ok(()) => {
                self.part_finished(slot, batch, seq, true);
                // a SNAPSHOT part confirmed may let live parts (and the next SNAPSHOT part) go
                return self.dispatch(slot);
            }
            Err(e) => e,
        };
        let s = &mut self.slots[slot];
        let live = batch.epoch == self.epoch && s.enabled && self.batches.contains_key(&batch);
        if let (PartError::Unroutable(returned), Some(item), true, OnPoison::Park) =
            (&err, awaited, live, s.policy.on_poison)
            // only triggers of a normal run can be re-run as dead letters: a park run's refused
            // messages may be dead letters themselves (the dead-letter queue is missing), and
            // re-running would publish nothing for them; that rolls back instead (stall)
            && item.mode == Mode::Normal
        {
            // run it again, dead-lettering exactly the triggers the broker refused
            let lane = item.lane;
            let item = Item {
                mode: Mode::ParkIds {
                    ids: returned.iter().map(|r| r.id.clone()).collect(),
                    reason: err.to_string(),
                },
                failures: 0,
                ..item
            };
            let at = usize::from(s.in_consumer == Some(lane)).min(s.queue_mut(lane).len());
            s.queue_mut(lane).insert(at, item);
            self.dispatch(slot);
            return;
        }
        // the rollback goes out before the batch can be released
        self.fail(batch, err.to_string());
        self.part_finished(slot, batch, seq, false);
        self.dispatch(slot);
    }

    /// Roll `batch` back (once), if it belongs to the current epoch.
    fn fail(&mut self, batch: BatchRef, reason: String) {
        if batch.epoch == self.epoch {
            let first = match self.batches.get_mut(&batch) {
                Some(t) => {
                    t.failed = true;
                    !std::mem::replace(&mut t.rolled_back, true)
                }
                None => false,
            };
            if first {
                self.out.push(Command::Rollback { batch, reason });
            }
        }
    }

    /// The slot's part `seq` no longer holds `batch` back. `ok` is false when it was dropped
    /// or failed, which makes the batch impossible to ack.
    fn part_finished(&mut self, slot: SlotId, batch: BatchRef, seq: u32, ok: bool) {
        let Some(track) = self.batches.get_mut(&batch) else {
            return;
        };
        if !track.pending.remove(&(slot, seq)) {
            return;
        }
        if !ok && batch.epoch == self.epoch && self.slots[slot].enabled {
            // a live batch lost a part: it can only be rolled back
            track.failed = true;
            if !std::mem::replace(&mut track.rolled_back, true) {
                self.out.push(Command::Rollback {
                    batch,
                    reason: format!("the part of consumer slot {slot} could not be processed"),
                });
            }
        }
        if track.pending.is_empty() {
            let t = self.batches.remove(&batch).unwrap_or_default();
            if batch.epoch == self.epoch && !t.failed {
                self.out.push(Command::Ack(batch));
            } else {
                self.out.push(Command::Release(batch));
            }
        }
    }

    /// Every batch of an epoch before `epoch` was abandoned by the connection.
    pub fn reset(&mut self, epoch: u64) {
        if epoch <= self.epoch {
            return;
        }
        self.epoch = epoch;
        self.out.push(Command::CancelBefore(epoch));
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let mut dropped = Vec::new();
            for lane in [Lane::Live, Lane::Snapshot] {
                let keep_front = s.in_consumer == Some(lane);
                let mut kept = VecDeque::new();
                for (i, item) in s.queue_mut(lane).drain(..).enumerate() {
                    if item.batch.epoch < epoch && !(i == 0 && keep_front) {
                        dropped.push((item.batch, item.seq));
                    } else {
                        kept.push_back(item);
                    }
                }
                *s.queue_mut(lane) = kept;
            }
            if s.in_consumer.is_none() {
                s.waiting_retry = false;
            }
            for (b, seq) in dropped {
                self.part_finished(slot, b, seq, false);
            }
            self.dispatch(slot);
        }
    }

    /// Enable or disable a slot. Disabling drops its queued parts (their batches no longer
    /// wait for it); the part inside its actor finishes normally. Enabling lifts a quarantine.
    pub fn set_enabled(&mut self, slot: SlotId, enabled: bool) {
        let s = &mut self.slots[slot];
        s.enabled = enabled;
        if enabled {
            s.quarantined = false;
            s.retrying = false;
            s.recent.clear();
            // parts waiting to be dead-lettered because of the quarantine are processed again
            for lane in [Lane::Live, Lane::Snapshot] {
                let skip = usize::from(s.in_consumer == Some(lane));
                for item in s.queue_mut(lane).iter_mut().skip(skip) {
                    if matches!(item.mode, Mode::ParkAll { .. }) {
                        item.mode = Mode::Normal;
                    }
                }
            }
            self.dispatch(slot);
            return;
        }
        let mut dropped = Vec::new();
        for lane in [Lane::Live, Lane::Snapshot] {
            let skip = usize::from(s.in_consumer == Some(lane));
            dropped.extend(s.queue_mut(lane).drain(skip..).map(|i| (i.batch, i.seq)));
        }
        if s.in_consumer.is_none() {
            s.waiting_retry = false;
        }
        for (b, seq) in dropped {
            // a disabled consumer's part holds nothing back: finishing it is not a failure
            self.part_finished(slot, b, seq, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: i64) -> BatchRef {
        BatchRef::new(1, id)
    }

    fn process(r: &mut Router<&'static str>) -> Mode {
        let cmds = r.take_commands();
        cmds.into_iter()
            .find_map(|c| match c {
                Command::Process { mode, .. } => Some(mode),
                _ => None,
            })
            .expect("a Process command")
    }

    #[test]
    fn publish_errors_map_to_part_errors() {
        let returned = Returned {
            id: "m1".into(),
            exchange: "cc_gone".into(),
            routing_key: "k".into(),
            reason: "exchange 'cc_gone' is gone".into(),
        };
        match PartError::from(PublishError::Unroutable {
            returned: vec![returned],
        }) {
            e @ PartError::Unroutable(_) => {
                assert!(!e.is_transient());
                let reason = e.to_string();
                assert!(
                    reason.contains("message(s) unroutable, first m1: exchange 'cc_gone'"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        for e in [
            PublishError::Cancelled { epoch: 3 },
            PublishError::Nacked { id: "m2".into() },
            PublishError::ConnectionLost {
                unconfirmed: 2,
                reason: "publishing channel closed".into(),
            },
        ] {
            let text = e.to_string();
            let part = PartError::from(e.clone());
            assert_eq!(part, PartError::Publish(e));
            assert!(part.is_transient());
            assert_eq!(part.to_string(), text);
        }
    }

    fn unroutable() -> PartError {
        PartError::Unroutable(vec![Returned {
            id: "x".into(),
            exchange: "cc_gone".into(),
            routing_key: "k".into(),
            reason: "312 NO_ROUTE".into(),
        }])
    }

    fn seg(part: &'static str, lane: Lane, keys: &[&str]) -> Segment<&'static str> {
        Segment {
            part,
            lane,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    /// The parts handed out and the batches acked since the last call.
    fn handed(r: &mut Router<&'static str>) -> (Vec<&'static str>, Vec<i64>) {
        let (mut parts, mut acks) = (Vec::new(), Vec::new());
        for c in r.take_commands() {
            match c {
                Command::Process { part, .. } => parts.push(part),
                Command::Ack(b) => acks.push(b.id),
                _ => {}
            }
        }
        (parts, acks)
    }

    fn published(r: &mut Router<&'static str>, id: i64, seq: u32) {
        r.processed(0, b(id), seq, Processed::Published, Instant::now());
    }

    /// A live part goes past a chunk's SNAPSHOT parts, unless it touches a key of one not yet
    /// confirmed; the chunk's batch is acked only once all its parts are confirmed, while a
    /// later batch may be acked before it.
    #[test]
    fn live_parts_pass_a_chunk_except_for_its_unconfirmed_keys() {
        let mut r = Router::new([true]).with_lane_parts(1);
        let (live, snap) = (Lane::Live, Lane::Snapshot);
        // the high watermark's batch: a live event before it, then two parts of rows
        r.route_segments(
            b(1),
            vec![(
                0,
                vec![
                    seg("pre", live, &["k1"]),
                    seg("s1", snap, &["k1", "k2"]),
                    seg("s2", snap, &["k3"]),
                ],
            )],
        );
        assert_eq!(handed(&mut r), (vec!["pre"], vec![]));
        published(&mut r, 1, 0);
        // the rows go only after the live part before them
        assert_eq!(handed(&mut r), (vec!["s1"], vec![]));
        r.route_segments(b(2), vec![(0, vec![seg("x", live, &["k9"])])]);
        published(&mut r, 1, 1);
        // another key: it goes before the chunk's second part
        assert_eq!(handed(&mut r), (vec!["x"], vec![]));
        published(&mut r, 2, 0);
        // one SNAPSHOT part out at a time
        assert_eq!(handed(&mut r), (vec![], vec![]));
        // a change of k1 waits for s1's confirm
        r.route_segments(b(3), vec![(0, vec![seg("y", live, &["k1"])])]);
        r.confirmed(0, b(2), 0, Ok(()));
        assert_eq!(handed(&mut r), (vec![], vec![2]));
        r.confirmed(0, b(1), 0, Ok(()));
        r.confirmed(0, b(1), 1, Ok(()));
        // s2 (k3) does not hold it; live first
        assert_eq!(handed(&mut r), (vec!["y"], vec![]));
        published(&mut r, 3, 0);
        assert_eq!(handed(&mut r), (vec!["s2"], vec![]));
        published(&mut r, 1, 2);
        r.confirmed(0, b(3), 0, Ok(()));
        assert_eq!(handed(&mut r), (vec![], vec![3]));
        // the chunk's batch: only now that its last part is confirmed
        r.confirmed(0, b(1), 2, Ok(()));
        assert_eq!(handed(&mut r), (vec![], vec![1]));
    }

    /// A SNAPSHOT part waits for every live part routed before it, even one that is itself
    /// held by an earlier SNAPSHOT part.
    #[test]
    fn a_snapshot_part_waits_for_the_live_parts_before_it() {
        let mut r = Router::new([true]).with_lane_parts(2);
        let (live, snap) = (Lane::Live, Lane::Snapshot);
        r.route_segments(b(1), vec![(0, vec![seg("s1", snap, &["k1"])])]);
        assert_eq!(handed(&mut r), (vec!["s1"], vec![]));
        published(&mut r, 1, 0);
        r.route_segments(b(2), vec![(0, vec![seg("v", live, &["k1"])])]);
        r.route_segments(b(3), vec![(0, vec![seg("s2", snap, &["k2"])])]);
        // v is held by s1, and s2 waits for v although a second part could be out
        assert_eq!(handed(&mut r), (vec![], vec![]));
        r.confirmed(0, b(1), 0, Ok(()));
        assert_eq!(handed(&mut r), (vec!["v"], vec![1]));
        published(&mut r, 2, 0);
        assert_eq!(handed(&mut r), (vec!["s2"], vec![]));
    }

    /// A refused trigger of a normal run is re-run as a dead letter; the batch then acks.
    #[test]
    fn unroutable_triggers_of_a_normal_run_are_parked() {
        let mut r = Router::new([true]);
        r.route(b(1), vec![(0, "part")]);
        assert_eq!(process(&mut r), Mode::Normal);
        r.processed(0, b(1), 0, Processed::Published, Instant::now());
        r.confirmed(0, b(1), 0, Err(unroutable()));
        assert!(matches!(process(&mut r), Mode::ParkIds { .. }));
        r.processed(0, b(1), 0, Processed::Published, Instant::now());
        r.confirmed(0, b(1), 0, Ok(()));
        assert_eq!(r.take_commands(), vec![Command::Ack(b(1))]);
    }

    /// Found by the simulation (seed 5051838): a park run whose messages are refused (the
    /// dead-letter queue itself is missing) must not be "parked" again — re-running would
    /// publish nothing for a dead letter and the row would be acked unseen. It rolls back.
    #[test]
    fn a_refused_park_run_rolls_back_instead_of_acking() {
        let mut r = Router::with_policies([(
            true,
            PoisonPolicy {
                on_poison: OnPoison::Park,
                attempts: 1,
            },
            SupervisionConfig::default(),
        )]);
        r.route(b(1), vec![(0, "part")]);
        process(&mut r);
        r.processed(
            0,
            b(1),
            0,
            Processed::Failed {
                error: "boom".into(),
            },
            Instant::now(),
        );
        r.take_commands();
        r.retry(0);
        assert!(matches!(process(&mut r), Mode::ParkFailures { .. }));
        r.processed(0, b(1), 0, Processed::Published, Instant::now());
        r.confirmed(0, b(1), 0, Err(unroutable()));
        let cmds = r.take_commands();
        assert!(
            matches!(cmds.first(), Some(Command::Rollback { batch, .. }) if *batch == b(1)),
            "{cmds:?}"
        );
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Ack(_))),
            "{cmds:?}"
        );
    }

    fn supervision(max_restarts: u32) -> SupervisionConfig {
        SupervisionConfig {
            restart_min: Duration::from_millis(100),
            restart_max: Duration::from_secs(1),
            max_restarts,
            quarantine_window: Duration::from_secs(60),
        }
    }

    fn fail(r: &mut Router<&'static str>, id: i64, at: Instant) -> Vec<Command<&'static str>> {
        let error = ProcessFailure::Stopped("boom".into());
        r.processed(0, b(id), 0, Processed::Failed { error }, at);
        r.take_commands()
    }

    /// The Router alone supervises: it counts restarts, backs off, quarantines after more
    /// than `max_restarts` within the window, and enabling lifts the quarantine.
    #[test]
    fn restarts_back_off_then_quarantine_and_enabling_lifts_it() {
        let stall = PoisonPolicy {
            on_poison: OnPoison::Stall,
            attempts: 1,
        };
        let mut r = Router::with_policies([(true, stall, supervision(2))]);
        let t0 = Instant::now();
        r.route(b(1), vec![(0, "part")]);
        process(&mut r);
        let retry = |d| vec![Command::RetryAfter { slot: 0, delay: d }];
        assert_eq!(fail(&mut r, 1, t0), retry(Duration::from_millis(100)));
        assert_eq!(r.state(0), ConsumerState::Restarting);
        r.retry(0);
        process(&mut r);
        assert_eq!(fail(&mut r, 1, t0), retry(Duration::from_millis(200)));
        r.retry(0);
        process(&mut r);
        // the third restart within the window: quarantined, the batch rolls back
        let cmds = fail(&mut r, 1, t0 + Duration::from_secs(1));
        assert!(
            matches!(cmds.first(), Some(Command::Rollback { batch, .. }) if *batch == b(1)),
            "{cmds:?}"
        );
        assert_eq!((r.state(0), r.restarts(0)), (ConsumerState::Quarantined, 3));
        // what comes next is refused at once, without asking the consumer
        r.reset(2);
        r.take_commands();
        let b2 = BatchRef::new(2, 2);
        r.route(b2, vec![(0, "part")]);
        let cmds = r.take_commands();
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Process { .. })),
            "{cmds:?}"
        );
        assert!(
            cmds.iter()
                .any(|c| matches!(c, Command::Rollback { batch, .. } if *batch == b2)),
            "{cmds:?}"
        );
        // enabling lifts it; the restart count stays, the window starts again
        r.set_enabled(0, true);
        assert_eq!((r.state(0), r.restarts(0)), (ConsumerState::Running, 3));
        let b3 = BatchRef::new(2, 3);
        r.route(b3, vec![(0, "part")]);
        assert_eq!(process(&mut r), Mode::Normal);
        let cmds = {
            r.processed(0, b3, 0, Processed::Failed { error: "x".into() }, t0);
            r.take_commands()
        };
        assert!(
            matches!(cmds.as_slice(), [Command::RetryAfter { .. }]),
            "{cmds:?}"
        );
    }

    /// Restarts older than the window do not count toward a quarantine.
    #[test]
    fn old_restarts_fall_out_of_the_window() {
        let mut r = Router::with_policies([(
            true,
            PoisonPolicy {
                on_poison: OnPoison::Stall,
                attempts: 1,
            },
            supervision(1),
        )]);
        let t0 = Instant::now();
        r.route(b(1), vec![(0, "part")]);
        for i in 0..4 {
            process(&mut r);
            let cmds = fail(&mut r, 1, t0 + Duration::from_secs(61 * i));
            assert!(
                matches!(cmds.as_slice(), [Command::RetryAfter { .. }]),
                "restart {i}: {cmds:?}"
            );
            r.retry(0);
        }
        assert_eq!(r.restarts(0), 4);
    }
}
