//! The AMQP publisher actor: triggers to RabbitMQ with publisher confirms.
//!
//! [`AmqpPublisher`] owns the broker connection, the queue topology check at connect
//! ([`super::topology`]), one confirm-mode publishing channel, and the translation of each
//! trigger into a message ([`super::envelope`] or [`super::celery`]). Start it with
//! `AmqpPublisher::new(cfg).start()` (or [`AmqpPublisher::start_checked`], which fails on a
//! queue mismatch), send it [`Publish`] and [`GetPublisherStatus`], and [`Shutdown`] to drain
//! (publish what was accepted, await its confirms, close) on the way out.
//!
//! How it works: a connection is served by one *session* task that publishes the messages of
//! each `Publish` in arrival order on its single channel (never concurrently), keeps at most
//! `amqp.max_unconfirmed` messages unconfirmed (when the window is full, later `Publish`es wait,
//! which is the back-pressure upstream sees), and settles confirms strictly in publish order.
//! Every message is `mandatory`, persistent, and carries the trigger id as `message_id` and
//! `correlation_id`.
//!
//! How it fails, always with an answer on the `Publish` reply, never a hang:
//! - a message returned as unroutable → [`PublishError::Returned`] (RabbitMQ *acks* such
//!   messages; lapin hands the return over on whichever confirm completes next, so returns are
//!   matched to messages by `message_id`);
//! - a nack → [`PublishError::Nacked`]; no confirm within `amqp.confirm_timeout` →
//!   [`PublishError::ConfirmTimeout`] (the late confirm is still awaited and only counted);
//! - the channel or connection dies → every unconfirmed `Publish` gets
//!   [`PublishError::ConnectionLost`], queued ones [`PublishError::Unavailable`]; the actor
//!   reconnects with exponential backoff (`reconnect_min` … `reconnect_max`);
//! - while disconnected, or while the broker blocks the connection (memory or disk alarm),
//!   a `Publish` gets [`PublishError::Unavailable`] at once; upstream rolls back and retries.
//!   Messages already in flight when the block starts time out after `confirm_timeout`; the
//!   state shows `blocked` with the broker's reason, and logs say so.
//!
//! A `Publish` is answered at its first failure; its remaining triggers are then not published
//! (the upstream republishes the whole batch anyway). Publishes that reached the session are
//! answered in arrival order; refusals (unavailable, unencodable) are answered at once.
//!
//! In `declare` mode, a message for the configured queue that comes back unroutable means the
//! queue was deleted while we were connected: the session declares it again, so the upstream's
//! retry succeeds.
//!
//! lapin's own auto-recovery is not used: it never republishes, and the upstream must roll
//! back anyway. The URL's password never reaches logs or status ([`redact_url`]).

use super::{Publish, PublishError, celery, envelope, topology};
use crate::config::{AmqpConfig, DeclareMode, redact_url};
use crate::trigger::{MessageFormat, Trigger};
use actix::prelude::*;
use futures::{FutureExt, Stream, StreamExt, future::LocalBoxFuture, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// The publisher's connection state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherState {
    Connecting,
    Connected,
    /// Connected, but the broker refuses to read what we publish (memory or disk alarm).
    Blocked,
    Disconnected,
}

impl std::fmt::Display for PublisherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PublisherState::Connecting => "connecting",
            PublisherState::Connected => "connected",
            PublisherState::Blocked => "blocked",
            PublisherState::Disconnected => "disconnected",
        })
    }
}

/// A snapshot of the publisher, for `status`, `/metrics` and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublisherStatus {
    pub state: PublisherState,
    /// The broker URL with the password replaced by `***`.
    pub broker: String,
    pub queue: String,
    /// The broker's reason while `state` is `blocked`.
    pub blocked_reason: Option<String>,
    /// Messages published and not yet confirmed (the window in use).
    pub unconfirmed: usize,
    pub max_unconfirmed: usize,
    /// Messages written to the channel.
    pub published: u64,
    /// Messages acked by the broker without being returned.
    pub confirmed: u64,
    /// Messages the broker returned as unroutable.
    pub returned: u64,
    pub nacked: u64,
    /// Messages without a confirm within `confirm_timeout`.
    pub timeouts: u64,
    /// Messages still unconfirmed when the channel or connection was lost.
    pub lost: u64,
    /// Confirms that arrived after their message had timed out.
    pub late_confirms: u64,
    /// Successful connections since start.
    pub connects: u64,
    pub last_error: Option<String>,
    /// When `state` last changed (RFC 3339).
    pub state_since: String,
}

/// Ask the publisher for a [`PublisherStatus`].
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "PublisherStatus")]
pub struct GetPublisherStatus;

type SharedStatus = Arc<Mutex<PublisherStatus>>;

fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, PublisherStatus> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_state(s: &SharedStatus, state: PublisherState) {
    let mut st = lock(s);
    if st.state != state {
        st.state = state;
        st.state_since = now_rfc3339();
    }
    if state != PublisherState::Blocked {
        st.blocked_reason = None;
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One message ready to go.
struct Prepared {
    id: String,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// One `Publish`, handed to the session.
struct Job {
    messages: Vec<Prepared>,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// Stop publishing: refuse new `Publish`es, let the current session publish what it already
/// accepted and await its confirms, close the connection, and stay disconnected. Answers when
/// the session has ended, or with `Err` if that takes longer than `deadline` (the session then
/// keeps going in the background until its confirms time out).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), PublishError>")]
pub struct Shutdown {
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
    status: SharedStatus,
    session: Option<mpsc::UnboundedSender<Job>>,
    generation: u64,
    backoff: Duration,
    ready: Option<oneshot::Sender<Result<(), PublishError>>>,
    origin: String,
    /// Resolves when the current session task has ended.
    session_done: Option<oneshot::Receiver<()>>,
    shutting_down: bool,
}

impl AmqpPublisher {
    pub fn new(cfg: AmqpConfig) -> Self {
        let status = PublisherStatus {
            state: PublisherState::Connecting,
            broker: redact_url(cfg.url.expose()),
            queue: cfg.queue.name.clone(),
            blocked_reason: None,
            unconfirmed: 0,
            max_unconfirmed: cfg.max_unconfirmed.get(),
            published: 0,
            confirmed: 0,
            returned: 0,
            nacked: 0,
            timeouts: 0,
            lost: 0,
            late_confirms: 0,
            connects: 0,
            last_error: None,
            state_since: now_rfc3339(),
        };
        AmqpPublisher {
            backoff: cfg.reconnect_min,
            cfg: Arc::new(cfg),
            status: Arc::new(Mutex::new(status)),
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
            Ok(Err(e @ PublishError::Topology(_))) => Err(e),
            _ => Ok(addr),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        set_state(&self.status, PublisherState::Connecting);
        info!(broker = %redact_url(self.cfg.url.expose()), "connecting to the broker");
        let cfg = self.cfg.clone();
        ctx.spawn(open(cfg).into_actor(self).map(|res, act, ctx| match res {
            Ok(opened) => act.on_connected(opened, ctx),
            Err(e) => act.on_connect_failed(e, ctx),
        }));
    }

    fn on_connected(&mut self, opened: Opened, ctx: &mut Context<Self>) {
        if self.shutting_down {
            actix::spawn(async move { close_quietly(&opened.conn).await });
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        self.session = Some(tx);
        self.backoff = self.cfg.reconnect_min;
        {
            let mut st = lock(&self.status);
            st.connects += 1;
        }
        set_state(&self.status, PublisherState::Connected);
        info!(
            broker = %redact_url(self.cfg.url.expose()),
            queue = %self.cfg.queue.name,
            max_unconfirmed = self.cfg.max_unconfirmed,
            "connected to the broker"
        );
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }
        let session = Session::new(opened, rx, self.cfg.clone(), self.status.clone());
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
        set_state(&self.status, PublisherState::Disconnected);
        lock(&self.status).last_error = Some(e.to_string());
        let topology = matches!(e, PublishError::Topology(_));
        if topology {
            error!(error = %e, "queue topology does not match the configuration");
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(e.clone()));
            if topology {
                ctx.stop();
                return;
            }
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max.max(self.cfg.reconnect_min));
        warn!(error = %e, retry_in = ?delay, "cannot connect to the broker; retrying");
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
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
            .with_app_id("canal-consumer".into())
            .with_headers(headers);
        if let Some(kind) = kind {
            properties = properties.with_type(kind.into());
        }
        Ok(Prepared {
            id: t.id.clone(),
            exchange: t.route.exchange.clone(),
            routing_key: t.route.routing_key.clone(),
            body,
            properties,
        })
    }
}

impl Actor for AmqpPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
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
        let Publish { triggers, reply } = msg;
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
        let (state, blocked_reason, last_error) = {
            let st = lock(&self.status);
            (st.state, st.blocked_reason.clone(), st.last_error.clone())
        };
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
        if let Err(mpsc::error::SendError(job)) = session.send(Job { messages, reply }) {
            let _ = job.reply.send(Err(PublishError::Unavailable(
                "the broker session just ended".into(),
            )));
        }
    }
}

impl Handler<GetPublisherStatus> for AmqpPublisher {
    type Result = MessageResult<GetPublisherStatus>;

    fn handle(&mut self, _: GetPublisherStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(lock(&self.status).clone())
    }
}

impl Handler<Shutdown> for AmqpPublisher {
    type Result = ResponseFuture<Result<(), PublishError>>;

    fn handle(&mut self, msg: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        // dropping the sender tells the session to finish what it accepted and close
        self.session = None;
        let done = self.session_done.take();
        let status = self.status.clone();
        info!(deadline = ?msg.deadline, "publisher shutting down");
        Box::pin(async move {
            let res = match done {
                None => Ok(()),
                Some(done) => match tokio::time::timeout(msg.deadline, done).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(PublishError::Unavailable(format!(
                        "shutdown deadline {:?} passed with {} messages unconfirmed",
                        msg.deadline,
                        lock(&status).unconfirmed
                    ))),
                },
            };
            set_state(&status, PublisherState::Disconnected);
            lock(&status).last_error = Some("shut down".into());
            info!("publisher shut down");
            res
        })
    }
}

impl Handler<SessionEnded> for AmqpPublisher {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.shutting_down {
            return;
        }
        self.session = None;
        set_state(&self.status, PublisherState::Disconnected);
        lock(&self.status).last_error = Some(msg.reason.clone());
        self.backoff = self.cfg.reconnect_min;
        warn!(reason = %msg.reason, retry_in = ?self.backoff, "broker session ended; reconnecting");
        let delay = self.backoff;
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }
}

/// A connection with its publishing channel, ready for a session.
struct Opened {
    conn: Connection,
    channel: Channel,
}

/// Connect, check the topology, open the confirm-mode channel.
async fn open(cfg: Arc<AmqpConfig>) -> Result<Opened, PublishError> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from("canal-consumer publisher"));
    let limit = cfg.confirm_timeout.max(Duration::from_secs(5));
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        PublishError::Unavailable(format!("{what} {}: {e}", redact_url(cfg.url.expose())))
    };
    let conn = match tokio::time::timeout(limit, Connection::connect(cfg.url.expose(), props)).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(unavailable("cannot connect to", &e)),
        Err(_) => {
            return Err(unavailable(
                "cannot connect to",
                &format!("no answer within {limit:?}"),
            ));
        }
    };
    let setup = async {
        topology::ensure_queue(&conn, &cfg.queue).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| unavailable("cannot open a channel on", &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| unavailable("cannot enable publisher confirms on", &e))?;
        Ok(channel)
    };
    match tokio::time::timeout(limit, setup).await {
        Ok(Ok(channel)) => Ok(Opened { conn, channel }),
        Ok(Err(e)) => {
            close_quietly(&conn).await;
            Err(e)
        }
        Err(_) => {
            close_quietly(&conn).await;
            Err(unavailable(
                "cannot set up the channel on",
                &format!("no answer within {limit:?}"),
            ))
        }
    }
}

async fn close_quietly(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "canal-consumer publisher closing".into()),
        )
        .await;
    }
}

/// How a published message ended.
#[derive(Debug, Clone)]
enum Outcome {
    Acked,
    Returned {
        exchange: String,
        routing_key: String,
        reason: String,
    },
    Nacked,
}

/// A published, not yet settled message. `seq` counts publishes on this channel.
struct InFlight {
    seq: u64,
    job: u64,
    id: String,
    deadline: Instant,
    outcome: Option<Outcome>,
}

/// A `Publish` being published or awaiting confirms.
struct OpenJob {
    no: u64,
    reply: Option<oneshot::Sender<Result<(), PublishError>>>,
    total: usize,
    published: usize,
    settled: usize,
}

type ConfirmFuture = LocalBoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

/// Everything about one connection: publishes jobs in order, settles confirms in order.
struct Session {
    conn: Connection,
    channel: Channel,
    events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    jobs: mpsc::UnboundedReceiver<Job>,
    cfg: Arc<AmqpConfig>,
    status: SharedStatus,
    open_jobs: VecDeque<OpenJob>,
    next_job: u64,
    sending: Option<(u64, std::vec::IntoIter<Prepared>)>,
    inflight: VecDeque<InFlight>,
    next_seq: u64,
    confirms: FuturesUnordered<ConfirmFuture>,
    /// A message for the configured queue came back unroutable: the queue was deleted under
    /// us. In `declare` mode it is declared again (at most once a second).
    redeclare: bool,
    last_redeclare: Option<Instant>,
}

impl Session {
    fn new(
        opened: Opened,
        jobs: mpsc::UnboundedReceiver<Job>,
        cfg: Arc<AmqpConfig>,
        status: SharedStatus,
    ) -> Self {
        let events = Box::pin(opened.conn.events_listener());
        Session {
            conn: opened.conn,
            channel: opened.channel,
            events,
            jobs,
            cfg,
            status,
            open_jobs: VecDeque::new(),
            next_job: 0,
            sending: None,
            inflight: VecDeque::new(),
            next_seq: 0,
            confirms: FuturesUnordered::new(),
            redeclare: false,
            last_redeclare: None,
        }
    }

    fn window(&self) -> usize {
        self.cfg.max_unconfirmed.get()
    }

    /// Serve the connection until it fails or the actor goes away; answer every job.
    async fn run(mut self) -> String {
        let reason = self.drive().await;
        // the reason first: whoever sees `disconnected` also sees why
        lock(&self.status).last_error = Some(reason.clone());
        set_state(&self.status, PublisherState::Disconnected);
        self.fail_all(&reason);
        close_quietly(&self.conn).await;
        reason
    }

    async fn drive(&mut self) -> String {
        let mut health = tokio::time::interval(Duration::from_secs(1));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut jobs_closed = false;
        loop {
            while self.inflight.len() < self.window() {
                let Some((job, msg)) = self.next_message() else {
                    break;
                };
                if let Err(reason) = self.publish_one(job, msg).await {
                    return reason;
                }
            }
            if self.redeclare
                && self
                    .last_redeclare
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            {
                self.redeclare_queue().await;
            }
            if jobs_closed && self.sending.is_none() && self.inflight.is_empty() {
                return "publisher stopped".into();
            }
            let room = self.inflight.len() < self.window();
            let front_deadline = self
                .inflight
                .front()
                .filter(|f| f.outcome.is_none())
                .map(|f| f.deadline);
            tokio::select! {
                ev = self.events.next() => match ev {
                    Some(Event::ConnectionBlocked(reason)) => self.on_blocked(reason),
                    Some(Event::ConnectionUnblocked) => self.on_unblocked(),
                    Some(Event::Error(e)) => {
                        if let Some(reason) = self.broken() {
                            return format!("{reason}: {e}");
                        }
                        debug!(error = %e, "connection event error on another channel");
                    }
                    Some(_) => {}
                    None => return "connection closed".into(),
                },
                Some((seq, res)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    if let Err(reason) = self.on_confirm(seq, res) {
                        return reason;
                    }
                    // Barrier: lapin resolves all tags of one multi-ack under its
                    // acknowledgements lock, and `wait_for_confirms` takes that lock on its
                    // first poll; once it returns, every confirm of that ack is resolved, so
                    // a returned message riding on a later tag is seen before we settle.
                    let _ = self.channel.wait_for_confirms().now_or_never();
                    while let Some(Some((seq, res))) = self.confirms.next().now_or_never() {
                        if let Err(reason) = self.on_confirm(seq, res) {
                            return reason;
                        }
                    }
                    self.settle_front();
                }
                _ = tokio::time::sleep_until(front_deadline.unwrap_or_else(Instant::now)),
                    if front_deadline.is_some() => self.settle_front(),
                job = self.jobs.recv(), if !jobs_closed && room && self.sending.is_none() => {
                    match job {
                        Some(job) => self.start_job(job),
                        None => jobs_closed = true,
                    }
                }
                _ = health.tick() => {
                    if let Some(reason) = self.broken() {
                        return self.explain(reason);
                    }
                    let blocked = self.conn.status().blocked();
                    let shown = lock(&self.status).state == PublisherState::Blocked;
                    if blocked && !shown {
                        self.on_blocked("reported by connection status".into());
                    } else if !blocked && shown {
                        self.on_unblocked();
                    }
                }
            }
        }
    }

    /// Declare the configured queue again after it vanished (see `redeclare`).
    async fn redeclare_queue(&mut self) {
        self.redeclare = false;
        self.last_redeclare = Some(Instant::now());
        let limit = self.cfg.confirm_timeout;
        match tokio::time::timeout(limit, topology::ensure_queue(&self.conn, &self.cfg.queue)).await
        {
            Ok(Ok(())) => warn!(
                queue = %self.cfg.queue.name,
                "the worker queue was missing (messages came back unroutable); declared it again"
            ),
            Ok(Err(e)) => error!(error = %e, "cannot declare the worker queue again"),
            Err(_) => error!(timeout = ?limit, "declaring the worker queue again timed out"),
        }
    }

    /// Add the broker's own words to `reason` if an error event or a failed confirm is
    /// already waiting (the status flips before those are delivered).
    fn explain(&mut self, reason: String) -> String {
        while let Some(Some(ev)) = self.events.next().now_or_never() {
            if let Event::Error(e) = ev {
                return format!("{reason}: {e}");
            }
        }
        while let Some(Some((_, res))) = self.confirms.next().now_or_never() {
            if let Err(e) = res {
                return format!("{reason}: {e}");
            }
        }
        reason
    }

    /// Why the connection or channel is unusable, if it is.
    fn broken(&self) -> Option<String> {
        let conn = self.conn.status();
        if !conn.connected() {
            let what = if conn.errored() {
                "failed"
            } else if conn.closing() {
                "closing"
            } else {
                "closed"
            };
            Some(format!("broker connection {what}"))
        } else if !self.channel.status().connected() {
            Some("publishing channel closed".into())
        } else {
            None
        }
    }

    fn on_blocked(&mut self, reason: String) {
        warn!(reason = %reason, unconfirmed = self.inflight.len(), "the broker blocked publishing");
        set_state(&self.status, PublisherState::Blocked);
        lock(&self.status).blocked_reason = Some(reason);
    }

    fn on_unblocked(&mut self) {
        info!("the broker unblocked publishing");
        set_state(&self.status, PublisherState::Connected);
    }

    fn start_job(&mut self, job: Job) {
        let no = self.next_job;
        self.next_job += 1;
        self.open_jobs.push_back(OpenJob {
            no,
            reply: Some(job.reply),
            total: job.messages.len(),
            published: 0,
            settled: 0,
        });
        self.sending = Some((no, job.messages.into_iter()));
    }

    fn job_mut(&mut self, no: u64) -> Option<&mut OpenJob> {
        let first = self.open_jobs.front()?.no;
        self.open_jobs.get_mut(no.checked_sub(first)? as usize)
    }

    /// The next message to publish: the rest of the current job, else the next queued job.
    /// A job that already failed (or whose caller went away) is not published further.
    fn next_message(&mut self) -> Option<(u64, Prepared)> {
        loop {
            if self.sending.is_none() {
                match self.jobs.try_recv() {
                    Ok(job) => self.start_job(job),
                    Err(_) => return None,
                }
            }
            let (no, _) = self.sending.as_ref()?;
            let no = *no;
            let abandoned = self
                .job_mut(no)
                .is_none_or(|j| j.reply.as_ref().is_none_or(|r| r.is_closed()));
            if abandoned {
                if let Some(job) = self.job_mut(no) {
                    job.total = job.published;
                    job.reply = None;
                }
                self.sending = None;
                self.drop_finished_jobs();
                continue;
            }
            let (next, exhausted) = match self.sending.as_mut() {
                Some((_, it)) => (it.next(), it.len() == 0),
                None => (None, true),
            };
            if exhausted {
                self.sending = None;
            }
            match next {
                Some(msg) => {
                    if let Some(job) = self.job_mut(no) {
                        job.published += 1;
                    }
                    return Some((no, msg));
                }
                None => self.drop_finished_jobs(),
            }
        }
    }

    async fn publish_one(&mut self, job: u64, msg: Prepared) -> Result<(), String> {
        let timeout = self.cfg.confirm_timeout;
        let publish = self.channel.basic_publish(
            msg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &msg.body,
            msg.properties,
        );
        let confirm = match tokio::time::timeout(timeout, publish).await {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(e)) => return Err(format!("publish failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "publishing stalled for {timeout:?} (broker blocked or unreachable)"
                ));
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.push_back(InFlight {
            seq,
            job,
            id: msg.id,
            deadline: Instant::now() + timeout,
            outcome: None,
        });
        self.confirms
            .push(async move { (seq, confirm.await) }.boxed_local());
        let mut st = lock(&self.status);
        st.published += 1;
        st.unconfirmed = self.inflight.len();
        Ok(())
    }

    /// Record a confirm. `Err` means the channel is gone.
    fn on_confirm(&mut self, seq: u64, res: lapin::Result<Confirmation>) -> Result<(), String> {
        let (outcome, returned) = match res {
            Ok(Confirmation::Ack(ret)) => (Outcome::Acked, ret),
            Ok(Confirmation::Nack(ret)) => (Outcome::Nacked, ret),
            Ok(Confirmation::NotRequested) => {
                return Err("the publishing channel is not in confirm mode".into());
            }
            Err(e) => return Err(format!("publishing channel failed: {e}")),
        };
        if let Some(ret) = returned {
            let carrier = self
                .inflight
                .front()
                .and_then(|f| seq.checked_sub(f.seq))
                .and_then(|i| self.inflight.get(i as usize))
                .map(|f| f.id.as_str());
            let returned_id = ret.delivery.properties.message_id().as_ref();
            if carrier != returned_id.map(|s| s.as_str()) {
                debug!(
                    carrier = ?carrier,
                    returned = ?returned_id,
                    "a returned message arrived on another message's confirm"
                );
            }
            self.on_returned(ret);
        }
        let Some(first) = self.inflight.front().map(|f| f.seq) else {
            lock(&self.status).late_confirms += 1;
            return Ok(());
        };
        match seq
            .checked_sub(first)
            .and_then(|i| self.inflight.get_mut(i as usize))
        {
            Some(f) => {
                // a return already recorded for this message wins over its ack
                if !matches!(f.outcome, Some(Outcome::Returned { .. })) {
                    f.outcome = Some(outcome);
                }
            }
            None => {
                lock(&self.status).late_confirms += 1;
                debug!(seq, "confirm for a message that already timed out");
            }
        }
        Ok(())
    }

    /// Attach a returned message to the in-flight message with its `message_id`.
    fn on_returned(&mut self, ret: BasicReturnMessage) {
        let id = ret
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let outcome = Outcome::Returned {
            exchange: ret.delivery.exchange.to_string(),
            routing_key: ret.delivery.routing_key.to_string(),
            reason: format!("{} {}", ret.reply_code, ret.reply_text),
        };
        match self.inflight.iter_mut().find(|f| f.id == id) {
            Some(f) => f.outcome = Some(outcome),
            None => {
                error!(
                    id = %id,
                    "the broker returned a message that is no longer in flight (timed out before)"
                );
                lock(&self.status).returned += 1;
            }
        }
    }

    /// Settle messages from the front of the window: decided ones, and timed-out ones.
    fn settle_front(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.confirm_timeout;
        while let Some(front) = self.inflight.front() {
            if front.outcome.is_none() && front.deadline > now {
                break;
            }
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            let err = {
                let mut st = lock(&self.status);
                match f.outcome {
                    Some(Outcome::Acked) => {
                        st.confirmed += 1;
                        None
                    }
                    Some(Outcome::Returned {
                        exchange,
                        routing_key,
                        reason,
                    }) => {
                        st.returned += 1;
                        if exchange.is_empty()
                            && routing_key == self.cfg.queue.name
                            && self.cfg.queue.declare == DeclareMode::Declare
                        {
                            self.redeclare = true;
                        }
                        warn!(id = %f.id, exchange = %exchange, routing_key = %routing_key,
                              reason = %reason, "the broker returned an unroutable message");
                        Some(PublishError::Returned {
                            id: f.id.clone(),
                            exchange,
                            routing_key,
                            reason,
                        })
                    }
                    Some(Outcome::Nacked) => {
                        st.nacked += 1;
                        warn!(id = %f.id, "the broker nacked a message");
                        Some(PublishError::Nacked { id: f.id.clone() })
                    }
                    None => {
                        st.timeouts += 1;
                        warn!(id = %f.id, timeout = ?timeout, "no confirm in time");
                        Some(PublishError::ConfirmTimeout {
                            id: f.id.clone(),
                            timeout,
                        })
                    }
                }
            };
            self.settle(f.job, err);
        }
        lock(&self.status).unconfirmed = self.inflight.len();
    }

    /// One message of `job` is settled; answer the job on its first error or when all are ok.
    fn settle(&mut self, job: u64, err: Option<PublishError>) {
        if let Some(j) = self.job_mut(job) {
            j.settled += 1;
            if let Some(e) = err
                && let Some(reply) = j.reply.take()
            {
                let _ = reply.send(Err(e));
            }
        }
        self.drop_finished_jobs();
    }

    fn drop_finished_jobs(&mut self) {
        while let Some(front) = self.open_jobs.front() {
            let being_sent = self.sending.as_ref().is_some_and(|(no, _)| *no == front.no);
            if front.settled >= front.total && !being_sent {
                if let Some(job) = self.open_jobs.pop_front()
                    && let Some(reply) = job.reply
                {
                    let _ = reply.send(Ok(()));
                }
            } else {
                break;
            }
        }
    }

    /// The session ends: every open and queued job gets an error.
    fn fail_all(&mut self, reason: &str) {
        let lost = self.inflight.len();
        if lost > 0 || !self.open_jobs.is_empty() {
            warn!(reason = %reason, unconfirmed = lost, "failing unconfirmed publishes");
        }
        for job in self.open_jobs.drain(..) {
            if let Some(reply) = job.reply {
                let unconfirmed = self.inflight.iter().filter(|f| f.job == job.no).count();
                let _ = reply.send(Err(PublishError::ConnectionLost {
                    unconfirmed,
                    reason: reason.to_string(),
                }));
            }
        }
        self.inflight.clear();
        self.sending = None;
        self.confirms = FuturesUnordered::new();
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            let _ = job.reply.send(Err(PublishError::Unavailable(format!(
                "the broker connection ended before publishing: {reason}"
            ))));
        }
        let mut st = lock(&self.status);
        st.lost += lost as u64;
        st.unconfirmed = 0;
    }
}
