//! One broker connection's publishing session: the I/O shell around [`ConfirmWindow`].
//!
//! The session owns the lapin connection and its single confirm-mode channel. It takes jobs from
//! the publisher actor, asks the window what to publish next, writes it (tagging each publish
//! with a unique `canal_consumer_publish` header so a return can be pinned on the exact copy),
//! feeds confirms, returns and timeouts back into the window, and sends each job's answer when
//! the window decides it. Every decision lives in the window; this file only does I/O. What the
//! actor needs to know about the connection (blocked, counters, unconfirmed, stall, broken
//! routes, the end and its reason) goes into a [`SessionReport`] on a `watch`: the session
//! writes only that, and the actor owns the publisher's status.
//!
//! How it fails: when the channel or connection dies, the window fails every job
//! ([`PublishError::ConnectionLost`]), queued jobs are refused, and `run` returns the reason;
//! the actor then reconnects with backoff. One exception: a channel the broker closed because
//! an exchange a rule publishes to is gone ([`super::routes`]). Then the unconfirmed jobs fail
//! the same way, but the session opens a new channel on the same connection and goes on, and
//! from then on messages to that exchange are refused as unroutable (parked upstream) until a
//! re-check with backoff finds it again.

use super::routes::{self, BrokenRoutes, ChannelFault};
use super::window::{ConfirmWindow, JobNo, Outgoing};
use super::{PublishError, Returned, topology};
use crate::config::{AmqpConfig, DeclareMode, redact_url};
use futures::{FutureExt, Stream, StreamExt, future::LocalBoxFuture, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, LongString},
};
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::status::SessionReport;
use super::window::WindowStats;
use crate::clock::{now_rfc3339, rfc3339_ago};

/// How long a broken session waits for the broker's reason before it reports the failure.
const EXPLAIN_WAIT: Duration = Duration::from_secs(1);

/// The header that identifies one publish on the wire (`<generation>.<seq>`).
pub(super) const PUBLISH_TAG_HEADER: &str = "canal_consumer_publish";

/// One message ready to go.
pub(super) struct Prepared {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Everything but the headers, which the session completes with the publish tag.
    pub properties: BasicProperties,
    pub headers: lapin::types::FieldTable,
}

impl Outgoing for Prepared {
    fn id(&self) -> &str {
        &self.id
    }
}

/// One `Publish`, handed to the session.
pub(super) struct Job {
    pub epoch: u64,
    pub messages: Vec<Prepared>,
    pub reply: oneshot::Sender<Result<(), PublishError>>,
}

/// What the actor sends the session.
pub(super) enum ToSession {
    Job(Job),
    CancelBefore(u64),
}

/// A connection with its publishing channel, ready for a session.
pub(super) struct Opened {
    pub conn: Connection,
    channel: Channel,
}

/// How long a reconnect waits for the topology re-check before it publishes anyway (see
/// [`open`]).
pub const TOPOLOGY_RECHECK: Duration = Duration::from_secs(2);

/// Connect to `cfg.endpoints()[node]`, check the topology, open the confirm-mode channel.
///
/// `verified`: this process has checked the topology on an earlier connection. A reconnect
/// then waits at most [`TOPOLOGY_RECHECK`] for the check and publishes on without it: on a
/// RabbitMQ cluster with a frozen node (SIGSTOP, a hung VM) a `queue.declare` waits for that
/// node until the Erlang distribution gives up on it (`net_ticktime`, 60 s), while publishing
/// to a quorum queue whose majority is up works. A queue that did vanish shows as returned
/// messages, and the session declares it again.
pub(super) async fn open(
    cfg: Arc<AmqpConfig>,
    node: usize,
    verified: bool,
) -> Result<Opened, PublishError> {
    let endpoints = cfg.endpoints();
    let url = endpoints
        .get(node)
        .or_else(|| endpoints.first())
        .cloned()
        .unwrap_or_default();
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from("canal-consumer publisher"));
    let limit = cfg.confirm_timeout.max(Duration::from_secs(5));
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        PublishError::Unavailable(format!("{what} {}: {e}", redact_url(url.expose())))
    };
    let conn = match tokio::time::timeout(limit, super::connect::connect(&cfg, &url, props)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(unavailable(
                "cannot connect to",
                &format!("no answer within {limit:?}"),
            ));
        }
    };
    let setup = async {
        let check = async {
            topology::ensure_queue(&conn, &cfg.queue).await?;
            topology::ensure_dead_letter_queue(&conn, &cfg.queue).await
        };
        if verified {
            match tokio::time::timeout(TOPOLOGY_RECHECK, check).await {
                Ok(res) => res?,
                Err(_) => warn!(
                    broker = %redact_url(url.expose()),
                    "the queue topology re-check got no answer within {TOPOLOGY_RECHECK:?} (is \
                     a cluster node frozen?); publishing without it, as it was checked before"
                ),
            }
        } else {
            check.await?;
        }
        confirm_channel(&conn)
            .await
            .map_err(|e| PublishError::Unavailable(format!("{e} {}", redact_url(url.expose()))))
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

/// A new channel in confirm mode; the error says which step failed ("... on", the broker's
/// address follows).
async fn confirm_channel(conn: &Connection) -> Result<Channel, String> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel ({e}) on"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms ({e}) on"))?;
    Ok(channel)
}

/// The broker's reply code and text when `e` is a close by the broker.
fn close_reason(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().to_string()))
        }
        _ => None,
    }
}

/// `m` is not published while its exchange is known broken: it is reported as unroutable.
fn refused(routes: &mut BrokenRoutes, m: &Prepared) -> Option<Returned> {
    if m.exchange.is_empty() {
        return None;
    }
    routes.refusal(&m.exchange).map(|reason| Returned {
        id: m.id.clone(),
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        reason,
    })
}

/// Why the publishing channel failed: our words, and the broker's error if it gave one.
struct ChannelFailed {
    reason: String,
    error: Option<lapin::Error>,
}

pub(super) async fn close_quietly(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "canal-consumer publisher closing".into()),
        )
        .await;
    }
}

type ConfirmFuture = LocalBoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

/// Everything about one connection. See the module docs.
pub(super) struct Session {
    conn: Connection,
    /// Shared with the publishes in flight (a lapin `Channel` clone is a dozen `Arc`s).
    channel: Rc<Channel>,
    events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    jobs: mpsc::UnboundedReceiver<ToSession>,
    cfg: Arc<AmqpConfig>,
    /// What this session tells the actor (it writes nothing else the actor reads).
    report: watch::Sender<SessionReport>,
    /// The broker blocks publishing (as last reported).
    blocked: bool,
    generation: u64,
    window: ConfirmWindow<Prepared>,
    replies: HashMap<JobNo, oneshot::Sender<Result<(), PublishError>>>,
    confirms: FuturesUnordered<ConfirmFuture>,
    /// A message for the configured queue came back unroutable: the queue was deleted under
    /// us. In `declare` mode it is declared again (at most once a second).
    redeclare: bool,
    last_redeclare: Option<Instant>,
    /// Exchanges found gone while connected (see the module docs).
    routes: BrokenRoutes,
}

impl Session {
    pub(super) fn new(
        opened: Opened,
        jobs: mpsc::UnboundedReceiver<ToSession>,
        cfg: Arc<AmqpConfig>,
        report: watch::Sender<SessionReport>,
        generation: u64,
        counted: WindowStats,
    ) -> Self {
        let events = Box::pin(opened.conn.events_listener());
        Session {
            conn: opened.conn,
            channel: Rc::new(opened.channel),
            events,
            jobs,
            window: ConfirmWindow::new(cfg.max_unconfirmed.get(), cfg.confirm_timeout)
                .counting_from(counted),
            routes: BrokenRoutes::new(cfg.reconnect_min, cfg.reconnect_max),
            cfg,
            report,
            blocked: false,
            generation,
            replies: HashMap::new(),
            confirms: FuturesUnordered::new(),
            redeclare: false,
            last_redeclare: None,
        }
    }

    /// Serve the connection until it fails or the actor goes away; answer every job.
    pub(super) async fn run(mut self) -> String {
        let reason = self.drive().await;
        // ended before the jobs are failed: whoever is answered finds the publisher down
        self.report.send_modify(|r| r.ended = Some(reason.clone()));
        self.fail_all(&reason);
        close_quietly(&self.conn).await;
        reason
    }

    async fn drive(&mut self) -> String {
        let mut health = tokio::time::interval(Duration::from_secs(1));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut jobs_closed = false;
        loop {
            // not while the broker blocks the connection: it would not answer the channel.open
            if self.window.wants_new_channel()
                && !self.conn.status().blocked()
                && let Err(reason) = self.renew_channel().await
            {
                return reason;
            }
            let now = Instant::now().into_std();
            loop {
                let routes = &mut self.routes;
                let Some((seq, msg)) = self
                    .window
                    .poll_publish_or_refuse(now, |m| refused(routes, m))
                else {
                    break;
                };
                self.publish_one(seq, msg).await;
            }
            self.flush();
            if self.redeclare
                && self
                    .last_redeclare
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            {
                self.redeclare_queue().await;
            }
            if jobs_closed && self.window.is_idle() {
                return "publisher stopped".into();
            }
            // accept more work only while the backlog is within one window
            let room = self.window.queued() < self.cfg.max_unconfirmed.get();
            let deadline = self.window.next_deadline().map(Instant::from_std);
            let route_check = self.routes.next_check().map(Instant::from_std);
            tokio::select! {
                ev = self.events.next() => match ev {
                    Some(Event::ConnectionBlocked(reason)) => self.on_blocked(reason),
                    Some(Event::ConnectionUnblocked) => self.on_unblocked(),
                    Some(Event::Error(e)) => {
                        if let Some(reason) = self.broken() {
                            let failed = ChannelFailed {
                                reason: format!("{reason}: {e}"),
                                error: Some(e),
                            };
                            if let Err(reason) = self.channel_failed(failed).await {
                                return reason;
                            }
                        } else {
                            debug!(error = %e, "connection event error on another channel");
                        }
                    }
                    Some(_) => {}
                    None => return "connection closed".into(),
                },
                Some((seq, res)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    if let Err(failed) = self.on_confirms(seq, res)
                        && let Err(reason) = self.channel_failed(failed).await
                    {
                        return reason;
                    }
                }
                _ = tokio::time::sleep_until(route_check.unwrap_or_else(Instant::now)),
                    if route_check.is_some() => self.check_routes().await,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => self.window.settle(Instant::now().into_std()),
                job = self.jobs.recv(), if !jobs_closed && room => {
                    match job {
                        Some(ToSession::Job(job)) => {
                            let no = self.window.submit(job.epoch, job.messages);
                            self.replies.insert(no, job.reply);
                        }
                        Some(ToSession::CancelBefore(epoch)) => self.window.cancel_before(epoch),
                        None => jobs_closed = true,
                    }
                }
                _ = health.tick() => {
                    if let Some(reason) = self.broken() {
                        let failed = self.explain(reason).await;
                        if let Err(reason) = self.channel_failed(failed).await {
                            return reason;
                        }
                    }
                    let blocked = self.conn.status().blocked();
                    let shown = self.blocked;
                    if blocked && !shown {
                        self.on_blocked("reported by connection status".into());
                    } else if !blocked && shown {
                        self.on_unblocked();
                    }
                    self.abandon_gone_callers();
                    // keep `stalled_since` fresh while nothing else happens
                    self.flush();
                }
            }
        }
    }

    /// Feed a confirm, and every other one already resolved, into the window and settle.
    fn on_confirms(
        &mut self,
        seq: u64,
        res: lapin::Result<Confirmation>,
    ) -> Result<(), ChannelFailed> {
        self.on_confirm(seq, res)?;
        // Barrier: lapin resolves all tags of one multi-ack under its acknowledgements lock,
        // and `wait_for_confirms` takes that lock on its first poll; once it returns, every
        // confirm of that ack is resolved, so a returned message riding on a later tag is seen
        // before we settle.
        let _ = self.channel.wait_for_confirms().now_or_never();
        while let Some(Some((seq, res))) = self.confirms.next().now_or_never() {
            self.on_confirm(seq, res)?;
        }
        self.window.settle(Instant::now().into_std());
        Ok(())
    }

    /// The publishing channel failed. If the broker closed it because an exchange is gone
    /// (and the connection is up), that route is marked broken, what was unconfirmed fails
    /// (its batches roll back and come again), and a new channel carries on for everyone:
    /// `Ok`. Otherwise `Err` with the reason: the session ends.
    async fn channel_failed(&mut self, failed: ChannelFailed) -> Result<(), String> {
        let failed = match failed.error {
            Some(_) => failed,
            // the broker's words come as an event or a failed confirm: wait briefly for them
            None => self.explain(failed.reason).await,
        };
        let Some((code, text)) = failed.error.as_ref().and_then(close_reason) else {
            return Err(failed.reason);
        };
        let ChannelFault::RouteGone { exchange } = routes::classify_close(code, &text) else {
            return Err(failed.reason);
        };
        if !self.conn.status().connected() {
            return Err(failed.reason);
        }
        self.routes
            .route_gone(&exchange, &text, Instant::now().into_std());
        warn!(
            exchange = %exchange,
            reason = %text,
            unconfirmed = self.window.unconfirmed(),
            "the broker closed the publishing channel: a rule's exchange is gone; its messages \
             are parked from now on (re-checked with backoff), the unconfirmed ones are retried, \
             and the others go on on a new channel"
        );
        // whatever was unconfirmed on the closed channel is in doubt, whichever its route
        self.window
            .connection_lost(&format!("publishing channel closed: {text}"));
        self.confirms = FuturesUnordered::new();
        self.flush();
        let limit = self.cfg.confirm_timeout.max(Duration::from_secs(5));
        match tokio::time::timeout(limit, confirm_channel(&self.conn)).await {
            Ok(Ok(channel)) => {
                self.channel = Rc::new(channel);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{}; then {e} the broker", failed.reason)),
            Err(_) => Err(format!(
                "{}; then no new channel within {limit:?}",
                failed.reason
            )),
        }
    }

    /// The channel nacked a publish, and nothing is in flight on it: open a
    /// new one and close the old (see [`ConfirmWindow::wants_new_channel`]). `Err` ends the
    /// session (the actor reconnects).
    async fn renew_channel(&mut self) -> Result<(), String> {
        let limit = self.cfg.confirm_timeout.max(Duration::from_secs(5));
        let channel = match tokio::time::timeout(limit, confirm_channel(&self.conn)).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(format!(
                    "{e} the broker, to replace a publishing channel that nacked"
                ));
            }
            Err(_) => {
                return Err(format!(
                    "no new publishing channel within {limit:?}, to replace one that nacked"
                ));
            }
        };
        let old = std::mem::replace(&mut self.channel, Rc::new(channel));
        // confirms still owed on the old channel are of publishes that already timed out
        self.confirms = FuturesUnordered::new();
        self.window.channel_renewed();
        info!(
            renewed = self.window.stats().renewed_channels,
            "opened a new publishing channel after a nack (on RabbitMQ 3.x a \
             channel that met a quorum queue without a leader keeps nacking; a new one asks again)"
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(1), old.close(200, "renewed".into())).await;
        Ok(())
    }

    /// Check the broken routes that are due, each with a passive declare on a channel of its
    /// own (a missing exchange closes that channel, not ours).
    async fn check_routes(&mut self) {
        for exchange in self.routes.due(Instant::now().into_std()) {
            let check = async {
                let channel = self.conn.create_channel().await?;
                let res = channel
                    .exchange_declare(
                        exchange.as_str().into(),
                        lapin::ExchangeKind::Direct,
                        lapin::options::ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await;
                if channel.status().connected() {
                    let _ = channel.close(200, "route checked".into()).await;
                }
                res
            };
            let limit = self.cfg.confirm_timeout.max(Duration::from_secs(5));
            let exists = match tokio::time::timeout(limit, check).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    debug!(exchange = %exchange, error = %e, "a broken route is still missing");
                    false
                }
                Err(_) => false,
            };
            if exists {
                info!(exchange = %exchange, "a broken route is back: publishing to it again");
            }
            self.routes
                .checked(&exchange, exists, Instant::now().into_std());
        }
        self.flush();
    }

    /// Send the answers the window decided, log failures, and report its counters.
    fn flush(&mut self) {
        for f in self.window.take_failures() {
            match &f.error {
                PublishError::Returned(r) => {
                    warn!(id = %r.id, exchange = %r.exchange, routing_key = %r.routing_key,
                          reason = %r.reason, "the broker returned an unroutable message");
                    if r.exchange.is_empty()
                        && r.routing_key == self.cfg.queue.name
                        && self.cfg.queue.declare == DeclareMode::Declare
                    {
                        self.redeclare = true;
                    }
                }
                e => warn!(error = %e, "publish failed"),
            }
        }
        let stats = self.window.stats().clone();
        let oldest = self.window.oldest_unconfirmed_at();
        let broken_routes = self.routes.snapshot(Instant::now().into_std());
        let unconfirmed = self.window.unconfirmed();
        let stall = super::status::stall_after(self.cfg.confirm_timeout);
        let stalled_since = oldest
            .filter(|t| t.elapsed() >= stall)
            .map(|t| rfc3339_ago(t.elapsed()));
        self.report.send_modify(|r| {
            r.counters = stats;
            r.broken_routes = broken_routes;
            r.unconfirmed = unconfirmed;
            r.oldest_unconfirmed_ms = oldest.map(|t| t.elapsed().as_millis() as u64);
            r.stalled_since = stalled_since;
        });
        // answers after the counters, so whoever is answered sees them
        for (no, result) in self.window.take_replies() {
            if let Some(reply) = self.replies.remove(&no) {
                let _ = reply.send(result);
            }
        }
    }

    /// Jobs whose caller went away publish nothing more.
    fn abandon_gone_callers(&mut self) {
        let gone: Vec<JobNo> = self
            .replies
            .iter()
            .filter(|(_, r)| r.is_closed())
            .map(|(no, _)| *no)
            .collect();
        for no in gone {
            self.replies.remove(&no);
            self.window.abandon(no);
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

    /// Add the broker's own words to `reason` (e.g. `NOT_FOUND - no exchange 'x'`): the channel
    /// or connection status flips before lapin delivers the close reason, as an error event or
    /// a failed confirm, so wait briefly for it.
    async fn explain(&mut self, reason: String) -> ChannelFailed {
        let deadline = Instant::now() + EXPLAIN_WAIT;
        let without = |reason| ChannelFailed {
            reason,
            error: None,
        };
        loop {
            tokio::select! {
                ev = self.events.next() => match ev {
                    Some(Event::Error(e)) => return ChannelFailed {
                        reason: format!("{reason}: {e}"),
                        error: Some(e),
                    },
                    Some(_) => {}
                    None => return without(reason),
                },
                Some((_, res)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    if let Err(e) = res
                        && close_reason(&e).is_some()
                    {
                        return ChannelFailed {
                            reason: format!("{reason}: {e}"),
                            error: Some(e),
                        };
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return without(reason),
            }
        }
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
        warn!(reason = %reason, unconfirmed = self.window.unconfirmed(), "the broker blocked publishing");
        self.blocked = true;
        self.report.send_modify(|r| {
            r.blocked = Some(reason);
            r.blocked_changed = Some(now_rfc3339());
        });
    }

    fn on_unblocked(&mut self) {
        info!("the broker unblocked publishing");
        self.blocked = false;
        self.report.send_modify(|r| {
            r.blocked = None;
            r.blocked_changed = Some(now_rfc3339());
        });
    }

    /// Hand one message to lapin without waiting for it to reach the socket.
    ///
    /// `basic_publish` takes its delivery tag and queues its frames on its first poll, so the
    /// message is polled once here, in the window's order; what remains (lapin writing it,
    /// then the broker's confirm) completes in `confirms`. Waiting for each write before the
    /// next publish would cost a round trip to lapin's I/O thread per message. A write that
    /// never completes (a blocked broker, a frozen link) ends as the window's confirm timeout.
    async fn publish_one(&mut self, seq: u64, msg: Prepared) {
        let mut headers = msg.headers;
        headers.insert(
            PUBLISH_TAG_HEADER.into(),
            AMQPValue::LongString(LongString::from(format!("{}.{seq}", self.generation))),
        );
        let properties = msg.properties.with_headers(headers);
        let channel = Rc::clone(&self.channel);
        let mut publish = async move {
            let sent = channel
                .basic_publish(
                    msg.exchange.as_str().into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &msg.body,
                    properties,
                )
                .await;
            let confirmed = match sent {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            (seq, confirmed)
        }
        .boxed_local();
        match futures::poll!(publish.as_mut()) {
            std::task::Poll::Ready(done) => self
                .confirms
                .push(futures::future::ready(done).boxed_local()),
            std::task::Poll::Pending => self.confirms.push(publish),
        }
    }

    /// Feed one confirm (and the return lapin attached to it) into the window. `Err` means the
    /// channel is gone.
    fn on_confirm(
        &mut self,
        seq: u64,
        res: lapin::Result<Confirmation>,
    ) -> Result<(), ChannelFailed> {
        let (ack, returned) = match res {
            Ok(Confirmation::Ack(ret)) => (true, ret),
            Ok(Confirmation::Nack(ret)) => (false, ret),
            Ok(Confirmation::NotRequested) => {
                return Err(ChannelFailed {
                    reason: "the publishing channel is not in confirm mode".into(),
                    error: None,
                });
            }
            Err(e) => {
                let protocol = close_reason(&e).is_some();
                return Err(ChannelFailed {
                    reason: format!("publishing channel failed: {e}"),
                    error: protocol.then_some(e),
                });
            }
        };
        // lapin may hand a return over on another publish's confirm; the tag names the
        // publish it belongs to, and a return always precedes that publish's own ack
        if let Some(ret) = returned {
            self.on_returned(&ret);
        }
        self.window.on_confirm(seq, ack, false);
        Ok(())
    }

    fn on_returned(&mut self, ret: &BasicReturnMessage) {
        let tag = ret
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(PUBLISH_TAG_HEADER).cloned());
        let seq = match tag {
            Some(AMQPValue::LongString(s)) => parse_tag(&s.to_string(), self.generation),
            _ => None,
        };
        let exchange = ret.delivery.exchange.to_string();
        let routing_key = ret.delivery.routing_key.to_string();
        let reason = format!("{} {}", ret.reply_code, ret.reply_text);
        // our own queue vanished (declare mode re-declares it): a retry will succeed
        let transient = exchange.is_empty()
            && routing_key == self.cfg.queue.name
            && self.cfg.queue.declare == DeclareMode::Declare;
        let known = seq.is_some_and(|seq| {
            self.window
                .on_return(seq, &exchange, &routing_key, &reason, transient)
        });
        if !known {
            let id = super::message_id_of(&ret.delivery.properties);
            error!(
                id = %id,
                "the broker returned a message that is no longer in flight (timed out before)"
            );
        }
    }

    /// The session ends: every open and queued job gets an error.
    fn fail_all(&mut self, reason: &str) {
        let lost = self.window.unconfirmed();
        if lost > 0 || !self.replies.is_empty() {
            warn!(reason = %reason, unconfirmed = lost, "failing unconfirmed publishes");
        }
        self.window.connection_lost(reason);
        self.confirms = FuturesUnordered::new();
        self.jobs.close();
        while let Ok(msg) = self.jobs.try_recv() {
            let ToSession::Job(job) = msg else { continue };
            let _ = job.reply.send(Err(PublishError::Unavailable(format!(
                "the broker connection ended before publishing: {reason}"
            ))));
        }
        self.flush();
        self.report.send_modify(|r| r.unconfirmed = 0);
    }
}

/// `"<generation>.<seq>"` -> `seq`, if it belongs to this session's generation.
fn parse_tag(tag: &str, generation: u64) -> Option<u64> {
    let (g, s) = tag.split_once('.')?;
    (g.parse::<u64>().ok()? == generation).then_some(())?;
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_tag;

    #[test]
    fn urls_get_a_heartbeat_unless_they_set_one() {
        use super::super::connect::with_heartbeat;
        assert_eq!(
            with_heartbeat("amqp://h:5672/%2f"),
            "amqp://h:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=3"),
            "amqp://h/%2f?heartbeat=3"
        );
        // a parameter whose name ends in "heartbeat" is not the heartbeat
        assert_eq!(
            with_heartbeat("amqp://h/%2f?xheartbeat=1"),
            "amqp://h/%2f?xheartbeat=1&heartbeat=10"
        );
        // nor is a value, or a password, that mentions it (the password comes back
        // percent-encoded: the same password to lapin's parser)
        let url = with_heartbeat("amqp://u:heartbeat=1@h/%2f?reply=heartbeat=2");
        assert_eq!(
            url,
            "amqp://u:heartbeat%3D1@h/%2f?reply=heartbeat=2&heartbeat=10"
        );
        let parsed: lapin::uri::AMQPUri = url.parse().unwrap();
        assert_eq!(parsed.authority.userinfo.password, "heartbeat=1");
        assert_eq!(parsed.query.heartbeat, Some(10));
        assert_eq!(
            with_heartbeat("amqps://u:p@[::1]:5671/%2f?heartbeat=0"),
            "amqps://u:p@[::1]:5671/%2f?heartbeat=0"
        );
        assert_eq!(
            with_heartbeat("amqps://[::1]/%2f"),
            "amqps://[::1]/%2f?heartbeat=10"
        );
    }

    #[test]
    fn publish_tags_belong_to_their_generation() {
        assert_eq!(parse_tag("3.17", 3), Some(17));
        assert_eq!(parse_tag("2.17", 3), None);
        assert_eq!(parse_tag("garbage", 3), None);
    }
}
