//! The admin endpoint: how operators and the command line see and steer the running service.
//!
//! - [`server`]: the actix-web HTTP server (`/health`, `/ready`, `/status`, `/metrics`,
//!   `/consumers`, `POST /consumers/{name}/enable|disable`, `GET /tap`), bound to `admin.bind`.
//! - [`access`]: who may call it: the admin token (state-changing calls and the tap) and the
//!   `Host`/`Origin` rules that keep web pages out.
//! - [`actors`]: [`ActorControl`], the [`Control`] of the running service over the actors'
//!   messages.
//! - [`client`]: the other side, used by `canal-consumer status|list|enable|disable|tail`: an
//!   `awc` client that sends the token, and the human rendering of the status.
//!
//! The server knows nothing about actors. It asks a [`Control`] (implemented by whoever owns
//! the pipeline, the Manager) for a [`ServiceStatus`] and to enable or disable a consumer, so it
//! can be tested with a fake. How it fails: an address that cannot be bound is an
//! [`AdminError::Bind`] at start; at run time a request that cannot be served is an HTTP error
//! status with a one-line reason, never a crash.

pub mod access;
pub mod actors;
pub mod client;
#[cfg(test)]
mod coverage;
pub mod exposition;
pub mod render;
pub mod server;

use crate::canal::connection::{ConnectionState, ConnectionStatus};
use crate::publisher::PublisherStatus;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use actors::ActorControl;
pub use server::{AdminServer, AdminState, serve};

/// What the admin endpoint needs from the running service.
///
/// Both methods return `'static` futures so implementations can hand them to actors (clone an
/// `Addr` into the future). The admin server persists enable/disable to the state file itself
/// after [`Control::set_enabled`] succeeds; implementations only apply the change live.
pub trait Control: Send + Sync + 'static {
    /// A snapshot of the whole service.
    fn status(&self) -> BoxFuture<'static, ServiceStatus>;
    /// Enable or disable one consumer, live. [`AdminError::UnknownConsumer`] when there is no
    /// consumer by that name.
    fn set_enabled(&self, name: &str, enabled: bool) -> BoxFuture<'static, Result<(), AdminError>>;
    /// Pass what the Canal stream is stalled at (`token` as `status` shows it); answers with
    /// what was skipped.
    fn skip(&self, token: &str) -> BoxFuture<'static, Result<String, AdminError>> {
        let _ = token;
        Box::pin(async { Err(AdminError::Unavailable("skip is not supported here".into())) })
    }
}

/// Everything `GET /status` reports: the one status model, typed from the actors' snapshots
/// to the screen. The admin endpoint serves it as JSON, the command line reads it back into
/// this type ([`client::fetch`]) and renders it ([`render::render_status`]), `/ready` judges
/// it ([`ServiceStatus::readiness`]) and `/metrics` is encoded from it at scrape time
/// ([`exposition`]); `coverage` checks that every figure has a metric and a line of `status`. The JSON field names are an interface (`tests/`, `deploy/`, scripts).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ServiceStatus {
    /// The crate version.
    pub version: String,
    pub uptime_seconds: u64,
    /// The Canal connection.
    pub canal: ConnectionStatus,
    /// The publisher's status; `None` (served as `{"state": "none"}`) when the service runs
    /// without a publisher or it did not answer in time.
    #[serde(with = "broker_json")]
    pub broker: Option<PublisherStatus>,
    /// The publisher has a usable channel to the broker.
    pub broker_connected: bool,
    /// A graceful shutdown is under way.
    pub shutting_down: bool,
    /// Canal batches fetched and not yet acked.
    pub batches_in_flight: usize,
    /// The backfills as the runner last read them (filled in by the admin server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<crate::backfill::BackfillView>,
    /// Readers attached to `GET /tap` (filled in by the admin server).
    pub tap_listeners: usize,
    pub consumers: Vec<ConsumerStatus>,
    /// Columns whose text arrived with U+FFFD (UTF-8 mode: Canal decoded them lossily), with
    /// their row counts, the policy applied and the fix; empty when none did.
    pub lossy_text: Vec<crate::canal::lossy::LossyColumn>,
    /// With `[heartbeat] enabled`: the lag the heartbeats measure (what `status` and
    /// `canal_lag_seconds` show), and their trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<crate::manager::HeartbeatStatus>,
    /// Parts of the service whose actor did not answer within [`actors::ASK_TIMEOUT`]
    /// (`canal`, `manager`, `publisher`): their figures in this snapshot are placeholders, so
    /// `/metrics` leaves their series out (a counter must not drop to 0 and back). Absent
    /// when every part answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unanswered: Vec<Part>,
}

/// A part of the service that answers for its own piece of the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Canal,
    Manager,
    Publisher,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Canal => "canal connection",
            Part::Manager => "manager",
            Part::Publisher => "publisher",
        })
    }
}

/// `broker` in JSON: the publisher's status, or `{"state": "none"}` without one. Anything
/// else is an error naming what does not fit (a missing or renamed field fails loudly instead
/// of showing as `-`).
mod broker_json {
    use crate::publisher::PublisherStatus;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<PublisherStatus>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(p) => serde::Serialize::serialize(p, s),
            None => serde::Serialize::serialize(&serde_json::json!({ "state": "none" }), s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<PublisherStatus>, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if v == serde_json::json!({ "state": "none" }) {
            return Ok(None);
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("broker: {e}")))
    }
}

impl ServiceStatus {
    /// An empty status for this build (version filled in).
    pub fn new() -> Self {
        ServiceStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    /// Ready to do its part: Canal session connected, broker channel up, not shutting down. A
    /// ZooKeeper standby is ready while its ZooKeeper session is connected and the broker
    /// channel is up (it can take over at once); an active replica must be connected to Canal.
    /// The error is the reason, for `/ready`'s 503 body.
    pub fn readiness(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if self.shutting_down {
            reasons.push("shutting down".to_string());
        }
        if !self.canal_ready() {
            let state = self.canal.state;
            match &self.canal.last_error {
                Some(e) => reasons.push(format!("canal is {state}: {e}")),
                None => reasons.push(format!("canal is {state}")),
            }
        }
        if !self.broker_connected {
            reasons.push(match &self.broker {
                Some(p) => p
                    .unavailable()
                    .unwrap_or_else(|| format!("broker channel is not up ({})", p.state)),
                None => "broker channel is not up (none)".to_string(),
            });
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Canal's side of [`ServiceStatus::readiness`]: connected, or a standby whose ZooKeeper
    /// session is up.
    pub fn canal_ready(&self) -> bool {
        let standby_ok = self.canal.state == ConnectionState::Standby
            && self
                .canal
                .ha
                .as_ref()
                .is_some_and(|h| h.zookeeper == crate::ha::ZkSession::Connected);
        self.canal.state == ConnectionState::Connected || standby_ok
    }
}

pub use crate::manager::{ConsumerState, ConsumerStatus};

/// Errors of the admin endpoint.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdminError {
    #[error("no consumer named `{0}`")]
    UnknownConsumer(String),
    /// The service cannot do it now (e.g. shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request does not match the service's state (e.g. skipping what is not stalled).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    #[error("admin endpoint: cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    /// The admin credential or the bind policy stops the start.
    #[error("{0}")]
    Credential(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_is_a_publisher_status_or_none() {
        let mut s = ServiceStatus::new();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["broker"], serde_json::json!({"state": "none"}));
        let back: ServiceStatus = serde_json::from_value(v).unwrap();
        assert!(back.broker.is_none());
        s.broker = Some(PublisherStatus::connecting(
            "amqp://x".into(),
            1,
            "q".into(),
            8,
        ));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["broker"]["state"], "connecting");
        let back: ServiceStatus = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.broker, s.broker);
        // a renamed or missing field is an error, not a blank
        let mut bad = v;
        bad["broker"].as_object_mut().unwrap().remove("queue");
        let e = serde_json::from_value::<ServiceStatus>(bad).unwrap_err();
        assert!(e.to_string().contains("queue"), "{e}");
    }

    #[test]
    fn readiness_needs_canal_and_broker() {
        let mut s = ServiceStatus::new();
        let why = s.readiness().unwrap_err();
        assert!(why.contains("canal is connecting"), "{why}");
        assert!(why.contains("broker"), "{why}");
        s.canal.state = ConnectionState::Connected;
        s.broker_connected = true;
        assert_eq!(s.readiness(), Ok(()));
        // a link that carries nothing is not ready, and says since when
        s.broker = serde_json::from_value(serde_json::json!({
            "state": "connected", "broker": "amqp://x", "queue": "q", "blocked_reason": null,
            "unconfirmed": 3, "max_unconfirmed": 8, "published": 3, "confirmed": 0,
            "returned": 0, "nacked": 0, "timeouts": 0, "lost": 0, "late_confirms": 0,
            "oldest_unconfirmed_ms": 61_000, "stalled_since": "2026-11-29T08:00:00.000Z",
            "connects": 1, "last_error": null, "state_since": "2026-11-29T07:00:00.000Z"
        }))
        .unwrap();
        s.broker_connected = false;
        assert_eq!(
            s.readiness(),
            Err("broker stalled since 2026-11-29T08:00:00.000Z: no confirm for 61 s".into())
        );
        s.broker_connected = true;
        s.canal.state = ConnectionState::Reconnecting;
        s.canal.last_error = Some("connection refused".into());
        assert_eq!(
            s.readiness(),
            Err("canal is reconnecting: connection refused".into())
        );
    }

    #[test]
    fn a_standby_is_ready_while_its_zookeeper_session_is_up() {
        let mut s = ServiceStatus::new();
        s.broker_connected = true;
        s.canal.state = ConnectionState::Standby;
        s.canal.ha = Some(crate::ha::HaStatus {
            role: crate::ha::Role::Standby,
            zookeeper: crate::ha::ZkSession::Connected,
            holder: Some("host-a:17".into()),
            ..Default::default()
        });
        assert_eq!(s.readiness(), Ok(()));
        s.canal.ha.as_mut().unwrap().zookeeper = crate::ha::ZkSession::Disconnected;
        s.canal.last_error = Some("zookeeper session disconnected".into());
        assert_eq!(
            s.readiness(),
            Err("canal is standby: zookeeper session disconnected".into())
        );
        // active but suspended (no session): not ready either
        s.canal.state = ConnectionState::Reconnecting;
        assert!(s.readiness().is_err());
    }
}
