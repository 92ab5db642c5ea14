//! The `CanalConnection` actor: owns the Canal session and the batches in flight.
//!
//! It fetches batches (GET without ack), decodes them into [`ChangeEvent`]s (on tokio's
//! blocking pool, so the actors' thread never runs the decoding; one batch at a time, so they
//! stay in fetch order) and sends each to its subscriber as a [`CanalEvent::Batch`]. The subscriber answers with [`AckBatch`] or
//! [`RollbackBatch`]. Acks are sent to Canal strictly in the order batches were fetched: a
//! batch acked early waits until every earlier one is acked too.
//!
//! The bookkeeping lives in [`BatchWindow`] (sans-IO): which batches are in flight, which are
//! finished, which acks may be written, whether another GET may be issued. This actor only turns
//! messages and session I/O into calls on it.
//!
//! Fetching: while data keeps coming every GET takes what Canal has at once; after a GET came
//! back empty, or short (Canal had nothing more, [`took_all`]), the next one long-polls for the
//! smallest batch (up to `fetch_wait`), which Canal answers as soon as there is one unit of
//! data (see [`GetMode`]). The session is lent to one request at a time, so an ack written
//! behind a long poll waits until Canal answers it; the long poll therefore waits (at most
//! `fetch_wait`) for the acks of the batches in flight, and they go out in the same turn.
//!
//! Back-pressure: no GET is issued while `max_inflight_batches` batches or
//! `max_inflight_bytes` bytes of frames are unacked — counting batches of abandoned epochs that
//! the subscriber still works on until it sends [`ReleaseBatch`] — so whatever stalls downstream
//! (a slow consumer, a blocked broker) stops the fetching, and memory stays bounded.
//!
//! Epochs: every reconnect and every rollback starts a new epoch. Canal forgets (or re-issues)
//! the batch ids of the old one, so acks for an old epoch are never written and the subscriber
//! is told with [`CanalEvent::Reset`]; the rows are redelivered under new batch ids. This is what
//! makes the pipeline at-least-once: nothing is acked unless it was confirmed, and anything not
//! acked comes back.
//!
//! Filters: [`SetFilter`] answers only once Canal has applied the new subscription, so a
//! consumer that was just enabled sees every row committed after its `enable` returned.
//!
//! A second client: Canal numbers the batches of one client identity consecutively; a jump
//! within a session means another process fetches as the same client. The connection then stops
//! fetching, rolls back, shows `conflict` with the evidence, and retries after `reconnect_max`.
//!
//! Failures: any session error drops the session; the actor reconnects with exponential backoff,
//! re-subscribes with the current filter and rolls back everything. The actor never blocks its
//! mailbox on the network, so status queries and acks are always served.
//!
//! ZooKeeper mode (`cfg.lease` set, see [`crate::ha`]): the lease names the Canal server and
//! says whether this replica may work. Every GET and ACK is checked against it right before it
//! is written (a lease that ran out, or a replica that lost its node, writes nothing more); a
//! [`LeaseChanged`] makes the actor drop its session (standby, or the server moved) or connect
//! through the usual path (connect, subscribe, rollback). A dropped session is retired by a
//! generation count, so an operation still running on it is ignored when it comes back.
//!
//! [`ChangeEvent`]: crate::event::ChangeEvent

use crate::backoff::Backoff;
use crate::canal::CanalError;
use crate::canal::decode::{DecodeError, Decoder};
use crate::canal::session::{Fetch, RawBatch, Session, SkippedFrame};
use crate::canal::window::{AckOutcome, BatchWindow, GetMode, server_unit_larger, took_all};
use crate::event::ChangeEvent;

use actix::prelude::*;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

mod api;
mod charsets;
mod stall;
pub use api::*;

/// An operation on the lent session; it hands the session back with its result.
type SessionOp = std::pin::Pin<Box<dyn Future<Output = (Session, Result<Op, CanalError>)>>>;

/// What an operation on the session did.
enum Op {
    Fetched {
        epoch: u64,
        raw: RawBatch,
    },
    Skipped {
        epoch: u64,
        skipped: SkippedFrame,
    },
    /// Acks written, and the answer of the GET that followed them in the same turn, if any.
    Acked {
        ids: Vec<i64>,
        fetched: Option<(u64, RawBatch)>,
    },
    Subscribed {
        filter: String,
    },
    RolledBack,
    Closed,
}

/// The Canal connection actor. See the module docs.
pub struct CanalConnection {
    cfg: ConnectionConfig,
    subscriber: Recipient<CanalEvent>,
    state: ConnectionState,
    session: Option<Session>,
    /// The session is lent to an operation.
    busy: bool,
    /// A fetched batch is being decoded on the blocking pool (no GET until it is back, so
    /// batches reach the window in fetch order).
    decoding: bool,
    /// The idle period whose wait for acks has a timer (`BatchWindow::waiting_for_acks`), and
    /// the timer (cancelled once the wait is over, so it costs no wakeup).
    ack_wait_timer: Option<(u64, SpawnHandle)>,
    window: BatchWindow,
    need_subscribe: bool,
    /// Who waits for the current filter to be in force.
    filter_waiters: Vec<oneshot::Sender<()>>,
    /// The batch held back by an undecodable entry, while stalled on it.
    held: Option<BatchRef>,
    /// Skip the next frame over the cap (the operator approved it with `skip`).
    skip_oversized: bool,
    /// Stalls so far (names the `frame-N` skip token).
    stall_seq: u64,
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
    shutdown: Option<(bool, oneshot::Sender<ShutdownReport>)>,
    status: ConnectionStatus,
    /// Bumped whenever the session is dropped from outside an operation (ZooKeeper mode): an
    /// operation that started on an older generation is ignored when it returns.
    generation: u64,
    /// Raw text mode (`TextSource::Raw`): column charsets and their lookups.
    raw_text: Option<charsets::RawText>,
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
            subscriber,
            state: ConnectionState::Connecting,
            session: None,
            busy: false,
            decoding: false,
            ack_wait_timer: None,
            window: BatchWindow::new(cfg.max_inflight_batches, cfg.max_inflight_bytes),
            need_subscribe: false,
            filter_waiters: Vec::new(),
            held: None,
            skip_oversized: false,
            stall_seq: 0,
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
            generation: 0,
            raw_text: match &cfg.text {
                TextSource::AsShipped => None,
                TextSource::Raw { source_url } => Some(charsets::RawText::new(source_url)),
            },
            cfg,
        }
    }

    /// ZooKeeper mode: the current lease (None in the simple mode).
    fn lease(&self) -> Option<crate::ha::Lease> {
        self.cfg.lease.as_ref().map(|l| l.borrow().clone())
    }

    /// ZooKeeper mode: point the session settings at the server the lease names, or say why
    /// there is none (and set the state to show it). True when a connect may go ahead.
    fn follow_lease(&mut self) -> bool {
        let Some(lease) = self.lease() else {
            return true;
        };
        self.status.ha = Some((&lease).into());
        match lease.target(Instant::now()) {
            Some(addr) => {
                let Some((host, port)) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                else {
                    self.state = ConnectionState::Reconnecting;
                    self.status.last_error = Some(format!(
                        "canal's running node names '{addr}', not host:port"
                    ));
                    return false;
                };
                self.cfg.session.host = host;
                self.cfg.session.port = port;
                self.status.server = addr.to_string();
                true
            }
            None => {
                if let Some(canal) = &lease.canal {
                    self.status.server = canal.clone();
                }
                self.state = if lease.role == crate::ha::Role::Standby {
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

    /// Drop the session from outside an operation (the lease moved or ended).
    fn retire_session(&mut self, reason: &str) {
        self.generation += 1;
        self.busy = false;
        self.session = None;
        self.begin_epoch(reason, true);
        self.held = None;
        self.skip_oversized = false;
        self.need_rollback = false;
    }

    /// Delay before reconnect (or redelivery) number `attempt`: up to 20% jitter so restarts
    /// of several instances do not synchronise.
    fn backoff(&self, attempt: u32) -> Duration {
        Backoff::new(
            self.cfg.reconnect_min.max(Duration::from_millis(1)),
            self.cfg.reconnect_max,
        )
        .with_jitter(0.2)
        .delay(attempt)
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.state == ConnectionState::Stopped || self.busy || self.session.is_some() {
            return;
        }
        if !self.follow_lease() {
            return;
        }
        self.state = ConnectionState::Connecting;
        self.busy = true;
        let generation = self.generation;
        let cfg = self.cfg.session.clone();
        let filter = self.cfg.filter.clone();
        let gate = self.cfg.lease.clone();
        let fut = async move {
            let mut session = Session::connect(&cfg).await?;
            // ZooKeeper mode: a replica whose lease ran out while it connected writes nothing
            may_write(&gate)?;
            session.subscribe(&filter).await?;
            may_write(&gate)?;
            // Batches of an earlier connection are still outstanding on the server; roll
            // them back so they are redelivered and later acks line up.
            session.rollback(0).await?;
            Ok::<_, CanalError>((session, filter))
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            if act.generation != generation {
                return; // the lease moved meanwhile; that path connects anew
            }
            act.busy = false;
            if act.state == ConnectionState::Stopped {
                return;
            }
            if let (Ok(_), Some(lease)) = (&res, act.lease())
                && lease.target(Instant::now()) != Some(act.cfg.session.addr().as_str())
            {
                // no longer ours, or the server moved, while we connected
                drop(res);
                act.state = ConnectionState::Reconnecting;
                act.connect(ctx);
                return;
            }
            match res {
                Ok((session, filter)) => {
                    act.begin_epoch("new canal session", true);
                    act.session = Some(session);
                    act.state = ConnectionState::Connected;
                    // the backoff is reset by a GET that is answered, not by a connect: a server that fails every GET at the same position (out of
                    // memory, say) is retried ever more slowly instead of several times a second
                    act.ever_connected = true;
                    act.status.last_error = None;
                    tracing::info!(
                        server = %act.cfg.session.addr(),
                        destination = %act.cfg.session.destination,
                        epoch = act.window.epoch(),
                        "canal session established"
                    );
                    act.filter_applied(&filter);
                    act.drive(ctx);
                }
                Err(e) => {
                    if e.is_permanent() && act.cfg.fail_fast && !act.ever_connected {
                        tracing::debug!(error = %e, "canal connection failed permanently");
                        act.subscriber.do_send(CanalEvent::Fatal {
                            error: e.to_string(),
                        });
                        act.state = ConnectionState::Stopped;
                        ctx.stop();
                        return;
                    }
                    act.schedule_reconnect(e, ctx);
                }
            }
        }));
    }

    /// A subscription with `filter` is in force: answer who waited for it.
    fn filter_applied(&mut self, filter: &str) {
        if filter == self.cfg.filter {
            for w in self.filter_waiters.drain(..) {
                let _ = w.send(());
            }
        }
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
        self.state = ConnectionState::Reconnecting;
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    /// Drop the session after an error: everything in flight is abandoned.
    fn fail(&mut self, e: CanalError, ctx: &mut Context<Self>) {
        self.session = None;
        let reason = e.to_string();
        self.begin_epoch(&reason, true);
        self.held = None;
        // a skip that did not happen is not retried blindly: the next fetch stalls again
        self.skip_oversized = false;
        if self.state == ConnectionState::Stopped {
            return;
        }
        if self.shutdown.is_some() {
            tracing::warn!(error = %e, "canal session failed during shutdown");
            self.finish_shutdown(ctx);
            return;
        }
        if let CanalError::Frame(crate::canal::codec::FrameError::TooLarge { len, max }) = &e {
            // retrying cannot help: Canal sends the same frame again
            let (len, max) = (*len, *max);
            self.stall_seq += 1;
            let token = format!("frame-{}", self.stall_seq);
            self.stall(
                token.clone(),
                format!("the next batch is a {len}-byte frame, over canal.max_frame_bytes ({max})"),
                format!(
                    "raise canal.max_frame_bytes above {len} and restart, or run `canal-consumer skip {token}` to ack that batch without delivering its rows"
                ),
            );
            return;
        }
        if let Some(evidence) = Self::vanished_batch(&e) {
            return self.on_conflict(evidence, ctx);
        }
        if let CanalError::NotActive { .. } = &e {
            // the lease ended under an operation: wait for it to come back (LeaseChanged)
            tracing::warn!(error = %e, "stopped fetching and acking");
            self.status.last_error = Some(e.to_string());
            if self.follow_lease() {
                self.connect(ctx);
            }
            return;
        }
        self.schedule_reconnect(e, ctx);
    }

    /// Start a new epoch: the subscriber forgets older batches and acks for them are not
    /// written.
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
        self.subscriber.do_send(CanalEvent::Reset {
            epoch,
            reason: reason.to_string(),
        });
        self.notify_drained();
    }

    fn notify_drained(&mut self) {
        if self.window.drained() && !self.decoding && !self.waiting_for_charsets() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Run the next operation on the session, if it is free.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        // the wait for acks is over (they came, or data did): its timer would only wake us
        if let Some((period, _)) = &self.ack_wait_timer
            && self.window.waiting_for_acks() != Some(*period)
            && let Some((_, timer)) = self.ack_wait_timer.take()
        {
            ctx.cancel_future(timer);
        }
        let live = matches!(
            self.state,
            ConnectionState::Connected | ConnectionState::Stalled
        );
        if self.busy || !live || self.session.is_none() {
            return;
        }
        let Some(mut session) = self.session.take() else {
            return;
        };
        let op: SessionOp;
        let gate = self.cfg.lease.clone();
        let generation = self.generation;
        let ackable = if self.need_rollback {
            Default::default()
        } else {
            self.window.take_ackable()
        };
        if self.need_rollback {
            self.need_rollback = false;
            op = Box::pin(async move {
                let r = session.rollback(0).await.map(|_| Op::RolledBack);
                (session, r)
            });
        } else if !ackable.ids.is_empty() {
            if let Some((pos, at)) = ackable.last {
                self.status.acked_position = Some(pos);
                self.status.acked_executed_at = Some(at);
            }
            let ids = ackable.ids;
            // Acks get no reply, so a GET written right behind them costs no extra round trip:
            // one turn of the session instead of two.
            let get = (self.shutdown.is_none() && !self.need_subscribe && !self.skip_oversized)
                .then(|| self.next_get())
                .flatten()
                .map(|mode| (self.window.epoch(), self.get_args(mode)));
            if get.is_some() {
                self.window.get_sent();
            }
            op = Box::pin(async move {
                for id in &ids {
                    if let Err(e) = may_write(&gate) {
                        return (session, Err(e));
                    }
                    tracing::debug!(batch_id = *id, "writing canal ack");
                    if let Err(e) = session.ack(*id).await {
                        return (session, Err(e));
                    }
                }
                let Some((epoch, (size, wait))) = get else {
                    return (session, Ok(Op::Acked { ids, fetched: None }));
                };
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session.get(size, wait).await.map(|raw| Op::Acked {
                    ids,
                    fetched: Some((epoch, raw)),
                });
                (session, r)
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
                let r = session
                    .subscribe(&filter)
                    .await
                    .map(|_| Op::Subscribed { filter });
                (session, r)
            });
        } else if self.may_fetch() && self.skip_oversized {
            self.window.get_sent();
            let epoch = self.window.epoch();
            let wait = self.cfg.fetch_wait;
            op = Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                // the smallest batch Canal makes: the oversized entry and as little else as it can
                let (session, r) = session.get_skipping_oversized(1, wait, None).await;
                let r = r.map(|f| match f {
                    Fetch::Batch(raw) => Op::Fetched { epoch, raw },
                    Fetch::Skipped(skipped) => Op::Skipped { epoch, skipped },
                });
                (session, r)
            });
        } else if let Some(mode) = self.next_get() {
            self.window.get_sent();
            let epoch = self.window.epoch();
            let (size, wait) = self.get_args(mode);
            op = Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session
                    .get(size, wait)
                    .await
                    .map(|raw| Op::Fetched { epoch, raw });
                (session, r)
            });
        } else {
            self.session = Some(session);
            // caught up with batches in flight: the long poll waits for their acks, at most
            // `fetch_wait` (see `BatchWindow::next_get`)
            if let Some(period) = self.window.waiting_for_acks()
                && self.ack_wait_timer.as_ref().map(|t| t.0) != Some(period)
            {
                let timer = ctx.run_later(self.cfg.fetch_wait, move |act, ctx| {
                    act.ack_wait_timer = None;
                    act.window.end_ack_wait(period);
                    act.drive(ctx);
                });
                if let Some((_, old)) = self.ack_wait_timer.replace((period, timer)) {
                    ctx.cancel_future(old);
                }
            }
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
        ctx.spawn(op.into_actor(self).map(move |(session, res), act, ctx| {
            if act.generation != generation {
                return; // retired while it ran (see retire_session)
            }
            act.busy = false;
            if act.state == ConnectionState::Stopped {
                return;
            }
            match res {
                Ok(Op::Closed) => {
                    drop(session);
                    act.finish_shutdown(ctx);
                }
                Ok(op) => {
                    act.session = Some(session);
                    act.completed(op, ctx);
                    act.drive(ctx);
                }
                Err(e) => act.fail(e, ctx),
            }
        }));
    }

    /// GET size and server-side wait for `mode`.
    fn get_args(&self, mode: GetMode) -> (i32, Duration) {
        match mode {
            GetMode::Drain => (self.cfg.fetch_size, Duration::ZERO),
            // the smallest batch Canal makes: answered as soon as there is that much
            GetMode::LongPoll => (1, self.cfg.fetch_wait),
        }
    }

    fn may_fetch(&self) -> bool {
        self.next_get().is_some()
    }

    /// The GET to issue now, if any: the window decides how it asks (see [`GetMode`]).
    fn next_get(&self) -> Option<GetMode> {
        if self.state == ConnectionState::Connected
            && !self.decoding
            && !self.waiting_for_charsets()
            && !self.draining
            && self.paused_until.is_none_or(|t| t <= Instant::now())
        {
            self.window.next_get()
        } else {
            None
        }
    }

    fn completed(&mut self, op: Op, ctx: &mut Context<Self>) {
        match op {
            Op::Fetched { epoch, raw } => {
                // a GET answered: the server works at this position
                self.attempt = 0;
                self.window.get_answered();
                self.on_fetched(epoch, raw, ctx)
            }
            Op::Skipped { epoch, skipped } => {
                self.window.get_answered();
                self.skip_oversized = false;
                if epoch == self.window.epoch() {
                    let b = self.window.fetched(skipped.batch_id, 0, None, false);
                    if let Some((expected, got)) = b.gap {
                        self.on_conflict(
                            format!("canal's batch ids jumped from {expected} to {got}"),
                            ctx,
                        );
                        return;
                    }
                }
                self.record_skip(format!(
                    "frame of {} bytes (canal batch {}) after {}",
                    skipped.frame_bytes,
                    skipped.batch_id,
                    self.status
                        .acked_position
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "the start".into())
                ));
            }
            Op::Acked { ids, fetched } => {
                self.status.batches_acked += ids.len() as u64;
                self.consecutive_rollbacks = 0;
                self.attempt = 0;
                tracing::debug!(?ids, "canal batches acked");
                if let Some((epoch, raw)) = fetched {
                    self.window.get_answered();
                    self.on_fetched(epoch, raw, ctx);
                }
            }
            Op::Subscribed { filter } => {
                tracing::info!(filter = %filter, "canal subscription updated");
                self.filter_applied(&filter);
            }
            Op::RolledBack => {
                tracing::info!(epoch = self.window.epoch(), "canal batches rolled back")
            }
            Op::Closed => {}
        }
        // after the answer is recorded: a batch it brought is in flight (decoding) by now, and
        // an empty one may be what a drain waited for
        self.notify_drained();
    }

    /// Name a Canal memunit larger than `canal.mem_unit`, once, if this answer shows one.
    fn check_unit(&mut self, raw: &RawBatch) {
        if self.status.config_warning.is_none()
            && let Some(bytes) = server_unit_larger(
                raw.asked,
                self.cfg.mem_unit,
                raw.entries.iter().map(|e| e.len()),
            )
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

    fn on_fetched(&mut self, epoch: u64, raw: RawBatch, ctx: &mut Context<Self>) {
        self.check_unit(&raw);
        if raw.is_empty() {
            if epoch == self.window.epoch() {
                self.window.caught_up();
            }
            return;
        }
        if epoch != self.window.epoch() {
            // Fetched before a rollback was requested: the pending rollback drops it.
            self.window.observe_id(raw.batch_id);
            tracing::debug!(
                batch_id = raw.batch_id,
                "discarding batch fetched before rollback"
            );
            return;
        }
        // Decoding is CPU work: it runs on the blocking pool, off the thread the actors share.
        self.decoding = true;
        let destination = self.cfg.session.destination.clone();
        let charsets = self.charset_map();
        let decode = async move {
            let job = tokio::task::spawn_blocking(move || {
                let mut events = Vec::new();
                let mut decoder = Decoder::new(&destination);
                if let Some(map) = charsets {
                    decoder = decoder.with_charsets(map);
                }
                let r = decoder.decode_entries(&raw.entries, &mut events);
                (raw, r.map(|_| events))
            });
            job.await
        };
        ctx.spawn(decode.into_actor(self).map(move |done, act, ctx| {
            act.decoding = false;
            match done {
                Ok((raw, decoded)) => act.on_decoded(epoch, raw, decoded, ctx),
                // the decode panicked: a bug; the batch is redelivered after a rollback
                Err(e) => {
                    tracing::error!(error = %e, "decoding a canal batch failed");
                    act.request_rollback("decoding a batch panicked");
                }
            }
            act.notify_drained();
            act.drive(ctx);
        }));
    }

    fn on_decoded(
        &mut self,
        epoch: u64,
        raw: RawBatch,
        decoded: Result<Vec<ChangeEvent>, DecodeError>,
        ctx: &mut Context<Self>,
    ) {
        if self.state == ConnectionState::Stopped {
            return;
        }
        if epoch != self.window.epoch() {
            // A rollback or reconnect began while it was decoded: the rows come again.
            self.window.observe_id(raw.batch_id);
            return;
        }
        let events = match decoded {
            Ok(events) => {
                self.ddls_passed(&events);
                events
            }
            Err(DecodeError::CharsetsNeeded(needs)) => {
                return self.wait_for_charsets(epoch, raw, needs, ctx);
            }
            Err(source) => {
                let e = CanalError::Decode {
                    destination: self.cfg.session.destination.clone(),
                    batch_id: raw.batch_id,
                    source,
                };
                // retrying cannot help either: hold it (no later batch is acked past it) and
                // stall
                let batch = self.window.hold(raw.batch_id, raw.frame_bytes);
                self.held = Some(batch);
                self.stall(
                    format!("batch:{}", raw.batch_id),
                    e.to_string(),
                    format!(
                        "run `canal-consumer skip batch:{}` to ack it without delivering its {} \
                         entries",
                        raw.batch_id,
                        raw.entries.len()
                    ),
                );
                return;
            }
        };
        self.status.batches_received += 1;
        self.status.events_received += events.len() as u64;
        let last = events.last().map(|e| (e.position.clone(), e.executed_at));
        if let Some((pos, at)) = &last {
            self.status.last_position = Some(pos.clone());
            self.status.last_executed_at = Some(*at);
        }
        let deliver = !events.is_empty();
        let fetched = self
            .window
            .fetched(raw.batch_id, raw.frame_bytes, last, deliver);
        // a short answer: Canal had nothing more, so the next GET long-polls
        if took_all(
            raw.asked,
            self.cfg.mem_unit,
            raw.entries.iter().map(|e| e.len()),
        ) {
            self.window.caught_up();
        }
        if let Some((expected, got)) = fetched.gap {
            self.on_conflict(
                format!("canal's batch ids jumped from {expected} to {got}"),
                ctx,
            );
            return;
        }
        tracing::debug!(
            batch = %fetched.batch,
            entries = raw.entries.len(),
            events = events.len(),
            bytes = raw.frame_bytes,
            "canal batch fetched"
        );
        if deliver {
            self.subscriber.do_send(CanalEvent::Batch(Batch {
                batch: fetched.batch,
                events: Arc::new(events),
                bytes: raw.frame_bytes,
                entries: raw.entries.len(),
            }));
        }
    }

    fn request_rollback(&mut self, reason: &str) {
        self.status.rollbacks += 1;
        self.need_rollback = true;
        self.begin_epoch(reason, false);
        // Back off before redelivery so a persistent failure does not spin.
        let delay = self.backoff(self.consecutive_rollbacks);
        self.consecutive_rollbacks = self.consecutive_rollbacks.saturating_add(1);
        self.paused_until = Some(Instant::now() + delay);
    }

    /// Stop for good: drop the session, release waiters, answer the shutdown request.
    fn finish_shutdown(&mut self, ctx: &mut Context<Self>) {
        self.state = ConnectionState::Stopped;
        self.session = None;
        let unacked = self.window.inflight_batches();
        if unacked > 0 {
            tracing::info!(
                batches = unacked,
                "canal connection closed with unacked batches; canal redelivers them"
            );
        }
        self.window.begin_epoch(true);
        self.notify_drained();
        if let Some((_, reply)) = self.shutdown.take() {
            let _ = reply.send(ShutdownReport {
                acked: self.status.batches_acked,
                unacked,
                abandoned_total: self.status.abandoned_total,
                fetched_position: self.status.last_position.clone(),
                acked_position: self.status.acked_position.clone(),
            });
        }
        ctx.stop();
    }

    fn snapshot(&self) -> ConnectionStatus {
        let mut s = self.status.clone();
        s.state = self.state;
        s.epoch = self.window.epoch();
        s.inflight_batches = self.window.inflight_batches();
        s.inflight_bytes = self.window.inflight_bytes();
        s.abandoned_batches = self.window.abandoned_batches();
        s.filter = self.cfg.filter.clone();
        s
    }
}

/// ZooKeeper mode: may this replica write a GET or ACK now? (Always in the simple mode.)
fn may_write(
    gate: &Option<tokio::sync::watch::Receiver<crate::ha::Lease>>,
) -> Result<(), CanalError> {
    match gate {
        None => Ok(()),
        Some(g) => {
            let lease = g.borrow();
            if lease.may_write(Instant::now()) {
                Ok(())
            } else {
                Err(CanalError::NotActive {
                    reason: lease
                        .reason
                        .clone()
                        .unwrap_or_else(|| "the zookeeper lease ran out".into()),
                })
            }
        }
    }
}

impl Handler<LeaseChanged> for CanalConnection {
    type Result = ();

    fn handle(&mut self, _: LeaseChanged, ctx: &mut Context<Self>) {
        if self.state == ConnectionState::Stopped {
            return;
        }
        let Some(lease) = self.lease() else {
            return;
        };
        self.status.ha = Some((&lease).into());
        let target = lease.target(Instant::now()).map(str::to_string);
        let current = self.cfg.session.addr();
        let has_session = self.session.is_some() || self.busy;
        match target {
            None => {
                if has_session {
                    let reason = lease
                        .reason
                        .clone()
                        .unwrap_or_else(|| "the zookeeper lease ended".into());
                    tracing::warn!(reason = %reason, "leaving the canal server: not the active replica now");
                    self.retire_session(&reason);
                }
                self.follow_lease();
            }
            Some(addr) => {
                if has_session && addr != current {
                    tracing::warn!(from = %current, to = %addr, "canal server moved; following it");
                    self.retire_session(&format!("canal server moved from {current} to {addr}"));
                }
                let idle = self.session.is_none() && !self.busy;
                if idle && self.state != ConnectionState::Conflict {
                    self.connect(ctx);
                }
            }
        }
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
        match self.window.ack(msg.0) {
            AckOutcome::Recorded => {}
            AckOutcome::Abandoned => {
                tracing::debug!(batch = %msg.0, "ack for an abandoned batch only releases it")
            }
            AckOutcome::Unknown => tracing::warn!(batch = %msg.0, "ack for an unknown batch"),
        }
        self.drive(ctx);
    }
}

impl Handler<ReleaseBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: ReleaseBatch, ctx: &mut Context<Self>) {
        if msg.0.epoch == self.window.epoch() {
            // a batch of the current epoch can only be given up through a rollback
            tracing::warn!(batch = %msg.0, "release of a live batch; rolling back");
            self.request_rollback("a batch was released before it was acked");
        } else {
            self.window.release(msg.0);
        }
        self.drive(ctx);
    }
}

impl Handler<RollbackBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: RollbackBatch, ctx: &mut Context<Self>) {
        if msg.batch.epoch != self.window.epoch() {
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
        if let Some(w) = msg.applied {
            self.filter_waiters.push(w);
        }
        if msg.filter != self.cfg.filter {
            self.cfg.filter = msg.filter;
            self.need_subscribe = self.state == ConnectionState::Connected || self.busy;
            self.drive(ctx);
        } else if self.state == ConnectionState::Connected && !self.need_subscribe {
            // already in force (no subscribe pending for it)
            let f = self.cfg.filter.clone();
            self.filter_applied(&f);
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
    type Result = ResponseFuture<ShutdownReport>;

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let (tx, rx) = oneshot::channel();
        if let Some((_, earlier)) = self.shutdown.replace((msg.rollback, tx)) {
            let _ = earlier.send(ShutdownReport::default());
        }
        if self.state == ConnectionState::Connected {
            // runs after the operation in progress and after writing every acked batch
            self.drive(ctx);
        } else {
            // no session: nothing to flush or roll back
            self.finish_shutdown(ctx);
        }
        Box::pin(async move { rx.await.unwrap_or_default() })
    }
}

impl Handler<GetConnectionStatus> for CanalConnection {
    type Result = MessageResult<GetConnectionStatus>;

    fn handle(&mut self, _: GetConnectionStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot())
    }
}
