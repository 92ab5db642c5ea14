//! The publisher's status as `status`, `/ready` and `/metrics` see it: its connection state
//! and counters ([`PublisherStatus`]), what a session reports about its connection
//! ([`SessionReport`]), and when a confirm that does not come counts as a stall
//! ([`stall_after`]).
//!
//! One owner: the publisher actor keeps the [`PublisherStatus`] and is the only one to write
//! it. A session task writes only its [`SessionReport`], into a `tokio::sync::watch` (the
//! newest report wins), and the actor folds the newest report into its status
//! ([`PublisherStatus::absorb`]) before it decides whether to accept a publish or answers a
//! status request. Plain data; nothing here fails.

use super::window::WindowStats;
use crate::clock::now_rfc3339;
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

/// What the session of one connection reports to the publisher actor (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionReport {
    /// The broker blocks publishing (memory or disk alarm), with its reason.
    pub blocked: Option<String>,
    /// When `blocked` last changed (RFC 3339); `None` while it never did.
    pub blocked_changed: Option<String>,
    /// The confirm window's counters (counting on from the connections before).
    pub counters: WindowStats,
    /// Messages published and not yet confirmed.
    pub unconfirmed: usize,
    /// How long the oldest unconfirmed message has waited (ms).
    pub oldest_unconfirmed_ms: Option<u64>,
    /// Since when the oldest unconfirmed message waits too long ([`stall_after`]).
    pub stalled_since: Option<String>,
    pub broken_routes: Vec<super::routes::BrokenRoute>,
    /// The session ended, and why (set before its jobs are failed, so whoever is answered
    /// finds the publisher disconnected).
    pub ended: Option<String>,
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

    /// Move to `state`; `since` is when it happened (now when `None`). Leaving `blocked` drops
    /// the broker's reason.
    pub fn set_state(&mut self, state: PublisherState, since: Option<&str>) {
        if self.state != state {
            self.state = state;
            self.state_since = since.map_or_else(now_rfc3339, str::to_string);
        }
        if state != PublisherState::Blocked {
            self.blocked_reason = None;
        }
    }

    /// Take in the newest report of the current connection's session.
    pub fn absorb(&mut self, r: &SessionReport) {
        self.counters = r.counters.clone();
        self.unconfirmed = r.unconfirmed;
        self.oldest_unconfirmed_ms = r.oldest_unconfirmed_ms;
        self.stalled_since = r.stalled_since.clone();
        self.broken_routes = r.broken_routes.clone();
        if let Some(reason) = &r.ended {
            // the reason first: whoever sees `disconnected` also sees why
            self.last_error = Some(reason.clone());
            self.set_state(PublisherState::Disconnected, None);
        } else if let Some(reason) = &r.blocked {
            self.set_state(PublisherState::Blocked, r.blocked_changed.as_deref());
            self.blocked_reason = Some(reason.clone());
        } else if self.state == PublisherState::Blocked {
            self.set_state(PublisherState::Connected, r.blocked_changed.as_deref());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_actor_takes_in_what_its_session_reports() {
        let mut st = PublisherStatus::connecting("amqp://x".into(), 1, "q".into(), 8);
        st.set_state(PublisherState::Connected, None);
        let mut r = SessionReport {
            unconfirmed: 2,
            ..Default::default()
        };
        r.counters.published = 5;
        st.absorb(&r);
        assert_eq!(
            (st.state, st.unconfirmed, st.counters.published),
            (PublisherState::Connected, 2, 5)
        );
        // blocked, since when the session saw it
        r.blocked = Some("memory alarm".into());
        r.blocked_changed = Some("2026-12-06T10:00:00.000Z".into());
        st.absorb(&r);
        assert_eq!(st.state, PublisherState::Blocked);
        assert_eq!(st.state_since, "2026-12-06T10:00:00.000Z");
        assert!(st.unavailable().unwrap().contains("memory alarm"));
        // and unblocked
        r.blocked = None;
        r.blocked_changed = Some("2026-12-06T10:01:00.000Z".into());
        st.absorb(&r);
        assert_eq!(st.state, PublisherState::Connected);
        assert_eq!(st.state_since, "2026-12-06T10:01:00.000Z");
        assert_eq!(st.blocked_reason, None);
        assert!(st.carries());
        // ended: disconnected, with the reason
        r.ended = Some("connection closed".into());
        st.absorb(&r);
        assert_eq!(st.state, PublisherState::Disconnected);
        assert_eq!(st.last_error.as_deref(), Some("connection closed"));
        assert!(!st.carries());
    }
}
