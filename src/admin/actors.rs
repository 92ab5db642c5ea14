//! [`ActorControl`]: the [`Control`] of the running service, over the actors' own messages.
//!
//! It asks the CanalConnection ([`GetConnectionStatus`]), the Manager ([`GetManagerStatus`]) and the
//! publisher ([`GetPublisherStatus`]) for snapshots and assembles a [`ServiceStatus`]; enabling
//! and disabling is the Manager's [`SetEnabled`]. Nothing here holds state of its own besides
//! the start time and the shutdown flag. How it fails: an actor that is gone or does not answer
//! within [`ASK_TIMEOUT`] shows as a placeholder part of the status, named in
//! [`ServiceStatus::unanswered`] (never an error of `/status`), and a `SetEnabled` that cannot be delivered is [`AdminError::Unavailable`].

use super::{AdminError, Control, Part, ServiceStatus};
use crate::canal::connection::{
    ConnectionState, ConnectionStatus, GetConnectionStatus, SkipStalled,
};
use crate::manager::{GetManagerStatus, ManagerStatus, SetEnabled, SetEnabledError};
use crate::publisher::{GetPublisherStatus, PublisherStatus};
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
            let mut unanswered = Vec::new();
            let canal = canal.unwrap_or_else(|e| {
                unanswered.push(Part::Canal);
                ConnectionStatus {
                    state: ConnectionState::Stopped,
                    last_error: Some(format!("connection actor did not answer: {e}")),
                    ..Default::default()
                }
            });
            let mgr = mgr.unwrap_or_else(|_| {
                unanswered.push(Part::Manager);
                ManagerStatus::default()
            });
            let publisher = match publisher {
                Some(p) => {
                    let answer = p.send(GetPublisherStatus).timeout(ASK_TIMEOUT).await.ok();
                    if answer.is_none() {
                        unanswered.push(Part::Publisher);
                    }
                    answer
                }
                None => None,
            };
            let mut s = assemble(canal, mgr, publisher, uptime, shutting_down);
            s.unanswered = unanswered;
            s
        })
    }

    fn skip(&self, token: &str) -> BoxFuture<'static, Result<String, AdminError>> {
        let req = self.skip.send(SkipStalled(token.to_string()));
        Box::pin(async move {
            match req.timeout(ASK_TIMEOUT).await {
                Ok(Ok(done)) => Ok(done.to_string()),
                Ok(Err(why)) => Err(AdminError::Conflict(why.to_string())),
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

/// The service status from the actors' snapshots (each part as its owner reported it).
pub fn assemble(
    canal: ConnectionStatus,
    manager: ManagerStatus,
    publisher: Option<PublisherStatus>,
    uptime: Duration,
    shutting_down: bool,
) -> ServiceStatus {
    ServiceStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: uptime.as_secs(),
        canal,
        // connected *and* carrying messages: a stalled link is not ready
        broker_connected: publisher.as_ref().is_some_and(PublisherStatus::carries),
        broker: publisher,
        shutting_down,
        batches_in_flight: manager.batches_in_flight,
        backfills: Vec::new(),
        tap_listeners: 0,
        consumers: manager.consumers,
        lossy_text: manager.lossy_text,
        heartbeat: manager.heartbeat,
        unanswered: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{ConsumerState, ConsumerStatus};

    #[test]
    fn assembles_from_snapshots() {
        let canal = ConnectionStatus {
            state: ConnectionState::Connected,
            ..Default::default()
        };
        let manager = ManagerStatus {
            batches_in_flight: 2,
            consumers: vec![ConsumerStatus {
                name: "example_consumer".into(),
                enabled: true,
                state: ConsumerState::Restarting,
                events: 5,
                restarts: 1,
                lag_seconds: Some(2.5),
                ..Default::default()
            }],
            filter: String::new(),
            lossy_text: Vec::new(),
            heartbeat: None,
            live_at: None,
        };
        let s = assemble(canal, manager, None, Duration::from_secs(9), false);
        assert_eq!(s.uptime_seconds, 9);
        assert_eq!(s.batches_in_flight, 2);
        assert!(!s.broker_connected);
        assert!(s.broker.is_none());
        let c = &s.consumers[0];
        assert_eq!(c.state, ConsumerState::Restarting);
        assert_eq!(c.restarts, 1);
        assert_eq!(c.lag_seconds, Some(2.5));
        assert!(s.readiness().unwrap_err().contains("broker"));
    }
}
