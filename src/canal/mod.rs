//! The Canal layer: everything between the Canal server's TCP port and [`ChangeEvent`]s.
//!
//! - [`codec`]: length-prefixed frames with a size cap.
//! - [`proto`]: prost types from `proto/`.
//! - [`auth`]: the password scramble.
//! - [`session`]: one authenticated TCP session and its requests.
//! - [`decode`]: entries to [`ChangeEvent`]s.
//! - [`charset`], [`source`]: column charsets for a destination that ships text as raw bytes
//!   (`canal.connection_charset = "ISO-8859-1"`), and their lookup in the source database.
//! - [`lossy`]: text Canal decoded lossily (U+FFFD in UTF-8 mode), counted per column.
//! - [`connection`]: the `CanalConnection` actor that owns the session, fetches batches, acks
//!   them in order, rolls back, and reconnects with backoff.
//!
//! Every failure is a [`CanalError`]; none of them panics. Any error on a session drops it: the
//! connection actor reconnects, re-subscribes and rolls back, so unacked batches are redelivered.
//!
//! [`ChangeEvent`]: crate::event::ChangeEvent

pub mod auth;
pub mod charset;
pub mod codec;
pub mod connection;
pub mod decode;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod lossy;
pub mod proto;
pub mod session;
pub mod source;
pub mod window;

pub use connection::{Batch, BatchRef, CanalConnection, ConnectionConfig, TextSource};
pub use session::{Session, SessionConfig};

use std::time::Duration;

/// Errors of the Canal layer.
#[derive(Debug, thiserror::Error)]
pub enum CanalError {
    #[error("cannot connect to canal server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("canal server {addr} did not answer within {after:?} while {during}")]
    Timeout {
        addr: String,
        during: &'static str,
        after: Duration,
    },
    #[error("canal server {addr} closed the connection while {during}")]
    Closed { addr: String, during: &'static str },
    #[error("bad frame from canal server: {0}")]
    Frame(#[from] codec::FrameError),
    #[error("malformed {what} packet from canal server: {source}")]
    Protobuf {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("unexpected {got} packet from canal server while waiting for {expected}")]
    Unexpected { expected: &'static str, got: String },
    #[error("canal server sent a compressed packet (compression {0}), which is not supported")]
    Compression(i32),
    #[error(
        "authentication failed for user '{user}' on destination '{destination}' (code {code}): {message}"
    )]
    Auth {
        destination: String,
        user: String,
        code: i32,
        message: String,
    },
    #[error(
        "the oversized frame to skip announced {expected} bytes, but the next one announces {got}; nothing was skipped (check `canal-consumer status` and skip what it shows)"
    )]
    SkipMismatch { expected: usize, got: usize },
    #[error(
        "cannot find the batch id at the start of the oversized frame; it cannot be skipped (raise canal.max_frame_bytes instead)"
    )]
    SkipNoBatchId,
    #[error(
        "another process is fetching from destination '{destination}' as client id {client_id}: {evidence}; stop the other instance (check `canal-consumer status` on other hosts) or give one of them another canal.client_id"
    )]
    Conflict {
        destination: String,
        client_id: String,
        /// What showed it (batch ids that jumped, a batch that vanished before its ack).
        evidence: String,
    },
    #[error("canal server error {code} on destination '{destination}' while {during}: {message}")]
    Server {
        destination: String,
        during: &'static str,
        code: i32,
        message: String,
    },
    #[error("not the active replica any more ({reason}); nothing more is fetched or acked")]
    NotActive { reason: String },
    #[error("cannot decode batch {batch_id} from destination '{destination}': {source}")]
    Decode {
        destination: String,
        batch_id: i64,
        source: decode::DecodeError,
    },
}

impl CanalError {
    /// Transient or definite (see [the crate docs](crate#errors)): a reconnect cannot fix a
    /// wrong password, a frame over the cap or a compressed packet, so those are definite; the
    /// connection still retries them with backoff, but logs them as errors.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            CanalError::Auth { .. }
                | CanalError::Frame(codec::FrameError::TooLarge { .. })
                | CanalError::Compression(_)
        )
    }
}
