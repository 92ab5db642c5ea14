//! The running service (`canal-consumer start`): assembles the pipeline and runs it until a
//! signal.
//!
//! Start order: consumer definitions (a bad one stops start-up), the AMQP publisher (a queue
//! that does not match the workers' declaration stops start-up), one supervised actor per
//! consumer, the Manager, the Canal connection (subscribed to exactly what enabled consumers
//! want), and the admin endpoint (whose `/metrics` reads the actors' counters on each scrape).
//!
//! Shutdown on SIGTERM/SIGINT: stop fetching, let every batch in flight finish (its triggers
//! confirmed, then acked in order), close the publisher, exit 0. If that takes longer than
//! `shutdown.deadline`, or a second signal arrives, exit at once with code 1: whatever was not
//! confirmed was not acked, and Canal redelivers it to the next run.

use crate::admin::{self, AdminError, actors::ActorControl};
use crate::canal::connection::{self as conn, CanalConnection};
use crate::config::Config;
use crate::consumer::actor::ConsumerActor;
use crate::manager::{AttachConnection, ConsumerEntry, Manager, ManagerConfig, SupervisionConfig};
use crate::metrics::Metrics;
use crate::publisher::amqp::{self as amqp, AmqpPublisher};
use crate::publisher::topology::{self, RouteUse};
use crate::rules::{self, ConfigConsumer};
use crate::state::StateFile;
use crate::trigger::{MessageFormat, Route};
use actix::prelude::*;
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
    #[error("backfill: {0}")]
    Backfill(String),
}

/// The default route of every trigger: the configured queue on the default exchange.
pub fn default_route(cfg: &Config) -> Route {
    Route {
        exchange: String::new(),
        routing_key: cfg.amqp.queue.name.clone(),
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

/// Requests to stop, each named (a signal's name): the first starts a graceful shutdown, a
/// second one during it exits at once.
pub type StopRequests = futures::stream::BoxStream<'static, &'static str>;

/// SIGTERM and SIGINT, as [`StopRequests`].
pub fn os_signals() -> StopRequests {
    Box::pin(futures::stream::unfold((), |()| async {
        Some((signal().await, ()))
    }))
}

/// Run the service until SIGTERM or SIGINT stops it. Returns the process exit code.
pub fn run(cfg: Config) -> i32 {
    run_until(cfg, os_signals)
}

/// Run the service until `stop` (made on the service's runtime) asks it to stop. Returns the
/// process exit code: what a test drives in place of signals.
pub fn run_until(cfg: Config, stop: impl FnOnce() -> StopRequests) -> i32 {
    let specs = match load_consumers(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    // one instance per Canal client identity on this host, held until the process exits
    let state_dir = state_dir(&cfg);
    // (in ZooKeeper mode keyed on the ensemble: two replicas on one host need their own state
    // files; which of them works is ZooKeeper's decision, see crate::ha)
    let _lock = match crate::instance::InstanceLock::acquire(
        &state_dir,
        &cfg.canal.lock_server(),
        &cfg.canal.destination,
        &cfg.canal.client_id,
    ) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let sys = System::new();
    let started = sys.block_on(start(cfg, specs, stop));
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

/// Every route a consumer definition publishes to, except the worker queue and its dead-letter
/// queue (the publisher declares those).
pub fn route_uses(cfg: &Config, specs: &[rules::ConsumerSpec]) -> Vec<RouteUse> {
    let main = default_route(cfg);
    let dlq = crate::consumer::dead_letter_route(&main);
    let mut uses = Vec::new();
    for spec in specs {
        let default = spec.route.clone().unwrap_or_else(|| main.clone());
        let file = spec.source.display();
        for rule in &spec.rules {
            let route = rule.route.clone().unwrap_or_else(|| default.clone());
            uses.push((
                format!("consumer {}, rule {} ({file})", spec.name, rule.name),
                route,
            ));
            if rule.on_error == rules::OnError::DeadLetter {
                uses.push((
                    format!(
                        "consumer {}, rule {} dead letters ({file})",
                        spec.name, rule.name
                    ),
                    spec.dead_letter_route.clone(),
                ));
            }
        }
    }
    uses.into_iter()
        .filter(|(_, r)| *r != main && *r != dlq)
        .map(|(who, r)| RouteUse {
            who,
            exchange: r.exchange,
            routing_key: r.routing_key,
        })
        .collect()
}

/// Refuse to start when a rule routes to an exchange or queue the broker does not have. An
/// unreachable broker only skips the check (the publisher retries; unroutable messages are
/// parked at run time).
async fn check_routes(cfg: &Config, specs: &[rules::ConsumerSpec]) -> Result<(), StartError> {
    let uses = route_uses(cfg, specs);
    if uses.is_empty() {
        return Ok(());
    }
    let connect =
        crate::publisher::connect::connect_any(&cfg.amqp, lapin::ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => {
            let res = topology::check_routes(&conn, &uses).await;
            let _ = conn.close(200, "routes checked".into()).await;
            res.map_err(StartError::Publisher)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot check the rules' routes now (broker unreachable); unroutable triggers will be parked");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                "cannot check the rules' routes now (broker does not answer); unroutable triggers will be parked"
            );
            Ok(())
        }
    }
}

async fn start(
    cfg: Config,
    specs: Vec<rules::ConsumerSpec>,
    stop: impl FnOnce() -> StopRequests,
) -> Result<(), StartError> {
    let metrics = Metrics::new();
    check_routes(&cfg, &specs).await?;
    tracing::info!(
        consumers = specs.len(),
        enabled = specs.iter().filter(|s| s.enabled).count(),
        "starting canal-consumer"
    );
    let publisher = AmqpPublisher::start_checked(cfg.amqp.clone()).await?;

    // who a backfill can be for: the consumers whose filters and rules take SNAPSHOT events
    let backfill_consumers: Vec<crate::backfill::Taker> = specs
        .iter()
        .map(|s| crate::backfill::Taker {
            name: s.name.clone(),
            filters: s.filters.clone(),
            rules: s
                .rules
                .iter()
                .map(|r| crate::backfill::TakerRule {
                    database: r.when.database.clone(),
                    table: r.when.table.clone(),
                    events: r.when.events.clone(),
                    batch: r.batch.map(|b| b.max_rows),
                })
                .collect(),
        })
        .collect();
    let supervision = SupervisionConfig::from(&cfg.consumers);
    let route = default_route(&cfg);
    let entries: Vec<ConsumerEntry> = specs
        .into_iter()
        .map(|spec| {
            let name = spec.name.clone();
            let filters = spec.filters.clone();
            let enabled = spec.enabled;
            let poison = spec.poison;
            let addr = ConsumerActor::new(
                Box::new(move || Box::new(ConfigConsumer::new(spec.clone()))),
                publisher.clone().recipient(),
                route.clone(),
                MessageFormat::Envelope,
            )
            .start_supervised();
            tracing::info!(consumer = %name, enabled, "consumer started");
            ConsumerEntry {
                name,
                filters,
                enabled,
                poison,
                supervision: supervision.clone(),
                addr,
            }
        })
        .collect();
    // backfills need the source database; without canal.source_url there are none
    let watermark = (!cfg.canal.source_url.is_empty())
        .then(|| cfg.backfill.watermark().ok())
        .flatten();
    let manager = Manager::new(
        ManagerConfig {
            extra_filter: cfg.canal.filter.clone(),
            lossy_text: cfg.canal.lossy_text_check(),
            watermark: watermark
                .clone()
                .map(|(database, table)| crate::manager::WatermarkTable { database, table }),
            heartbeat: cfg.heartbeat.enabled && watermark.is_some(),
            commit_to_confirm: Some(metrics.canal_commit_to_confirm_seconds.clone()),
            lane: crate::manager::LaneConfig {
                rows: cfg.backfill.lane_rows.get(),
                parts: cfg.backfill.lane_parts,
            },
        },
        entries,
    )
    .with_publisher(publisher.clone().recipient());
    let filter = manager.filter();
    let manager = manager.start();
    tracing::info!(filter = %filter, "canal subscription filter");
    let mut conn_cfg = cfg.canal.connection(filter, true);
    if cfg.canal.rewind_guard {
        conn_cfg.confirmed_file = Some(crate::instance::confirmed_path(
            &state_dir(&cfg),
            &cfg.canal.lock_server(),
            &cfg.canal.destination,
            &cfg.canal.client_id,
        ));
    }
    let ha = cfg.canal.ha();
    let lease_tx = ha.as_ref().map(|_| {
        let (tx, rx) = crate::ha::zk::channel();
        conn_cfg.lease = Some(rx);
        tx
    });
    let connection = CanalConnection::new(conn_cfg, manager.clone().recipient()).start();
    let mut ha_release = None;
    if let (Some(ha), Some(tx)) = (ha, lease_tx) {
        tracing::info!(
            zookeeper = %ha.servers,
            node = %ha.client_running_path(),
            address = %ha.address,
            "zookeeper mode: active only while holding the client running node"
        );
        let (release, release_rx) = tokio::sync::oneshot::channel();
        ha_release = Some(release);
        actix::spawn(crate::ha::zk::run(ha, tx, release_rx));
    }
    manager.do_send(AttachConnection((&connection).into()));
    if let (true, Some(wm)) = (cfg.heartbeat.enabled, watermark.clone()) {
        let source = crate::backfill::source::Source::new(
            cfg.canal.source_url.expose(),
            cfg.canal.source_url.redacted(),
            wm,
        )
        .map_err(StartError::Backfill)?;
        let id = crate::backfill::heartbeat::row_id(&cfg.canal.destination, &cfg.canal.client_id);
        tracing::info!(row = %id, interval = ?cfg.heartbeat.interval, "heartbeats on: lag is measured by their trips");
        actix::spawn(crate::backfill::heartbeat::run(
            source,
            id,
            cfg.heartbeat.interval,
            manager.clone().recipient(),
            connection.clone().recipient(),
            crate::clock::now_ms,
        ));
    }
    let backfills = match watermark {
        Some(wm) => {
            let source = crate::backfill::source::Source::new(
                cfg.canal.source_url.expose(),
                cfg.canal.source_url.redacted(),
                wm,
            )
            .map_err(StartError::Backfill)?;
            let b = Arc::new(crate::backfill::Backfills::new(
                source,
                crate::backfill::Settings {
                    pace: crate::manager::snapshot::chunks::Pace {
                        chunk: cfg.backfill.chunk.get(),
                        outstanding: cfg.backfill.chunks_in_flight,
                        bulk_chunk: cfg.backfill.bulk_chunk.get(),
                        bulk_outstanding: cfg.backfill.bulk_chunks_in_flight,
                    },
                    chunk_timeout: cfg.backfill.chunk_timeout,
                    max_live_batches: cfg.backfill.max_live_batches,
                    live_window: cfg.backfill.live_window,
                    lane_rows: cfg.backfill.lane_rows.get(),
                    // rate_while_live = 0: backfills do not yield
                    live: if cfg.backfill.rate_while_live > 0.0 {
                        crate::manager::snapshot::chunks::Yield {
                            rate: Some(cfg.backfill.rate_while_live),
                            chunk: Some(cfg.backfill.chunk_while_live.get()),
                        }
                    } else {
                        Default::default()
                    },
                    owner: format!("{}/{}", cfg.canal.destination, cfg.canal.client_id),
                },
                backfill_consumers,
                manager.clone(),
                connection.clone().recipient(),
            ));
            actix::spawn(b.clone().run());
            Some(b)
        }
        None => None,
    };

    let shutting_down = Arc::new(AtomicBool::new(false));
    let control = ActorControl {
        connection: connection.clone().recipient(),
        manager: manager.clone().recipient(),
        set_enabled: manager.clone().recipient(),
        skip: connection.clone().recipient(),
        publisher: Some(publisher.clone().recipient()),
        started: Instant::now(),
        shutting_down: shutting_down.clone(),
    };
    let admin_handle = if cfg.admin.enabled {
        // issue 9: token, Host/Origin rules and the tap come with the admin state
        let state =
            admin::server::AdminState::for_service(&cfg, Arc::new(control), metrics.clone())?
                .with_backfills(backfills);
        let server = admin::serve(&cfg.admin.bind, state)?;
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

    actix::spawn(shutdown_on_signal(
        Pipeline {
            connection,
            publisher,
            ha_release,
        },
        admin_handle,
        cfg.shutdown.deadline,
        shutting_down,
        stop(),
    ));
    Ok(())
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

/// What the shutdown path stops.
struct Pipeline {
    connection: Addr<CanalConnection>,
    publisher: Addr<AmqpPublisher>,
    /// ZooKeeper mode: give up the client running node once the connection stopped.
    ha_release: Option<crate::ha::zk::Release>,
}

async fn shutdown_on_signal(
    control: Pipeline,
    admin: Option<actix_web::dev::ServerHandle>,
    deadline: Duration,
    shutting_down: Arc<AtomicBool>,
    mut stop: StopRequests,
) {
    use futures::StreamExt;
    let Some(first) = stop.next().await else {
        return; // nobody can ask any more: run until the process ends
    };
    shutting_down.store(true, Ordering::SeqCst);

    tracing::info!(signal = first, deadline = ?deadline, "shutdown requested: finishing batches in flight");
    let started = Instant::now();
    let graceful = async {
        // stop fetching and wait until every fetched batch is confirmed and acked
        let _ = control.connection.send(conn::Drain).await;
        let left = deadline.saturating_sub(started.elapsed());
        let _ = control
            .publisher
            .send(amqp::StopPublishing { deadline: left })
            .await;
        control
            .connection
            .send(conn::Shutdown { rollback: false })
            .await
            .unwrap_or_default()
    };
    let code = tokio::select! {
        report = graceful => {
            if let Some(release) = control.ha_release {
                // the connection is stopped: hand the destination to a standby now
                let (done, released) = tokio::sync::oneshot::channel();
                if release.send(done).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), released).await;
                }
            }
            if report.all_acked() {
                tracing::info!(
                    took = ?started.elapsed(),
                    acked_batches = report.acked,
                    "shutdown complete: every fetched batch was confirmed and acked"
                );
            } else {
                tracing::warn!(
                    took = ?started.elapsed(),
                    acked_batches = report.acked,
                    unacked_batches = report.unacked,
                    abandoned_batches = report.abandoned_total,
                    fetched = %report.fetched_position.as_ref().map(|p| p.to_string()).unwrap_or_default(),
                    acked = %report.acked_position.as_ref().map(|p| p.to_string()).unwrap_or_default(),
                    "shutdown complete, but some fetched batches were not acked (a failure or rollback abandoned them); canal redelivers them to the next run"
                );
            }
            0
        }
        _ = tokio::time::sleep(deadline) => {
            let st = control.connection.send(conn::GetConnectionStatus).await.unwrap_or_default();
            tracing::warn!(
                unacked_batches = st.inflight_batches,
                "shutdown deadline reached; exiting without acking unconfirmed batches (canal redelivers them)"
            );
            1
        }
        Some(second) = stop.next() => {
            tracing::warn!(signal = second, "second signal: exiting now; unacked batches are redelivered later");
            1
        }
    };
    if let Some(h) = admin {
        h.stop(false).await;
    }
    System::current().stop_with_code(code);
}

/// The directory of `consumers.state_file`: the instance lock and the rewind guard's file live
/// beside it.
fn state_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.consumers
        .state_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf()
}
