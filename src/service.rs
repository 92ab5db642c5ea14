//! The running service (`canal-consumer start`): assembles the pipeline and runs it until a
//! signal.
//!
//! Start order: consumer definitions (a bad one stops start-up), the AMQP publisher (a queue
//! that does not match the workers' declaration stops start-up), one supervised actor per
//! consumer, the Manager, the Canal connection (subscribed to exactly what enabled consumers
//! want), the admin endpoint, and a once-a-second sync of actor counters into `/metrics`.
//!
//! Shutdown on SIGTERM/SIGINT: stop fetching, let every batch in flight finish (its triggers
//! confirmed, then acked in order), close the publisher, exit 0. If that takes longer than
//! `shutdown.deadline`, or a second signal arrives, exit at once with code 1: whatever was not
//! confirmed was not acked, and Canal redelivers it to the next run.

use crate::admin::{self, AdminError, ConsumerState, ConsumerStatus, Control, ServiceStatus};
use crate::canal::connection::{self as conn, CanalConnection};
use crate::config::Config;
use crate::consumer::actor::{ConsumerActor, SupervisionConfig};
use crate::manager::{
    AttachConnection, ConsumerEntry, GetManagerStatus, Manager, ManagerConfig, SetEnabled,
};
use crate::metrics::{Metrics, MetricsHandle};
use crate::publisher::amqp::{self as amqp, AmqpPublisher, GetPublisherStatus, PublisherState};
use crate::rules::{self, ConfigConsumer};
use crate::state::StateFile;
use crate::trigger::{MessageFormat, Route};
use actix::prelude::*;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    #[error("broker: {0}")]
    Publisher(#[from] crate::publisher::PublishError),
    #[error("admin endpoint: {0}")]
    Admin(#[from] AdminError),
}

/// The default route of every trigger: the configured queue on the default exchange.
pub fn default_route(cfg: &Config) -> Route {
    Route {
        exchange: String::new(),
        routing_key: cfg.amqp.queue.name.clone(),
    }
}

/// Handles the admin endpoint uses.
#[derive(Clone)]
struct ServiceControl {
    manager: Addr<Manager>,
    connection: Addr<CanalConnection>,
    publisher: Addr<AmqpPublisher>,
    started: Instant,
    shutting_down: Arc<AtomicBool>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ServiceControl {
    async fn snapshot(&self) -> ServiceStatus {
        let canal = self
            .connection
            .send(conn::GetStatus)
            .await
            .unwrap_or_default();
        let manager = self
            .manager
            .send(GetManagerStatus)
            .await
            .unwrap_or_default();
        let broker = self.publisher.send(GetPublisherStatus).await.ok();
        let now = now_ms();
        let mut status = ServiceStatus::new();
        status.uptime_seconds = self.started.elapsed().as_secs();
        status.broker_connected = broker
            .as_ref()
            .is_some_and(|b| b.state == PublisherState::Connected);
        status.broker = broker
            .map(|b| serde_json::to_value(b).unwrap_or_default())
            .unwrap_or_else(|| serde_json::json!({"state": "stopped"}));
        status.batches_in_flight = canal.inflight_batches;
        status.canal = canal;
        status.shutting_down = self.shutting_down.load(Ordering::SeqCst);
        status.consumers = manager
            .consumers
            .into_iter()
            .map(|c| ConsumerStatus {
                state: match c.state {
                    "disabled" => ConsumerState::Disabled,
                    "quarantined" => ConsumerState::Quarantined,
                    "retrying" => ConsumerState::Restarting,
                    _ => ConsumerState::Running,
                },
                lag_seconds: c
                    .confirmed_executed_at
                    .map(|at| ((now - at).max(0) as f64) / 1000.0),
                name: c.name,
                enabled: c.enabled,
                events: c.events,
                triggers: c.triggers,
                errors: c.errors,
                restarts: u64::from(c.restarts),
                last_error: c.last_error,
            })
            .collect();
        status
    }
}

impl Control for ServiceControl {
    fn status(&self) -> BoxFuture<'static, ServiceStatus> {
        let me = self.clone();
        Box::pin(async move { me.snapshot().await })
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> BoxFuture<'static, Result<(), AdminError>> {
        let manager = self.manager.clone();
        let name = name.to_string();
        Box::pin(async move {
            match manager
                .send(SetEnabled {
                    name: name.clone(),
                    enabled,
                })
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(AdminError::UnknownConsumer(name)),
                Err(e) => Err(AdminError::Unavailable(e.to_string())),
            }
        })
    }
}

/// Copy the actors' counters into the metrics registry.
fn sync_metrics(metrics: &Metrics, s: &ServiceStatus) {
    let c = &s.canal;
    metrics.canal_batches_total.set_total(c.batches_received);
    metrics.canal_events_total.set_total(c.events_received);
    metrics.canal_rollbacks_total.set_total(c.rollbacks);
    metrics.canal_reconnects_total.set_total(c.reconnects);
    metrics
        .canal_inflight_batches
        .set(c.inflight_batches as i64);
    let lag = match (c.inflight_batches, c.last_executed_at) {
        (n, Some(at)) if n > 0 => ((now_ms() - at).max(0) as f64) / 1000.0,
        _ => 0.0,
    };
    metrics.canal_lag_seconds.set(lag);
    if let Ok(b) = serde_json::from_value::<amqp::PublisherStatus>(s.broker.clone()) {
        metrics.publisher_published_total.set_total(b.published);
        metrics.publisher_confirmed_total.set_total(b.confirmed);
        metrics.publisher_returned_total.set_total(b.returned);
        metrics.publisher_nacked_total.set_total(b.nacked);
        metrics.publisher_timeouts_total.set_total(b.timeouts);
        metrics.publisher_unconfirmed.set(b.unconfirmed as i64);
        metrics
            .publisher_blocked
            .set_bool(b.state == PublisherState::Blocked);
    }
    for cs in &s.consumers {
        let m = metrics.consumer(&cs.name);
        m.events_total.set_total(cs.events);
        m.triggers_total.set_total(cs.triggers);
        m.errors_total.set_total(cs.errors);
        m.restarts_total.set_total(cs.restarts);
        m.enabled.set_bool(cs.enabled);
        m.lag_seconds.set(if c.inflight_batches > 0 {
            cs.lag_seconds.unwrap_or(0.0)
        } else {
            0.0
        });
    }
}

/// Load the consumer definitions and apply the persisted enable/disable state.
pub fn load_consumers(cfg: &Config) -> Result<Vec<rules::ConsumerSpec>, StartError> {
    let mut specs = rules::load_dir(&cfg.consumers.dir)?;
    let states = StateFile::new(&cfg.consumers.state_file).load()?;
    for (name, enabled) in states.iter() {
        match specs.iter_mut().find(|s| &s.name == name) {
            Some(spec) => spec.enabled = *enabled,
            None => tracing::warn!(
                consumer = %name,
                file = %cfg.consumers.state_file.display(),
                "state file names a consumer that is not defined; ignoring it"
            ),
        }
    }
    Ok(specs)
}

/// Run the service until it is stopped. Returns the process exit code.
pub fn run(cfg: Config) -> i32 {
    let specs = match load_consumers(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let sys = System::new();
    let started = sys.block_on(start(cfg, specs));
    match started {
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
        Ok(()) => match sys.run_with_code() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    }
}

async fn start(cfg: Config, specs: Vec<rules::ConsumerSpec>) -> Result<(), StartError> {
    let metrics = Metrics::new();
    tracing::info!(
        consumers = specs.len(),
        enabled = specs.iter().filter(|s| s.enabled).count(),
        "starting canal-consumer"
    );
    let publisher = AmqpPublisher::start_checked(cfg.amqp.clone()).await?;

    let supervision = SupervisionConfig::from(&cfg.consumers);
    let route = default_route(&cfg);
    let entries: Vec<ConsumerEntry> = specs
        .into_iter()
        .map(|spec| {
            let name = spec.name.clone();
            let filters = spec.filters.clone();
            let enabled = spec.enabled;
            let addr = ConsumerActor::new(
                Box::new(ConfigConsumer::new(spec)),
                publisher.clone().recipient(),
                route.clone(),
                MessageFormat::Envelope,
                supervision.clone(),
            )
            .start_supervised();
            tracing::info!(consumer = %name, enabled, "consumer started");
            ConsumerEntry {
                name,
                filters,
                enabled,
                addr,
            }
        })
        .collect();
    let manager = Manager::new(
        ManagerConfig {
            extra_filter: cfg.canal.filter.clone(),
        },
        entries,
    );
    let filter = manager.filter();
    let manager = manager.start();
    tracing::info!(filter = %filter, "canal subscription filter");
    let connection = CanalConnection::new(
        cfg.canal.connection(filter, true),
        manager.clone().recipient(),
    )
    .start();
    manager.do_send(AttachConnection((&connection).into()));

    let shutting_down = Arc::new(AtomicBool::new(false));
    let control = ServiceControl {
        manager: manager.clone(),
        connection: connection.clone(),
        publisher: publisher.clone(),
        started: Instant::now(),
        shutting_down: shutting_down.clone(),
    };
    let admin_handle = if cfg.admin.enabled {
        let server = admin::serve(
            &cfg.admin.bind,
            admin::server::AdminState {
                control: Arc::new(control.clone()),
                metrics: metrics.clone(),
                state_file: Some(StateFile::new(&cfg.consumers.state_file)),
            },
        )?;
        let handle = server.handle.clone();
        actix::spawn(async move {
            if let Err(e) = server.server.await {
                tracing::error!(error = %e, "admin endpoint stopped");
            }
        });
        Some(handle)
    } else {
        None
    };

    actix::spawn(metrics_loop(control.clone(), metrics.clone()));
    actix::spawn(shutdown_on_signal(
        control,
        admin_handle,
        cfg.shutdown.deadline,
        shutting_down,
    ));
    Ok(())
}

async fn metrics_loop(control: ServiceControl, metrics: MetricsHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let status = control.snapshot().await;
        sync_metrics(&metrics, &status);
    }
}

async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn shutdown_on_signal(
    control: ServiceControl,
    admin: Option<actix_web::dev::ServerHandle>,
    deadline: Duration,
    shutting_down: Arc<AtomicBool>,
) {
    let first = signal().await;
    shutting_down.store(true, Ordering::SeqCst);
    tracing::info!(signal = first, deadline = ?deadline, "shutdown requested: finishing batches in flight");
    let started = Instant::now();
    let graceful = async {
        // stop fetching and wait until every fetched batch is confirmed and acked
        let _ = control.connection.send(conn::Drain).await;
        let left = deadline.saturating_sub(started.elapsed());
        let _ = control
            .publisher
            .send(amqp::Shutdown { deadline: left })
            .await;
        let _ = control
            .connection
            .send(conn::Shutdown { rollback: false })
            .await;
    };
    let code = tokio::select! {
        _ = graceful => {
            tracing::info!(took = ?started.elapsed(), "shutdown complete: every fetched batch was confirmed and acked");
            0
        }
        _ = tokio::time::sleep(deadline) => {
            let st = control.connection.send(conn::GetStatus).await.unwrap_or_default();
            tracing::warn!(
                unacked_batches = st.inflight_batches,
                "shutdown deadline reached; exiting without acking unconfirmed batches (canal redelivers them)"
            );
            1
        }
        second = signal() => {
            tracing::warn!(signal = second, "second signal: exiting now; unacked batches are redelivered later");
            1
        }
    };
    if let Some(h) = admin {
        h.stop(false).await;
    }
    System::current().stop_with_code(code);
}
