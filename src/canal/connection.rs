//! The `CanalConnection` actor: owns the Canal session and the batches in flight.
//!
//! It fetches batches (GET without ack), decodes them into [`ChangeEvent`]s and sends each to
//! its subscriber as a [`CanalEvent::Batch`]. The subscriber answers with [`AckBatch`] or
//! [`RollbackBatch`]. Acks are sent to Canal strictly in the order batches were fetched: a
//! batch acked early waits until every earlier one is acked too.
//!
//! Back-pressure: no GET is issued while `max_inflight_batches` batches or
//! `max_inflight_bytes` bytes of frames are unacked, so whatever stalls downstream (a slow
//! consumer, a blocked broker) stops the fetching, and memory stays bounded.
//!
//! Epochs: every reconnect and every rollback starts a new epoch. Canal forgets (or re-issues)
//! the batch ids of the old one, so acks for an old epoch are ignored and the subscriber is told
//! with [`CanalEvent::Reset`]; the rows are redelivered under new batch ids. This is what makes
//! the pipeline at-least-once: nothing is acked unless it was confirmed, and anything not acked
//! comes back.
//!
//! Failures: any session error drops the session; the actor reconnects with exponential backoff,
//! re-subscribes with the current filter and rolls back everything. The actor never blocks its
//! mailbox on the network, so status queries and acks are always served.
//!
//! [`ChangeEvent`]: crate::event::ChangeEvent

use crate::canal::CanalError;
use crate::canal::decode::decode_entries;
use crate::canal::session::{RawBatch, Session, SessionConfig};
use crate::event::{ChangeEvent, Position};
use actix::prelude::*;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Settings of the connection actor.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub session: SessionConfig,
    /// Canal subscription filter (comma-separated regexes on `schema.table`); empty keeps the
    /// server's configured filter.
    pub filter: String,
    /// GET size in Canal's unit (KiB in the default MEMSIZE mode, entries in ITEMSIZE mode).
    pub fetch_size: i32,
    /// How long the server may wait for data before answering a GET with "nothing".
    pub fetch_wait: Duration,
    pub max_inflight_batches: usize,
    pub max_inflight_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Give up (instead of retrying) when the very first connect fails with a permanent error
    /// such as a wrong password.
    pub fail_fast: bool,
}

/// Identifies a batch: Canal's batch id within a connection epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BatchRef {
    pub epoch: u64,
    pub id: i64,
}

impl std::fmt::Display for BatchRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.epoch, self.id)
    }
}

/// A decoded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: BatchRef,
    pub events: Arc<Vec<ChangeEvent>>,
    /// Size of the MESSAGES frame.
    pub bytes: usize,
    pub entries: usize,
}

/// What the connection tells its subscriber.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum CanalEvent {
    /// A batch to process; answer with [`AckBatch`] or [`RollbackBatch`].
    Batch(Batch),
    /// Every batch of an epoch before `epoch` was abandoned and will be redelivered.
    Reset { epoch: u64, reason: String },
    /// The connection gave up (only with `fail_fast`, on a permanent error at first connect).
    Fatal { error: String },
}

/// The subscriber finished a batch: everything derived from it is safely delivered.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct AckBatch(pub BatchRef);

/// The subscriber failed a batch: roll back everything outstanding so Canal redelivers it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RollbackBatch {
    pub batch: BatchRef,
    pub reason: String,
}

/// Replace the subscription filter (applied live with a re-subscribe).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetFilter(pub String);

/// Stop fetching; resolves once every batch in flight has been acked or abandoned.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Close the session and stop the actor, optionally rolling back what is outstanding first.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub rollback: bool,
}

/// Ask for a [`ConnectionStatus`].
#[derive(Debug, Message)]
#[rtype(result = "ConnectionStatus")]
pub struct GetStatus;

/// A snapshot of the connection.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConnectionStatus {
    pub state: &'static str,
    pub server: String,
    pub destination: String,
    pub filter: String,
    pub epoch: u64,
    pub inflight_batches: usize,
    pub inflight_bytes: usize,
    pub batches_received: u64,
    pub events_received: u64,
    pub batches_acked: u64,
    pub rollbacks: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Position of the newest event fetched.
    pub last_position: Option<Position>,
    /// When the newest fetched event was executed on the source (ms since the epoch).
    pub last_executed_at: Option<i64>,
    /// Position of the newest event whose batch was acked.
    pub acked_position: Option<Position>,
    pub acked_executed_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    Backoff,
    Stopped,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Backoff => "reconnecting",
            State::Stopped => "stopped",
        }
    }
}

struct InFlight {
    id: i64,
    bytes: usize,
    acked: bool,
    last: Option<(Position, i64)>,
}

/// An operation on the lent session; it hands the session back with its result.
type SessionOp = std::pin::Pin<Box<dyn Future<Output = (Session, Result<Op, CanalError>)>>>;

/// What an operation on the session did.
enum Op {
    Fetched { epoch: u64, raw: RawBatch },
    Acked { ids: Vec<i64> },
    Subscribed,
    RolledBack,
    Closed,
}

/// The Canal connection actor. See the module docs.
pub struct CanalConnection {
    cfg: ConnectionConfig,
    subscriber: Recipient<CanalEvent>,
    state: State,
    session: Option<Session>,
    /// The session is lent to an operation.
    busy: bool,
    epoch: u64,
    inflight: VecDeque<InFlight>,
    inflight_bytes: usize,
    need_subscribe: bool,
    need_rollback: bool,
    paused_until: Option<Instant>,
    /// A timer to resume fetching after `paused_until` is set.
    resume_scheduled: bool,
    consecutive_rollbacks: u32,
    attempt: u32,
    ever_connected: bool,
    draining: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// A requested shutdown (rollback first?) and who waits for it.
    shutdown: Option<(bool, oneshot::Sender<()>)>,
    status: ConnectionStatus,
}

impl CanalConnection {
    pub fn new(cfg: ConnectionConfig, subscriber: Recipient<CanalEvent>) -> Self {
        let status = ConnectionStatus {
            server: cfg.session.addr(),
            destination: cfg.session.destination.clone(),
            filter: cfg.filter.clone(),
            ..Default::default()
        };
        CanalConnection {
            cfg,
            subscriber,
            state: State::Connecting,
            session: None,
            busy: false,
            epoch: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            need_subscribe: false,
            need_rollback: false,
            paused_until: None,
            resume_scheduled: false,
            consecutive_rollbacks: 0,
            attempt: 0,
            ever_connected: false,
            draining: false,
            drain_waiters: Vec::new(),
            shutdown: None,
            status,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.reconnect_min.max(Duration::from_millis(1));
        let exp = base.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.cfg.reconnect_max.max(base));
        // up to 20% jitter so restarts of several instances do not synchronise
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        capped + capped.mul_f64((nanos % 200) as f64 / 1000.0)
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.state == State::Stopped {
            return;
        }
        self.state = State::Connecting;
        self.busy = true;
        let cfg = self.cfg.session.clone();
        let filter = self.cfg.filter.clone();
        let fut = async move {
            let mut session = Session::connect(&cfg).await?;
            session.subscribe(&filter).await?;
            // Batches of an earlier connection are still outstanding on the server; roll
            // them back so they are redelivered and later acks line up.
            session.rollback(0).await?;
            Ok::<_, CanalError>(session)
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.busy = false;
            if act.state == State::Stopped {
                return;
            }
            match res {
                Ok(session) => {
                    act.epoch += 1;
                    act.session = Some(session);
                    act.state = State::Connected;
                    act.attempt = 0;
                    act.ever_connected = true;
                    act.status.last_error = None;
                    tracing::info!(
                        server = %act.cfg.session.addr(),
                        destination = %act.cfg.session.destination,
                        epoch = act.epoch,
                        "canal session established"
                    );
                    act.drive(ctx);
                }
                Err(e) => {
                    if e.is_permanent() && act.cfg.fail_fast && !act.ever_connected {
                        tracing::debug!(error = %e, "canal connection failed permanently");
                        act.subscriber.do_send(CanalEvent::Fatal {
                            error: e.to_string(),
                        });
                        act.state = State::Stopped;
                        ctx.stop();
                        return;
                    }
                    act.schedule_reconnect(e, ctx);
                }
            }
        }));
    }

    fn schedule_reconnect(&mut self, e: CanalError, ctx: &mut Context<Self>) {
        let delay = self.backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.status.reconnects += 1;
        self.status.last_error = Some(e.to_string());
        if e.is_permanent() {
            tracing::error!(error = %e, retry_in = ?delay, "canal connection failed");
        } else {
            tracing::warn!(error = %e, retry_in = ?delay, "canal connection failed");
        }
        self.state = State::Backoff;
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    /// Drop the session after an error: everything in flight is abandoned.
    fn fail(&mut self, e: CanalError, ctx: &mut Context<Self>) {
        self.session = None;
        let reason = e.to_string();
        self.abandon_inflight(&reason);
        if self.state == State::Stopped {
            return;
        }
        if self.shutdown.is_some() {
            tracing::warn!(error = %e, "canal session failed during shutdown");
            self.finish_shutdown(ctx);
            return;
        }
        self.schedule_reconnect(e, ctx);
    }

    /// Start a new epoch: the subscriber forgets older batches and acks for them are ignored.
    fn abandon_inflight(&mut self, reason: &str) {
        self.epoch += 1;
        if !self.inflight.is_empty() {
            tracing::warn!(
                batches = self.inflight.len(),
                reason,
                "abandoning unacked canal batches; they will be redelivered"
            );
        }
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.subscriber.do_send(CanalEvent::Reset {
            epoch: self.epoch,
            reason: reason.to_string(),
        });
        self.notify_drained();
    }

    fn notify_drained(&mut self) {
        if self.inflight.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Run the next operation on the session, if it is free.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.state != State::Connected {
            return;
        }
        let Some(mut session) = self.session.take() else {
            return;
        };
        let op: SessionOp;
        if self.need_rollback {
            self.need_rollback = false;
            op = Box::pin(async move {
                let r = session.rollback(0).await.map(|_| Op::RolledBack);
                (session, r)
            });
        } else if self.inflight.front().is_some_and(|b| b.acked) {
            // Popped before the write: if it fails, the session is dropped and the epoch
            // abandoned, so Canal redelivers these batches anyway.
            let mut ids = Vec::new();
            while self.inflight.front().is_some_and(|b| b.acked) {
                let b = self.inflight.pop_front().expect("front exists");
                ids.push(b.id);
                self.inflight_bytes -= b.bytes;
                if let Some((pos, at)) = b.last {
                    self.status.acked_position = Some(pos);
                    self.status.acked_executed_at = Some(at);
                }
            }
            op = Box::pin(async move {
                let mut r = Ok(());
                for id in &ids {
                    r = session.ack(*id).await;
                    if r.is_err() {
                        break;
                    }
                }
                (session, r.map(|_| Op::Acked { ids }))
            });
        } else if let Some((rollback, _)) = &self.shutdown {
            // every acked batch has been written; close (rolling back the rest if asked)
            let rollback = *rollback;
            op = Box::pin(async move {
                if rollback && let Err(e) = session.rollback(0).await {
                    tracing::warn!(error = %e, "rollback on shutdown failed");
                }
                (session, Ok(Op::Closed))
            });
        } else if self.need_subscribe {
            self.need_subscribe = false;
            let filter = self.cfg.filter.clone();
            op = Box::pin(async move {
                let r = session.subscribe(&filter).await.map(|_| Op::Subscribed);
                (session, r)
            });
        } else if self.may_fetch() {
            let epoch = self.epoch;
            let (size, wait) = (self.cfg.fetch_size, self.cfg.fetch_wait);
            op = Box::pin(async move {
                let r = session
                    .get(size, wait)
                    .await
                    .map(|raw| Op::Fetched { epoch, raw });
                (session, r)
            });
        } else {
            self.session = Some(session);
            if let Some(until) = self.paused_until {
                let now = Instant::now();
                if until <= now {
                    self.paused_until = None;
                    self.drive(ctx);
                } else if !self.resume_scheduled {
                    self.resume_scheduled = true;
                    ctx.run_later(until - now, |act, ctx| {
                        act.resume_scheduled = false;
                        act.drive(ctx)
                    });
                }
            }
            return;
        }
        self.busy = true;
        ctx.spawn(op.into_actor(self).map(|(session, res), act, ctx| {
            act.busy = false;
            if act.state == State::Stopped {
                return;
            }
            match res {
                Ok(Op::Closed) => {
                    drop(session);
                    act.finish_shutdown(ctx);
                }
                Ok(op) => {
                    act.session = Some(session);
                    act.completed(op);
                    act.drive(ctx);
                }
                Err(e) => act.fail(e, ctx),
            }
        }));
    }

    fn may_fetch(&self) -> bool {
        !self.draining
            && self.paused_until.is_none_or(|t| t <= Instant::now())
            && self.inflight.len() < self.cfg.max_inflight_batches.max(1)
            && self.inflight_bytes < self.cfg.max_inflight_bytes.max(1)
    }

    fn completed(&mut self, op: Op) {
        match op {
            Op::Fetched { epoch, raw } => self.on_fetched(epoch, raw),
            Op::Acked { ids } => {
                self.status.batches_acked += ids.len() as u64;
                self.consecutive_rollbacks = 0;
                tracing::debug!(?ids, "canal batches acked");
                self.notify_drained();
            }
            Op::Subscribed => {
                tracing::info!(filter = %self.cfg.filter, "canal subscription updated")
            }
            Op::RolledBack => tracing::info!(epoch = self.epoch, "canal batches rolled back"),
            Op::Closed => {}
        }
    }

    fn on_fetched(&mut self, epoch: u64, raw: RawBatch) {
        if raw.is_empty() {
            return;
        }
        if epoch != self.epoch {
            // Fetched before a rollback was requested: the pending rollback drops it.
            tracing::debug!(
                batch_id = raw.batch_id,
                "discarding batch fetched before rollback"
            );
            return;
        }
        let batch = BatchRef {
            epoch,
            id: raw.batch_id,
        };
        let mut events = Vec::new();
        if let Err(source) =
            decode_entries(&self.cfg.session.destination, &raw.entries, &mut events)
        {
            let e = CanalError::Decode {
                destination: self.cfg.session.destination.clone(),
                batch_id: raw.batch_id,
                source,
            };
            tracing::error!(error = %e, "undecodable canal batch; rolling back");
            self.status.last_error = Some(e.to_string());
            self.request_rollback(&e.to_string());
            return;
        }
        self.status.batches_received += 1;
        self.status.events_received += events.len() as u64;
        let last = events.last().map(|e| (e.position.clone(), e.executed_at));
        if let Some((pos, at)) = &last {
            self.status.last_position = Some(pos.clone());
            self.status.last_executed_at = Some(*at);
        }
        tracing::debug!(
            batch = %batch,
            entries = raw.entries.len(),
            events = events.len(),
            bytes = raw.frame_bytes,
            "canal batch fetched"
        );
        self.inflight.push_back(InFlight {
            id: raw.batch_id,
            bytes: raw.frame_bytes,
            // nothing to deliver (only transaction boundaries): ready to ack in order
            acked: events.is_empty(),
            last,
        });
        self.inflight_bytes += raw.frame_bytes;
        if !events.is_empty() {
            self.subscriber.do_send(CanalEvent::Batch(Batch {
                batch,
                events: Arc::new(events),
                bytes: raw.frame_bytes,
                entries: raw.entries.len(),
            }));
        }
    }

    fn request_rollback(&mut self, reason: &str) {
        self.status.rollbacks += 1;
        self.need_rollback = true;
        self.abandon_inflight(reason);
        // Back off before redelivery so a persistent failure does not spin.
        let delay = self.backoff(self.consecutive_rollbacks);
        self.consecutive_rollbacks = self.consecutive_rollbacks.saturating_add(1);
        self.paused_until = Some(Instant::now() + delay);
    }

    /// Stop for good: drop the session, release waiters, answer the shutdown request.
    fn finish_shutdown(&mut self, ctx: &mut Context<Self>) {
        self.state = State::Stopped;
        self.session = None;
        if !self.inflight.is_empty() {
            tracing::info!(
                batches = self.inflight.len(),
                "canal connection closed with unacked batches; canal redelivers them"
            );
        }
        self.inflight.clear();
        self.notify_drained();
        if let Some((_, reply)) = self.shutdown.take() {
            let _ = reply.send(());
        }
        ctx.stop();
    }

    fn snapshot(&self) -> ConnectionStatus {
        let mut s = self.status.clone();
        s.state = self.state.as_str();
        s.epoch = self.epoch;
        s.inflight_batches = self.inflight.len();
        s.inflight_bytes = self.inflight_bytes;
        s.filter = self.cfg.filter.clone();
        s
    }
}

impl Actor for CanalConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        self.connect(ctx);
    }
}

impl Handler<AckBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: AckBatch, ctx: &mut Context<Self>) {
        if msg.0.epoch != self.epoch {
            tracing::debug!(batch = %msg.0, "ignoring ack for an abandoned batch");
            return;
        }
        match self.inflight.iter_mut().find(|b| b.id == msg.0.id) {
            Some(b) => b.acked = true,
            None => tracing::warn!(batch = %msg.0, "ack for an unknown batch"),
        }
        self.drive(ctx);
    }
}

impl Handler<RollbackBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: RollbackBatch, ctx: &mut Context<Self>) {
        if msg.batch.epoch != self.epoch {
            return;
        }
        tracing::warn!(batch = %msg.batch, reason = %msg.reason, "rolling back canal batches");
        self.request_rollback(&msg.reason);
        self.drive(ctx);
    }
}

impl Handler<SetFilter> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: SetFilter, ctx: &mut Context<Self>) {
        if msg.0 != self.cfg.filter {
            self.cfg.filter = msg.0;
            self.need_subscribe = self.state == State::Connected || self.busy;
            self.drive(ctx);
        }
    }
}

impl Handler<Drain> for CanalConnection {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.notify_drained();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Shutdown> for CanalConnection {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let (tx, rx) = oneshot::channel();
        if let Some((_, earlier)) = self.shutdown.replace((msg.rollback, tx)) {
            let _ = earlier.send(());
        }
        if self.state == State::Connected {
            // runs after the operation in progress and after writing every acked batch
            self.drive(ctx);
        } else {
            // no session: nothing to flush or roll back
            self.finish_shutdown(ctx);
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<GetStatus> for CanalConnection {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot())
    }
}
