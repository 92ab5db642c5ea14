//! Operating the real service safely (issue 9), against the local MariaDB, Canal and RabbitMQ
//! (`deploy/local/up`; run under `flock /tmp/cc-stack.lock`):
//! - a message the broker returns never puts its row values into the logs at the default level;
//! - the tap streams what the consumers process, with their triggers, read-only, and a reader
//!   too slow for it loses lines (reported) while the pipeline delivers every row;
//! - `enable`/`disable` from the command line work with the token, and concurrent calls leave
//!   the state file equal to the live state.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::service::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DB: &str = "cc_it";

fn table(name: &str) {
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{name}; \
         CREATE TABLE {DB}.{name} (id INT PRIMARY KEY, note VARCHAR(40))"
    ));
}

fn insert_range(name: &str, from: i64, to: i64) {
    let values: Vec<String> = (from..=to).map(|i| format!("({i}, 'n{i}')")).collect();
    mysql(&format!(
        "INSERT INTO {DB}.{name} VALUES {}",
        values.join(",")
    ));
}

/// `tapped` fires `row_task` for every insert; `watcher` sees the same rows and fires nothing.
fn consumers(tbl: &str) -> [(String, String); 2] {
    let tapped = format!(
        r#"
[consumers.tapped]
[[consumers.tapped.filters]]
database = "{DB}"
table = "{tbl}"
events = ["INSERT"]
[[consumers.tapped.rules]]
name = "row"
plugin = "row_task"
payload = {{ id = "${{data.id}}" }}
"#
    );
    let watcher = format!(
        r#"
[consumers.watcher]
[[consumers.watcher.filters]]
database = "{DB}"
table = "{tbl}"
events = ["INSERT"]
[[consumers.watcher.rules]]
name = "never"
when = {{ condition = "data.id < 0" }}
plugin = "never_task"
payload = {{ id = "${{data.id}}" }}
"#
    );
    [
        ("tapped.toml".into(), tapped),
        ("watcher.toml".into(), watcher),
    ]
}

/// A child process killed when the test ends, however it ends.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(svc: &ServiceProc, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_canal-consumer"));
    c.args(args)
        .arg("--config")
        .arg(&svc.config)
        .env_remove("RUST_LOG")
        .env_remove("CANAL_HOST")
        .env_remove("CANAL_PORT");
    c
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn returned_row_values_never_reach_the_logs_at_the_default_level() {
    let _lock = canal_lock().await;
    let tbl = "privacy_rows";
    table(tbl);
    let filter = format!("{DB}\\.{tbl}");
    drop(Tap::clean(&filter).await);
    let queue = "cc_e2e_privacy_no_such_queue";
    delete_queue(queue).await;
    let consumer = format!(
        r#"
[consumers.leaky]
[[consumers.leaky.filters]]
database = "{DB}"
table = "{tbl}"
events = ["INSERT"]
[[consumers.leaky.rules]]
name = "row"
plugin = "row_task"
payload = {{ note = "${{data.note}}" }}
"#
    );
    let mut svc = ServiceProc::prepare("privacy", queue, &[("c.toml", &consumer)], "");
    // nobody declares the queue: every publish comes back; and the default log level
    let text = std::fs::read_to_string(&svc.config).unwrap();
    let text = text
        .replace(
            "max_priority = 10\n",
            "max_priority = 10\ndeclare = \"none\"\n",
        )
        .replace("level = \"info,canal_consumer=debug\"", "level = \"info\"");
    std::fs::write(&svc.config, text).unwrap();
    svc.start().await;
    let secret = "zq-row-value-8841";
    mysql(&format!("INSERT INTO {DB}.{tbl} VALUES (1, '{secret}')"));
    // two return cycles: the row was published, returned and redelivered
    wait_status(&svc, "two returned messages and rollbacks", |s| {
        s["broker"]["returned"].as_u64().unwrap_or(0) >= 2
            && s["canal"]["rollbacks"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    svc.kill9();
    let app = std::fs::read_to_string(svc.dir.join("app.log")).unwrap();
    let stderr = std::fs::read_to_string(svc.dir.join("stderr.log")).unwrap();
    // our own line, by id only, is there: the logs did capture the return
    assert!(
        app.contains("the broker returned an unroutable message"),
        "{app}"
    );
    // lapin's line shows the body as a Debug byte list: `[123, 34, ...]`
    let as_bytes = secret
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for (name, text) in [("app.log", &app), ("stderr", &stderr)] {
        assert!(!text.contains(secret), "row value in {name}:\n{text}");
        assert!(!text.contains(&as_bytes), "row bytes in {name}:\n{text}");
        assert!(
            !text.contains("Server returned us a message"),
            "{name}:\n{text}"
        );
    }
    // leave nothing of this table unacked in Canal
    drop(Tap::clean(&filter).await);
}

/// Reads a chunked HTTP/1.1 answer from a raw socket: the head, then body bytes.
struct RawTap {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    head_done: bool,
    body: Vec<u8>,
}

impl RawTap {
    /// Connects with a small receive buffer (a slow reader's socket fills up quickly) and
    /// sends the request; reads nothing yet.
    async fn open(addr: &str, path: &str, token: &str) -> RawTap {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        RawTap {
            stream,
            buf: Vec::new(),
            head_done: false,
            body: Vec::new(),
        }
    }

    /// Reads more and decodes what is complete; returns the complete body lines so far.
    async fn lines(&mut self, deadline: Instant) -> Vec<Value> {
        let mut chunk = [0u8; 65536];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, self.stream.read(&mut chunk))
            .await
            .expect("tap data in time")
            .unwrap();
        assert!(n > 0, "tap closed");
        self.buf.extend_from_slice(&chunk[..n]);
        if !self.head_done {
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Vec::new();
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "{head}"
            );
            self.buf.drain(..end + 4);
            self.head_done = true;
        }
        // chunks: SIZE\r\nDATA\r\n
        while let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.buf[..eol]).unwrap().trim(), 16)
                    .unwrap();
            if self.buf.len() < eol + 2 + size + 2 {
                break;
            }
            self.body
                .extend_from_slice(&self.buf[eol + 2..eol + 2 + size]);
            self.buf.drain(..eol + 2 + size + 2);
        }
        let mut out = Vec::new();
        while let Some(nl) = self.body.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.body.drain(..=nl).collect();
            if line.len() > 1 {
                out.push(serde_json::from_slice(&line).unwrap());
            }
        }
        out
    }
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn the_tap_streams_what_the_consumers_process_and_cannot_slow_the_pipeline() {
    let _lock = canal_lock().await;
    let tbl = "tap_rows";
    table(tbl);
    drop(Tap::clean(&format!("{DB}\\.{tbl}")).await);
    let queue = "cc_e2e_tap";
    delete_queue(queue).await;
    let defs = consumers(tbl);
    let defs: Vec<(&str, &str)> = defs.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect();
    let mut svc = ServiceProc::prepare("tap", queue, &defs, "");
    svc.start().await;
    let token = svc.token();

    // 1. `tail` uses the tap of the running service: only events that fired, with triggers.
    let mut tail = cli(&svc, &["tail", "--fired", "--limit", "5"]);
    let tail = tail.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut tail = Reaped(Some(tail.spawn().unwrap()));
    wait_status(&svc, "the tail attached", |s| s["tap_listeners"] == 1).await;
    insert_range(tbl, 1, 5);
    let got = consume_until(queue, Duration::from_secs(60), |g| g.len() >= 5).await;
    let ids: BTreeMap<i64, String> = got
        .iter()
        .map(|g| {
            let id = g.body["payload"]["id"].as_i64().unwrap();
            (id, g.message_id.clone())
        })
        .collect();
    let out = tail.0.take().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("reading the running service's tap") && !stderr.contains("Canal directly"),
        "{stderr}"
    );
    // the size of one tap line, to size the flood below
    let line_bytes = (out.stdout.len() / 5).max(1);
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (n, l) in lines.iter().enumerate() {
        let row = n as i64 + 1;
        // only `tapped` fired; `watcher` saw the same rows and is filtered out by --fired
        assert_eq!(l["consumer"], "tapped", "{l}");
        assert_eq!(l["event"]["table"], tbl, "{l}");
        assert_eq!(l["event"]["data"]["id"], row, "{l}");
        let t = &l["triggers"][0];
        assert_eq!(
            (t["plugin"].as_str(), t["rule"].as_str()),
            (Some("row_task"), Some("row"))
        );
        assert_eq!(t["priority"], "normal");
        // the very id the message carries on RabbitMQ
        assert_eq!(t["id"].as_str(), ids.get(&row).map(String::as_str), "{l}");
    }
    wait_status(&svc, "the tail detached", |s| s["tap_listeners"] == 0).await;

    // 2. A reader that does not read: its 8-line queue overflows, the pipeline does not care.
    // The service's socket buffers what the reader does not take, up to the kernel's largest
    // send buffer, before the queue fills: send twice that much, so lines must be dropped
    // however far the kernel grows the buffer.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let rows = (2 * wmem_max / line_bytes).max(400) as i64;
    let mut slow = RawTap::open(&svc.admin, "/tap?consumer=tapped&buffer=8", token.expose()).await;
    wait_status(&svc, "the slow reader attached", |s| {
        s["tap_listeners"] == 1
    })
    .await;
    for from in (6..=5 + rows).step_by(1000) {
        insert_range(tbl, from, (from + 999).min(5 + rows));
    }
    // (counted incrementally: the predicate runs once per message)
    let counted = std::cell::Cell::new((0usize, 0usize)); // (messages looked at, new rows)
    let got = consume_until(queue, Duration::from_secs(120), |g| {
        let (looked, mut new) = counted.get();
        new += g[looked..]
            .iter()
            .filter(|m| m.body["payload"]["id"].as_i64().unwrap_or(0) > 5)
            .count();
        counted.set((g.len(), new));
        new >= rows as usize
    })
    .await;
    let delivered: std::collections::BTreeSet<i64> = got
        .iter()
        .filter_map(|m| m.body["payload"]["id"].as_i64())
        .collect();
    assert_eq!(delivered, (6..=5 + rows).collect(), "every row delivered");
    let s = wait_status(&svc, "every batch acked", |s| s["batches_in_flight"] == 0).await;
    assert_eq!(s["canal"]["last_error"], Value::Null, "{s:#}");
    // now read: every row is either a line or counted as dropped
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut dropped) = (Vec::new(), 0u64);
    while (seen.len() as u64 + dropped) < rows as u64 {
        for l in slow.lines(deadline).await {
            match l["dropped"].as_u64() {
                Some(d) => dropped += d,
                None => seen.push(l["event"]["data"]["id"].as_i64().unwrap()),
            }
        }
    }
    assert_eq!(seen.len() as u64 + dropped, rows as u64);
    assert!(dropped > 0, "a reader that does not read must lose lines");
    assert!(seen.len() >= 8, "at least its queue: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in binlog order: {seen:?}"
    );
    println!(
        "slow tap reader: {} lines, {dropped} dropped, all {rows} rows published",
        seen.len()
    );
    drop(slow);

    // 3. enable/disable from the command line, with the token it reads beside the state file
    let out = cli(&svc, &["disable", "watcher"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "watcher: disabled (live, saved)\n"
    );
    let s = svc.status().await;
    assert_eq!(
        s["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "watcher")
            .unwrap()["enabled"],
        false
    );
    // without the token the endpoint refuses and nothing changes
    let r = canal_consumer::admin::client::request(&svc.admin, "POST", "/consumers/watcher/enable")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let out = cli(&svc, &["enable", "watcher"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "watcher: enabled (live, saved)\n"
    );

    // 4. 40 rounds of concurrent enable/disable of both consumers against the live service
    let state_file = canal_consumer::state::StateFile::new(svc.dir.join("state/consumers.json"));
    let (mut errors, mut disagreements) = (0, 0);
    for round in 0..40usize {
        let mut paths: Vec<String> = ["tapped", "watcher"]
            .iter()
            .flat_map(|n| ["enable", "disable"].map(|v| format!("/consumers/{n}/{v}")))
            .collect();
        paths.rotate_left(round % 4);
        let answers = futures::future::join_all(paths.iter().map(|p| {
            canal_consumer::admin::client::request_with(&svc.admin, "POST", p, Some(&token))
        }))
        .await;
        errors += answers
            .iter()
            .filter(|a| a.as_ref().map_or(true, |r| r.status != 200))
            .count();
        let live: BTreeMap<String, bool> = svc.status().await["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["enabled"].as_bool().unwrap(),
                )
            })
            .collect();
        if state_file.load().unwrap() != live {
            disagreements += 1;
        }
    }
    assert_eq!((errors, disagreements), (0, 0));
    svc.terminate(Duration::from_secs(30));
}
