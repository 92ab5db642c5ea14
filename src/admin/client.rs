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
use super::render::{render_list, render_status};
use super::{ConsumerStatus, ServiceStatus};
use crate::clock::now_ms;
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
    /// The service refused the request, and said why.
    #[error("refused ({status}): {reason}")]
    Refused { status: u16, reason: String },
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

/// A backfill call (`/backfills...`, with the token): its JSON answer, or why it was refused.
pub async fn backfill_call(
    bind: &str,
    token: Option<&Token>,
    verb: &str,
    path: &str,
) -> Result<Value, ClientError> {
    let addr = connect_addr(bind);
    let r = request_with(&addr, verb, path, token).await?;
    match r.status {
        200 => serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse(e.to_string())),
        401 => Err(ClientError::Unauthorized(reason(&r.body))),
        status => Err(ClientError::Refused {
            status,
            reason: reason(&r.body),
        }),
    }
}

/// A backfill call ([`backfill_call`]) read into the type the admin endpoint serializes
/// ([`crate::backfill::BackfillView`], or a list of them). An answer that does not fit it is
/// [`ClientError::BadResponse`] naming the field.
pub async fn backfill<T: serde::de::DeserializeOwned>(
    bind: &str,
    token: Option<&Token>,
    verb: &str,
    path: &str,
) -> Result<T, ClientError> {
    typed(backfill_call(bind, token, verb, path).await?)
}

/// `s` for a URL path segment or query value.
pub fn encode(s: &str) -> String {
    percent_encode(s)
}

/// `GET /status` as JSON, as the service sent it (for scripts and tests that look at the
/// wire format; the command line reads it typed with [`fetch`]).
pub async fn fetch_status(addr: &str) -> Result<Value, ClientError> {
    let r = request(addr, "GET", "/status").await?;
    ok_json(r)
}

/// `GET /status`, read into the status model. An answer that does not fit it (a field
/// missing, renamed or of another type) is [`ClientError::BadResponse`] naming the field.
pub async fn fetch(addr: &str) -> Result<ServiceStatus, ClientError> {
    typed(fetch_status(addr).await?)
}

/// `v` read into `T`; [`ClientError::BadResponse`] naming the field when it does not fit.
pub fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| ClientError::BadResponse(format!("{}: {}", e.path(), e.inner())))
}

/// `canal-consumer status [--json]`: the rendered status (or its JSON, pretty-printed).
pub async fn status(bind: &str, json: bool) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let v = fetch_status(&addr).await?;
    if json {
        Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
    } else {
        Ok(render_status(&typed(v)?, now_ms()))
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
        let consumers: Vec<ConsumerStatus> = typed(v)?;
        Ok(render_list(&consumers))
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
            Ok(format!(
                "{}\n",
                v.get("result").and_then(Value::as_str).unwrap_or("-")
            ))
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
    fn a_backfill_answer_is_read_typed_or_refused_naming_the_field() {
        use crate::backfill::BackfillView;
        let b = serde_json::json!({
            "id": "bf-1", "state": "paused",
            "spec": {"database": "d", "table": "t", "chunk": 100, "owner": "example/1001",
                     "key_columns": ["id"]},
            "progress": {"rows_read": 250, "estimate": 1000},
        });
        let v: BackfillView = typed(b.clone()).unwrap();
        assert_eq!(v.backfill.id, "bf-1");
        assert_eq!(v.backfill.progress.rows_read, 250);
        let list: Vec<BackfillView> = typed(serde_json::json!([b.clone()])).unwrap();
        assert_eq!(list, vec![v]);
        let mut bad = b;
        bad["progress"]["rows_read"] = "many".into();
        match typed::<BackfillView>(bad) {
            // (the record is flattened into the view, so the path stops at the top)
            Err(ClientError::BadResponse(why)) => {
                assert!(why.contains("\"many\", expected u64"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        match typed::<BackfillView>(serde_json::json!({"id": "bf-1"})) {
            Err(ClientError::BadResponse(why)) => assert!(why.contains("missing field"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wildcard_binds_are_reached_on_loopback() {
        assert_eq!(connect_addr("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(connect_addr("[::]:9090"), "[::1]:9090");
        assert_eq!(connect_addr("10.0.0.5:9090"), "10.0.0.5:9090");
    }
}
