//! What the connection actor exchanges with the rest of the service: its settings, the
//! messages it takes and sends, and the status it reports. The actor itself is in the parent
//! module.

use crate::canal::session::SessionConfig;
use crate::event::{ChangeEvent, Position};
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub use crate::canal::window::BatchRef;

/// Settings of the connection actor.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub session: SessionConfig,
    /// What the connection core decides with (the filter, GET sizes, window bounds, reconnect
    /// backoff, `fail_fast`). Its `server`, `destination` and `client_id` are the session's;
    /// the shell sets `jitter_seed`.
    pub core: CoreConfig,
    /// ZooKeeper mode: the lease that says which Canal server to use (instead of
    /// `session.host`/`session.port`) and whether this replica may fetch and ack at all; read
    /// before every GET and ACK. None: the simple mode (always this host and port).
    pub lease: Option<tokio::sync::watch::Receiver<crate::ha::Lease>>,
    /// How text columns arrive (`canal.connection_charset`).
    pub text: TextSource,
    /// The rewind guard's file (`canal.rewind_guard`): the newest confirmed position, read at
    /// start and written (at most once a second, and at shutdown) as it moves. None: the guard
    /// keeps it in memory only.
    pub confirmed_file: Option<std::path::PathBuf>,
}

/// Settings of the core: what `[canal]` sets that decides something, mapped in one place
/// (`config::CanalConfig::connection`) and carried in the actor's `ConnectionConfig`.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The Canal server of the simple mode (`host:port`); in ZooKeeper mode the lease names it.
    pub server: String,
    pub destination: String,
    pub client_id: String,
    /// Canal subscription filter (comma-separated regexes on `schema.table`); empty keeps the
    /// server's configured filter.
    pub filter: String,
    /// GET size in Canal's unit (the server's memunit in MEMSIZE mode, entries in ITEMSIZE mode).
    pub fetch_size: i32,
    /// Bytes in one of Canal's MEMSIZE units (`canal.mem_unit`): tells a short answer from a
    /// cut one ([`crate::canal::window::took_all`]).
    pub mem_unit: u32,
    /// How long an idle long poll (a GET after an empty one) may wait on the server for data
    /// before it is answered with "nothing"; GETs while data flows never wait.
    pub fetch_wait: Duration,
    /// Caught up with batches in flight, how long the long poll waits for their acks
    /// (`canal.ack_wait`, at most `fetch_wait`).
    pub ack_wait: Duration,
    pub max_inflight_batches: usize,
    pub max_inflight_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Give up (instead of retrying) when the very first connect fails with a definite error
    /// such as a wrong password.
    pub fail_fast: bool,
    /// Seeds the backoff jitter (up to 20%); the simulation passes its own for reproducible
    /// runs.
    pub jitter_seed: u64,
}

/// How the destination ships text columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSource {
    /// Decoded by Canal (its connectionCharset, UTF-8): taken as they are.
    AsShipped,
    /// As raw bytes (connectionCharset ISO-8859-1): decoded with each column's charset, looked
    /// up in the source database at this URL.
    Raw { source_url: crate::secret::Secret },
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
    /// The connection gave up (only with `fail_fast`, on a definite error at first connect).
    Fatal { error: Failure },
}

/// A failed connect or operation: what the core needs to know of the error (its kind says
/// transient or definite, and which of the definite ones the core handles on its own); its
/// text is the error's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// What kind of failure: decides between a reconnect, a stall, a conflict and standing by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A reconnect may fix it (network, server restart).
    Transient,
    /// A reconnect repeats it (a wrong password): definite, but still retried with backoff
    /// (logged as an error), except at the first connect with `fail_fast`.
    Definite,
    /// The next frame is over `canal.max_frame_bytes`.
    TooLarge { len: usize, max: usize },
    /// Canal no longer knows a batch we ack: another process acked or rolled it back.
    Vanished { evidence: String },
    /// ZooKeeper mode: the lease ended under the operation.
    NotActive,
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

/// The subscriber holds nothing of this abandoned batch any more (its epoch ended before it
/// could be acked); it stops counting against the in-flight bounds.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct ReleaseBatch(pub BatchRef);

/// Replace the subscription filter (applied live with a re-subscribe). `applied`, if given, is
/// answered once Canal has accepted a subscription with this filter (or a newer one).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetFilter {
    pub filter: String,
    pub applied: Option<oneshot::Sender<()>>,
}

/// Stop fetching; resolves once every batch in flight has been acked or abandoned, the batch
/// of a GET already on the wire included (a long poll holds that up to `canal.fetch_wait`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Close the session and stop the actor, optionally rolling back what is outstanding first.
/// Answers with what was left unacked.
#[derive(Debug, Message)]
#[rtype(result = "ShutdownReport")]
pub struct Shutdown {
    pub rollback: bool,
}

/// What a connection left behind when it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Batches acked to Canal since start.
    pub acked: u64,
    /// Batches fetched and not acked at the end (Canal redelivers them to the next run).
    pub unacked: usize,
    /// Batches abandoned (rolled back or lost with a session) since start: Canal redelivers
    /// them too.
    pub abandoned_total: u64,
    /// Position of the newest event fetched, and of the newest acked: equal when everything
    /// fetched was acked.
    pub fetched_position: Option<Position>,
    pub acked_position: Option<Position>,
}

impl ShutdownReport {
    /// Everything fetched was confirmed and acked.
    pub fn all_acked(&self) -> bool {
        self.unacked == 0 && self.fetched_position == self.acked_position
    }
}

/// Ask for a [`ConnectionStatus`].
#[derive(Debug, Message)]
#[rtype(result = "ConnectionStatus")]
pub struct GetConnectionStatus;

/// Why the connection stopped fetching, and how to go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallInfo {
    /// What `canal-consumer skip` must be given to pass it (`frame-<n>` or `batch:<id>`).
    pub token: String,
    pub reason: String,
    /// The newest position acked before the stall: the stalled rows come after it.
    pub after: Option<Position>,
    /// What the operator can do.
    pub how: String,
    /// When it began (RFC 3339).
    pub since: String,
}

/// Pass what the connection is stalled at, acking it without delivering it. `token` must be
/// the one `status` shows. Answers with what was skipped, or why nothing was.
#[derive(Debug, Message)]
#[rtype(result = "Result<Skipped, SkipError>")]
pub struct SkipStalled(pub String);

/// What `canal-consumer skip` passed; its text is the command's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// A held batch (an entry that cannot be decoded): acked without being delivered.
    Batch { token: String },
    /// An oversized frame: the connection reconnects and the next fetch reads past it.
    Frame { token: String },
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::Batch { token } => write!(f, "skipped {token}"),
            Skipped::Frame { token } => write!(
                f,
                "skipping {token}: the next fetch reads past it (see `canal-consumer status`)"
            ),
        }
    }
}

/// Why `canal-consumer skip` passed nothing. Definite: the same command fails the same way
/// until the stream's state changes (see `status` for what it is stalled at).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipError {
    #[error("the canal stream is not stalled; nothing to skip")]
    NotStalled,
    #[error("the stream is stalled at {stalled}, not {given}; nothing was skipped")]
    OtherToken { stalled: String, given: String },
}

/// The connection's state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    #[default]
    Connecting,
    Connected,
    /// Waiting to reconnect after a failure.
    Reconnecting,
    /// Another process fetches as the same Canal client; not fetching until it is gone.
    Conflict,
    /// ZooKeeper mode: another replica (or Canal's Java client) holds the destination, or this
    /// one has no ZooKeeper session; connected to no Canal server.
    Standby,
    /// Stopped at something it must not pass on its own (a frame over the cap, an entry that
    /// cannot be decoded); see [`ConnectionStatus::stall`] for what and how to proceed.
    Stalled,
    Stopped,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Reconnecting => "reconnecting",
            ConnectionState::Conflict => "conflict",
            ConnectionState::Standby => "standby",
            ConnectionState::Stalled => "stalled",
            ConnectionState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of the connection.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ConnectionStatus {
    pub state: ConnectionState,
    pub server: String,
    pub destination: String,
    pub filter: String,
    pub epoch: u64,
    pub inflight_batches: usize,
    pub inflight_bytes: usize,
    /// Batches of abandoned epochs still being finished downstream (they count against the
    /// in-flight bounds).
    #[serde(default)]
    pub abandoned_batches: usize,
    /// Batches abandoned (rolled back or lost with a session) since start.
    #[serde(default)]
    pub abandoned_total: u64,
    pub batches_received: u64,
    pub events_received: u64,
    pub batches_acked: u64,
    pub rollbacks: u64,
    pub reconnects: u64,
    /// Events that came again at or before the newest confirmed position (Canal's cursor went
    /// backwards) and were acked without being delivered (the rewind guard).
    #[serde(default)]
    pub rewind_skipped: u64,
    /// Times another process was seen fetching as this Canal client.
    #[serde(default)]
    pub conflicts: u64,
    /// ZooKeeper mode only: active or standby, the session, the Canal server ZooKeeper names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<crate::ha::HaStatus>,
    /// Set while `state` is `stalled`.
    #[serde(default)]
    pub stall: Option<StallInfo>,
    /// What was skipped with `canal-consumer skip` (newest last, at most 20).
    #[serde(default)]
    pub skipped: Vec<String>,
    pub last_error: Option<String>,
    /// A setting that does not match the Canal server, seen in what it sent (kept until
    /// restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_warning: Option<String>,
    /// Position of the newest event fetched.
    pub last_position: Option<Position>,
    /// When the newest fetched event was executed on the source (ms since the epoch).
    pub last_executed_at: Option<i64>,
    /// Position of the newest event whose batch was acked.
    pub acked_position: Option<Position>,
    pub acked_executed_at: Option<i64>,
}
