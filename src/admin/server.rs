//! The admin HTTP server (actix-web), one worker, bound to `admin.bind`.
//!
//! | Route | Needs | Answer |
//! |---|---|---|
//! | `GET /health` | probe | 200 `ok` while the process serves requests (liveness) |
//! | `GET /ready` | probe | 200 `ready` when Canal is connected and the broker channel is up (a ZooKeeper standby: its ZooKeeper session is connected and the broker channel is up), else 503 with the reason (readiness) |
//! | `GET /metrics` | probe | 200, Prometheus text format 0.0.4, encoded from a fresh status snapshot ([`super::exposition`]) |
//! | `GET /status` | read | 200, [`ServiceStatus`] as JSON |
//! | `GET /consumers` | read | 200, the consumers of the status as a JSON array |
//! | `POST /consumers/{name}/enable`, `/disable` | token | 200 `{"consumer", "enabled", "persisted"}`; 404 for an unknown name |
//! | `GET /tap?table=REGEX&consumer=NAME&fired=true&buffer=N` | token | 200, JSON lines of what the consumers process (see [`crate::tap`]), until the client goes away |
//!
//! "probe": a foreign `Origin` is refused (403); "read": also a `Host` that does not name this
//! service (421); "token": also `Authorization: Bearer TOKEN` (401). The rules are in
//! [`super::access`]. A consumer name in a path must follow the consumer-name grammar
//! (letters, digits, `_`, `-`); anything else is a 400 that does not echo it.
//!
//! Errors are JSON `{"error": "..."}` with 400, 401, 403, 404 (unknown consumer), 421, 503
//! (unavailable) or 500. Enable/disable is applied live through [`Control::set_enabled`], then
//! saved to the state file when one is given, both under one lock, so concurrent calls are
//! applied and saved in the same order and the file always ends equal to the live state; a
//! failed save is a 500 saying the change is live but not saved.

use super::access::{Access, Need, Token, check_bind, token_path};
use super::exposition;
use super::{AdminError, Control, ServiceStatus};
use crate::backfill::record::Action;
use crate::backfill::{BackfillError, Backfills, StartRequest};
use crate::clock::now_ms;
use crate::config::Config;
use crate::metrics::{CONTENT_TYPE, MetricsHandle};
use crate::state::StateFile;
use crate::tap::{self, Tap, TapFilter};
use actix_web::dev::{Server, ServerHandle};
use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use std::net::SocketAddr;
use std::sync::Arc;

/// What every handler shares.
#[derive(Clone)]
pub struct AdminState {
    pub control: Arc<dyn Control>,
    pub metrics: MetricsHandle,
    /// Where enable/disable is persisted; `None` to not persist (tests).
    pub state_file: Option<StateFile>,
    /// The token and the Host/Origin rules. [`serve`] sets the bound address in it.
    pub access: Access,
    /// What `GET /tap` serves.
    pub tap: Tap,
    /// The service's backfills; `None` without `canal.source_url`.
    pub backfills: Option<Arc<Backfills>>,
}

impl AdminState {
    /// The state of the service's admin endpoint for `cfg`: refuses a non-loopback bind
    /// without `admin.allow_remote`, loads the token (generating the token file at first
    /// start), persists to `consumers.state_file`, and serves the process's [`tap::global`].
    pub fn for_service(
        cfg: &Config,
        control: Arc<dyn Control>,
        metrics: MetricsHandle,
    ) -> Result<AdminState, AdminError> {
        check_bind(cfg).map_err(AdminError::Credential)?;
        let token = Token::load_or_create(&token_path(cfg))
            .map_err(|e| AdminError::Credential(e.to_string()))?;
        let bound = cfg
            .admin
            .bind
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        Ok(AdminState {
            control,
            metrics,
            state_file: Some(StateFile::new(&cfg.consumers.state_file)),
            access: Access::new(token, bound),
            tap: tap::global().clone(),
            backfills: None,
        })
    }

    /// Serve `backfills` on `/backfills`.
    pub fn with_backfills(mut self, backfills: Option<Arc<Backfills>>) -> AdminState {
        self.backfills = backfills;
        self
    }
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
            .route("/tap", web::get().to(tap_stream))
            .route("/consumers/{name}/enable", web::post().to(enable))
            .route("/consumers/{name}/disable", web::post().to(disable))
            .route("/canal/skip/{token}", web::post().to(skip))
            .route("/backfills", web::get().to(backfill_list))
            .route("/backfills", web::post().to(backfill_start))
            .route("/backfills/{id}", web::get().to(backfill_get))
            .route("/backfills/{id}/{action}", web::post().to(backfill_act));
    }
}

/// Bind the admin server to `bind` (`ip:port`). Call it inside the service's runtime (the actix
/// System); the returned server does nothing until spawned. Signals are left to the caller: the
/// service's own graceful shutdown stops this server through the handle, last, so `/ready`
/// reports the shutdown while it drains.
pub fn serve(bind: &str, mut state: AdminState) -> Result<AdminServer, AdminError> {
    let berr = |e: &dyn std::fmt::Display| AdminError::Bind {
        addr: bind.to_string(),
        message: e.to_string(),
    };
    let addr: SocketAddr = bind.parse().map_err(|e| berr(&e))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| berr(&e))?;
    let addr = listener.local_addr().unwrap_or(addr);
    // The Host/Origin rules need the port actually bound (port 0 in tests).
    state.access.set_bound(addr);
    let http = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .map_err(|e| berr(&e))?;
    let server = http.run();
    tracing::info!(%addr, "admin endpoint listening");
    Ok(AdminServer {
        addr,
        handle: server.handle(),
        server,
    })
}

/// Apply the access rules of [`super::access`] to a request.
fn refused(req: &HttpRequest, state: &AdminState, need: Need) -> Option<HttpResponse> {
    let h = |name| req.headers().get(name).map(|v| v.as_bytes());
    state
        .access
        .check(
            need,
            h(header::HOST),
            h(header::ORIGIN),
            h(header::AUTHORIZATION),
        )
        .err()
        .map(|r| {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
            let mut resp = HttpResponse::build(status);
            if r.status == 401 {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            resp.json(serde_json::json!({ "error": r.message }))
        })
}

/// A 400 unless `raw` follows the consumer-name grammar (the name is not echoed).
fn bad_name(raw: &str) -> Option<HttpResponse> {
    if crate::rules::valid_name(raw) && raw.len() <= 200 {
        None
    } else {
        Some(error(
            StatusCode::BAD_REQUEST,
            "invalid consumer name: names are 1 to 200 letters, digits, `_` or `-`",
        ))
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.into() }))
}

fn admin_error(e: &AdminError) -> HttpResponse {
    let status = match e {
        AdminError::UnknownConsumer(_) => StatusCode::NOT_FOUND,
        AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        AdminError::Conflict(_) => StatusCode::CONFLICT,
        AdminError::Internal(_) | AdminError::Bind { .. } | AdminError::Credential(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, e.to_string())
}

async fn health(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Probe) {
        return r;
    }
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn ready(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Probe) {
        return r;
    }
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

async fn status(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Read) {
        return r;
    }
    HttpResponse::Ok().json(snapshot(&state).await)
}

async fn consumers(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Read) {
        return r;
    }
    HttpResponse::Ok().json(state.control.status().await.consumers)
}

/// The status snapshot `/status` and `/metrics` show: the actors' parts, the tap's listeners
/// and the backfills as the runner last read them.
async fn snapshot(state: &AdminState) -> ServiceStatus {
    let mut s = state.control.status().await;
    s.tap_listeners = state.tap.listeners();
    if let Some(b) = &state.backfills {
        s.backfills = b.seen();
    }
    s
}

async fn metrics(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Probe) {
        return r;
    }
    let s = snapshot(&state).await;
    HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(exposition::render(&state.metrics, s, now_ms()))
}

/// Pass what the Canal stream is stalled at; the token must be the one `/status` shows. Like
/// every state-changing call it needs the admin credential.
async fn skip(
    req: HttpRequest,
    state: web::Data<AdminState>,
    token: web::Path<String>,
) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Token) {
        return r;
    }
    let token = token.into_inner();
    let _one = SWITCH.lock().await;
    match state.control.skip(&token).await {
        Ok(done) => {
            tracing::warn!(token = %token.escape_debug(), "skip requested through the admin endpoint");
            HttpResponse::Ok().json(serde_json::json!({ "skipped": token, "result": done }))
        }
        Err(e) => admin_error(&e),
    }
}

async fn enable(
    req: HttpRequest,
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> HttpResponse {
    set_enabled(req, state, name.into_inner(), true).await
}

async fn disable(
    req: HttpRequest,
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> HttpResponse {
    set_enabled(req, state, name.into_inner(), false).await
}

/// Applies and saves enable/disable calls one at a time, so the state file ends equal to the
/// live state whatever the interleaving of concurrent calls.
static SWITCH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn set_enabled(
    req: HttpRequest,
    state: web::Data<AdminState>,
    name: String,
    enabled: bool,
) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Token) {
        return r;
    }
    if let Some(r) = bad_name(&name) {
        return r;
    }
    let _one = SWITCH.lock().await;
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

/// Query of `GET /tap`.
#[derive(serde::Deserialize)]
struct TapQuery {
    table: Option<String>,
    consumer: Option<String>,
    #[serde(default)]
    fired: bool,
    buffer: Option<usize>,
}

async fn tap_stream(
    req: HttpRequest,
    state: web::Data<AdminState>,
    query: Result<web::Query<TapQuery>, actix_web::Error>,
) -> HttpResponse {
    if let Some(r) = refused(&req, &state, Need::Token) {
        return r;
    }
    let Ok(query) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad tap query: use table=REGEX, consumer=NAME, fired=true|false, buffer=N",
        );
    };
    let q = query.into_inner();
    let table = match q.table.as_deref().filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => match regex::Regex::new(t) {
            Ok(r) => Some(r),
            Err(_) => return error(StatusCode::BAD_REQUEST, "table is not a valid regex"),
        },
    };
    let consumer = match q.consumer.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match bad_name(c) {
            None => Some(c.to_string()),
            Some(r) => return r,
        },
    };
    let filter = TapFilter {
        table,
        consumer,
        fired_only: q.fired,
    };
    let sub = state
        .tap
        .subscribe(filter, q.buffer.unwrap_or(tap::DEFAULT_BUFFER));
    tracing::info!(listeners = state.tap.listeners(), "tap listener attached");
    let body = futures::StreamExt::map(sub.into_stream(), Ok::<_, actix_web::Error>);
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .streaming(body)
}

fn backfill_error(e: &BackfillError) -> HttpResponse {
    let status = match e {
        BackfillError::Invalid(_) => StatusCode::BAD_REQUEST,
        BackfillError::NotFound(_) => StatusCode::NOT_FOUND,
        BackfillError::Conflict(_) | BackfillError::NotConfigured => StatusCode::CONFLICT,
        BackfillError::Source { .. } | BackfillError::Timeout { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    error(status, e.to_string())
}

/// The backfills, or the answer when the service has none; every backfill route needs the
/// token (records carry `where` conditions, and starting one reads the source database).
fn backfills<'a>(
    req: &HttpRequest,
    state: &'a AdminState,
) -> Result<&'a Arc<Backfills>, Box<HttpResponse>> {
    if let Some(r) = refused(req, state, Need::Token) {
        return Err(Box::new(r));
    }
    state
        .backfills
        .as_ref()
        .ok_or_else(|| Box::new(backfill_error(&BackfillError::NotConfigured)))
}

/// A backfill id as the service makes them (`bf-` and letters, digits, `-`).
fn bad_backfill_id(id: &str) -> Option<HttpResponse> {
    let ok = id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    (!ok).then(|| error(StatusCode::BAD_REQUEST, "invalid backfill id"))
}

async fn backfill_list(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let b = match backfills(&req, &state) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match b.list().await {
        Ok(all) => HttpResponse::Ok().json(all),
        Err(e) => backfill_error(&e),
    }
}

async fn backfill_start(
    req: HttpRequest,
    state: web::Data<AdminState>,
    query: Result<web::Query<StartRequest>, actix_web::Error>,
) -> HttpResponse {
    let b = match backfills(&req, &state) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let query = match query {
        Ok(q) => q.into_inner(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad backfill request: {e}"),
            );
        }
    };
    match b.start(query).await {
        Ok(started) => HttpResponse::Ok().json(started),
        Err(e) => {
            tracing::warn!(error = %e, "backfill start refused");
            backfill_error(&e)
        }
    }
}

async fn backfill_get(
    req: HttpRequest,
    state: web::Data<AdminState>,
    id: web::Path<String>,
) -> HttpResponse {
    let b = match backfills(&req, &state) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if let Some(r) = bad_backfill_id(&id) {
        return r;
    }
    match b.get(&id).await {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => backfill_error(&e),
    }
}

async fn backfill_act(
    req: HttpRequest,
    state: web::Data<AdminState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let b = match backfills(&req, &state) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let (id, action) = path.into_inner();
    if let Some(r) = bad_backfill_id(&id) {
        return r;
    }
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "cancel" => Action::Cancel,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "no such backfill action (pause, resume, cancel)",
            );
        }
    };
    match b.act(&id, action).await {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => backfill_error(&e),
    }
}
