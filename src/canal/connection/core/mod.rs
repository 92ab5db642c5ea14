//! Every decision of the Canal connection, sans-IO: [`ConnectionCore`].
//!
//! The core owns the connection's state (the session's lifecycle, the [`BatchWindow`], the
//! pending intents: roll back, re-subscribe, skip an oversized frame, shut down; pauses,
//! stalls, conflicts, the lease it obeys) and answers each [`Input`] (a message from the
//! subscriber, an operation's result, a fired timer, a new lease) with [`Action`]s for its
//! shell: open or drop a session, run one operation on it, decode a batch, deliver one, arm a
//! timer, answer a waiter. It does no I/O and has no clock: `now` is an argument of every
//! call, and a timer is an action the shell arms and reports back. The actor in the parent
//! module only carries the actions out; the delivery simulation (`tests/delivery_sim.rs`)
//! drives this same core with a model Canal server and a virtual clock.
//!
//! The rules it keeps (see the parent module for the why):
//! - one operation on the session at a time; acks are written in fetch order, only for the
//!   finished prefix, and a GET may ride behind them in the same turn;
//! - a rollback, a lost session or a conflict starts a new epoch: nothing of the old one is
//!   acked, the subscriber is told ([`Action::Reset`]), Canal redelivers;
//! - no GET while a batch is decoded (so batches reach the window in fetch order), while
//!   draining, while paused after a rollback, or while the window is full;
//! - a frame over the cap or an undecodable batch stalls the stream until an operator skips it;
//! - batch ids that jump, or an ack Canal no longer knows, mean another client fetches as us
//!   (`conflict`): stop, and retry after `reconnect_max`;
//! - ZooKeeper mode: the server is the one the lease names, and without a lease nothing is
//!   written (the shell checks [`ConnectionCore::may_write`]'s rule right before each write);
//! - **rewind guard**: rows at or before the newest confirmed position (same MySQL server and
//!   binlog, not executed later) were confirmed already; when Canal's cursor went backwards
//!   (a server restarted from a saved cursor older than our last ack) they come again, and are
//!   acked without being delivered ([`ConnectionStatus::rewind_skipped`]).
//!
//! How it fails: it does not; an input that does not fit the state (an answer of a retired
//! session, a timer of an older period, an ack of an unknown batch) is ignored or logged.

mod protocol;
pub mod recut;
mod rewind;
mod stall;
#[cfg(test)]
mod tests;
mod unit;

use super::api::{
    ConnectionState, ConnectionStatus, ShutdownReport, SkipError, Skipped, StallInfo,
};
use crate::backoff::Backoff;
use crate::canal::window::{AckOutcome, BatchRef, BatchWindow, GetMode, SmallUnitProbe, took_all};
use crate::event::Position;
use crate::ha::{Lease, Role};
pub use protocol::*;
use recut::{Cuts, Key};
pub use rewind::not_after;
use std::time::{Duration, Instant};

/// The session, as far as the core knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    None,
    Connecting,
    Idle,
    Busy,
}

/// Rows of fetched batches held back by the re-cut, with what their delivery must carry.
#[derive(Debug)]
struct Pending<E> {
    events: E,
    /// The batch the last of them came from.
    id: i64,
    /// The batches to ack with the piece that completes them, and the newest position.
    acks: Vec<i64>,
    last: Option<Key>,
    bytes: usize,
    entries: usize,
    /// Long polls in a row that found nothing since.
    empty_polls: u32,
}

/// What a piece carries for the batches whose last rows it holds: their acks, the newest
/// position those cover, their frame bytes and entries.
#[derive(Debug, Default)]
struct Carry {
    acks: Vec<i64>,
    last: Option<Key>,
    bytes: usize,
    entries: usize,
}

impl Carry {
    /// Add a later batch's.
    fn take(&mut self, later: Carry) {
        self.acks.extend(later.acks);
        if later.last.is_some() {
            self.last = later.last;
        }
        self.bytes += later.bytes;
        self.entries += later.entries;
    }
}

/// The connection core. See the module docs.
#[derive(Debug)]
pub struct ConnectionCore<R, E> {
    cfg: CoreConfig,
    state: ConnectionState,
    status: ConnectionStatus,
    window: BatchWindow,
    link: Link,
    /// Bumped whenever a session is dropped outside an operation: answers of older ones are
    /// ignored.
    generation: u64,
    /// The first epoch of the current session: batch ids of older epochs belong to another
    /// session's numbering and are not observed.
    session_epoch: u64,
    /// A fetched batch is being decoded (no GET until it is back).
    decoding: bool,
    /// The idle period whose ack wait has a timer armed.
    ack_wait_timer: Option<u64>,
    need_subscribe: bool,
    need_rollback: bool,
    /// Read past the next frame over the cap (the operator said `skip`).
    skip_oversized: bool,
    /// The batch held back by an undecodable entry while stalled on it.
    held: Option<BatchRef>,
    stall_seq: u64,
    paused_until: Option<Instant>,
    resume_armed: bool,
    consecutive_rollbacks: u32,
    attempt: u32,
    ever_connected: bool,
    draining: bool,
    drain_waiting: bool,
    /// Shutdown requested (roll back first?).
    shutdown: Option<bool>,
    lease: Option<Lease>,
    /// Newest confirmed position (and its execution time): the rewind guard.
    confirmed: Option<(Position, i64)>,
    /// Where the deliveries Canal has not acked yet ended: rows it sends again are cut there
    /// ([`recut`]).
    cuts: Cuts,
    /// Rows held back until the rest of the delivery they began comes ([`recut`]).
    pending: Option<Pending<E>>,
    /// Held rows delivered without the rest of their first delivery, and skips (the rows after
    /// a skipped batch no longer start where a delivery started).
    recut_flushes: u64,
    /// Watches answers for a server memunit smaller than `canal.mem_unit`.
    small_unit: SmallUnitProbe,
    jitter: u64,
    actions: Vec<Action<R, E>>,
}

impl<R: RawView, E: EventsView> ConnectionCore<R, E> {
    /// A core; `zookeeper`: a lease will name the server ([`Input::Lease`] before
    /// [`Input::Start`]).
    pub fn new(cfg: CoreConfig, zookeeper: bool) -> Self {
        let status = ConnectionStatus {
            server: cfg.server.clone(),
            destination: cfg.destination.clone(),
            filter: cfg.filter.clone(),
            ..Default::default()
        };
        ConnectionCore {
            state: ConnectionState::Connecting,
            status,
            window: BatchWindow::new(cfg.max_inflight_batches, cfg.max_inflight_bytes),
            link: Link::None,
            generation: 0,
            session_epoch: 0,
            decoding: false,
            ack_wait_timer: None,
            need_subscribe: false,
            need_rollback: false,
            skip_oversized: false,
            held: None,
            stall_seq: 0,
            paused_until: None,
            resume_armed: false,
            consecutive_rollbacks: 0,
            attempt: 0,
            ever_connected: false,
            draining: false,
            drain_waiting: false,
            shutdown: None,
            lease: zookeeper.then(Lease::default),
            confirmed: None,
            cuts: Cuts::default(),
            pending: None,
            recut_flushes: 0,
            small_unit: SmallUnitProbe::default(),
            jitter: cfg.jitter_seed | 1,
            actions: Vec::new(),
            cfg,
        }
    }

    /// Start the rewind guard at a position confirmed by an earlier run, and the re-cut at the
    /// delivery ends that run wrote with it ([`recut`]).
    pub fn with_confirmed(mut self, confirmed: Option<(Position, i64)>, cuts: Vec<Key>) -> Self {
        self.cuts = Cuts::restored(cuts, confirmed.as_ref());
        self.confirmed = confirmed;
        self
    }

    /// Where the deliveries not acked yet ended (written with the confirmed position).
    pub fn cuts(&self) -> &Cuts {
        &self.cuts
    }

    /// Rows held back until the rest of their first delivery comes.
    pub fn held_rows(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.events.count())
    }

    /// How many times held rows were delivered without the rest of their first delivery, or a
    /// batch was skipped (the bulks of the rows around it may differ from the first time).
    pub fn recut_flushes(&self) -> u64 {
        self.recut_flushes
    }

    /// The actions decided so far, in order.
    pub fn take_actions(&mut self) -> Vec<Action<R, E>> {
        std::mem::take(&mut self.actions)
    }

    /// The session generation whose answers count (older ones are ignored).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn state(&self) -> ConnectionState {
        self.state
    }

    pub fn window(&self) -> &BatchWindow {
        &self.window
    }

    /// The filter the connection wants in force.
    pub fn filter(&self) -> &str {
        &self.cfg.filter
    }

    /// The newest confirmed position (what the rewind guard compares against).
    pub fn confirmed(&self) -> Option<&(Position, i64)> {
        self.confirmed.as_ref()
    }

    /// The status as `status` shows it.
    pub fn snapshot(&self) -> ConnectionStatus {
        let mut s = self.status.clone();
        s.state = self.state;
        s.epoch = self.window.epoch();
        s.inflight_batches = self.window.inflight_batches();
        s.inflight_bytes = self.window.inflight_bytes();
        s.abandoned_batches = self.window.abandoned_batches();
        s.filter = self.cfg.filter.clone();
        s
    }

    /// May a GET or an ACK be written at `now`? Always in the simple mode; in ZooKeeper mode
    /// only while the lease says so. (The shell applies the same rule to the newest lease right
    /// before each write.)
    pub fn may_write(&self, now: Instant) -> bool {
        self.lease.as_ref().is_none_or(|l| l.may_write(now))
    }

    /// Feed one input; then [`Self::take_actions`].
    pub fn on(&mut self, now: Instant, input: Input<R, E>) {
        match input {
            Input::Start => self.connect(now),
            Input::Lease(lease) => self.on_lease(now, lease),
            Input::Connected { generation, filter } => {
                if generation != self.generation {
                    return;
                }
                self.on_connected(now, filter);
            }
            Input::Done { generation, done } => {
                if generation != self.generation || self.state == ConnectionState::Stopped {
                    return;
                }
                if let Done::Closed = done {
                    self.link = Link::None;
                    return self.finish_shutdown();
                }
                self.link = Link::Idle;
                self.completed(now, done);
                self.drive(now);
            }
            Input::Failed {
                generation,
                failure,
            } => {
                if generation != self.generation {
                    return;
                }
                let connecting = self.link == Link::Connecting;
                self.link = Link::None;
                if self.state == ConnectionState::Stopped {
                    return;
                }
                if connecting {
                    self.connect_failed(now, failure);
                } else {
                    self.fail(now, failure);
                }
            }
            Input::Decoded {
                epoch,
                raw,
                outcome,
            } => {
                self.decoding = false;
                match outcome {
                    Decoded::Panicked(e) => {
                        tracing::error!(error = %e, "decoding a canal batch failed");
                        // its id counts in the session's numbering all the same
                        self.observe_stale(epoch, raw.batch_id());
                        if epoch == self.window.epoch() && self.state != ConnectionState::Stopped {
                            self.request_rollback(now, "decoding a batch panicked");
                        }
                    }
                    outcome => self.on_decoded(epoch, raw, outcome),
                }
                self.notify_drained();
                self.drive(now);
            }
            Input::Ack(batch) => {
                match self.window.ack(batch) {
                    AckOutcome::Recorded => {}
                    AckOutcome::Abandoned => {
                        tracing::debug!(batch = %batch, "ack for an abandoned batch only releases it")
                    }
                    AckOutcome::Unknown => {
                        tracing::warn!(batch = %batch, "ack for an unknown batch")
                    }
                }
                self.drive(now);
            }
            Input::Release(batch) => {
                if batch.epoch == self.window.epoch() {
                    // a batch of the current epoch can only be given up through a rollback
                    tracing::warn!(batch = %batch, "release of a live batch; rolling back");
                    self.request_rollback(now, "a batch was released before it was acked");
                } else {
                    self.window.release(batch);
                }
                self.drive(now);
            }
            Input::Rollback { batch, reason } => {
                if batch.epoch != self.window.epoch() {
                    return;
                }
                tracing::warn!(batch = %batch, reason = %reason, "rolling back canal batches");
                self.request_rollback(now, &reason);
                self.drive(now);
            }
            Input::SetFilter(filter) => {
                if filter != self.cfg.filter {
                    self.cfg.filter = filter;
                    self.need_subscribe =
                        self.state == ConnectionState::Connected || self.link == Link::Busy;
                    self.drive(now);
                } else if self.state == ConnectionState::Connected && !self.need_subscribe {
                    // already in force (no subscribe pending for it)
                    self.actions.push(Action::FilterApplied);
                }
            }
            Input::Drain => {
                self.draining = true;
                self.drain_waiting = true;
                // the drain fetches no more: what is held goes as it is
                self.flush_pending();
                self.notify_drained();
            }
            Input::Shutdown { rollback } => {
                self.draining = true;
                self.shutdown = Some(rollback);
                if self.state == ConnectionState::Connected {
                    // runs after the operation in progress and after writing every acked batch
                    self.drive(now);
                } else {
                    // no session: nothing to flush or roll back
                    self.finish_shutdown();
                }
            }
            Input::Timer(timer) => self.on_timer(now, timer),
            Input::LookupError(e) => {
                const MARK: &str = "column charset lookup failed";
                match e {
                    Some(e) => self.status.last_error = Some(format!("{MARK}: {e}")),
                    None => {
                        if self
                            .status
                            .last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with(MARK))
                        {
                            self.status.last_error = None;
                        }
                    }
                }
            }
        }
    }

    /// A jittered delay in `[0.8, 1.0] × base` (so several instances do not retry in step).
    fn jittered(&mut self, backoff: Backoff, attempt: u32) -> Duration {
        // xorshift64: reproducible from the seed, no I/O
        let mut x = self.jitter;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter = x;
        backoff
            .with_jitter(0.2)
            .delay_with(attempt, (x >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// Delay before reconnect (or redelivery) number `attempt`.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let b = Backoff::new(
            self.cfg.reconnect_min.max(Duration::from_millis(1)),
            self.cfg.reconnect_max,
        );
        self.jittered(b, attempt)
    }

    /// ZooKeeper mode: point at the server the lease names, or say why there is none (and
    /// show it in the state). True when a connect may go ahead.
    fn follow_lease(&mut self, now: Instant) -> bool {
        let Some(lease) = &self.lease else {
            return true;
        };
        self.status.ha = Some(lease.into());
        match lease.target(now) {
            Some(addr) => {
                if addr
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    self.state = ConnectionState::Reconnecting;
                    self.status.last_error = Some(format!(
                        "canal's running node names '{addr}', not host:port"
                    ));
                    return false;
                }
                self.status.server = addr.to_string();
                true
            }
            None => {
                if let Some(canal) = &lease.canal {
                    self.status.server = canal.clone();
                }
                self.state = if lease.role == Role::Standby {
                    ConnectionState::Standby
                } else {
                    // active, but suspended (zookeeper disconnected) or no canal server runs it
                    ConnectionState::Reconnecting
                };
                self.status.last_error = lease.reason.clone();
                false
            }
        }
    }

    fn server(&self) -> &str {
        if self.lease.is_some() {
            &self.status.server
        } else {
            &self.cfg.server
        }
    }

    fn connect(&mut self, now: Instant) {
        if self.state == ConnectionState::Stopped || self.link != Link::None {
            return;
        }
        if !self.follow_lease(now) {
            return;
        }
        self.state = ConnectionState::Connecting;
        self.link = Link::Connecting;
        self.actions.push(Action::Connect {
            generation: self.generation,
            server: self.server().to_string(),
            filter: self.cfg.filter.clone(),
        });
    }

    fn on_connected(&mut self, now: Instant, filter: String) {
        self.link = Link::Idle;
        if self.state == ConnectionState::Stopped {
            self.link = Link::None;
            self.actions.push(Action::DropSession);
            return;
        }
        if let Some(lease) = &self.lease
            && lease.target(now) != Some(self.status.server.as_str())
        {
            // no longer ours, or the server moved, while we connected
            self.link = Link::None;
            self.actions.push(Action::DropSession);
            self.state = ConnectionState::Reconnecting;
            return self.connect(now);
        }
        self.begin_epoch("new canal session", true);
        self.session_epoch = self.window.epoch();
        self.state = ConnectionState::Connected;
        // the backoff is reset by a GET that is answered, not by a connect: a server that
        // fails every GET at the same position is retried ever more slowly
        self.ever_connected = true;
        self.status.last_error = None;
        tracing::info!(
            server = %self.server(),
            destination = %self.cfg.destination,
            epoch = self.window.epoch(),
            "canal session established"
        );
        if filter == self.cfg.filter {
            self.actions.push(Action::FilterApplied);
        } else {
            // the filter changed while we connected
            self.need_subscribe = true;
        }
        self.drive(now);
    }

    fn connect_failed(&mut self, now: Instant, failure: Failure) {
        if failure.kind == FailureKind::Definite && self.cfg.fail_fast && !self.ever_connected {
            tracing::debug!(error = %failure.message, "canal connection failed permanently");
            self.actions.push(Action::Fatal(failure));
            self.state = ConnectionState::Stopped;
            return;
        }
        if failure.kind == FailureKind::NotActive {
            return self.not_active(now, failure);
        }
        self.schedule_reconnect(failure);
    }

    fn schedule_reconnect(&mut self, failure: Failure) {
        let delay = self.backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.status.reconnects += 1;
        if failure.kind == FailureKind::Definite {
            tracing::error!(error = %failure.message, retry_in = ?delay, "canal connection failed");
        } else {
            tracing::warn!(error = %failure.message, retry_in = ?delay, "canal connection failed");
        }
        self.status.last_error = Some(failure.message);
        self.state = ConnectionState::Reconnecting;
        self.actions.push(Action::Timer {
            timer: Timer::Reconnect,
            after: delay,
        });
    }

    /// The lease ended under an operation: wait for it to come back ([`Input::Lease`]).
    fn not_active(&mut self, now: Instant, failure: Failure) {
        tracing::warn!(error = %failure.message, "stopped fetching and acking");
        self.status.last_error = Some(failure.message);
        if self.follow_lease(now) {
            self.connect(now);
        }
    }

    /// The session failed under an operation: everything in flight is abandoned.
    fn fail(&mut self, now: Instant, failure: Failure) {
        self.begin_epoch(&failure.message, true);
        self.held = None;
        // a skip that did not happen is not retried blindly: the next fetch stalls again
        self.skip_oversized = false;
        if self.shutdown.is_some() {
            tracing::warn!(error = %failure.message, "canal session failed during shutdown");
            return self.finish_shutdown();
        }
        match failure.kind {
            FailureKind::TooLarge { len, max } => {
                // retrying cannot help: Canal sends the same frame again
                self.stall_seq += 1;
                let token = format!("frame-{}", self.stall_seq);
                self.stall(
                    token.clone(),
                    format!(
                        "the next batch is a {len}-byte frame, over canal.max_frame_bytes ({max})"
                    ),
                    format!(
                        "raise canal.max_frame_bytes above {len} and restart, or run \
                         `canal-consumer skip {token}` to ack that batch without delivering its rows"
                    ),
                );
            }
            FailureKind::Vanished { evidence } => self.on_conflict(evidence),
            FailureKind::NotActive => self.not_active(now, failure),
            FailureKind::Transient | FailureKind::Definite => self.schedule_reconnect(failure),
        }
    }

    /// Start a new epoch: the subscriber forgets older batches; acks for them are not written.
    fn begin_epoch(&mut self, reason: &str, new_session: bool) {
        // held rows were not handed on: their batches come again (the window forgets them)
        self.pending = None;
        let (epoch, abandoned) = self.window.begin_epoch(new_session);
        self.status.abandoned_total += abandoned as u64;
        if abandoned > 0 {
            tracing::warn!(
                batches = abandoned,
                reason,
                "abandoning unacked canal batches; they will be redelivered"
            );
        }
        self.actions.push(Action::Reset {
            epoch,
            reason: reason.to_string(),
        });
        self.notify_drained();
    }

    fn notify_drained(&mut self) {
        if self.drain_waiting && self.window.drained() && !self.decoding {
            self.drain_waiting = false;
            self.actions.push(Action::Drained);
        }
    }

    fn on_lease(&mut self, now: Instant, lease: Lease) {
        if self.state == ConnectionState::Stopped {
            return;
        }
        self.status.ha = Some((&lease).into());
        let target = lease.target(now).map(str::to_string);
        let reason = lease.reason.clone();
        self.lease = Some(lease);
        let has_session = self.link != Link::None;
        let current = self.status.server.clone();
        match target {
            None => {
                if has_session {
                    let reason = reason.unwrap_or_else(|| "the zookeeper lease ended".into());
                    tracing::warn!(reason = %reason, "leaving the canal server: not the active replica now");
                    self.retire_session(&reason);
                }
                self.follow_lease(now);
            }
            Some(addr) => {
                if has_session && addr != current {
                    tracing::warn!(from = %current, to = %addr, "canal server moved; following it");
                    self.retire_session(&format!("canal server moved from {current} to {addr}"));
                }
                if self.link == Link::None && self.state != ConnectionState::Conflict {
                    self.connect(now);
                }
            }
        }
    }

    /// Drop the session from outside an operation (the lease moved or ended).
    fn retire_session(&mut self, reason: &str) {
        self.generation += 1;
        self.link = Link::None;
        self.actions.push(Action::DropSession);
        self.begin_epoch(reason, true);
        self.held = None;
        self.skip_oversized = false;
        self.need_rollback = false;
    }

    fn on_timer(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Reconnect => self.connect(now),
            Timer::ConflictRetry => {
                if self.state == ConnectionState::Conflict {
                    self.connect(now);
                }
            }
            Timer::Resume => {
                self.resume_armed = false;
                self.drive(now);
            }
            Timer::AckWait(period) => {
                if self.ack_wait_timer == Some(period) {
                    self.ack_wait_timer = None;
                }
                self.window.end_ack_wait(period);
                self.drive(now);
            }
        }
    }

    /// The GET to issue now, if any: the window decides how it asks.
    fn next_get(&self, now: Instant) -> Option<GetMode> {
        if self.state == ConnectionState::Connected
            && !self.decoding
            && !self.draining
            && self.paused_until.is_none_or(|t| t <= now)
        {
            self.window.next_get()
        } else {
            None
        }
    }

    /// GET size and server-side wait for `mode`.
    fn get_args(&self, mode: GetMode) -> (i32, Duration) {
        match mode {
            GetMode::Drain => (self.cfg.fetch_size, Duration::ZERO),
            // the smallest batch Canal makes: answered as soon as there is that much
            GetMode::LongPoll => (1, self.cfg.fetch_wait),
        }
    }

    /// Run the next operation on the session, if it is free.
    fn drive(&mut self, now: Instant) {
        // the wait for acks is over (they came, or data did): its timer would only wake us
        if let Some(period) = self.ack_wait_timer
            && self.window.waiting_for_acks() != Some(period)
        {
            self.ack_wait_timer = None;
            self.actions
                .push(Action::CancelTimer(Timer::AckWait(period)));
        }
        let live = matches!(
            self.state,
            ConnectionState::Connected | ConnectionState::Stalled
        );
        if self.link != Link::Idle || !live {
            return;
        }
        let op = if self.need_rollback {
            self.need_rollback = false;
            Op::Rollback
        } else if let ackable = self.window.take_ackable()
            && !ackable.ids.is_empty()
        {
            if let Some((pos, at)) = ackable.last {
                self.status.acked_position = Some(pos.clone());
                self.status.acked_executed_at = Some(at);
                // never backwards: acking rows Canal sent again does not lower the guard
                self.cuts.acked(&(pos.clone(), at));
                if self
                    .confirmed
                    .as_ref()
                    .is_none_or(|(c, c_at)| !(at <= *c_at && not_after(&pos, c)))
                {
                    self.confirmed = Some((pos, at));
                }
            }
            // Acks get no reply, so a GET written right behind them costs no extra round trip.
            let then_get =
                if self.shutdown.is_none() && !self.need_subscribe && !self.skip_oversized {
                    self.next_get(now).map(|mode| {
                        self.window.get_sent();
                        let (size, wait) = self.get_args(mode);
                        (self.window.epoch(), size, wait)
                    })
                } else {
                    None
                };
            Op::Ack {
                ids: ackable.ids,
                then_get,
            }
        } else if let Some(rollback) = self.shutdown {
            // every acked batch has been written; close (rolling back the rest if asked)
            Op::Close { rollback }
        } else if self.need_subscribe {
            self.need_subscribe = false;
            Op::Subscribe(self.cfg.filter.clone())
        } else if self.skip_oversized && self.next_get(now).is_some() {
            self.window.get_sent();
            Op::GetSkipping {
                epoch: self.window.epoch(),
                wait: self.cfg.fetch_wait,
            }
        } else if let Some(mode) = self.next_get(now) {
            self.window.get_sent();
            let (size, wait) = self.get_args(mode);
            Op::Get {
                epoch: self.window.epoch(),
                size,
                wait,
            }
        } else {
            // caught up with batches in flight: the long poll waits for their acks, at most
            // `ack_wait` (see `BatchWindow::next_get`)
            if let Some(period) = self.window.waiting_for_acks()
                && self.ack_wait_timer != Some(period)
            {
                if let Some(old) = self.ack_wait_timer.replace(period) {
                    self.actions.push(Action::CancelTimer(Timer::AckWait(old)));
                }
                self.actions.push(Action::Timer {
                    timer: Timer::AckWait(period),
                    after: self.cfg.ack_wait,
                });
            }
            if let Some(until) = self.paused_until {
                if until <= now {
                    self.paused_until = None;
                    self.drive(now);
                } else if !self.resume_armed {
                    self.resume_armed = true;
                    self.actions.push(Action::Timer {
                        timer: Timer::Resume,
                        after: until - now,
                    });
                }
            }
            return;
        };
        self.link = Link::Busy;
        self.actions.push(Action::Run {
            generation: self.generation,
            op,
        });
    }

    fn completed(&mut self, _now: Instant, done: Done<R>) {
        match done {
            Done::Fetched { epoch, raw } => {
                // a GET answered: the server works at this position
                self.attempt = 0;
                self.window.get_answered();
                self.on_fetched(epoch, raw);
            }
            Done::Skipped {
                epoch,
                batch_id,
                frame_bytes,
            } => {
                self.window.get_answered();
                self.skip_oversized = false;
                if epoch == self.window.epoch() {
                    self.flush_pending();
                    let b = self.window.fetched(batch_id, 0, None, false);
                    if let Some((expected, got)) = b.gap {
                        return self.on_conflict(format!(
                            "canal's batch ids jumped from {expected} to {got}"
                        ));
                    }
                }
                let after = self
                    .status
                    .acked_position
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "the start".into());
                self.record_skip(format!(
                    "frame of {frame_bytes} bytes (canal batch {batch_id}) after {after}"
                ));
            }
            Done::Acked { ids, fetched } => {
                self.status.batches_acked += ids.len() as u64;
                self.consecutive_rollbacks = 0;
                self.attempt = 0;
                tracing::debug!(?ids, "canal batches acked");
                if let Some((epoch, raw)) = fetched {
                    self.window.get_answered();
                    self.on_fetched(epoch, raw);
                }
            }
            Done::Subscribed(filter) => {
                tracing::info!(filter = %filter, "canal subscription updated");
                if filter == self.cfg.filter {
                    self.actions.push(Action::FilterApplied);
                }
            }
            Done::RolledBack => {
                tracing::info!(epoch = self.window.epoch(), "canal batches rolled back")
            }
            Done::Closed => {}
        }
        // after the answer is recorded: a batch it brought is being decoded by now, and an
        // empty one may be what a drain waited for
        self.notify_drained();
    }

    fn on_fetched(&mut self, epoch: u64, raw: R) {
        self.check_unit(&raw);
        if raw.is_empty() {
            if epoch == self.window.epoch() {
                if self.window.is_idle()
                    && let Some(p) = &mut self.pending
                {
                    // long polls that found nothing: the rest of the held rows' delivery is
                    // not coming (see `recut`)
                    p.empty_polls += 1;
                    if p.empty_polls >= recut::EMPTY_POLLS {
                        self.flush_pending();
                    }
                }
                self.window.caught_up();
            }
            return;
        }
        if epoch != self.window.epoch() {
            // fetched before a rollback was requested: the rollback brings it again
            self.observe_stale(epoch, raw.batch_id());
            tracing::debug!(
                batch_id = raw.batch_id(),
                "discarding batch fetched before rollback"
            );
            return;
        }
        self.decoding = true;
        self.actions.push(Action::Decode { epoch, raw });
    }

    fn on_decoded(&mut self, epoch: u64, raw: R, outcome: Decoded<E>) {
        if self.state == ConnectionState::Stopped {
            return;
        }
        if epoch != self.window.epoch() {
            // a rollback or reconnect began while it was decoded: the rows come again
            self.observe_stale(epoch, raw.batch_id());
            return;
        }
        let mut events = match outcome {
            Decoded::Events(events) => events,
            Decoded::Undecodable(error) | Decoded::Panicked(error) => {
                // retrying cannot help: hold it (no later batch is acked past it) and stall
                self.flush_pending();
                let batch = self.window.hold(raw.batch_id(), raw.frame_bytes());
                self.held = Some(batch);
                let entries = raw.entry_sizes().len();
                return self.stall(
                    format!("batch:{}", raw.batch_id()),
                    error,
                    format!(
                        "run `canal-consumer skip batch:{}` to ack it without delivering its \
                         {entries} entries",
                        raw.batch_id()
                    ),
                );
            }
        };
        let n = events.count();
        let last = n
            .checked_sub(1)
            .map(|i| events.key(i))
            .map(|(p, at)| (p.clone(), at));
        let rewound = self.rewound(&events);
        if rewound > 0 {
            events.drop_first(rewound);
            self.status.rewind_skipped += rewound as u64;
            tracing::warn!(
                rows = rewound,
                batch_id = raw.batch_id(),
                confirmed = %self.confirmed.as_ref().map(|c| c.0.to_string()).unwrap_or_default(),
                "canal rewound: events at or before the confirmed position came again; acked without delivering them"
            );
        }
        self.status.batches_received += 1;
        self.status.events_received += n as u64;
        if let Some((pos, at)) = &last {
            self.status.last_position = Some(pos.clone());
            self.status.last_executed_at = Some(*at);
        }
        if let Some((expected, got)) = self.window.gap(raw.batch_id()) {
            // recorded as not delivered: nothing downstream will release it
            self.window
                .fetched(raw.batch_id(), raw.frame_bytes(), None, false);
            return self.on_conflict(format!("canal's batch ids jumped from {expected} to {got}"));
        }
        self.window.observe_id(raw.batch_id());
        // a short answer: Canal had nothing more, so the next GET long-polls
        if took_all(raw.asked(), self.cfg.mem_unit, raw.entry_sizes()) {
            self.window.caught_up();
        }
        tracing::debug!(
            batch_id = raw.batch_id(),
            entries = raw.entry_sizes().len(),
            events = events.count(),
            bytes = raw.frame_bytes(),
            "canal batch fetched"
        );
        self.deliver(
            raw.batch_id(),
            raw.frame_bytes(),
            raw.entry_sizes().len(),
            last,
            events,
        );
    }

    /// Hand a batch's events on, cut where earlier deliveries of them ended ([`recut`]): each
    /// piece is recorded in the window and delivered; the acks of this batch and of the held
    /// rows' batches ride with its last piece (which ends where the batch ends); rows short of
    /// a remembered end wait in [`Self::pending`], with those acks. Frame bytes are shared out
    /// by rows, so pieces and held rows count what they hold.
    fn deliver(&mut self, id: i64, bytes: usize, entries: usize, last: Option<Key>, events: E) {
        self.window.set_held(0, 0);
        let fresh = events.count();
        let mut current = Carry {
            acks: vec![id],
            last,
            bytes: 0,
            entries,
        };
        let (mut events, prior, held_id, held_n) = match self.pending.take() {
            Some(mut p) => {
                let n = p.events.count();
                p.events.append(events);
                let prior = Carry {
                    acks: p.acks,
                    last: p.last,
                    bytes: 0,
                    entries: p.entries,
                };
                // a batch with no rows adds its bytes to those held
                let held_bytes = if fresh == 0 { p.bytes + bytes } else { p.bytes };
                (p.events, Some((prior, held_bytes)), p.id, n)
            }
            None => (events, None, id, 0),
        };
        let total = events.count();
        if total == 0 {
            // nothing to deliver: done at once, acked in order
            self.window
                .piece(id, bytes, current.acks, current.last, false);
            return;
        }
        let held_bytes = prior.as_ref().map_or(0, |p| p.1);
        let fresh_bytes = if fresh == 0 { 0 } else { bytes };
        // bytes of the first `k` rows
        let bytes_upto = |k: usize| -> usize {
            let from_held = (held_bytes * k.min(held_n))
                .checked_div(held_n)
                .unwrap_or(0);
            let from_fresh = (fresh_bytes * k.saturating_sub(held_n))
                .checked_div(fresh)
                .unwrap_or(0);
            from_held + from_fresh
        };
        let mut prior = prior.map(|p| p.0);
        let plan = self.cuts.plan(total, |i| events.key(i));
        let mut done = 0;
        let n_pieces = plan.pieces.len();
        for (i, len) in plan.pieces.into_iter().enumerate() {
            let rest = events.split_off(len);
            let piece = std::mem::replace(&mut events, rest);
            // the piece's last row came from the held rows' batch or from this one
            let end_id = if done + len <= held_n { held_id } else { id };
            let mut carry = Carry {
                bytes: bytes_upto(done + len) - bytes_upto(done),
                ..Carry::default()
            };
            done += len;
            if i + 1 == n_pieces && !plan.hold {
                // the acks ride only with a piece that ends where a batch ends, so the
                // position Canal acks is always a piece's end: rows it sends again start a
                // piece
                if let Some(p) = prior.take() {
                    carry.take(p);
                }
                carry.take(std::mem::take(&mut current));
            }
            self.deliver_piece(end_id, carry, piece);
        }
        if plan.hold {
            tracing::debug!(
                rows = events.count(),
                "holding rows back until the rest of their first delivery comes"
            );
            let mut carry = prior.unwrap_or_default();
            carry.take(current);
            carry.bytes = bytes_upto(total) - bytes_upto(done);
            self.window.set_held(carry.acks.len(), carry.bytes);
            self.pending = Some(Pending {
                events,
                id: if fresh > 0 { id } else { held_id },
                acks: carry.acks,
                last: carry.last,
                bytes: carry.bytes,
                entries: carry.entries,
                empty_polls: 0,
            });
            if self.draining {
                // a drain fetches no more: nothing would complete them
                self.flush_pending();
            } else if self.window.held_full() {
                // held rows alone fill the window: no GET could bring the rest
                self.flush_pending();
            }
        }
    }

    /// Record one piece and hand it on.
    fn deliver_piece(&mut self, id: i64, carry: Carry, events: E) {
        let Carry {
            acks,
            last,
            bytes,
            entries,
        } = carry;
        let n = events.count();
        let Some(end) = n.checked_sub(1).map(|i| events.key(i)) else {
            self.window.piece(id, bytes, acks, last, false);
            return;
        };
        self.cuts.delivered((end.0.clone(), end.1));
        let batch = self.window.piece(id, bytes, acks, last, true);
        self.actions.push(Action::Deliver {
            batch,
            bytes,
            entries,
            events,
        });
    }

    /// Deliver the held rows as they are (their delivery's rest is not coming, or the stream
    /// must not wait: a skip, a stall, a drain).
    fn flush_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.window.set_held(0, 0);
            tracing::info!(
                rows = p.events.count(),
                "delivering held rows without the rest of their first delivery; their bulk messages may differ from the first time"
            );
            self.recut_flushes += 1;
            let carry = Carry {
                acks: p.acks,
                last: p.last,
                bytes: p.bytes,
                entries: p.entries,
            };
            self.deliver_piece(p.id, carry, p.events);
        }
    }

    /// A batch of an ended epoch: its id still counts in the numbering of its session (a
    /// rollback does not restart it), but not in another session's.
    fn observe_stale(&mut self, epoch: u64, id: i64) {
        if epoch >= self.session_epoch {
            self.window.observe_id(id);
        }
    }

    /// How many leading events are at or before the confirmed position.
    fn rewound(&self, events: &E) -> usize {
        let Some((confirmed, confirmed_at)) = &self.confirmed else {
            return 0;
        };
        (0..events.count())
            .take_while(|&i| {
                let (p, at) = events.key(i);
                at <= *confirmed_at && not_after(p, confirmed)
            })
            .count()
    }

    fn request_rollback(&mut self, now: Instant, reason: &str) {
        self.status.rollbacks += 1;
        self.need_rollback = true;
        self.begin_epoch(reason, false);
        // back off before redelivery so a persistent failure does not spin
        let delay = self.backoff(self.consecutive_rollbacks);
        self.consecutive_rollbacks = self.consecutive_rollbacks.saturating_add(1);
        self.paused_until = Some(now + delay);
    }

    /// Stop for good: drop the session, release waiters, report.
    fn finish_shutdown(&mut self) {
        self.state = ConnectionState::Stopped;
        self.pending = None;
        if self.link != Link::None {
            self.link = Link::None;
            self.actions.push(Action::DropSession);
        }
        let unacked = self.window.inflight_batches();
        if unacked > 0 {
            tracing::info!(
                batches = unacked,
                "canal connection closed with unacked batches; canal redelivers them"
            );
        }
        self.window.begin_epoch(true);
        self.decoding = false;
        self.notify_drained();
        self.actions.push(Action::Finished(ShutdownReport {
            acked: self.status.batches_acked,
            unacked,
            abandoned_total: self.status.abandoned_total,
            fetched_position: self.status.last_position.clone(),
            acked_position: self.status.acked_position.clone(),
        }));
    }
}
