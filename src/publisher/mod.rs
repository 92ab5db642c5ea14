//! The publisher boundary: how triggers leave the consumers.
//!
//! Consumers send [`Publish`] messages to a `Recipient<Publish>`. The AMQP publisher actor is
//! the production implementation; [`RecordingSink`] records triggers for tests and `test` runs.
//! Whoever receives a `Publish` must answer on its `reply` channel only once every trigger in it
//! is safely delivered (AMQP: confirmed by the broker), or with an error; triggers must leave in
//! the order `Publish` messages arrive.

pub mod amqp;
pub mod celery;
pub mod connect;
pub mod envelope;
pub mod failover;
pub mod routes;
mod session;
pub mod status;
pub mod topology;
pub mod window;

pub use amqp::{
    AmqpPublisher, GetPublisherStatus, PublisherState, PublisherStatus, StopPublishing,
};

use crate::trigger::Trigger;
use actix::prelude::*;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Why a publish failed. Any of these means the Canal batch must not be acked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error(
        "broker returned message {} as unroutable (exchange '{}', routing key '{}'): {}",
        .0.id, .0.exchange, .0.routing_key, .0.reason
    )]
    Returned(Returned),
    #[error("broker nacked message {id}")]
    Nacked { id: String },
    #[error("no confirm for message {id} within {timeout:?}")]
    ConfirmTimeout {
        id: String,
        timeout: std::time::Duration,
    },
    #[error("broker connection lost with {unconfirmed} messages unconfirmed: {reason}")]
    ConnectionLost { unconfirmed: usize, reason: String },
    #[error("cannot encode message {id}: {reason}")]
    Encode { id: String, reason: String },
    #[error("publisher unavailable: {0}")]
    Unavailable(String),
    /// The broker's queue does not match `[amqp.queue]` (or is missing); the text says which
    /// argument differs and what to set. Retrying does not help.
    #[error("queue topology mismatch: {0}")]
    Topology(String),
    /// The TLS handshake failed on the broker's certificate (another CA, another host name,
    /// expired) or the `[amqp.tls]` files are unusable; the text says which setting to fix.
    /// Retrying does not help.
    #[error("{0}")]
    Tls(String),
    /// Some messages of the job could not be routed as configured (their exchange or queue
    /// does not exist); the others were confirmed. Retrying alone does not help: they are
    /// parked (or the batch stalls, with `on_poison = "stall"`).
    #[error("{} message(s) unroutable, first {}: exchange '{}', routing key '{}': {}", returned.len(),
        returned.first().map(|r| r.id.as_str()).unwrap_or("-"),
        returned.first().map(|r| r.exchange.as_str()).unwrap_or("-"),
        returned.first().map(|r| r.routing_key.as_str()).unwrap_or("-"),
        returned.first().map(|r| r.reason.as_str()).unwrap_or("-"))]
    Unroutable { returned: Vec<Returned> },
    /// The job belonged to a Canal epoch that was abandoned (a rollback or reconnect began a
    /// newer one); what it had not published yet was dropped, and Canal redelivers the rows.
    #[error("publish cancelled: canal epoch {epoch} was abandoned")]
    Cancelled { epoch: u64 },
}

impl PublishError {
    /// Transient or definite (see [the crate docs](crate#errors)): transient when retrying the
    /// same publish later may succeed (the broker or the link was the problem, or our own
    /// queue was deleted and is declared again: `Returned`); definite when the message itself
    /// cannot be delivered as configured (unroutable, unencodable, wrong topology), so
    /// retrying alone never helps.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Nacked { .. }
            | PublishError::Returned(_)
            | PublishError::ConfirmTimeout { .. }
            | PublishError::ConnectionLost { .. }
            | PublishError::Unavailable(_)
            | PublishError::Cancelled { .. } => true,
            PublishError::Unroutable { .. }
            | PublishError::Encode { .. }
            | PublishError::Topology(_)
            | PublishError::Tls(_) => false,
        }
    }
}

/// One message the broker returned as unroutable (or that was refused before publishing
/// because its exchange is known broken): the one shape of a return, from the window's record
/// of it to [`PublishError::Returned`] and [`PublishError::Unroutable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    pub reason: String,
}

/// Publish these triggers, in order; answer on `reply` when all are confirmed.
///
/// `epoch` is the Canal epoch of the batch the triggers come from: a publisher cancels the
/// unpublished work of older epochs once it sees a newer one (see [`window`]).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub triggers: Vec<Trigger>,
    pub epoch: u64,
    pub reply: oneshot::Sender<Result<(), PublishError>>,
}

/// The AMQP `message_id` of a message we published (our trigger id), or "" if it has none.
pub fn message_id_of(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Cancel what is not yet published of Canal epochs below this one (the Manager sends it when
/// an epoch ends; a `Publish` of a newer epoch has the same effect).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct CancelBefore(pub u64);

/// A sink that records every trigger and confirms at once (tests, `test NAME`).
#[derive(Debug, Default, Clone)]
pub struct RecordingSink {
    pub recorded: Arc<Mutex<Vec<Trigger>>>,
}

impl Actor for RecordingSink {
    type Context = Context<Self>;
}

impl Handler<CancelBefore> for RecordingSink {
    type Result = ();

    fn handle(&mut self, _: CancelBefore, _: &mut Context<Self>) {}
}

impl Handler<Publish> for RecordingSink {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        self.recorded
            .lock()
            .expect("recording sink poisoned")
            .extend(msg.triggers);
        let _ = msg.reply.send(Ok(()));
    }
}
