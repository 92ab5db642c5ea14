//! The consumer actor: one per consumer, under actix supervision.
//!
//! It runs its [`Consumer`] over the events the Manager routes to it, one batch at a time, and
//! hands the resulting triggers to the publisher in the same order. Its reply to the Manager
//! carries a receiver that resolves when the publisher has confirmed them.
//!
//! Failure handling:
//! - `ConsumerError::Event` applies the consumer's [`ErrorPolicy`](crate::consumer::ErrorPolicy) (trigger `error_handler`, or
//!   a dead-letter message); the batch goes on.
//! - `ConsumerError::Fatal`, the `stop` policy, or a panic inside `process_event` fails the
//!   batch (nothing of it is published), answers [`ProcessFailure`] (transient: the part is
//!   retried) and stops the actor. Its supervisor restarts it; a panic is caught here, so it
//!   stops only this consumer.
//! - Every restart builds the consumer anew from its [`ConsumerFactory`].
//! - It keeps no supervision state: when to retry (the backoff) and when to quarantine are
//!   decided by the Manager's router (`manager::core`), which counts the restarts.

use crate::canal::connection::BatchRef;
use crate::consumer::{Consumer, ConsumerContext, ConsumerError, Failure, Mode, ProcessFailure};
use crate::event::ChangeEvent;
use crate::publisher::{Publish, PublishError};
use crate::trigger::Trigger;
use crate::trigger::{MessageFormat, Route};
use actix::prelude::*;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Process these events (indices into `events`), in order.
#[derive(Message)]
#[rtype(result = "Result<Processed, ProcessFailure>")]
pub struct ProcessBatch {
    /// The Canal batch (and epoch) the events come from.
    pub batch: BatchRef,
    /// Normal processing, or one of the park modes.
    pub mode: Mode,
    pub events: Arc<Vec<ChangeEvent>>,
    pub indices: Arc<Vec<usize>>,
    /// Events (indices into `events`) to dead-letter unprocessed with the reason, in any mode
    /// (lossy text with `canal.on_lossy_text = "park"`); usually empty.
    pub park: Arc<BTreeMap<usize, String>>,
}

/// The batch was processed and its triggers handed to the publisher.
#[derive(Debug)]
pub struct Processed {
    pub triggers: usize,
    pub event_errors: usize,
    /// The newest of those errors.
    pub last_error: Option<String>,
    /// Events (or refused triggers) turned into dead letters.
    pub parked: usize,
    /// Resolves when every trigger is confirmed (or failed).
    pub confirmed: oneshot::Receiver<Result<(), PublishError>>,
}

/// Builds a fresh consumer: the supervisor calls it on every restart, so state a panic may
/// have left half-updated never survives into the next attempt.
pub type ConsumerFactory = Box<dyn Fn() -> Box<dyn Consumer> + Send>;

/// The consumer actor.
pub struct ConsumerActor {
    factory: ConsumerFactory,
    consumer: Box<dyn Consumer>,
    ctx: ConsumerContext,
    publisher: Recipient<Publish>,
}

impl ConsumerActor {
    pub fn new(
        factory: ConsumerFactory,
        publisher: Recipient<Publish>,
        default_route: Route,
        default_format: MessageFormat,
    ) -> Self {
        let consumer = factory();
        let ctx = ConsumerContext::new(consumer.name(), default_route, default_format);
        ConsumerActor {
            factory,
            consumer,
            ctx,
            publisher,
        }
    }

    /// Start under a supervisor.
    pub fn start_supervised(self) -> Addr<ConsumerActor> {
        Supervisor::start(move |_| self)
    }
}

impl Actor for ConsumerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64);
    }
}

impl Supervised for ConsumerActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.ctx.take_triggers();
        // a new instance: nothing a failed `process_event` left behind carries over
        self.consumer = (self.factory)();
        tracing::warn!(consumer = self.consumer.name(), "consumer restarted");
    }
}

/// Run `consumer` on one event, applying its error policy (a handled failure is counted with
/// [`ConsumerContext::record_error`]). Triggers emitted before a failure are discarded. `Err`
/// means the consumer must stop (fatal error, `stop` policy, or panic).
pub fn process_event(
    consumer: &mut dyn Consumer,
    cctx: &mut ConsumerContext,
    event: &ChangeEvent,
) -> Result<(), ProcessFailure> {
    cctx.begin_event(event);
    let mark = cctx.triggers().len();
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| consumer.process_event(event, cctx)));
    let error = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(ConsumerError::Event(msg))) => msg,
        Ok(Err(ConsumerError::Fatal(msg))) => {
            cctx.truncate(mark);
            return Err(ProcessFailure::Stopped(msg));
        }
        Err(panic) => {
            cctx.truncate(mark);
            return Err(panicked("process_event", panic));
        }
    };
    cctx.truncate(mark);
    tracing::warn!(
        consumer = consumer.name(),
        table = %event.full_table(),
        position = %event.position,
        error = %error,
        "event failed in consumer"
    );
    let failure = Failure {
        consumer: consumer.name(),
        rule: None,
        event,
        error: &error,
        route: None,
        format: None,
    };
    if cctx.handle_failure(&consumer.error_policy(), failure) {
        Ok(())
    } else {
        Err(ProcessFailure::Stopped(error))
    }
}

/// Run `consumer.end_of_part` (bulk messages of the part), catching a panic like
/// [`process_event`]. On failure what it emitted is discarded and `Err` says why.
pub fn finish_part(
    consumer: &mut dyn Consumer,
    cctx: &mut ConsumerContext,
) -> Result<(), ProcessFailure> {
    let mark = cctx.triggers().len();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| consumer.end_of_part(cctx)));
    let error = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => ProcessFailure::Stopped(e.to_string()),
        Err(panic) => panicked("end_of_part", panic),
    };
    cctx.truncate(mark);
    Err(error)
}

/// A caught panic as a failure: its message when it has one.
fn panicked(during: &'static str, panic: Box<dyn std::any::Any + Send>) -> ProcessFailure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    ProcessFailure::Panicked { during, message }
}

fn failure<'a>(consumer: &'a str, event: &'a ChangeEvent, error: &'a str) -> Failure<'a> {
    Failure {
        consumer,
        rule: None,
        event,
        error,
        route: None,
        format: None,
    }
}

impl ConsumerActor {
    /// Run a part in a park mode (see [`Mode`]): never fails, never stops the actor; what
    /// cannot be processed or routed becomes a dead letter. Returns how many were parked.
    fn process_parking(&mut self, msg: &ProcessBatch) -> usize {
        let mut parked = 0;
        let name = self.consumer.name().to_string();
        for &i in msg.indices.iter() {
            let Some(event) = msg.events.get(i) else {
                continue;
            };
            let failure = |error| failure(&name, event, error);
            if let Some(reason) = msg.park.get(&i) {
                // a ParkIds run repeats a normal run whose dead letters were confirmed already
                if !matches!(msg.mode, Mode::ParkIds { .. }) {
                    self.ctx.begin_event(event);
                    self.ctx.park(failure(reason), None);
                    parked += 1;
                }
                continue;
            }
            match &msg.mode {
                Mode::Normal => {}
                Mode::ParkAll { reason } => {
                    self.ctx.begin_event(event);
                    self.ctx.park(failure(reason), None);
                    parked += 1;
                }
                Mode::ParkFailures { reason } => {
                    let mark = self.ctx.triggers().len();
                    if let Err(error) = process_event(self.consumer.as_mut(), &mut self.ctx, event)
                    {
                        self.ctx.truncate(mark);
                        self.ctx.begin_event(event);
                        let why = format!("{error} ({reason})");
                        self.ctx.park(failure(&why), None);
                        parked += 1;
                    }
                }
                Mode::ParkIds { ids, reason } => {
                    let mark = self.ctx.triggers().len();
                    let result = process_event(self.consumer.as_mut(), &mut self.ctx, event);
                    let produced: Vec<Trigger> = self.ctx.triggers()[mark..].to_vec();
                    self.ctx.truncate(mark);
                    self.ctx.begin_event(event);
                    if let Err(error) = result {
                        self.ctx.park(failure(&error.to_string()), None);
                        parked += 1;
                        continue;
                    }
                    // the others were confirmed already: only the refused ones go out again
                    for t in produced.iter().filter(|t| ids.contains(&t.id)) {
                        let f = Failure {
                            rule: t.rule.as_deref(),
                            ..failure(reason)
                        };
                        self.ctx.park(f, Some(t));
                        parked += 1;
                    }
                }
            }
        }
        parked += self.finish_parking(msg, &name);
        if parked > 0 {
            tracing::warn!(
                consumer = %name,
                parked,
                batch = %msg.batch,
                "events parked in the dead-letter queue"
            );
        }
        parked
    }

    /// The end of a part in a park mode: its bulk messages go out (`ParkFailures`), or only
    /// the refused ones are parked (`ParkIds`). If that fails, every event of the part is
    /// parked rather than losing the rows the bulks held. Returns how many were parked.
    fn finish_parking(&mut self, msg: &ProcessBatch, name: &str) -> usize {
        if matches!(msg.mode, Mode::Normal | Mode::ParkAll { .. }) {
            return 0;
        }
        let events = || msg.indices.iter().filter_map(|&i| msg.events.get(i));
        let mark = self.ctx.triggers().len();
        if let Err(error) = finish_part(self.consumer.as_mut(), &mut self.ctx) {
            let error = error.to_string();
            let mut parked = 0;
            for event in events() {
                self.ctx.begin_event(event);
                self.ctx.park(failure(name, event, &error), None);
                parked += 1;
            }
            return parked;
        }
        let Mode::ParkIds { ids, reason } = &msg.mode else {
            return 0;
        };
        let produced: Vec<Trigger> = self.ctx.triggers()[mark..].to_vec();
        self.ctx.truncate(mark);
        let mut parked = 0;
        for t in produced.iter().filter(|t| ids.contains(&t.id)) {
            // a bulk is parked as its rows: one dead letter per row, each with the bulk's id
            // and that row's payload as the original, so a replay sends every row again
            let rows: Vec<(&crate::event::Position, Trigger)> = match &t.bulk {
                Some(b) => b
                    .positions
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        let mut row = t.clone();
                        row.payload = t.payload.get(j).cloned().unwrap_or_default();
                        row.bulk = None;
                        (p, row)
                    })
                    .collect(),
                None => vec![(&t.source.position, t.clone())],
            };
            for (position, original) in rows {
                let Some(event) = events().find(|e| e.position == *position) else {
                    continue;
                };
                self.ctx.begin_event(event);
                let f = Failure {
                    rule: t.rule.as_deref(),
                    ..failure(name, event, reason)
                };
                self.ctx.park(f, Some(&original));
                parked += 1;
            }
        }
        parked
    }

    /// Hand the collected triggers to the publisher; the receiver resolves on their confirms.
    fn publish(&mut self, msg: &ProcessBatch, parked: usize) -> Processed {
        let epoch = msg.batch.epoch;
        let event_errors = self.ctx.take_errors();
        let last_error = self.ctx.take_last_error();
        let triggers = self.ctx.take_triggers();
        // a copy for `canal-consumer tail` (src/tap.rs); a no-op without listeners
        crate::tap::global().publish(self.consumer.name(), &msg.events, &msg.indices, &triggers);
        let count = triggers.len();
        let (tx, rx) = oneshot::channel();
        if triggers.is_empty() {
            let _ = tx.send(Ok(()));
        } else {
            // do_send keeps the order in which batches were processed; the number of
            // outstanding messages is bounded by the Canal in-flight window.
            self.publisher.do_send(Publish {
                triggers,
                epoch,
                reply: tx,
            });
        }
        Processed {
            triggers: count,
            event_errors,
            last_error,
            parked,
            confirmed: rx,
        }
    }
}

impl Handler<ProcessBatch> for ConsumerActor {
    type Result = Result<Processed, ProcessFailure>;

    fn handle(&mut self, msg: ProcessBatch, ctx: &mut Context<Self>) -> Self::Result {
        self.ctx.take_errors();
        if msg.mode.is_park() {
            // parking runs even while the consumer is quarantined
            let parked = self.process_parking(&msg);
            return Ok(self.publish(&msg, parked));
        }
        let mut failed = None;
        let mut parked = 0;
        let name = self.consumer.name().to_string();
        for &i in msg.indices.iter() {
            let Some(event) = msg.events.get(i) else {
                continue;
            };
            if let Some(reason) = msg.park.get(&i) {
                self.ctx.begin_event(event);
                self.ctx.park(failure(&name, event, reason), None);
                parked += 1;
                continue;
            }
            if let Err(error) = process_event(self.consumer.as_mut(), &mut self.ctx, event) {
                tracing::error!(
                    consumer = self.consumer.name(),
                    table = %event.full_table(),
                    position = %event.position,
                    error = %error,
                    "consumer failed; stopping it for a restart"
                );
                failed = Some(error);
                break;
            }
        }
        if failed.is_none()
            && let Err(error) = finish_part(self.consumer.as_mut(), &mut self.ctx)
        {
            tracing::error!(
                consumer = self.consumer.name(),
                batch = %msg.batch,
                error = %error,
                "consumer failed at the end of a part; stopping it for a restart"
            );
            failed = Some(error);
        }
        if let Some(error) = failed {
            self.ctx.take_triggers();
            ctx.stop();
            return Err(error);
        }
        if parked > 0 {
            tracing::warn!(
                consumer = %name,
                parked,
                batch = %msg.batch,
                "events parked in the dead-letter queue"
            );
        }
        Ok(self.publish(&msg, parked))
    }
}
