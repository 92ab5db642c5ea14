//! The admin HTTP server (actix-web), one worker, bound to `admin.bind`.
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /health` | 200 `ok` while the process serves requests (liveness) |
//! | `GET /ready` | 200 `ready` when Canal is connected and the broker channel is up, else 503 with the reason (readiness) |
//! | `GET /status` | 200, [`ServiceStatus`] as JSON |
//! | `GET /consumers` | 200, the consumers of the status as a JSON array |
//! | `GET /metrics` | 200, Prometheus text format 0.0.4 (refreshed from a status snapshot first) |
//! | `POST /consumers/{name}/enable`, `/disable` | 200 `{"consumer", "enabled", "persisted"}`; 404 for an unknown name |
//!
//! Errors are JSON `{"error": "..."}` with 404 (unknown consumer), 503 (unavailable) or 500.
//! Enable/disable is applied live through [`Control::set_enabled`], then saved to the state
//! file when one is given; a failed save is a 500 saying the change is live but not saved.

use super::now_ms;
use super::{AdminError, Control, ServiceStatus};
use crate::metrics::{CONTENT_TYPE, Metrics, MetricsHandle};
use crate::state::StateFile;
use actix_web::dev::{Server, ServerHandle};
use actix_web::http::StatusCode;
use actix_web::{App, HttpResponse, HttpServer, web};
use std::net::SocketAddr;
use std::sync::Arc;

/// What every handler shares.
#[derive(Clone)]
pub struct AdminState {
    pub control: Arc<dyn Control>,
    pub metrics: MetricsHandle,
    /// Where enable/disable is persisted; `None` to not persist (tests).
    pub state_file: Option<StateFile>,
}

/// A bound, not yet running server. Run it by spawning [`AdminServer::server`] (it is a
/// future), e.g. `actix_rt::spawn(admin.server)`, and stop it with `admin.handle.stop(true)`.
pub struct AdminServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    pub server: Server,
}

/// Register the routes on an actix-web `App` (also used by tests with `actix_web::test`).
pub fn configure(state: AdminState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready))
            .route("/status", web::get().to(status))
            .route("/consumers", web::get().to(consumers))
            .route("/metrics", web::get().to(metrics))
            .route("/consumers/{name}/enable", web::post().to(enable))
            .route("/consumers/{name}/disable", web::post().to(disable))
            .route("/canal/skip/{token}", web::post().to(skip));
    }
}

/// Bind the admin server to `bind` (`ip:port`). Call it inside the service's runtime (the actix
/// System); the returned server does nothing until spawned. Signals are left to the caller: the
/// service's own graceful shutdown stops this server through the handle, last, so `/ready`
/// reports the shutdown while it drains.
pub fn serve(bind: &str, state: AdminState) -> Result<AdminServer, AdminError> {
    let berr = |e: &dyn std::fmt::Display| AdminError::Bind {
        addr: bind.to_string(),
        message: e.to_string(),
    };
    let addr: SocketAddr = bind.parse().map_err(|e| berr(&e))?;
    let http = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .bind(addr)
        .map_err(|e| berr(&e))?;
    let addr = http.addrs().first().copied().unwrap_or(addr);
    let server = http.run();
    tracing::info!(%addr, "admin endpoint listening");
    Ok(AdminServer {
        addr,
        handle: server.handle(),
        server,
    })
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.into() }))
}

fn admin_error(e: &AdminError) -> HttpResponse {
    let status = match e {
        AdminError::UnknownConsumer(_) => StatusCode::NOT_FOUND,
        AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        AdminError::Conflict(_) => StatusCode::CONFLICT,
        AdminError::Internal(_) | AdminError::Bind { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn ready(state: web::Data<AdminState>) -> HttpResponse {
    let status: ServiceStatus = state.control.status().await;
    match status.readiness() {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"),
        Err(why) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {why}\n")),
    }
}

async fn status(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok().json(state.control.status().await)
}

async fn consumers(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok().json(state.control.status().await.consumers)
}

/// Bring the registry up to date with a status snapshot: counters catch up with the actors'
/// totals (never backwards), gauges take the snapshot's values.
pub fn observe(m: &Metrics, s: &ServiceStatus, now_ms: i64) {
    let c = &s.canal;
    m.canal_batches_total.observe(c.batches_received);
    m.canal_events_total.observe(c.events_received);
    m.canal_rollbacks_total.observe(c.rollbacks);
    m.canal_reconnects_total.observe(c.reconnects);
    m.canal_inflight_batches
        .set(s.batches_in_flight.max(c.inflight_batches) as i64);
    if let Some(t) = c.last_executed_at {
        m.canal_lag_seconds.set((now_ms - t).max(0) as f64 / 1000.0);
    }
    let b = &s.broker;
    let num = |k: &str| b.get(k).and_then(serde_json::Value::as_u64);
    let pairs = [
        ("published", &m.publisher_published_total),
        ("confirmed", &m.publisher_confirmed_total),
        ("returned", &m.publisher_returned_total),
        ("nacked", &m.publisher_nacked_total),
        ("timeouts", &m.publisher_timeouts_total),
    ];
    for (key, counter) in pairs {
        if let Some(v) = num(key) {
            counter.observe(v);
        }
    }
    if let Some(v) = num("unconfirmed") {
        m.publisher_unconfirmed.set(v as i64);
    }
    if let Some(state) = b.get("state").and_then(serde_json::Value::as_str) {
        m.publisher_blocked.set_bool(state == "blocked");
    }
    for cs in &s.consumers {
        let cm = m.consumer(&cs.name);
        cm.events_total.observe(cs.events);
        cm.triggers_total.observe(cs.triggers);
        cm.errors_total.observe(cs.errors);
        cm.restarts_total.observe(cs.restarts);
        cm.parked_total.observe(cs.parked);
        cm.enabled.set_bool(cs.enabled);
        if let Some(lag) = cs.lag_seconds {
            cm.lag_seconds.set(lag);
        }
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let snapshot = state.control.status().await;
    observe(&state.metrics, &snapshot, now_ms());
    HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(state.metrics.render())
}

/// Pass what the Canal stream is stalled at; the token must be the one `/status` shows.
async fn skip(state: web::Data<AdminState>, token: web::Path<String>) -> HttpResponse {
    let token = token.into_inner();
    match state.control.skip(&token).await {
        Ok(done) => {
            tracing::warn!(token = %token.escape_debug(), "skip requested through the admin endpoint");
            HttpResponse::Ok().json(serde_json::json!({ "skipped": token, "result": done }))
        }
        Err(e) => admin_error(&e),
    }
}

async fn enable(state: web::Data<AdminState>, name: web::Path<String>) -> HttpResponse {
    set_enabled(state, name.into_inner(), true).await
}

async fn disable(state: web::Data<AdminState>, name: web::Path<String>) -> HttpResponse {
    set_enabled(state, name.into_inner(), false).await
}

async fn set_enabled(state: web::Data<AdminState>, name: String, enabled: bool) -> HttpResponse {
    if let Err(e) = state.control.set_enabled(&name, enabled).await {
        tracing::warn!(consumer = %name, enabled, error = %e, "admin enable/disable refused");
        return admin_error(&e);
    }
    tracing::info!(consumer = %name, enabled, "consumer switched through the admin endpoint");
    let mut persisted = false;
    if let Some(file) = state.state_file.clone() {
        let who = name.clone();
        let saved = tokio::task::spawn_blocking(move || file.set(&who, enabled)).await;
        match saved {
            Ok(Ok(_)) => persisted = true,
            Ok(Err(e)) => {
                tracing::error!(consumer = %name, error = %e, "consumer state not saved");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("applied live but not saved (lost at restart): {e}"),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("applied live but not saved (lost at restart): {e}"),
                );
            }
        }
    }
    HttpResponse::Ok().json(serde_json::json!({
        "consumer": name,
        "enabled": enabled,
        "persisted": persisted,
    }))
}
