//! The Manager's bookkeeping as a plain state machine (no I/O, no actix).
//!
//! [`Router`] owns, per consumer *slot*, the queue of parts (the events of one batch that the
//! consumer's filters match) and, per batch, the set of slots whose part is not finished. It
//! turns inputs (a routed batch, a part processed or failed by its consumer, a publish confirmed
//! or failed, an epoch reset, enable/disable) into [`Command`]s for the actor shell: hand a part
//! to a consumer, retry later, ack, roll back, release, cancel stale publishes.
//!
//! Rules:
//! - each consumer has at most one part in its actor at a time, taken in batch order, so its
//!   triggers leave in binlog order;
//! - a batch is acked only when every slot's part of it is processed *and* confirmed; a failed
//!   part rolls the batch back (the connection then starts a new epoch);
//! - a batch is *released* (it holds nothing downstream any more) when it was abandoned — its
//!   epoch ended or it failed — and its last part finished; the connection counts abandoned
//!   batches against its in-flight bounds until then, so abandoned work cannot pile up;
//! - pending parts are tracked as a *set* of slots per batch, so finishing a part twice (a
//!   disable racing with its completion) can never ack a batch early;
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
use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
    /// Hand this part to the slot's consumer; answer with [`Router::processed`].
    Process {
        slot: SlotId,
        batch: BatchRef,
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

#[derive(Debug)]
struct Item<P> {
    batch: BatchRef,
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
    queue: VecDeque<Item<P>>,
    /// Parts handed to the publisher, kept until confirmed (a park run may need them).
    awaiting: BTreeMap<BatchRef, (P, Mode)>,
    /// The queue's front is inside the consumer actor.
    in_consumer: bool,
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
}

#[derive(Debug, Default)]
struct Track {
    pending: BTreeSet<SlotId>,
    /// A part of it failed or was dropped: it can only be released, never acked.
    failed: bool,
    rolled_back: bool,
}

/// The Manager's core. See the module docs.
#[derive(Debug)]
pub struct Router<P> {
    slots: Vec<Slot<P>>,
    batches: BTreeMap<BatchRef, Track>,
    epoch: u64,
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
                    awaiting: BTreeMap::new(),
                    in_consumer: false,
                    waiting_retry: false,
                })
                .collect(),
            batches: BTreeMap::new(),
            epoch: 0,
            out: Vec::new(),
        }
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

    /// Parts waiting for (or inside) this slot's consumer.
    pub fn queued(&self, slot: SlotId) -> usize {
        self.slots[slot].queue.len()
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

    /// Commands decided since the last call, in order.
    pub fn take_commands(&mut self) -> Vec<Command<P>> {
        std::mem::take(&mut self.out)
    }

    /// A new batch: `parts` are the slots whose filters match some of its events, with their
    /// part. Parts for disabled slots are ignored.
    pub fn route(&mut self, batch: BatchRef, parts: Vec<(SlotId, P)>) {
        if batch.epoch < self.epoch {
            // fetched before an epoch we already know ended: nothing of it runs
            self.out.push(Command::Release(batch));
            return;
        }
        if batch.epoch > self.epoch {
            self.reset(batch.epoch);
        }
        let mut track = Track::default();
        let mut touched = Vec::new();
        for (slot, part) in parts {
            let Some(s) = self.slots.get_mut(slot) else {
                continue;
            };
            if !s.enabled || !track.pending.insert(slot) {
                continue;
            }
            s.queue.push_back(Item {
                batch,
                part,
                mode: Mode::Normal,
                failures: 0,
            });
            touched.push(slot);
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
        let s = &mut self.slots[slot];
        if s.in_consumer || s.waiting_retry {
            return;
        }
        let parks = s.policy.on_poison == OnPoison::Park;
        let quarantined = s.quarantined;
        if quarantined && !parks {
            // nothing of it can be processed: its batches roll back until it is enabled again
            return self.refuse_all(slot);
        }
        if let Some(item) = s.queue.front_mut() {
            if quarantined && parks && item.mode == Mode::Normal {
                item.mode = Mode::ParkAll {
                    reason: "the consumer is quarantined".into(),
                };
            }
            s.in_consumer = true;
            self.out.push(Command::Process {
                slot,
                batch: item.batch,
                part: item.part.clone(),
                mode: item.mode.clone(),
            });
        }
    }

    /// The slot's consumer answered the part of `batch`; `now` times its restarts.
    pub fn processed(&mut self, slot: SlotId, batch: BatchRef, outcome: Processed, now: Instant) {
        let s = &mut self.slots[slot];
        let is_front = s.in_consumer && s.queue.front().is_some_and(|i| i.batch == batch);
        if !is_front {
            return;
        }
        s.in_consumer = false;
        match outcome {
            Processed::Published => {
                // its publish is confirmed or cancelled later; `confirmed` follows either way
                let Some(item) = s.queue.pop_front() else {
                    return;
                };
                if !matches!(item.mode, Mode::ParkAll { .. }) {
                    s.retrying = false;
                }
                s.awaiting.insert(batch, (item.part, item.mode));
                self.dispatch(slot);
            }
            Processed::Failed { error } => {
                let retry_in = s.restarted(now);
                self.failed(slot, batch, retry_in, &error);
            }
            Processed::Unavailable { retry_in } => {
                self.failed(slot, batch, Some(retry_in), &UNAVAILABLE)
            }
        }
    }

    /// The part of `batch` failed in the slot's consumer: retry it after `retry_in`, or, with
    /// `None`, the consumer is quarantined.
    fn failed(
        &mut self,
        slot: SlotId,
        batch: BatchRef,
        retry_in: Option<Duration>,
        error: &dyn std::fmt::Display,
    ) {
        let s = &mut self.slots[slot];
        s.retrying = true;
        if batch.epoch < self.epoch || !s.enabled {
            // abandoned or disabled while it was inside the consumer: do not retry it
            s.queue.pop_front();
            let ok = batch.epoch == self.epoch;
            self.part_finished(slot, batch, ok);
            self.dispatch(slot);
            return;
        }
        let parks = s.policy.on_poison == OnPoison::Park;
        let attempts = s.policy.attempts;
        if let Some(item) = s.queue.front_mut() {
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
        let dropped: Vec<BatchRef> = self.slots[slot].queue.drain(..).map(|i| i.batch).collect();
        if let Some(&first) = dropped.first() {
            self.fail(first, format!("consumer slot {slot} is quarantined"));
        }
        for b in dropped {
            self.part_finished(slot, b, false);
        }
    }

    /// The retry timer of `slot` fired.
    pub fn retry(&mut self, slot: SlotId) {
        self.slots[slot].waiting_retry = false;
        self.dispatch(slot);
    }

    /// The publish of the slot's part of `batch` is settled.
    pub fn confirmed(&mut self, slot: SlotId, batch: BatchRef, result: Result<(), PartError>) {
        let awaited = self.slots[slot].awaiting.remove(&batch);
        let err = match result {
            Ok(()) => return self.part_finished(slot, batch, true),
            Err(e) => e,
        };
        let s = &mut self.slots[slot];
        let live = batch.epoch == self.epoch && s.enabled && self.batches.contains_key(&batch);
        if let (PartError::Unroutable(returned), Some((part, mode)), true, OnPoison::Park) =
            (&err, awaited, live, s.policy.on_poison)
            // only triggers of a normal run can be re-run as dead letters: a park run's refused
            // messages may be dead letters themselves (the dead-letter queue is missing), and
            // re-running would publish nothing for them; that rolls back instead (stall)
            && mode == Mode::Normal
        {
            // run it again, dead-lettering exactly the triggers the broker refused
            let item = Item {
                batch,
                part,
                mode: Mode::ParkIds {
                    ids: returned.iter().map(|r| r.id.clone()).collect(),
                    reason: err.to_string(),
                },
                failures: 0,
            };
            let at = usize::from(s.in_consumer).min(s.queue.len());
            s.queue.insert(at, item);
            self.dispatch(slot);
            return;
        }
        // the rollback goes out before the batch can be released
        self.fail(batch, err.to_string());
        self.part_finished(slot, batch, false);
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

    /// The slot no longer holds `batch` back. `ok` is false when its part was dropped or
    /// failed, which makes the batch impossible to ack.
    fn part_finished(&mut self, slot: SlotId, batch: BatchRef, ok: bool) {
        let Some(track) = self.batches.get_mut(&batch) else {
            return;
        };
        if !track.pending.remove(&slot) {
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
            let keep_front = s.in_consumer;
            let mut dropped = Vec::new();
            let mut kept = VecDeque::new();
            for (i, item) in s.queue.drain(..).enumerate() {
                if item.batch.epoch < epoch && !(i == 0 && keep_front) {
                    dropped.push(item.batch);
                } else {
                    kept.push_back(item);
                }
            }
            s.queue = kept;
            if !s.in_consumer {
                s.waiting_retry = false;
            }
            for b in dropped {
                self.part_finished(slot, b, false);
            }
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
            let skip = usize::from(s.in_consumer);
            for item in s.queue.iter_mut().skip(skip) {
                if matches!(item.mode, Mode::ParkAll { .. }) {
                    item.mode = Mode::Normal;
                }
            }
            self.dispatch(slot);
            return;
        }
        let keep_front = s.in_consumer;
        let skip = usize::from(keep_front);
        let dropped: Vec<BatchRef> = s.queue.drain(skip..).map(|i| i.batch).collect();
        if !keep_front {
            s.waiting_retry = false;
        }
        for b in dropped {
            // a disabled consumer's part holds nothing back: finishing it is not a failure
            self.part_finished(slot, b, true);
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

    /// A refused trigger of a normal run is re-run as a dead letter; the batch then acks.
    #[test]
    fn unroutable_triggers_of_a_normal_run_are_parked() {
        let mut r = Router::new([true]);
        r.route(b(1), vec![(0, "part")]);
        assert_eq!(process(&mut r), Mode::Normal);
        r.processed(0, b(1), Processed::Published, Instant::now());
        r.confirmed(0, b(1), Err(unroutable()));
        assert!(matches!(process(&mut r), Mode::ParkIds { .. }));
        r.processed(0, b(1), Processed::Published, Instant::now());
        r.confirmed(0, b(1), Ok(()));
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
            Processed::Failed {
                error: "boom".into(),
            },
            Instant::now(),
        );
        r.take_commands();
        r.retry(0);
        assert!(matches!(process(&mut r), Mode::ParkFailures { .. }));
        r.processed(0, b(1), Processed::Published, Instant::now());
        r.confirmed(0, b(1), Err(unroutable()));
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
        r.processed(0, b(id), Processed::Failed { error }, at);
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
            r.processed(0, b3, Processed::Failed { error: "x".into() }, t0);
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
