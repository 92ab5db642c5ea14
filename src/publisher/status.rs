//! The publisher's status as `status`, `/ready` and `/metrics` see it: its connection state
//! and counters ([`PublisherStatus`]), and when a confirm that does not come counts as a stall
//! ([`stall_after`]). Plain data, written by the publisher actor and its session task.

use super::window::WindowStats;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
    /// The broker URL in use (or being tried) with the password replaced by `***`.
    pub broker: String,
    /// Which of the `amqp.urls` that is (1-based), and how many there are.
    #[serde(default)]
    pub node: usize,
    #[serde(default)]
    pub nodes: usize,
    pub queue: String,
    /// The broker's reason while `state` is `blocked`.
    pub blocked_reason: Option<String>,
    /// Messages published and not yet confirmed (the window in use).
    pub unconfirmed: usize,
    pub max_unconfirmed: usize,
    /// What happened to the messages so far (the confirm window's counters; flattened, so
    /// the JSON keeps `published`, `confirmed`, … at the top level).
    #[serde(flatten)]
    pub counters: WindowStats,
    /// How long the oldest unconfirmed message has waited for its confirm (ms); `None` when
    /// nothing is unconfirmed. A link that carries nothing shows here first.
    #[serde(default)]
    pub oldest_unconfirmed_ms: Option<u64>,
    /// Set while the oldest unconfirmed message has waited longer than
    /// [`stall_after`]`(confirm_timeout)` (RFC 3339 time the wait began): the link carries
    /// nothing (frozen network, blocked broker). Not ready while set.
    #[serde(default)]
    pub stalled_since: Option<String>,
    /// Routes (exchanges) that broke while connected: their messages are refused (parked
    /// upstream) and they are re-checked with backoff ([`super::routes`]).
    #[serde(default)]
    pub broken_routes: Vec<super::routes::BrokenRoute>,
    /// Successful connections since start.
    pub connects: u64,
    pub last_error: Option<String>,
    /// When `state` last changed (RFC 3339).
    pub state_since: String,
}

/// Now as RFC 3339 with milliseconds (`state_since`, `stalled_since`).
pub(super) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// How long the oldest unconfirmed message may wait before the publisher reports a stall:
/// half the confirm timeout, at most 5 s (a healthy broker confirms in milliseconds).
pub fn stall_after(confirm_timeout: Duration) -> Duration {
    (confirm_timeout / 2).min(Duration::from_secs(5))
}

impl PublisherStatus {
    /// The status of a publisher that starts connecting to `broker` (redacted), node 1 of
    /// `nodes`.
    pub fn connecting(broker: String, nodes: usize, queue: String, max_unconfirmed: usize) -> Self {
        PublisherStatus {
            state: PublisherState::Connecting,
            broker,
            node: 1,
            nodes,
            queue,
            blocked_reason: None,
            unconfirmed: 0,
            max_unconfirmed,
            counters: WindowStats::default(),
            oldest_unconfirmed_ms: None,
            stalled_since: None,
            broken_routes: Vec::new(),
            connects: 0,
            last_error: None,
            state_since: now_rfc3339(),
        }
    }

    /// The publisher carries messages: connected, and no confirm overdue (what
    /// `broker_connected` says).
    pub fn carries(&self) -> bool {
        self.state == PublisherState::Connected && self.stalled_since.is_none()
    }

    /// Why the publisher cannot carry messages now, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        if self.state != PublisherState::Connected {
            return Some(match &self.blocked_reason {
                Some(r) => format!("broker {} ({r})", self.state),
                None => format!("broker channel is not up ({})", self.state),
            });
        }
        self.stalled_since.as_ref().map(|since| {
            format!(
                "broker stalled since {since}: no confirm for {} s",
                self.oldest_unconfirmed_ms.unwrap_or(0) / 1000
            )
        })
    }
}
