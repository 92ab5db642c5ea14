//! What the Manager and a consumer tell each other about a part and its failures: the poison
//! policy a consumer is configured with, the mode a part is run in, and why a part failed
//! ([`ProcessFailure`]). Defined here, below the Manager that decides on them
//! (`manager::core`), so the consumer actor and the rules use them without importing the
//! Manager.

use serde::{Deserialize, Serialize};

/// What a consumer does with failures it cannot get past.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPoison {
    /// Park the failing events (or unroutable triggers) in the dead-letter queue and go on.
    #[default]
    Park,
    /// Retry forever / roll back; nothing of the batch is acked until it succeeds.
    Stall,
}

/// A consumer's poison policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoisonPolicy {
    pub on_poison: OnPoison,
    /// Failures of the same part before it is parked (at least 1).
    pub attempts: u32,
}

impl Default for PoisonPolicy {
    fn default() -> Self {
        PoisonPolicy {
            on_poison: OnPoison::Park,
            attempts: 3,
        }
    }
}

/// How a part is to be run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// Run it; a failing event fails the part.
    #[default]
    Normal,
    /// Run it; events that fail become dead letters (with `reason` if they fail no more).
    ParkFailures { reason: String },
    /// Run it again but publish only dead letters for these trigger ids (the broker could not
    /// route them); its other triggers were confirmed already.
    ParkIds { ids: Vec<String>, reason: String },
    /// Do not run it: every event becomes a dead letter (the consumer is quarantined).
    ParkAll { reason: String },
}

impl Mode {
    pub fn is_park(&self) -> bool {
        !matches!(self, Mode::Normal)
    }
}

/// Why a consumer could not finish a part. Transient (see [the crate docs](crate#errors)):
/// its actor restarts it with a fresh instance and the Manager retries the part after a
/// backoff; the poison policy, not this error, decides when retrying stops (park or stall).
/// Its text is what `status` shows as the consumer's `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessFailure {
    /// It gave up on its own: `ConsumerError::Fatal`, an event error under the `stop` error
    /// policy, or an error from `end_of_part`. The text is the consumer's.
    #[error("{0}")]
    Stopped(String),
    /// It panicked in `during` (`process_event` or `end_of_part`): a bug in it.
    #[error("panic in {during}: {message}")]
    Panicked {
        during: &'static str,
        message: String,
    },
}

impl From<&str> for ProcessFailure {
    /// A consumer's own reason for stopping.
    fn from(reason: &str) -> Self {
        ProcessFailure::Stopped(reason.to_string())
    }
}
