//! The command line's side of the admin endpoint: `status [--json]`, `list [--json]`,
//! `enable NAME`, `disable NAME`.
//!
//! A deliberately tiny HTTP/1.1 client over a tokio `TcpStream` (one request per connection,
//! `Connection: close`, fixed-length or chunked bodies), so the command line needs no HTTP
//! crate. `status` renders a compact table meant for `watch -n 5 canal-consumer status`.
//!
//! How it fails: no listener at the admin address is [`ClientError::NotRunning`], whose message
//! says so plainly; `enable`/`disable` then write the state file directly and say the change
//! applies at the next start. Other failures (timeouts, HTTP errors, an unreadable answer) are
//! the other [`ClientError`] variants. Every error maps to a non-zero exit code.

use super::now_ms;
use crate::state::{StateError, StateFile};
use serde_json::Value;
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long to wait for the connection, and then for the whole answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("canal-consumer is not running (no admin endpoint at {addr})")]
    NotRunning { addr: String },
    #[error("admin endpoint at {addr}: {message}")]
    Io { addr: String, message: String },
    #[error("no consumer named `{0}` (see `canal-consumer list`)")]
    UnknownConsumer(String),
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

/// One request, one answer.
pub async fn request(addr: &str, method: &str, path: &str) -> Result<Response, ClientError> {
    let io = |e: &dyn std::fmt::Display| ClientError::Io {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => return Err(io(&"connection timed out")),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) =>
        {
            return Err(ClientError::NotRunning {
                addr: addr.to_string(),
            });
        }
        Ok(Err(e)) => return Err(io(&e)),
        Ok(Ok(s)) => s,
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: canal-consumer/{}\r\n\
         Accept: */*\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let exchange = async {
        stream.write_all(head.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE_BYTES {
                break;
            }
            // Stop early once a fixed-length answer is complete (some servers keep the
            // connection open despite `Connection: close`).
            if let Some(total) = complete_length(&buf)
                && buf.len() >= total
            {
                break;
            }
        }
        Ok::<_, std::io::Error>(buf)
    };
    let raw = match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
        Err(_) => return Err(io(&"no answer within 10s")),
        Ok(Err(e)) => return Err(io(&e)),
        Ok(Ok(raw)) => raw,
    };
    parse_response(&raw)
}

/// Header length + Content-Length, when the head is complete and has a Content-Length.
fn complete_length(buf: &[u8]) -> Option<usize> {
    let end = find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })?;
    Some(end + len)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parse a full HTTP/1.1 answer.
pub fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let bad = |m: &str| ClientError::BadResponse(m.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| bad("no HTTP status line"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("broken chunked body"))?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| bad("body shorter than Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(rest, b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

fn ok_json(addr: &str, r: Response) -> Result<Value, ClientError> {
    let _ = addr;
    if r.status != 200 {
        return Err(ClientError::Http {
            status: r.status,
            body: r.body.trim().to_string(),
        });
    }
    serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse(e.to_string()))
}

/// `GET /status` as JSON.
pub async fn fetch_status(addr: &str) -> Result<Value, ClientError> {
    let r = request(addr, "GET", "/status").await?;
    ok_json(addr, r)
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
    let v = ok_json(&addr, r)?;
    if json {
        Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
    } else {
        Ok(render_list(&v))
    }
}

/// `canal-consumer enable|disable NAME`: live through the admin endpoint, or, when the service
/// is not running, written to `state_file` to apply at the next start. The name is not checked
/// against the consumer definitions in that case.
pub async fn set_enabled(
    bind: &str,
    state_file: &StateFile,
    name: &str,
    enabled: bool,
) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let verb = if enabled { "enable" } else { "disable" };
    let done = if enabled { "enabled" } else { "disabled" };
    let path = format!("/consumers/{}/{verb}", percent_encode(name));
    match request(&addr, "POST", &path).await {
        Ok(r) if r.status == 200 => Ok(format!("{name}: {done} (live, saved)\n")),
        Ok(r) if r.status == 404 => Err(ClientError::UnknownConsumer(name.to_string())),
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

/// `canal-consumer skip TOKEN`: pass what the running service's Canal stream is stalled at.
pub async fn skip(bind: &str, token: &str) -> Result<String, ClientError> {
    let addr = connect_addr(bind);
    let path = format!("/canal/skip/{}", percent_encode(token));
    let r = request(&addr, "POST", &path).await?;
    if r.status == 200 {
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        return Ok(format!("{}\n", s(&v, "result")));
    }
    Err(ClientError::Http {
        status: r.status,
        body: r.body.trim().to_string(),
    })
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
    if let Some(e) = canal["last_error"].as_str() {
        let _ = writeln!(out, "        last error: {e}");
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
            "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>7}  LAST ERROR",
            "CONSUMER", "ENABLED", "STATE", "EVENTS", "TRIGGERS", "ERRORS", "RESTARTS", "LAG"
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
                "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>7}  {err}",
                s(c, "name"),
                enabled,
                s(c, "state"),
                n(c, "events"),
                n(c, "triggers"),
                n(c, "errors"),
                n(c, "restarts"),
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
    fn parses_fixed_and_chunked_answers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\nextra").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "ok\n".into()
            }
        );
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready");
        assert!(parse_response(b"garbage").is_err());
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
                 "triggers": 8, "errors": 0, "restarts": 0, "lag_seconds": 0.5, "last_error": null},
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
