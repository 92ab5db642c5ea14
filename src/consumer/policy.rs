//! What the Manager tells a consumer about a part and its failures: the poison policy a
//! consumer is configured with, and the mode a part is run in. Defined here, below the Manager
//! that decides them (`manager::core`), so the consumer actor and the rules read them without
//! importing the Manager.

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
