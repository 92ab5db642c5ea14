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

use super::api::{ConnectionState, ConnectionStatus, ShutdownReport, StallInfo};
use crate::backoff::Backoff;
use crate::canal::window::{
    AckOutcome, BatchRef, BatchWindow, GetMode, server_unit_larger, took_all,
};
use crate::event::Position;
use crate::ha::{Lease, Role};
use std::time::{Duration, Instant};

/// A fetched batch as the core sees it (the shell's is the undecoded frame).
pub trait RawView {
    /// `-1` when the GET found nothing.
    fn batch_id(&self) -> i64;
    fn frame_bytes(&self) -> usize;
    /// The size the GET asked for, in Canal's units.
    fn asked(&self) -> i32;
    /// Each entry's size.
    fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_;
    fn is_empty(&self) -> bool {
        self.batch_id() < 0 || self.entry_sizes().len() == 0
    }
}

/// A decoded batch's events as the core sees them, in binlog order.
pub trait EventsView {
    fn count(&self) -> usize;
    /// Position and execution time (ms) of event `i`.
    fn key(&self, i: usize) -> (&Position, i64);
    /// Drop the first `n` events.
    fn drop_first(&mut self, n: usize);
}

/// Settings of the core (the parts of [`super::ConnectionConfig`] that decide something).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The Canal server of the simple mode (`host:port`); in ZooKeeper mode the lease names it.
    pub server: String,
    pub destination: String,
    pub client_id: String,
    pub filter: String,
    pub fetch_size: i32,
    pub mem_unit: u32,
    pub fetch_wait: Duration,
    pub max_inflight_batches: usize,
    pub max_inflight_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub fail_fast: bool,
    /// Seeds the backoff jitter (up to 20%); the simulation passes its own for reproducible
    /// runs.
    pub jitter_seed: u64,
}

/// A timer the shell arms ([`Action::Timer`]) and reports back when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Try to connect again after a failure.
    Reconnect,
    /// Try again after a conflict with another client.
    ConflictRetry,
    /// The pause after a rollback is over.
    Resume,
    /// The long poll of this idle period has waited `fetch_wait` for the acks in flight.
    AckWait(u64),
}

/// One operation on the session (the shell lends the session to it and reports its result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get {
        epoch: u64,
        size: i32,
        wait: Duration,
    },
    /// A GET that reads past a frame over the cap (the operator approved the skip).
    GetSkipping {
        epoch: u64,
        wait: Duration,
    },
    /// Write these acks in order, then (if given) a GET in the same turn.
    Ack {
        ids: Vec<i64>,
        then_get: Option<(u64, i32, Duration)>,
    },
    Subscribe(String),
    Rollback,
    /// Close the session (rolling back what is outstanding first, if asked).
    Close {
        rollback: bool,
    },
}

/// What the core asks its shell to do, in order.
#[derive(Debug)]
pub enum Action<R, E> {
    /// Open a session to `server` (`host:port`), subscribe with `filter`, roll back; answer
    /// with [`Input::Connected`] or [`Input::Failed`] carrying `generation`.
    Connect {
        generation: u64,
        server: String,
        filter: String,
    },
    /// Run `op` on the session; answer with [`Input::Done`] or [`Input::Failed`].
    Run {
        generation: u64,
        op: Op,
    },
    /// Drop the session (an operation still running on it answers with an old generation).
    DropSession,
    /// Decode `raw` (off the actors' thread) and answer with [`Input::Decoded`].
    Decode {
        epoch: u64,
        raw: R,
    },
    /// Hand a batch to the subscriber.
    Deliver {
        batch: BatchRef,
        events: E,
        bytes: usize,
        entries: usize,
    },
    /// Tell the subscriber every batch before `epoch` was abandoned.
    Reset {
        epoch: u64,
        reason: String,
    },
    /// Arm `timer` to fire after `after` (replacing an armed one of the same kind).
    Timer {
        timer: Timer,
        after: Duration,
    },
    CancelTimer(Timer),
    /// The current filter is in force: answer who waited for it.
    FilterApplied,
    /// A drain may end: answer who waited for it.
    Drained,
    /// The connection stopped: answer a shutdown request with the report, stop the actor.
    Finished(ShutdownReport),
    /// The connection gave up (a permanent error at the first connect with `fail_fast`).
    Fatal(String),
}

/// What happened, for the core.
#[derive(Debug)]
pub enum Input<R, E> {
    /// The shell started.
    Start,
    /// ZooKeeper mode: the lease changed.
    Lease(Lease),
    /// A session of `generation` is established with `filter`.
    Connected {
        generation: u64,
        filter: String,
    },
    Done {
        generation: u64,
        done: Done<R>,
    },
    /// A connect or an operation failed; the shell dropped the session.
    Failed {
        generation: u64,
        failure: Failure,
    },
    Decoded {
        epoch: u64,
        raw: R,
        outcome: Decoded<E>,
    },
    /// The subscriber finished a batch ([`super::AckBatch`]).
    Ack(BatchRef),
    Release(BatchRef),
    Rollback {
        batch: BatchRef,
        reason: String,
    },
    SetFilter(String),
    Drain,
    Shutdown {
        rollback: bool,
    },
    Timer(Timer),
    /// The raw-text charset lookup failed (`Some`) or works again (`None`): for `last_error`.
    LookupError(Option<String>),
}

/// A finished operation.
#[derive(Debug)]
pub enum Done<R> {
    Fetched {
        epoch: u64,
        raw: R,
    },
    Skipped {
        epoch: u64,
        batch_id: i64,
        frame_bytes: usize,
    },
    Acked {
        ids: Vec<i64>,
        fetched: Option<(u64, R)>,
    },
    Subscribed(String),
    RolledBack,
    Closed,
}

/// How decoding a batch ended.
#[derive(Debug)]
pub enum Decoded<E> {
    Events(E),
    /// Retrying cannot help (the error's text).
    Undecodable(String),
    /// The decoder panicked: a bug; the batch is redelivered after a rollback.
    Panicked(String),
}

/// A failed connect or operation: what the core needs to know of the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// What kind of failure: decides between a reconnect, a stall, a conflict and standing by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A reconnect may fix it (network, server restart).
    Transient,
    /// A reconnect repeats it (a wrong password); still retried with backoff, logged as an error.
    Permanent,
    /// The next frame is over `canal.max_frame_bytes`.
    TooLarge { len: usize, max: usize },
    /// Canal no longer knows a batch we ack: another process acked or rolled it back.
    Vanished { evidence: String },
    /// ZooKeeper mode: the lease ended under the operation.
    NotActive,
}

/// The session, as far as the core knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    None,
    Connecting,
    Idle,
    Busy,
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
            jitter: cfg.jitter_seed | 1,
            actions: Vec::new(),
            cfg,
        }
    }

    /// Start the rewind guard at a position confirmed by an earlier run.
    pub fn with_confirmed(mut self, confirmed: Option<(Position, i64)>) -> Self {
        self.confirmed = confirmed;
        self
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

    /// Pass what the stream is stalled at (`canal-consumer skip TOKEN`).
    pub fn skip(&mut self, now: Instant, token: &str) -> Result<String, String> {
        let Some(stall) = self.status.stall.clone() else {
            return Err("the canal stream is not stalled; nothing to skip".into());
        };
        if token != stall.token {
            return Err(format!(
                "the stream is stalled at {}, not {token}; nothing was skipped",
                stall.token
            ));
        }
        if let Some(batch) = self.held.take() {
            self.window.ack(batch);
            self.record_skip(format!(
                "canal batch {} ({}) after {}",
                batch.id,
                stall.reason,
                stall
                    .after
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "the start".into())
            ));
            self.state = ConnectionState::Connected;
            self.drive(now);
            return Ok(format!("skipped {}", stall.token));
        }
        // an oversized frame: reconnect and read past it on the next fetch
        self.skip_oversized = true;
        self.status.stall = None;
        self.connect(now);
        Ok(format!(
            "skipping {}: the next fetch reads past it (see `canal-consumer status`)",
            stall.token
        ))
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
        if failure.kind == FailureKind::Permanent && self.cfg.fail_fast && !self.ever_connected {
            tracing::debug!(error = %failure.message, "canal connection failed permanently");
            self.actions.push(Action::Fatal(failure.message));
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
        if failure.kind == FailureKind::Permanent {
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
            FailureKind::Transient | FailureKind::Permanent => self.schedule_reconnect(failure),
        }
    }

    /// Start a new epoch: the subscriber forgets older batches; acks for them are not written.
    fn begin_epoch(&mut self, reason: &str, new_session: bool) {
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
            // `fetch_wait` (see `BatchWindow::next_get`)
            if let Some(period) = self.window.waiting_for_acks()
                && self.ack_wait_timer != Some(period)
            {
                if let Some(old) = self.ack_wait_timer.replace(period) {
                    self.actions.push(Action::CancelTimer(Timer::AckWait(old)));
                }
                self.actions.push(Action::Timer {
                    timer: Timer::AckWait(period),
                    after: self.cfg.fetch_wait,
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

    /// Name a Canal memunit larger than `canal.mem_unit`, once, if this answer shows one.
    fn check_unit(&mut self, raw: &R) {
        if self.status.config_warning.is_none()
            && let Some(bytes) =
                server_unit_larger(raw.asked(), self.cfg.mem_unit, raw.entry_sizes())
        {
            let w = format!(
                "canal.mem_unit is {} bytes, but the Canal server answered a GET for one unit with \
                 {bytes} bytes before its last entry: its canal.instance.memory.buffer.memunit is \
                 larger. GETs are larger than canal.batch_size means, and a quiet table's change \
                 waits for the long poll to time out (canal.fetch_wait); set canal.mem_unit to the \
                 server's memunit",
                self.cfg.mem_unit
            );
            tracing::warn!("{w}");
            self.status.config_warning = Some(w);
        }
    }

    fn on_fetched(&mut self, epoch: u64, raw: R) {
        self.check_unit(&raw);
        if raw.is_empty() {
            if epoch == self.window.epoch() {
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
        let deliver = events.count() > 0;
        let fetched = self
            .window
            .fetched(raw.batch_id(), raw.frame_bytes(), last, deliver);
        // a short answer: Canal had nothing more, so the next GET long-polls
        if took_all(raw.asked(), self.cfg.mem_unit, raw.entry_sizes()) {
            self.window.caught_up();
        }
        tracing::debug!(
            batch = %fetched.batch,
            entries = raw.entry_sizes().len(),
            events = events.count(),
            bytes = raw.frame_bytes(),
            "canal batch fetched"
        );
        if deliver {
            self.actions.push(Action::Deliver {
                batch: fetched.batch,
                bytes: raw.frame_bytes(),
                entries: raw.entry_sizes().len(),
                events,
            });
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

    /// Stop fetching until an operator acts; say so everywhere.
    fn stall(&mut self, token: String, reason: String, how: String) {
        tracing::error!(reason = %reason, how = %how, "canal stream stalled");
        self.status.last_error = Some(format!("{reason}; {how}"));
        self.status.stall = Some(StallInfo {
            token,
            reason,
            after: self.status.acked_position.clone(),
            how,
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        self.state = ConnectionState::Stalled;
    }

    fn record_skip(&mut self, what: String) {
        tracing::warn!(skipped = %what, "skipped at the operator's request; its rows were not delivered");
        self.status.skipped.push(what);
        let n = self.status.skipped.len();
        if n > 20 {
            self.status.skipped.drain(..n - 20);
        }
        self.status.stall = None;
        self.status.last_error = None;
    }

    /// Another process fetched batches as our Canal client: stop, roll back, show it, and try
    /// again after `reconnect_max`.
    fn on_conflict(&mut self, evidence: String) {
        let e = crate::canal::CanalError::Conflict {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            evidence,
        };
        tracing::error!(error = %e, retry_in = ?self.cfg.reconnect_max, "second client detected");
        self.status.conflicts += 1;
        self.status.last_error = Some(e.to_string());
        if self.link != Link::None {
            // an operation still running on it answers with an old generation
            self.generation += 1;
            self.link = Link::None;
            self.actions.push(Action::DropSession);
        }
        self.begin_epoch(&e.to_string(), true);
        self.state = ConnectionState::Conflict;
        let base = self.cfg.reconnect_max;
        let delay = self.jittered(Backoff::new(base, base), 0);
        self.actions.push(Action::Timer {
            timer: Timer::ConflictRetry,
            after: delay,
        });
    }
}

/// Is `p` at or before `q` in the same binlog (same MySQL server, same log name stem)?
/// Positions of different servers or binlog stems are not comparable: never "before".
pub fn not_after(p: &Position, q: &Position) -> bool {
    if p.server_id != q.server_id && p.server_id != 0 && q.server_id != 0 {
        return false;
    }
    let (Some((ps, pn)), Some((qs, qn))) = (log_seq(&p.log_file), log_seq(&q.log_file)) else {
        return false;
    };
    ps == qs && (pn, p.offset, p.row_index) <= (qn, q.offset, q.row_index)
}

/// `mysql-bin.000042` -> (`mysql-bin`, 42).
fn log_seq(name: &str) -> Option<(&str, u64)> {
    let (stem, n) = name.rsplit_once('.')?;
    Some((stem, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Raw(i64, usize);
    impl RawView for Raw {
        fn batch_id(&self) -> i64 {
            self.0
        }
        fn frame_bytes(&self) -> usize {
            self.1 * 100
        }
        fn asked(&self) -> i32 {
            10
        }
        fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
            (0..self.1).map(|_| 100)
        }
    }

    #[derive(Debug)]
    struct Rows(Vec<(Position, i64)>);
    impl EventsView for Rows {
        fn count(&self) -> usize {
            self.0.len()
        }
        fn key(&self, i: usize) -> (&Position, i64) {
            (&self.0[i].0, self.0[i].1)
        }
        fn drop_first(&mut self, n: usize) {
            self.0.drain(..n);
        }
    }

    fn pos(file: &str, offset: u64) -> Position {
        Position {
            log_file: file.into(),
            offset,
            row_index: 0,
            server_id: 1,
            gtid: None,
        }
    }

    fn rows(offsets: std::ops::Range<u64>) -> Rows {
        Rows(
            offsets
                .map(|o| (pos("mysql-bin.000002", o), o as i64))
                .collect(),
        )
    }

    fn core() -> (ConnectionCore<Raw, Rows>, Instant) {
        let cfg = CoreConfig {
            server: "canal:11111".into(),
            destination: "example".into(),
            client_id: "1001".into(),
            filter: ".*".into(),
            fetch_size: 10,
            mem_unit: 100,
            fetch_wait: Duration::from_millis(100),
            max_inflight_batches: 8,
            max_inflight_bytes: 1 << 20,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            fail_fast: false,
            jitter_seed: 1,
        };
        let now = Instant::now();
        let mut c = ConnectionCore::new(cfg, false);
        c.on(now, Input::Start);
        c.on(
            now,
            Input::Connected {
                generation: 0,
                filter: ".*".into(),
            },
        );
        c.take_actions();
        (c, now)
    }

    /// Answer the GET on the wire with `raw`, decode it into `events`; the delivered batch.
    fn fetch(
        c: &mut ConnectionCore<Raw, Rows>,
        now: Instant,
        raw: Raw,
        events: Rows,
    ) -> Option<(BatchRef, usize)> {
        let epoch = c.window().epoch();
        c.on(
            now,
            Input::Done {
                generation: c.generation(),
                done: Done::Fetched { epoch, raw },
            },
        );
        let raw = c.take_actions().into_iter().find_map(|a| match a {
            Action::Decode { raw, .. } => Some(raw),
            _ => None,
        })?;
        c.on(
            now,
            Input::Decoded {
                epoch,
                raw,
                outcome: Decoded::Events(events),
            },
        );
        let actions = c.take_actions();
        // what else it decided (an ack of a batch with nothing to deliver) stays for `acks`
        let delivered = actions.iter().find_map(|a| match a {
            Action::Deliver { batch, events, .. } => Some((*batch, events.count())),
            _ => None,
        });
        c.actions = actions;
        delivered
    }

    /// The ack ids of the operation the core runs next, if it acks.
    fn acks(c: &mut ConnectionCore<Raw, Rows>) -> Vec<i64> {
        c.take_actions()
            .into_iter()
            .find_map(|a| match a {
                Action::Run {
                    op: Op::Ack { ids, .. },
                    ..
                } => Some(ids),
                _ => None,
            })
            .unwrap_or_default()
    }

    #[test]
    fn positions_compare_within_one_binlog_only() {
        let a = pos("mysql-bin.000002", 500);
        assert!(not_after(&a, &a));
        assert!(not_after(&pos("mysql-bin.000002", 400), &a));
        assert!(not_after(&pos("mysql-bin.000001", 900), &a));
        assert!(!not_after(&pos("mysql-bin.000003", 4), &a));
        // another stem or another server: never "before"
        assert!(!not_after(&pos("other-bin.000001", 4), &a));
        let mut other = pos("mysql-bin.000001", 4);
        other.server_id = 2;
        assert!(!not_after(&other, &a));
        // rows of one event
        let mut later_row = a.clone();
        later_row.row_index = 1;
        assert!(!not_after(&later_row, &a));
    }

    #[test]
    fn rows_sent_again_at_or_before_the_confirmed_position_are_acked_not_delivered() {
        let (mut c, now) = core();
        // rows 10..15 delivered, confirmed, acked
        let (b, n) = fetch(&mut c, now, Raw(1, 5), rows(10..15)).unwrap();
        assert_eq!(n, 5);
        c.on(now, Input::Ack(b));
        assert_eq!(acks(&mut c), vec![1]);
        assert_eq!(c.confirmed().unwrap().0.offset, 14);
        c.on(
            now,
            Input::Done {
                generation: c.generation(),
                done: Done::Acked {
                    ids: vec![1],
                    fetched: None,
                },
            },
        );
        // Canal restarts from an older cursor: rows 12..14 again, then new rows 15..17
        c.on(
            now,
            Input::Failed {
                generation: c.generation(),
                failure: Failure {
                    kind: FailureKind::Transient,
                    message: "canal closed the connection".into(),
                },
            },
        );
        c.on(now, Input::Timer(Timer::Reconnect));
        c.on(
            now,
            Input::Connected {
                generation: c.generation(),
                filter: ".*".into(),
            },
        );
        c.take_actions();
        // entirely old: acked, nothing delivered, and the guard does not move back
        assert_eq!(fetch(&mut c, now, Raw(1, 3), rows(12..15)), None);
        assert_eq!(acks(&mut c), vec![1]);
        assert_eq!(c.confirmed().unwrap().0.offset, 14);
        c.on(
            now,
            Input::Done {
                generation: c.generation(),
                done: Done::Acked {
                    ids: vec![1],
                    fetched: None,
                },
            },
        );
        // partly old: only the new rows go on
        let (_, n) = fetch(&mut c, now, Raw(2, 4), rows(13..17)).unwrap();
        assert_eq!(n, 2, "rows 15 and 16");
        assert_eq!(c.snapshot().rewind_skipped, 5);
    }

    #[test]
    fn a_batch_whose_id_jumped_is_not_left_waiting_for_a_release() {
        let (mut c, now) = core();
        let (b, _) = fetch(&mut c, now, Raw(1, 1), rows(1..2)).unwrap();
        c.on(now, Input::Ack(b));
        c.take_actions();
        // batch 5 after batch 1: someone else fetched 2..4
        assert_eq!(fetch(&mut c, now, Raw(5, 1), rows(2..3)), None);
        assert_eq!(c.state(), ConnectionState::Conflict);
        assert_eq!(
            c.window().abandoned_batches(),
            0,
            "nothing downstream holds it"
        );
    }
}
