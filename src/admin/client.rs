//! The command line's side of the admin endpoint: `status [--json]`, `list [--json]`,
//! `enable NAME`, `disable NAME`, and the tap of `tail`.
//!
//! HTTP goes through `awc`, actix's maintained client (it shares `actix-http` with the server,
//! so it adds little to the build). `awc` spawns its connection tasks on the current thread,
//! so every call here runs inside its own `tokio::task::LocalSet`: callers can be on any
//! current-thread tokio runtime (the command line's, `#[tokio::test]`, an actix System).
//! State-changing calls and the tap send the admin token as `Authorization: Bearer` (see
//! [`super::access`]); `status` renders a compact table meant for `watch -n 5 canal-consumer
//! status`.
//!
//! How it fails: no listener at the admin address is [`ClientError::NotRunning`], whose message
//! says so plainly; `enable`/`disable` then write the state file directly and say the change
//! applies at the next start. A refused token is [`ClientError::Unauthorized`]. Other failures
//! (timeouts, HTTP errors, an unreadable answer) are the other [`ClientError`] variants. Every
//! error maps to a non-zero exit code.

use super::access::Token;
use super::now_ms;
use crate::state::{StateError, StateFile};
use awc::error::{ConnectError, SendRequestError};
use awc::http::Method;
use futures::StreamExt;
use serde_json::Value;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

/// How long to wait for the connection, and then for the answer's head.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (the tap's stream is read line by line, without this limit).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Longest tap line accepted.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("canal-consumer is not running (no admin endpoint at {addr})")]
    NotRunning { addr: String },
    #[error("admin endpoint at {addr}: {message}")]
    Io { addr: String, message: String },
    #[error("no consumer named `{0}` (see `canal-consumer list`)")]
    UnknownConsumer(String),
    #[error("admin endpoint refused the call (401): {0}")]
    Unauthorized(String),
    #[error("admin endpoint answered {status}: {body}")]
    Http { status: u16, body: String },
    #[error("admin endpoint sent an answer that cannot be read: {0}")]
    BadResponse(String),
    #[error(transparent)]
    State(#[from] StateError),
}

impl ClientError {
    /// The process exit code for this error: 3 when the service is not running, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotRunning { .. } => 3,
            _ => 1,
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// The address to connect to for a bind address: a wildcard bind (`0.0.0.0`, `[::]`) is
/// reached on loopback.
pub fn connect_addr(bind: &str) -> String {
    if let Some(port) = bind.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = bind.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        bind.to_string()
    }
}

/// Run `f` on a `LocalSet` of its own (awc spawns local tasks).
async fn local<F: Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

fn http_client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().timeout(CONNECT_TIMEOUT))
        .timeout(RESPONSE_TIMEOUT)
        .add_default_header((
            awc::http::header::USER_AGENT,
            concat!("canal-consumer/", env!("CARGO_PKG_VERSION")),
        ))
        .finish()
}

fn send_error(addr: &str, e: SendRequestError) -> ClientError {
    match e {
        SendRequestError::Connect(ConnectError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) =>
        {
            ClientError::NotRunning {
                addr: addr.to_string(),
            }
        }
        SendRequestError::Connect(ConnectError::Timeout) => ClientError::Io {
            addr: addr.to_string(),
            message: "connection timed out".into(),
        },
        SendRequestError::Timeout => ClientError::Io {
            addr: addr.to_string(),
            message: format!("no answer within {}s", RESPONSE_TIMEOUT.as_secs()),
        },
        e => ClientError::Io {
            addr: addr.to_string(),
            message: e.to_string(),
        },
    }
}

fn method(m: &str) -> Method {
    Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)
}

/// One request without the token, one answer.
pub async fn request(addr: &str, method: &str, path: &str) -> Result<Response, ClientError> {
    request_with(addr, method, path, None).await
}

/// One request, with the token when given, one answer.
pub async fn request_with(
    addr: &str,
    verb: &str,
    path: &str,
    token: Option<&Token>,
) -> Result<Response, ClientError> {
    local(async {
        let url = format!("http://{addr}{path}");
        let mut req = http_client().request(method(verb), url);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        let mut resp = req.send().await.map_err(|e| send_error(addr, e))?;
        let body = resp
            .body()
            .limit(MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        Ok(Response {
            status: resp.status().as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    })
    .await
}

/// The reason in an error answer `{"error": "..."}`, else the body.
fn reason(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

fn ok_json(r: Response) -> Result<Value, ClientError> {
    match r.status {
        200 => serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse(e.to_string())),
        401 => Err(ClientError::Unauthorized(reason(&r.body))),
        status => Err(ClientError::Http {
            status,
            body: r.body.trim().to_string(),
        }),
    }
}

/// `GET /status` as JSON.
pub async fn fetch_status(addr: &str) -> Result<Value, ClientError> {
    let r = request(addr, "GET", "/status").await?;
    ok_json(r)
}

/// `canal-consumer status [--json]`: the rendered status (or its JSON, pretty-printed).
pub async fn status(bind: &str, json: bool) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let v = fetch_status(&addr).await?;
    if json {
        Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
    } else {
        Ok(render_status(&v, now_ms()))
    }
}

/// `canal-consumer list [--json]`: every consumer with its state.
pub async fn list(bind: &str, json: bool) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let r = request(&addr, "GET", "/consumers").await?;
    let v = ok_json(r)?;
    if json {
        Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
    } else {
        Ok(render_list(&v))
    }
}

/// `canal-consumer enable|disable NAME`: live through the admin endpoint (with the admin
/// token), or, when the service is not running, written to `state_file` to apply at the next
/// start. The name is not checked against the consumer definitions in that case.
pub async fn set_enabled(
    bind: &str,
    token: Option<&Token>,
    state_file: &StateFile,
    name: &str,
    enabled: bool,
) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let verb = if enabled { "enable" } else { "disable" };
    let done = if enabled { "enabled" } else { "disabled" };
    let path = format!("/consumers/{}/{verb}", percent_encode(name));
    match request_with(&addr, "POST", &path, token).await {
        Ok(r) if r.status == 200 => Ok(format!("{name}: {done} (live, saved)\n")),
        Ok(r) if r.status == 404 => Err(ClientError::UnknownConsumer(name.to_string())),
        Ok(r) if r.status == 401 => Err(ClientError::Unauthorized(reason(&r.body))),
        Ok(r) => Err(ClientError::Http {
            status: r.status,
            body: r.body.trim().to_string(),
        }),
        Err(ClientError::NotRunning { addr }) => {
            state_file.set(name, enabled)?;
            Ok(format!(
                "canal-consumer is not running (no admin endpoint at {addr}); {name} will be \
                 {done} at the next start (saved in {})\n",
                state_file.path().display()
            ))
        }
        Err(e) => Err(e),
    }
}

/// `canal-consumer skip TOKEN`: pass what the running service's Canal stream is stalled at
/// (needs the admin credential, like `enable`/`disable`).
pub async fn skip(bind: &str, auth: Option<&Token>, token: &str) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let path = format!("/canal/skip/{}", percent_encode(token));
    let r = request_with(&addr, "POST", &path, auth).await?;
    match r.status {
        200 => {
            let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            Ok(format!("{}\n", s(&v, "result")))
        }
        401 => Err(ClientError::Unauthorized(reason(&r.body))),
        status => Err(ClientError::Http {
            status,
            body: r.body.trim().to_string(),
        }),
    }
}

/// What `tail` asks the tap for.
#[derive(Debug, Clone, Default)]
pub struct TapQuery {
    pub table: Option<String>,
    pub consumer: Option<String>,
    pub fired: bool,
    pub buffer: Option<usize>,
}

impl TapQuery {
    /// The request path, `/tap?...`.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        if let Some(t) = &self.table {
            q.push(format!("table={}", percent_encode(t)));
        }
        if let Some(c) = &self.consumer {
            q.push(format!("consumer={}", percent_encode(c)));
        }
        if self.fired {
            q.push("fired=true".into());
        }
        if let Some(b) = self.buffer {
            q.push(format!("buffer={b}"));
        }
        if q.is_empty() {
            "/tap".into()
        } else {
            format!("/tap?{}", q.join("&"))
        }
    }
}

/// Stream the tap of the service at `addr`: `on_open` runs once the service accepted the
/// request, then `on_line` gets each JSON line (without its newline; the empty keepalive lines
/// are skipped) until it returns `false` or the service ends the stream.
pub async fn tap(
    addr: &str,
    token: Option<&Token>,
    query: &TapQuery,
    on_open: impl FnOnce(),
    mut on_line: impl FnMut(&[u8]) -> bool,
) -> Result<(), ClientError> {
    local(async {
        let url = format!("http://{addr}{}", query.path());
        let mut req = http_client().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        let mut resp = req.send().await.map_err(|e| send_error(addr, e))?;
        if resp.status().as_u16() != 200 {
            let body = resp.body().limit(64 * 1024).await.unwrap_or_default();
            let body = String::from_utf8_lossy(&body).into_owned();
            return Err(match resp.status().as_u16() {
                401 => ClientError::Unauthorized(reason(&body)),
                status => ClientError::Http {
                    status,
                    body: reason(&body),
                },
            });
        }
        on_open();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.next().await {
            let chunk = chunk.map_err(|e| ClientError::Io {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                // empty lines are the tap's keepalive
                if line.len() > 1 && !on_line(&line[..line.len() - 1]) {
                    return Ok(());
                }
            }
            if pending.len() > MAX_LINE_BYTES {
                return Err(ClientError::BadResponse("tap line too long".into()));
            }
        }
        Ok(())
    })
    .await
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `1h02m`, `3m05s`, `4.2s`, `120ms`.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let whole = secs as u64;
    if secs < 1.0 {
        format!("{}ms", (secs * 1000.0).round() as u64)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else if whole < 86400 {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    } else {
        format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600)
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn position(v: &Value) -> String {
    match v {
        Value::Object(_) => format!(
            "{}:{}#{}",
            s(v, "log_file"),
            n(v, "offset"),
            n(v, "row_index")
        ),
        _ => "-".into(),
    }
}

/// The human status, for `watch -n 5`. `now_ms` is the wall clock (ms since the epoch), for
/// the lag.
pub fn render_status(v: &Value, now_ms: i64) -> String {
    let mut out = String::new();
    let canal = &v["canal"];
    let ready = if v["shutting_down"].as_bool() == Some(true) {
        "SHUTTING DOWN"
    } else if canal["state"] == "connected" && v["broker_connected"].as_bool() == Some(true) {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(
        out,
        "canal-consumer {}  up {}  {ready}",
        s(v, "version"),
        short_duration(n(v, "uptime_seconds") as f64)
    );
    // Nothing in flight: caught up with everything Canal has served.
    let lag = if canal["inflight_batches"].as_u64() == Some(0) {
        "0s".to_string()
    } else {
        canal["last_executed_at"]
            .as_i64()
            .map(|t| short_duration(((now_ms - t).max(0)) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "canal   {:<12} {}  destination {}  lag {lag}",
        s(canal, "state"),
        s(canal, "server"),
        s(canal, "destination"),
    );
    let _ = writeln!(
        out,
        "        fetched {}  acked {}  in flight {} batches ({})",
        position(&canal["last_position"]),
        position(&canal["acked_position"]),
        v["batches_in_flight"]
            .as_u64()
            .unwrap_or_else(|| n(canal, "inflight_batches")),
        bytes(n(canal, "inflight_bytes")),
    );
    let _ = writeln!(
        out,
        "        batches {}  events {}  rollbacks {}  reconnects {}",
        n(canal, "batches_received"),
        n(canal, "events_received"),
        n(canal, "rollbacks"),
        n(canal, "reconnects"),
    );
    if let Some(stall) = canal["stall"].as_object() {
        let _ = writeln!(
            out,
            "        STALLED since {}: {}",
            stall.get("since").and_then(Value::as_str).unwrap_or("-"),
            stall.get("reason").and_then(Value::as_str).unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "        to go on: {}",
            stall.get("how").and_then(Value::as_str).unwrap_or("-")
        );
    } else if let Some(e) = canal["last_error"].as_str() {
        let _ = writeln!(out, "        last error: {e}");
    }
    if let Some(skipped) = canal["skipped"].as_array().filter(|a| !a.is_empty()) {
        let last = skipped.last().and_then(Value::as_str).unwrap_or("-");
        let _ = writeln!(out, "        skipped {} (last: {last})", skipped.len());
    }
    let broker = &v["broker"];
    let state = broker.get("state").and_then(Value::as_str).unwrap_or(
        if v["broker_connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "down"
        },
    );
    let _ = writeln!(
        out,
        "broker  {state:<12} {}  queue {}",
        s(broker, "broker"),
        s(broker, "queue")
    );
    // The publisher's counters, those it reports, in a fixed order.
    let mut counts = Vec::new();
    if let Some(u) = broker.get("unconfirmed").and_then(Value::as_u64) {
        match broker.get("max_unconfirmed").and_then(Value::as_u64) {
            Some(max) => counts.push(format!("unconfirmed {u}/{max}")),
            None => counts.push(format!("unconfirmed {u}")),
        }
    }
    for key in [
        "published",
        "confirmed",
        "returned",
        "nacked",
        "timeouts",
        "lost",
    ] {
        if let Some(x) = broker.get(key).and_then(Value::as_u64) {
            counts.push(format!("{key} {x}"));
        }
    }
    if !counts.is_empty() {
        let _ = writeln!(out, "        {}", counts.join("  "));
    }
    if let Some(since) = broker.get("stalled_since").and_then(Value::as_str) {
        let _ = writeln!(
            out,
            "        STALLED since {since}: no confirm for {} s",
            broker
                .get("oldest_unconfirmed_ms")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                / 1000
        );
    }
    for key in ["blocked_reason", "last_error"] {
        if let Some(e) = broker.get(key).and_then(Value::as_str) {
            let _ = writeln!(out, "        {}: {e}", key.replace('_', " "));
        }
    }
    out.push('\n');
    out.push_str(&consumer_table(&v["consumers"], true));
    out
}

fn consumer_table(consumers: &Value, counters: bool) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let list = consumers.as_array().unwrap_or(&empty);
    if list.is_empty() {
        out.push_str("no consumers\n");
        return out;
    }
    let width = list
        .iter()
        .map(|c| s(c, "name").len())
        .max()
        .unwrap_or(8)
        .max("CONSUMER".len());
    if counters {
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>6}  {:>7}  LAST ERROR",
            "CONSUMER",
            "ENABLED",
            "STATE",
            "EVENTS",
            "TRIGGERS",
            "ERRORS",
            "RESTARTS",
            "PARKED",
            "LAG"
        );
    } else {
        let _ = writeln!(out, "{:<width$}  {:<7}  STATE", "CONSUMER", "ENABLED");
    }
    for c in list {
        let enabled = if c["enabled"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        };
        if counters {
            let lag = c["lag_seconds"]
                .as_f64()
                .map(short_duration)
                .unwrap_or_else(|| "-".into());
            let mut err = c["last_error"].as_str().unwrap_or("-").replace('\n', " ");
            if err.chars().count() > 60 {
                err = err.chars().take(59).collect::<String>() + "…";
            }
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>6}  {:>7}  {err}",
                s(c, "name"),
                enabled,
                s(c, "state"),
                n(c, "events"),
                n(c, "triggers"),
                n(c, "errors"),
                n(c, "restarts"),
                n(c, "parked"),
                lag,
            );
        } else {
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {}",
                s(c, "name"),
                enabled,
                s(c, "state")
            );
        }
    }
    out
}

/// The human list of consumers (`GET /consumers`).
pub fn render_list(consumers: &Value) -> String {
    consumer_table(consumers, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_query_paths_are_encoded() {
        assert_eq!(TapQuery::default().path(), "/tap");
        let q = TapQuery {
            table: Some(r"^test_db\.(users|orders)$".into()),
            consumer: Some("example_consumer".into()),
            fired: true,
            buffer: Some(8),
        };
        assert_eq!(
            q.path(),
            "/tap?table=%5Etest_db%5C.%28users%7Corders%29%24&consumer=example_consumer&fired=true&buffer=8"
        );
    }

    #[test]
    fn wildcard_binds_are_reached_on_loopback() {
        assert_eq!(connect_addr("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(connect_addr("[::]:9090"), "[::1]:9090");
        assert_eq!(connect_addr("10.0.0.5:9090"), "10.0.0.5:9090");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(0.12), "120ms");
        assert_eq!(short_duration(4.25), "4.2s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(90000.0), "1d01h");
    }

    #[test]
    fn a_stall_says_what_and_how_to_go_on() {
        let v = serde_json::json!({
            "version": "0.2.0", "uptime_seconds": 5,
            "canal": {"state": "stalled", "server": "s", "destination": "example",
                      "inflight_batches": 0,
                      "stall": {"token": "frame-1", "since": "2026-11-29T09:00:00.000Z",
                                "reason": "the next batch is a 200299-byte frame",
                                "how": "run `canal-consumer skip frame-1`"},
                      "skipped": ["frame of 10 bytes (canal batch 3) after the start"],
                      "last_error": "x"},
            "broker": {"state": "connected", "stalled_since": "2026-11-29T09:00:01.000Z",
                       "oldest_unconfirmed_ms": 7_400},
            "broker_connected": false, "consumers": []
        });
        let text = render_status(&v, 0);
        assert!(text.contains("NOT READY"), "{text}");
        assert!(
            text.contains(
                "STALLED since 2026-11-29T09:00:00.000Z: the next batch is a 200299-byte frame"
            ),
            "{text}"
        );
        assert!(
            text.contains("to go on: run `canal-consumer skip frame-1`"),
            "{text}"
        );
        assert!(
            text.contains("skipped 1 (last: frame of 10 bytes"),
            "{text}"
        );
        assert!(
            text.contains("STALLED since 2026-11-29T09:00:01.000Z: no confirm for 7 s"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_compact_status() {
        let v = serde_json::json!({
            "version": "0.1.0",
            "uptime_seconds": 3725,
            "canal": {
                "state": "connected", "server": "127.0.0.1:11111", "destination": "example",
                "inflight_batches": 2, "inflight_bytes": 2048, "batches_received": 10,
                "events_received": 300, "rollbacks": 1, "reconnects": 0,
                "last_position": {"log_file": "mysql-bin.000003", "offset": 4567, "row_index": 2},
                "last_executed_at": 1_000_000, "acked_position": null
            },
            "broker": {"state": "connected", "broker": "amqp://u:***@rabbit:5672/%2f",
                       "queue": "plugin_tasks", "unconfirmed": 3, "max_unconfirmed": 512,
                       "confirmed": 40, "last_error": null},
            "broker_connected": true,
            "shutting_down": false,
            "batches_in_flight": 2,
            "consumers": [
                {"name": "example_consumer", "enabled": true, "state": "running", "events": 12,
                 "triggers": 8, "errors": 0, "restarts": 0, "parked": 3, "lag_seconds": 0.5,
                 "last_error": null},
                {"name": "teacher_consumer", "enabled": false, "state": "disabled", "events": 0,
                 "triggers": 0, "errors": 2, "restarts": 1, "last_error": "boom"}
            ]
        });
        let text = render_status(&v, 1_002_500);
        assert!(
            text.starts_with("canal-consumer 0.1.0  up 1h02m  ready\n"),
            "{text}"
        );
        assert!(text.contains("connected"), "{text}");
        assert!(text.contains("destination example  lag 2.5s"), "{text}");
        assert!(
            text.contains("fetched mysql-bin.000003:4567#2  acked -"),
            "{text}"
        );
        assert!(text.contains("in flight 2 batches (2.0 KiB)"), "{text}");
        assert!(
            text.contains("broker  connected    amqp://u:***@rabbit:5672/%2f  queue plugin_tasks"),
            "{text}"
        );
        assert!(text.contains("unconfirmed 3/512  confirmed 40\n"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("example_consumer"))
            .unwrap();
        let cols: Vec<_> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "example_consumer",
                "yes",
                "running",
                "12",
                "8",
                "0",
                "0",
                "3",
                "500ms",
                "-"
            ]
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("teacher_consumer"))
            .unwrap();
        assert!(row.ends_with("boom"), "{row}");
        let list = render_list(&v["consumers"]);
        assert!(
            list.contains("teacher_consumer  no       disabled"),
            "{list}"
        );
    }
}
