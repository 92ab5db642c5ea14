//! What the connection core exchanges with its shell: the views it takes of a fetched batch
//! and of decoded events, its settings, and its inputs and actions.

use crate::canal::connection::api::ShutdownReport;
pub use crate::canal::connection::api::{CoreConfig, Failure, FailureKind};
use crate::canal::window::BatchRef;
use crate::event::Position;
use crate::ha::Lease;
use std::time::Duration;

/// A fetched batch as the core sees it (the shell's is the undecoded frame).
pub trait RawView {
    /// `-1` when the GET found nothing.
    fn batch_id(&self) -> i64;
    fn frame_bytes(&self) -> usize;
    /// The size the GET asked for, in Canal's units.
    fn asked(&self) -> i32;
    /// Each entry's size.
    fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_;
    /// The last entry ends a transaction (true when not known: such an answer tells nothing
    /// about the server's memunit, see [`crate::canal::window::SmallUnitProbe`]).
    fn ends_transaction(&self) -> bool {
        true
    }
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
    /// Keep the first `n` events; return the rest.
    fn split_off(&mut self, n: usize) -> Self;
    /// Add `more` after the last event.
    fn append(&mut self, more: Self);
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
    /// The long poll of this idle period has waited `ack_wait` for the acks in flight.
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
    /// The connection gave up (a definite error at the first connect with `fail_fast`).
    Fatal(Failure),
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
    /// The subscriber finished a batch (the actor's `AckBatch` message).
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
