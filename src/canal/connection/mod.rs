//! The `CanalConnection` actor: owns the Canal session and the batches in flight.
//!
//! It fetches batches (GET without ack), decodes them into [`ChangeEvent`]s (on tokio's
//! blocking pool, so the actors' thread never runs the decoding; one batch at a time, so they
//! stay in fetch order) and sends each to its subscriber as a [`CanalEvent::Batch`]. The subscriber answers with [`AckBatch`] or
//! [`RollbackBatch`]. Acks are sent to Canal strictly in the order batches were fetched: a
//! batch acked early waits until every earlier one is acked too.
//!
//! The bookkeeping lives in [`BatchWindow`](crate::canal::window::BatchWindow) (sans-IO): which batches are in flight, which are
//! finished, which acks may be written, whether another GET may be issued. This actor only turns
//! messages and session I/O into calls on it.
//!
//! Fetching: while data keeps coming every GET takes what Canal has at once; after a GET came
//! back empty, or short (Canal had nothing more, [`took_all`](crate::canal::window::took_all)), the next one long-polls for the
//! smallest batch (up to `fetch_wait`), which Canal answers as soon as there is one unit of
//! data (see [`GetMode`](crate::canal::window::GetMode)). The session is lent to one request at a time, so an ack written
//! behind a long poll waits until Canal answers it; the long poll therefore waits (at most
//! `ack_wait`, 5 ms) for the acks of the batches in flight, and they go out in the same turn.
//! Not longer: a batch whose confirms take long (a backfill chunk's rows ride in one) would
//! hold up every live row behind it.
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
//! change of the lease (watched) makes the actor drop its session (standby, or the server moved) or connect
//! through the usual path (connect, subscribe, rollback). A dropped session is retired by a
//! generation count, so an operation still running on it is ignored when it comes back.
//!
//! [`ChangeEvent`]: crate::event::ChangeEvent

//! The decisions are in [`core::ConnectionCore`] (sans-IO, driven by the delivery simulation
//! too); this actor carries out its [`Action`]s: it owns the session and lends it to one
//! operation at a time, runs the decoding on tokio's blocking pool, arms the timers, and
//! answers the waiters.

use crate::backoff::Backoff;
use crate::canal::CanalError;
use crate::canal::decode::{DecodeError, Decoder, wire};
use crate::canal::proto::entry::EntryType;
use crate::canal::session::{Fetch, RawBatch, Session};
use crate::event::{ChangeEvent, Position};

use actix::prelude::*;

use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

mod api;
mod charsets;
mod confirmed;
pub mod core;
mod stall;
pub use api::*;
use core::{Action, ConnectionCore, Decoded, Done, EventsView, Input, Op, RawView, Timer};

impl RawView for RawBatch {
    fn batch_id(&self) -> i64 {
        self.batch_id
    }
    fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }
    fn asked(&self) -> i32 {
        self.asked
    }
    fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.entries.iter().map(|e| e.len())
    }
    fn ends_transaction(&self) -> bool {
        // an entry not even its type can be read from tells nothing either
        self.entries.last().is_none_or(|e| {
            wire::entry_type(e).is_none_or(|t| t == EntryType::TransactionEnd as u64)
        })
    }
}

impl EventsView for Vec<ChangeEvent> {
    fn count(&self) -> usize {
        self.len()
    }
    fn key(&self, i: usize) -> (&Position, i64) {
        (&self[i].position, self[i].executed_at)
    }
    fn drop_first(&mut self, n: usize) {
        self.drain(..n.min(self.len()));
    }
    fn split_off(&mut self, n: usize) -> Self {
        Vec::split_off(self, n.min(self.len()))
    }
    fn append(&mut self, mut more: Self) {
        Vec::append(self, &mut more)
    }
}

type Core = ConnectionCore<RawBatch, Vec<ChangeEvent>>;

/// An operation on the lent session; it hands the session back with its result.
type SessionOp =
    std::pin::Pin<Box<dyn Future<Output = (Session, Result<Done<RawBatch>, CanalError>)>>>;

/// The Canal connection actor. See the module docs.
pub struct CanalConnection {
    cfg: ConnectionConfig,
    subscriber: Recipient<CanalEvent>,
    core: Core,
    session: Option<Session>,
    /// The armed ack-wait timer (cancelled once the wait is over, so it costs no wakeup).
    ack_wait_timer: Option<(Timer, SpawnHandle)>,
    /// Who waits for the current filter to be in force.
    filter_waiters: Vec<oneshot::Sender<()>>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Who waits for the shutdown report.
    shutdown_waiters: Vec<oneshot::Sender<ShutdownReport>>,
    /// Raw text mode (`TextSource::Raw`): column charsets and their lookups.
    raw_text: Option<charsets::RawText>,
    /// The rewind guard's position as last written to `cfg.confirmed_file`, and whether a
    /// write is due (at most one a second).
    confirmed_saved: Option<(Position, i64)>,
    /// The version of the delivery ends last written to the file
    /// ([`core::recut::Cuts::version`]); each delivery's end is appended to the file's log
    /// before the delivery is handed on, so a restart cuts the same way.
    cuts_saved: u64,
    ends_log: Option<confirmed::EndsLog>,
    confirmed_timer: bool,
}

impl CanalConnection {
    pub fn new(cfg: ConnectionConfig, subscriber: Recipient<CanalEvent>) -> Self {
        let core = ConnectionCore::new(
            CoreConfig {
                jitter_seed: fastrand::u64(..),
                ..cfg.core.clone()
            },
            cfg.lease.is_some(),
        );
        let saved = cfg
            .confirmed_file
            .as_deref()
            .map(confirmed::load)
            .unwrap_or_default();
        let confirmed_saved = saved.confirmed.clone();
        let core = core.with_confirmed(saved.confirmed, saved.cuts);
        let cuts_saved = core.cuts().version();
        CanalConnection {
            subscriber,
            core,
            session: None,
            ack_wait_timer: None,
            filter_waiters: Vec::new(),
            drain_waiters: Vec::new(),
            shutdown_waiters: Vec::new(),
            confirmed_saved,
            cuts_saved,
            ends_log: cfg.confirmed_file.as_deref().map(confirmed::EndsLog::new),
            confirmed_timer: false,
            raw_text: match &cfg.text {
                TextSource::AsShipped => None,
                TextSource::Raw { source_url } => Some(charsets::RawText::new(source_url)),
            },
            cfg,
        }
    }

    /// Feed the core one input and carry out what it decides.
    fn feed(&mut self, input: Input<RawBatch, Vec<ChangeEvent>>, ctx: &mut Context<Self>) {
        self.core.on(Instant::now(), input);
        self.run_actions(ctx);
        // the rewind guard or the delivery ends moved: write them within a second
        if self.cfg.confirmed_file.is_some()
            && !self.confirmed_timer
            && (self.core.confirmed() != self.confirmed_saved.as_ref()
                || self.core.cuts().version() != self.cuts_saved)
        {
            self.confirmed_timer = true;
            ctx.run_later(std::time::Duration::from_secs(1), |act, _| {
                act.confirmed_timer = false;
                act.save_confirmed();
            });
        }
    }

    fn save_confirmed(&mut self) {
        if let Some(path) = &self.cfg.confirmed_file
            && (self.confirmed_saved.as_ref() != self.core.confirmed()
                || self.cuts_saved != self.core.cuts().version())
        {
            confirmed::save(path, self.core.confirmed(), self.core.cuts().ends());
            self.confirmed_saved = self.core.confirmed().cloned();
            self.cuts_saved = self.core.cuts().version();
            // every end is in the file now
            if let Some(log) = &mut self.ends_log {
                log.clear();
            }
        }
    }

    fn run_actions(&mut self, ctx: &mut Context<Self>) {
        for action in self.core.take_actions() {
            match action {
                Action::Connect {
                    generation,
                    server,
                    filter,
                } => self.connect(generation, &server, filter, ctx),
                Action::Run { generation, op } => {
                    // acks move the confirmed position: in the log before they are written
                    if let (Op::Ack { .. }, Some(log), Some(c)) =
                        (&op, &mut self.ends_log, self.core.confirmed())
                    {
                        log.confirmed(c);
                    }
                    self.run(generation, op, ctx)
                }
                Action::DropSession => self.session = None,
                Action::Decode { epoch, raw } => self.decode(epoch, raw, ctx),
                Action::Deliver {
                    batch,
                    events,
                    bytes,
                    entries,
                } => {
                    // its end on disk before any of its messages can reach the broker
                    if let (Some(log), Some(last)) = (&mut self.ends_log, events.last()) {
                        log.append(&(last.position.clone(), last.executed_at));
                    }
                    self.subscriber.do_send(CanalEvent::Batch(Batch {
                        batch,
                        events: Arc::new(events),
                        bytes,
                        entries,
                    }))
                }
                Action::Reset { epoch, reason } => {
                    self.subscriber.do_send(CanalEvent::Reset { epoch, reason })
                }
                Action::Timer { timer, after } => {
                    let handle = ctx.run_later(after, move |act, ctx| {
                        if matches!(&act.ack_wait_timer, Some((t, _)) if *t == timer) {
                            act.ack_wait_timer = None;
                        }
                        act.feed(Input::Timer(timer), ctx)
                    });
                    if let Timer::AckWait(_) = timer
                        && let Some((_, old)) = self.ack_wait_timer.replace((timer, handle))
                    {
                        ctx.cancel_future(old);
                    }
                }
                Action::CancelTimer(timer) => {
                    if matches!(&self.ack_wait_timer, Some((t, _)) if *t == timer)
                        && let Some((_, handle)) = self.ack_wait_timer.take()
                    {
                        ctx.cancel_future(handle);
                    }
                }
                Action::FilterApplied => {
                    for w in self.filter_waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
                Action::Drained => {
                    for w in self.drain_waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
                Action::Finished(report) => {
                    self.session = None;
                    self.save_confirmed();
                    if let Some(last) = self.shutdown_waiters.pop() {
                        let _ = last.send(report);
                    }
                    // an earlier request was replaced by the last one
                    for w in self.shutdown_waiters.drain(..) {
                        let _ = w.send(ShutdownReport::default());
                    }
                    ctx.stop();
                }
                Action::Fatal(error) => {
                    self.subscriber.do_send(CanalEvent::Fatal { error });
                    ctx.stop();
                }
            }
        }
    }

    /// Open a session: connect, subscribe, roll back what an earlier session left outstanding.
    fn connect(&mut self, generation: u64, server: &str, filter: String, ctx: &mut Context<Self>) {
        let mut cfg = self.cfg.session.clone();
        if let Some((host, port)) = server
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        {
            cfg.host = host;
            cfg.port = port;
        }
        self.cfg.session = cfg.clone();
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
            if generation != act.core.generation() {
                return; // retired meanwhile; that path connects anew
            }
            match res {
                Ok((session, filter)) => {
                    act.session = Some(session);
                    act.feed(Input::Connected { generation, filter }, ctx);
                }
                Err(e) => act.feed(
                    Input::Failed {
                        generation,
                        failure: failure(&e),
                    },
                    ctx,
                ),
            }
        }));
    }

    /// Lend the session to `op`.
    fn run(&mut self, generation: u64, op: Op, ctx: &mut Context<Self>) {
        let Some(mut session) = self.session.take() else {
            // cannot happen: the core runs an operation only on an idle session
            tracing::error!(?op, "no canal session for an operation; reconnecting");
            let failure = Failure {
                kind: FailureKind::Transient,
                message: "no canal session".into(),
            };
            return self.feed(
                Input::Failed {
                    generation,
                    failure,
                },
                ctx,
            );
        };
        let gate = self.cfg.lease.clone();
        let fut: SessionOp = match op {
            // ZooKeeper mode: a rollback or a subscribe acts on the client identity the active
            // replica shares, so a replica whose lease ended writes neither (it would roll back
            // the active one's batches, or change its filter)
            Op::Rollback => Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session.rollback(0).await.map(|_| Done::RolledBack);
                (session, r)
            }),
            Op::Ack { ids, then_get } => Box::pin(async move {
                for id in &ids {
                    if let Err(e) = may_write(&gate) {
                        return (session, Err(e));
                    }
                    tracing::debug!(batch_id = *id, "writing canal ack");
                    if let Err(e) = session.ack(*id).await {
                        return (session, Err(e));
                    }
                }
                let Some((epoch, size, wait)) = then_get else {
                    return (session, Ok(Done::Acked { ids, fetched: None }));
                };
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session.get(size, wait).await.map(|raw| Done::Acked {
                    ids,
                    fetched: Some((epoch, raw)),
                });
                (session, r)
            }),
            Op::Close { rollback } => Box::pin(async move {
                let rollback = rollback && may_write(&gate).is_ok();
                if rollback && let Err(e) = session.rollback(0).await {
                    tracing::warn!(error = %e, "rollback on shutdown failed");
                }
                (session, Ok(Done::Closed))
            }),
            Op::Subscribe(filter) => Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session
                    .subscribe(&filter)
                    .await
                    .map(|_| Done::Subscribed(filter));
                (session, r)
            }),
            Op::GetSkipping { epoch, wait } => Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                // the smallest batch Canal makes: the oversized entry and as little else as it can
                let (session, r) = session.get_skipping_oversized(1, wait, None).await;
                let r = r.map(|f| match f {
                    Fetch::Batch(raw) => Done::Fetched { epoch, raw },
                    Fetch::Skipped(s) => Done::Skipped {
                        epoch,
                        batch_id: s.batch_id,
                        frame_bytes: s.frame_bytes,
                    },
                });
                (session, r)
            }),
            Op::Get { epoch, size, wait } => Box::pin(async move {
                if let Err(e) = may_write(&gate) {
                    return (session, Err(e));
                }
                let r = session
                    .get(size, wait)
                    .await
                    .map(|raw| Done::Fetched { epoch, raw });
                (session, r)
            }),
        };
        ctx.spawn(fut.into_actor(self).map(move |(session, res), act, ctx| {
            if generation != act.core.generation() {
                return; // retired while it ran
            }
            match res {
                Ok(done) => {
                    act.session = Some(session);
                    act.feed(Input::Done { generation, done }, ctx);
                }
                Err(e) => {
                    drop(session);
                    act.feed(
                        Input::Failed {
                            generation,
                            failure: failure(&e),
                        },
                        ctx,
                    );
                }
            }
        }));
    }

    /// Decode a batch on the blocking pool (decoding is CPU work, kept off the thread the
    /// actors share); in raw-text mode a batch may first wait for column charsets.
    fn decode(&mut self, epoch: u64, raw: RawBatch, ctx: &mut Context<Self>) {
        let destination = self.cfg.session.destination.clone();
        let charsets = self.charset_map();
        let batch_id = raw.batch_id;
        let job = async move {
            tokio::task::spawn_blocking(move || {
                let mut events = Vec::new();
                let mut decoder = Decoder::new(&destination);
                if let Some(map) = charsets {
                    decoder = decoder.with_charsets(map);
                }
                let r = decoder.decode_entries(&raw.entries, &mut events);
                (raw, r.map(|_| events))
            })
            .await
        };
        ctx.spawn(job.into_actor(self).map(move |done, act, ctx| {
            let (raw, outcome) = match done {
                Ok((raw, Ok(events))) => {
                    act.ddls_passed(&events);
                    (raw, Decoded::Events(events))
                }
                Ok((raw, Err(DecodeError::CharsetsNeeded(needs)))) => {
                    return act.wait_for_charsets(epoch, raw, needs, ctx);
                }
                Ok((raw, Err(source))) => {
                    let e = CanalError::Decode {
                        destination: act.cfg.session.destination.clone(),
                        batch_id: raw.batch_id,
                        source,
                    };
                    (raw, Decoded::Undecodable(e.to_string()))
                }
                // the decode panicked: a bug; the rows are redelivered after a rollback
                Err(e) => {
                    let raw = RawBatch {
                        batch_id,
                        entries: Vec::new(),
                        frame_bytes: 0,
                        asked: 0,
                    };
                    (raw, Decoded::Panicked(e.to_string()))
                }
            };
            act.feed(
                Input::Decoded {
                    epoch,
                    raw,
                    outcome,
                },
                ctx,
            );
        }));
    }

    /// Delay before lookup retry number `attempt`.
    fn backoff(&self, attempt: u32) -> std::time::Duration {
        Backoff::new(
            self.cfg
                .core
                .reconnect_min
                .max(std::time::Duration::from_millis(1)),
            self.cfg.core.reconnect_max,
        )
        .with_jitter(0.2)
        .delay(attempt)
    }
}

/// What the core needs to know of a session error.
fn failure(e: &CanalError) -> Failure {
    let kind = match e {
        CanalError::Frame(crate::canal::codec::FrameError::TooLarge { len, max }) => {
            FailureKind::TooLarge {
                len: *len,
                max: *max,
            }
        }
        CanalError::NotActive { .. } => FailureKind::NotActive,
        e => match stall::vanished_batch(e) {
            Some(evidence) => FailureKind::Vanished { evidence },
            None if !e.is_transient() => FailureKind::Definite,
            None => FailureKind::Transient,
        },
    };
    Failure {
        kind,
        message: e.to_string(),
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

/// ZooKeeper mode: the lease changed (connect, follow the Canal server, or stand by).
impl StreamHandler<crate::ha::Lease> for CanalConnection {
    fn handle(&mut self, lease: crate::ha::Lease, ctx: &mut Context<Self>) {
        self.feed(Input::Lease(lease), ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // the ZooKeeper shell ended (the process is stopping): keep the last lease
    }
}

impl Actor for CanalConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        if let Some(rx) = self.cfg.lease.clone() {
            self.core
                .on(Instant::now(), Input::Lease(rx.borrow().clone()));
            // every later change of the lease, as it happens
            ctx.add_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.changed().await.ok()?;
                let lease = rx.borrow_and_update().clone();
                Some((lease, rx))
            }));
        }
        self.feed(Input::Start, ctx);
    }
}

impl Handler<AckBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: AckBatch, ctx: &mut Context<Self>) {
        self.feed(Input::Ack(msg.0), ctx);
    }
}

impl Handler<ReleaseBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: ReleaseBatch, ctx: &mut Context<Self>) {
        self.feed(Input::Release(msg.0), ctx);
    }
}

impl Handler<RollbackBatch> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: RollbackBatch, ctx: &mut Context<Self>) {
        self.feed(
            Input::Rollback {
                batch: msg.batch,
                reason: msg.reason,
            },
            ctx,
        );
    }
}

impl Handler<SetFilter> for CanalConnection {
    type Result = ();

    fn handle(&mut self, msg: SetFilter, ctx: &mut Context<Self>) {
        if let Some(w) = msg.applied {
            self.filter_waiters.push(w);
        }
        self.feed(Input::SetFilter(msg.filter), ctx);
    }
}

impl Handler<Drain> for CanalConnection {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.feed(Input::Drain, ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Shutdown> for CanalConnection {
    type Result = ResponseFuture<ShutdownReport>;

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.shutdown_waiters.push(tx);
        self.feed(
            Input::Shutdown {
                rollback: msg.rollback,
            },
            ctx,
        );
        Box::pin(async move { rx.await.unwrap_or_default() })
    }
}

impl Handler<SkipStalled> for CanalConnection {
    type Result = Result<Skipped, SkipError>;

    fn handle(&mut self, msg: SkipStalled, ctx: &mut Context<Self>) -> Self::Result {
        let r = self.core.skip(Instant::now(), &msg.0);
        self.run_actions(ctx);
        r
    }
}

impl Handler<GetConnectionStatus> for CanalConnection {
    type Result = MessageResult<GetConnectionStatus>;

    fn handle(&mut self, _: GetConnectionStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.core.snapshot())
    }
}
