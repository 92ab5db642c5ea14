//! The AMQP publisher actor: triggers to RabbitMQ with publisher confirms.
//!
//! [`AmqpPublisher`] owns the broker connection, the queue topology check at connect
//! ([`super::topology`]), one confirm-mode publishing channel, and the translation of each
//! trigger into a message ([`super::envelope`] or [`super::celery`]). Start it with
//! `AmqpPublisher::new(cfg).start()` (or [`AmqpPublisher::start_checked`], which fails on a
//! queue mismatch), send it [`Publish`] and [`GetPublisherStatus`], and [`StopPublishing`] to drain
//! (publish what was accepted, await its confirms, close) on the way out.
//!
//! How it works: a connection is served by one *session* task (`publisher::session`), an I/O
//! shell around the pure confirm window ([`super::window::ConfirmWindow`]), which decides what
//! is published next (jobs in arrival order, at most `amqp.max_unconfirmed` unconfirmed), what
//! each confirm, return, nack and timeout means, and when each `Publish` is answered. The actor
//! alone writes the [`PublisherStatus`]: the session reports its connection's state on a
//! `watch` ([`super::status::SessionReport`]), which the actor takes in before it accepts a
//! `Publish` or answers [`GetPublisherStatus`]; the counters carry on across connections. Every
//! message is `mandatory`, persistent, and carries the trigger id as `message_id` and
//! `correlation_id`.
//!
//! How it fails, always with an answer on the `Publish` reply, never a hang:
//! - returned as unroutable → [`PublishError::Returned`]; a nack → [`PublishError::Nacked`]; no
//!   confirm within `amqp.confirm_timeout` → [`PublishError::ConfirmTimeout`]. The first failure
//!   answers its `Publish` and cancels what is unpublished of its Canal epoch (which rolls back);
//! - a `Publish` of a newer epoch cancels the unpublished work of older ones
//!   ([`PublishError::Cancelled`]);
//! - the channel or connection dies → every unconfirmed `Publish` gets
//!   [`PublishError::ConnectionLost`], queued ones [`PublishError::Unavailable`]; the actor
//!   reconnects after `reconnect_min`, doubling up to `reconnect_max` while connecting fails;
//! - while disconnected, or while the broker blocks the connection (memory or disk alarm),
//!   a `Publish` gets [`PublishError::Unavailable`] at once; upstream rolls back and retries.
//!   Messages already in flight when the block starts time out after `confirm_timeout`; the
//!   state shows `blocked` with the broker's reason, and logs say so.
//!
//! In `declare` mode, a message for the configured queue that comes back unroutable means the
//! queue was deleted while we were connected: the session declares it again, so the upstream's
//! retry succeeds.
//!
//! lapin's own auto-recovery is not used: it never republishes, and the upstream must roll
//! back anyway. The URL's password never reaches logs or status ([`redact_url`]).

use super::failover::{Failover, Next};
use super::session::{self, Job, Prepared, Session, ToSession};
use super::status::SessionReport;
use super::{CancelBefore, Publish, PublishError, celery, envelope};
use crate::backoff::Backoff;
use crate::config::{AmqpConfig, redact_url};
use crate::trigger::{MessageFormat, Trigger};
use actix::prelude::*;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

pub use super::status::{PublisherState, PublisherStatus, stall_after};

/// Ask the publisher for a [`PublisherStatus`].
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "PublisherStatus")]
pub struct GetPublisherStatus;

/// Stop publishing: refuse new `Publish`es, let the current session publish what it already
/// accepted and await its confirms, close the connection, and stay disconnected. Answers when
/// the session has ended, or with `Err` if that takes longer than `deadline` (the session then
/// keeps going in the background until its confirms time out).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), PublishError>")]
pub struct StopPublishing {
    pub deadline: Duration,
}

/// The session of the current connection ended (sent by the session task).
#[derive(Message)]
#[rtype(result = "()")]
struct SessionEnded {
    generation: u64,
    reason: String,
}

/// The AMQP publisher actor. See the module docs.
pub struct AmqpPublisher {
    cfg: Arc<AmqpConfig>,
    /// The publisher's status: written here only, from what the session reports.
    status: PublisherStatus,
    /// The current session's reports (see [`super::status`]).
    report: Option<watch::Receiver<SessionReport>>,
    session: Option<mpsc::UnboundedSender<ToSession>>,
    generation: u64,
    ready: Option<oneshot::Sender<Result<(), PublishError>>>,
    origin: String,
    /// Resolves when the current session task has ended.
    session_done: Option<oneshot::Receiver<()>>,
    shutting_down: bool,
    /// Which broker node to try next (`amqp.urls`).
    failover: Failover,
    /// The queue topology was checked on an earlier connection (see [`session::open`]).
    topology_verified: bool,
}

impl AmqpPublisher {
    pub fn new(cfg: AmqpConfig) -> Self {
        let status = PublisherStatus::connecting(
            cfg.endpoints()
                .first()
                .map(|u| redact_url(u.expose()))
                .unwrap_or_default(),
            cfg.endpoints().len(),
            cfg.queue.name.clone(),
            cfg.max_unconfirmed.get(),
        );
        AmqpPublisher {
            failover: Failover::new(cfg.endpoints().len()),
            topology_verified: false,
            cfg: Arc::new(cfg),
            status,
            report: None,
            session: None,
            generation: 0,
            ready: None,
            origin: celery::origin(),
            session_done: None,
            shutting_down: false,
        }
    }

    /// Start the actor and wait for its first connection attempt. Fails only if the queue
    /// topology is wrong ([`PublishError::Topology`]: retrying will not fix it); an unreachable
    /// broker is logged and retried in the background.
    pub async fn start_checked(cfg: AmqpConfig) -> Result<Addr<Self>, PublishError> {
        let (tx, rx) = oneshot::channel();
        let mut publisher = AmqpPublisher::new(cfg);
        publisher.ready = Some(tx);
        let addr = publisher.start();
        match rx.await {
            Ok(Err(e @ (PublishError::Topology(_) | PublishError::Tls(_)))) => Err(e),
            _ => Ok(addr),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.status.set_state(PublisherState::Connecting, None);
        let node = self.failover.target();
        let broker = self.node_url(node);
        self.status.broker = broker.clone();
        self.status.node = node + 1;
        info!(broker = %broker, node = node + 1, nodes = self.failover.nodes(), "connecting to the broker");
        let cfg = self.cfg.clone();
        ctx.spawn(
            session::open(cfg, node, self.topology_verified)
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(opened) => act.on_connected(opened, ctx),
                    Err(e) => act.on_connect_failed(e, ctx),
                }),
        );
    }

    fn on_connected(&mut self, opened: session::Opened, ctx: &mut Context<Self>) {
        if self.shutting_down {
            actix::spawn(async move { session::close_quietly(&opened.conn).await });
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        self.session = Some(tx);
        self.failover.connected();
        self.topology_verified = true;
        self.status.connects += 1;
        self.status.set_state(PublisherState::Connected, None);
        info!(
            broker = %self.node_url(self.failover.target()),
            node = self.failover.target() + 1,
            queue = %self.cfg.queue.name,
            max_unconfirmed = self.cfg.max_unconfirmed,
            "connected to the broker"
        );
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }
        // the new session counts on from the connections before
        let (report_tx, report_rx) = watch::channel(SessionReport {
            counters: self.status.counters.clone(),
            ..Default::default()
        });
        self.report = Some(report_rx);
        let session = Session::new(
            opened,
            rx,
            self.cfg.clone(),
            report_tx,
            generation,
            self.status.counters.clone(),
        );
        let me = ctx.address().downgrade();
        let (done_tx, done_rx) = oneshot::channel();
        self.session_done = Some(done_rx);
        actix::spawn(async move {
            let reason = session.run().await;
            let _ = done_tx.send(());
            if let Some(addr) = me.upgrade() {
                addr.do_send(SessionEnded { generation, reason });
            }
        });
    }

    fn on_connect_failed(&mut self, e: PublishError, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.status.set_state(PublisherState::Disconnected, None);
        self.status.last_error = Some(e.to_string());
        let topology = matches!(e, PublishError::Topology(_) | PublishError::Tls(_));
        if topology {
            error!(error = %e, "the broker cannot be used as configured");
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(e.clone()));
            if topology {
                ctx.stop();
                return;
            }
        }
        let failed = self.failover.target();
        let next = self.failover.attempt_failed();
        let delay = next.delay(&self.backoff());
        match next {
            Next::TryNow => {
                warn!(error = %e, node = failed + 1, next = self.failover.target() + 1,
                      "cannot connect to this broker node; trying the next");
            }
            Next::BackOff { .. } => {
                warn!(error = %e, retry_in = ?delay, "cannot connect to the broker; retrying");
            }
        }
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    /// `amqp.reconnect_min` doubling up to `amqp.reconnect_max` (see [`super::failover`]).
    fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max)
    }

    /// Fold the current session's newest report into the status.
    fn absorb(&mut self) {
        if let Some(r) = self.report.as_mut() {
            // a session that is gone leaves its last report, which still counts
            if r.has_changed().unwrap_or(true) {
                let report = r.borrow_and_update();
                self.status.absorb(&report);
            }
        }
    }

    /// The current session is over: its last report taken in, no more to come.
    fn session_over(&mut self) {
        self.absorb();
        self.report = None;
        self.status.unconfirmed = 0;
        self.status.oldest_unconfirmed_ms = None;
        self.status.stalled_since = None;
    }

    /// The URL of node `i` (0-based) of `amqp.urls`, password redacted.
    fn node_url(&self, i: usize) -> String {
        self.cfg
            .endpoints()
            .get(i)
            .map(|u| redact_url(u.expose()))
            .unwrap_or_default()
    }

    fn prepare(&self, t: &Trigger) -> Result<Prepared, PublishError> {
        // AMQP short strings hold at most 255 bytes; a longer one would kill the channel
        for (what, value) in [
            ("id", &t.id),
            ("exchange", &t.route.exchange),
            ("routing key", &t.route.routing_key),
        ] {
            if value.len() > 255 {
                return Err(PublishError::Encode {
                    id: t.id.chars().take(64).collect(),
                    reason: format!("the {what} is longer than AMQP's 255-byte limit"),
                });
            }
        }
        let now = chrono::Utc::now();
        let (body, headers, kind) = match &t.format {
            MessageFormat::Envelope => {
                let mut h = FieldTable::default();
                h.insert(
                    "canal_consumer_plugin".into(),
                    AMQPValue::LongString(LongString::from(t.plugin.as_bytes())),
                );
                (envelope::encode(t, now)?, h, Some(envelope::ENVELOPE_TYPE))
            }
            MessageFormat::Celery { task, mapping } => {
                let m = celery::encode(t, task, *mapping, &self.origin)?;
                (m.body, m.headers, None)
            }
        };
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_message_id(t.id.as_str().into())
            .with_correlation_id(t.id.as_str().into())
            .with_priority(self.cfg.priorities.get(t.priority))
            .with_timestamp(now.timestamp().max(0) as u64)
            .with_app_id("canal-consumer".into());
        if let Some(kind) = kind {
            properties = properties.with_type(kind.into());
        }
        Ok(Prepared {
            id: t.id.clone(),
            exchange: t.route.exchange.clone(),
            routing_key: t.route.routing_key.clone(),
            body,
            properties,
            headers,
        })
    }
}

impl Actor for AmqpPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(note) =
            super::topology::quorum_priority_note(&self.cfg.queue, &self.cfg.priorities)
        {
            warn!("{note}");
        }
        self.connect(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // dropping the sender lets the session publish what it holds, await the confirms and
        // close the connection
        self.session = None;
        info!("publisher stopped");
    }
}

impl Handler<Publish> for AmqpPublisher {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        let Publish {
            triggers,
            epoch,
            reply,
        } = msg;
        if triggers.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        if self.shutting_down {
            let _ = reply.send(Err(PublishError::Unavailable(
                "the publisher is shutting down".into(),
            )));
            return;
        }
        self.absorb();
        let (state, blocked_reason, last_error) = (
            self.status.state,
            self.status.blocked_reason.clone(),
            self.status.last_error.clone(),
        );
        let Some(session) = self
            .session
            .as_ref()
            .filter(|_| state == PublisherState::Connected || state == PublisherState::Blocked)
        else {
            let why = last_error.map(|e| format!(": {e}")).unwrap_or_default();
            let _ = reply.send(Err(PublishError::Unavailable(format!(
                "not connected to the broker ({state}){why}"
            ))));
            return;
        };
        if state == PublisherState::Blocked {
            let _ = reply.send(Err(PublishError::Unavailable(format!(
                "the broker blocks publishing ({}); retry later",
                blocked_reason.unwrap_or_else(|| "resource alarm".into())
            ))));
            return;
        }
        let mut messages = Vec::with_capacity(triggers.len());
        for t in &triggers {
            match self.prepare(t) {
                Ok(m) => messages.push(m),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        if let Err(mpsc::error::SendError(ToSession::Job(job))) =
            session.send(ToSession::Job(Job {
                epoch,
                messages,
                reply,
            }))
        {
            let _ = job.reply.send(Err(PublishError::Unavailable(
                "the broker session just ended".into(),
            )));
        }
    }
}

impl Handler<CancelBefore> for AmqpPublisher {
    type Result = ();

    fn handle(&mut self, msg: CancelBefore, _: &mut Context<Self>) {
        if let Some(session) = &self.session {
            let _ = session.send(ToSession::CancelBefore(msg.0));
        }
    }
}

impl Handler<GetPublisherStatus> for AmqpPublisher {
    type Result = MessageResult<GetPublisherStatus>;

    fn handle(&mut self, _: GetPublisherStatus, _: &mut Context<Self>) -> Self::Result {
        self.absorb();
        MessageResult(self.status.clone())
    }
}

impl Handler<StopPublishing> for AmqpPublisher {
    type Result = ResponseActFuture<Self, Result<(), PublishError>>;

    fn handle(&mut self, msg: StopPublishing, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        // dropping the sender tells the session to finish what it accepted and close
        self.session = None;
        let done = self.session_done.take();
        let report = self.report.clone();
        info!(deadline = ?msg.deadline, "publisher shutting down");
        let wait = async move {
            match done {
                None => Ok(()),
                Some(done) => match tokio::time::timeout(msg.deadline, done).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(PublishError::Unavailable(format!(
                        "shutdown deadline {:?} passed with {} messages unconfirmed",
                        msg.deadline,
                        report.map_or(0, |r| r.borrow().unconfirmed)
                    ))),
                },
            }
        };
        Box::pin(wait.into_actor(self).map(|res, act, _| {
            if res.is_ok() {
                act.session_over();
            } else {
                act.absorb();
            }
            act.status.set_state(PublisherState::Disconnected, None);
            act.status.last_error = Some("shut down".into());
            info!("publisher shut down");
            res
        }))
    }
}

impl Handler<SessionEnded> for AmqpPublisher {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        self.session = None;
        self.session_over();
        self.status.set_state(PublisherState::Disconnected, None);
        self.status.last_error = Some(msg.reason.clone());
        let lost = self.failover.target();
        let delay = self.failover.after_loss(&self.backoff());
        warn!(reason = %msg.reason, node = lost + 1, next = self.failover.target() + 1,
              retry_in = ?delay, "broker session ended; reconnecting");
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }
}
