//! [`ActorControl`]: the [`Control`] of the running service, over the actors' own messages.
//!
//! It asks the CanalConnection ([`GetConnectionStatus`]), the Manager ([`GetManagerStatus`]) and the
//! publisher ([`GetPublisherStatus`]) for snapshots and assembles a [`ServiceStatus`]; enabling
//! and disabling is the Manager's [`SetEnabled`]. Nothing here holds state of its own besides
//! the start time and the shutdown flag. How it fails: an actor that is gone or does not answer
//! within [`ASK_TIMEOUT`] shows as an unknown/stopped part of the status (never an error of
//! `/status`), and a `SetEnabled` that cannot be delivered is [`AdminError::Unavailable`].

use super::now_ms;
use super::{AdminError, ConsumerStatus, Control, ServiceStatus};
use crate::canal::connection::{
    ConnectionState, ConnectionStatus, GetConnectionStatus, SkipStalled,
};
use crate::manager::{ConsumerStats, GetManagerStatus, ManagerStatus, SetEnabled, SetEnabledError};
use crate::publisher::{GetPublisherStatus, PublisherState, PublisherStatus};
use actix::Recipient;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a status request waits for each actor.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long `enable`/`disable` may take: Canal must accept the new subscription first.
pub const SET_ENABLED_TIMEOUT: Duration =
    Duration::from_secs(crate::manager::FILTER_APPLY_TIMEOUT.as_secs() + 2);

/// The live service's [`Control`]. Clone the `Arc` of `shutting_down` into the shutdown path
/// and set it when a graceful shutdown starts (`/ready` then answers 503).
pub struct ActorControl {
    pub connection: Recipient<GetConnectionStatus>,
    pub manager: Recipient<GetManagerStatus>,
    pub set_enabled: Recipient<SetEnabled>,
    pub skip: Recipient<SkipStalled>,
    /// `None` when the service runs without a broker (not in production).
    pub publisher: Option<Recipient<GetPublisherStatus>>,
    pub started: Instant,
    pub shutting_down: Arc<AtomicBool>,
}

impl Control for ActorControl {
    fn status(&self) -> BoxFuture<'static, ServiceStatus> {
        let connection = self.connection.clone();
        let manager = self.manager.clone();
        let publisher = self.publisher.clone();
        let uptime = self.started.elapsed();
        let shutting_down = self.shutting_down.load(Ordering::Relaxed);
        Box::pin(async move {
            let canal = connection.send(GetConnectionStatus).timeout(ASK_TIMEOUT);
            let mgr = manager.send(GetManagerStatus).timeout(ASK_TIMEOUT);
            let (canal, mgr) = futures::join!(canal, mgr);
            let canal = canal.unwrap_or_else(|e| ConnectionStatus {
                state: ConnectionState::Stopped,
                last_error: Some(format!("connection actor did not answer: {e}")),
                ..Default::default()
            });
            let mgr = mgr.unwrap_or_default();
            let publisher = match publisher {
                Some(p) => p.send(GetPublisherStatus).timeout(ASK_TIMEOUT).await.ok(),
                None => None,
            };
            assemble(canal, mgr, publisher, uptime, shutting_down, now_ms())
        })
    }

    fn skip(&self, token: &str) -> BoxFuture<'static, Result<String, AdminError>> {
        let req = self.skip.send(SkipStalled(token.to_string()));
        Box::pin(async move {
            match req.timeout(ASK_TIMEOUT).await {
                Ok(Ok(done)) => Ok(done),
                Ok(Err(why)) => Err(AdminError::Conflict(why)),
                Err(e) => Err(AdminError::Unavailable(format!("canal connection: {e}"))),
            }
        })
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> BoxFuture<'static, Result<(), AdminError>> {
        let req = self.set_enabled.send(SetEnabled {
            name: name.to_string(),
            enabled,
        });
        let name = name.to_string();
        Box::pin(async move {
            match req.timeout(SET_ENABLED_TIMEOUT).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(SetEnabledError::UnknownConsumer(_))) => {
                    Err(AdminError::UnknownConsumer(name))
                }
                Ok(Err(e @ SetEnabledError::NotInForce { .. })) => {
                    Err(AdminError::Unavailable(e.to_string()))
                }
                Err(e) => Err(AdminError::Unavailable(format!("manager: {e}"))),
            }
        })
    }
}

/// One consumer's line of the status; `now_ms` for its lag.
pub fn consumer_status(s: &ConsumerStats, now_ms: i64) -> ConsumerStatus {
    ConsumerStatus {
        name: s.name.clone(),
        enabled: s.enabled,
        state: s.state,
        events: s.events,
        triggers: s.triggers,
        errors: s.errors,
        restarts: u64::from(s.restarts),
        parked: s.parked,
        lag_seconds: s
            .confirmed_executed_at
            .map(|t| (now_ms - t).max(0) as f64 / 1000.0),
        last_error: s.last_error.clone(),
    }
}

/// The service status from the actors' snapshots.
pub fn assemble(
    canal: ConnectionStatus,
    manager: ManagerStatus,
    publisher: Option<PublisherStatus>,
    uptime: Duration,
    shutting_down: bool,
    now_ms: i64,
) -> ServiceStatus {
    // connected *and* carrying messages: a stalled link is not ready
    let broker_connected = publisher
        .as_ref()
        .is_some_and(|p| p.state == PublisherState::Connected && p.stalled_since.is_none());
    let broker = match &publisher {
        Some(p) => serde_json::to_value(p).unwrap_or_default(),
        None => serde_json::json!({ "state": "none" }),
    };
    ServiceStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: uptime.as_secs(),
        canal,
        broker,
        broker_connected,
        shutting_down,
        batches_in_flight: manager.batches_in_flight,
        backfills: Vec::new(),
        tap_listeners: 0,
        consumers: manager
            .consumers
            .iter()
            .map(|c| {
                let mut st = consumer_status(c, now_ms);
                // nothing queued or unconfirmed anywhere: the consumer is caught up
                if manager.batches_in_flight == 0 && c.queued_parts == 0 {
                    st.lag_seconds = st.lag_seconds.map(|_| 0.0);
                }
                st
            })
            .collect(),
        lossy_text: manager.lossy_text,
        heartbeat: manager.heartbeat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ConsumerState;

    #[test]
    fn assembles_from_snapshots() {
        let canal = ConnectionStatus {
            state: ConnectionState::Connected,
            ..Default::default()
        };
        let manager = ManagerStatus {
            batches_in_flight: 2,
            consumers: vec![ConsumerStats {
                name: "example_consumer".into(),
                enabled: true,
                state: ConsumerState::Restarting,
                events: 5,
                restarts: 1,
                confirmed_executed_at: Some(1_000),
                ..Default::default()
            }],
            filter: String::new(),
            lossy_text: Vec::new(),
            heartbeat: None,
        };
        let s = assemble(canal, manager, None, Duration::from_secs(9), false, 3_500);
        assert_eq!(s.uptime_seconds, 9);
        assert_eq!(s.batches_in_flight, 2);
        assert!(!s.broker_connected);
        assert_eq!(s.broker["state"], "none");
        let c = &s.consumers[0];
        assert_eq!(c.state, ConsumerState::Restarting);
        assert_eq!(c.restarts, 1);
        assert_eq!(c.lag_seconds, Some(2.5));
        assert!(s.readiness().unwrap_err().contains("broker"));
    }
}
