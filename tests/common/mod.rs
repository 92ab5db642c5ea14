//! Shared helpers for tests against the real servers. By default they are the local stack of
//! `deploy/local/up` (MariaDB on 127.0.0.1:3306, the Canal server on 127.0.0.1:11111 with
//! destination `example`, RabbitMQ on 127.0.0.1:5672); the `CC_TEST_*` environment variables
//! below point the tests at any other stack (deploy/local/README.md lists them).
//!
//! Canal serves one client per destination, so every test that talks to it takes
//! [`canal_lock`] first. Tests write to their own tables and ignore the rest of the stream.
//! Every process a test starts is held by a [`proc::ChildGuard`], which kills it when the test
//! ends, pass or fail.
#![allow(dead_code)]

pub mod backfill;
mod env;
pub mod hold;
pub mod proc;
pub mod promql;
pub mod service;

pub use env::*;

use canal_consumer::canal::{Session, SessionConfig};
use canal_consumer::event::ChangeEvent;
use std::process::Command;
use std::time::{Duration, Instant};

/// A test queue's name: `CC_TEST_QUEUE_PREFIX` (default empty) + `name`, so runs against a
/// shared broker can keep their queues apart.
pub fn queue(name: &str) -> String {
    format!("{}{name}", env_or("CC_TEST_QUEUE_PREFIX", ""))
}
/// `rabbitmqctl` aimed at the test broker's node: `-n $CC_TEST_RABBIT_NODE` when set, else
/// rabbitmqctl's default (the local node, `rabbit@<short host name>`). Only the tests that
/// disturb the broker (stop it, raise an alarm) need it, so they need the broker's host.
pub fn rabbitmqctl_cmd() -> Command {
    let mut cmd = Command::new("rabbitmqctl");
    if let Ok(node) = std::env::var("CC_TEST_RABBIT_NODE")
        && !node.is_empty()
    {
        cmd.arg("-n").arg(node);
    }
    cmd
}

/// The Celery executable (`CELERY_BIN`, default the venv `deploy/local/up` creates).
pub fn celery_bin() -> String {
    env_or("CELERY_BIN", "/var/tmp/canal-consumer/venv/bin/celery")
}

/// Serialises the tests of one test binary that use the Canal destination.
pub async fn canal_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs SQL through the real `mysql` client as the test user; panics with its stderr.
pub fn mysql(sql: &str) -> String {
    let out = Command::new("mysql")
        .args(mysql_client_args())
        .args([
            "--batch",
            "--skip-column-names",
            "--default-character-set=utf8mb4",
            "-e",
            sql,
        ])
        .output()
        .expect("the mysql client is installed (deploy/local/up)");
    assert!(
        out.status.success(),
        "mysql failed: {}\nSQL: {sql}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn session_config() -> SessionConfig {
    SessionConfig {
        host: canal_host(),
        port: canal_port(),
        destination: destination(),
        client_id: "1001".into(),
        username: canal_user(),
        password: canal_password(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(600),
        max_frame_bytes: canal_consumer::canal::codec::DEFAULT_MAX_FRAME_BYTES,
    }
}

/// A raw Canal session for precise control over get/ack/rollback.
pub struct Tap {
    pub session: Session,
    pub filter: String,
}

impl Tap {
    /// Connects, subscribes with `filter`, rolls back, and acks everything already queued
    /// so the test starts from a clean stream.
    pub async fn clean(filter: &str) -> Tap {
        let mut tap = Tap::connect(filter).await;
        tap.drain().await;
        tap
    }

    /// Connects, subscribes and rolls back (what every (re)connect does). The subscription
    /// also takes `cc_tap.marker`, the table [`Tap::drain`] writes its marker to.
    pub async fn connect(filter: &str) -> Tap {
        let mut session = Session::connect(&session_config())
            .await
            .unwrap_or_else(|e| panic!("canal server reachable (run deploy/local/up): {e}"));
        session
            .subscribe(&format!("{filter},{MARKER_TABLE_REGEX}"))
            .await
            .expect("subscribe");
        session.rollback(0).await.expect("rollback");
        Tap {
            session,
            filter: filter.to_string(),
        }
    }

    /// Acks everything up to the binlog's end as it is now: a marker row is written (to
    /// `cc_tap.marker`, which every tap subscribes to and no test reads), and batches are acked
    /// until one reaches the end of its transaction. (An empty GET is no proof: on a loaded
    /// machine Canal may not have parsed the last transactions yet, and a test then saw its own
    /// set-up rows.)
    pub async fn drain(&mut self) {
        let target = binlog_marker();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(
                Instant::now() < deadline,
                "Canal did not ship the binlog up to {target:?} within 90 s"
            );
            let b = self
                .session
                .get(1000, Duration::from_millis(300))
                .await
                .expect("get");
            if b.is_empty() {
                continue;
            }
            let reached = b
                .entries
                .iter()
                .any(|e| entry_end(e) >= Some(target.clone()));
            self.session.ack(b.batch_id).await.expect("ack");
            if reached {
                return;
            }
        }
    }

    /// Gets batches until `done(events so far)` holds, acking each batch if `ack`.
    /// Returns the row events of `table` (in arrival order) and the batch ids seen. DDL is
    /// left out: the test's own CREATE TABLE may still be on its way when the test starts.
    pub async fn collect(
        &mut self,
        table: &str,
        ack: bool,
        timeout: Duration,
        done: impl Fn(&[ChangeEvent]) -> bool,
    ) -> (Vec<ChangeEvent>, Vec<i64>) {
        self.collect_matching(ack, timeout, |e| &*e.table == table && !e.is_ddl, done)
            .await
    }

    /// Like `collect`, keeping the events for which `keep` holds.
    pub async fn collect_matching(
        &mut self,
        ack: bool,
        timeout: Duration,
        keep: impl Fn(&ChangeEvent) -> bool,
        done: impl Fn(&[ChangeEvent]) -> bool,
    ) -> (Vec<ChangeEvent>, Vec<i64>) {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        let mut ids = Vec::new();
        while !done(&events) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for events; got {}: {:?}",
                events.len(),
                events
                    .iter()
                    .map(|e: &ChangeEvent| e.position.to_string())
                    .collect::<Vec<_>>()
            );
            let b = self
                .session
                .get(1000, Duration::from_millis(200))
                .await
                .expect("get");
            if b.is_empty() {
                continue;
            }
            ids.push(b.batch_id);
            let mut decoded = Vec::new();
            canal_consumer::canal::decode::decode_entries(&destination(), &b.entries, &mut decoded)
                .expect("decodes");
            events.extend(decoded.into_iter().filter(|e| keep(e)));
            if ack {
                self.session.ack(b.batch_id).await.expect("ack");
            }
        }
        (events, ids)
    }
}

/// The table of [`binlog_marker`], as a Canal filter.
const MARKER_TABLE_REGEX: &str = "cc_tap\\.marker";

/// Writes a marker row (`cc_tap.marker`: only taps subscribe to it) and returns the binlog
/// position after its transaction: `(file, offset)`.
fn binlog_marker() -> (String, i64) {
    let out = mysql(
        "CREATE DATABASE IF NOT EXISTS cc_tap;
         CREATE TABLE IF NOT EXISTS cc_tap.marker (id INT PRIMARY KEY AUTO_INCREMENT);
         INSERT INTO cc_tap.marker () VALUES ();
         SHOW MASTER STATUS;",
    );
    let line = out.lines().last().unwrap_or_default();
    let mut f = line.split('\t');
    let (Some(file), Some(pos)) = (f.next(), f.next().and_then(|p| p.parse().ok())) else {
        panic!("SHOW MASTER STATUS gave {out:?}");
    };
    (file.to_string(), pos)
}

/// Where an entry ends in the binlog: `(file, offset + length)`.
fn entry_end(entry: &[u8]) -> Option<(String, i64)> {
    use prost::Message as _;
    let h = canal_consumer::canal::proto::entry::Entry::decode(entry)
        .ok()?
        .header?;
    Some((h.logfile_name, h.logfile_offset + h.event_length))
}

/// Runs a project script (e.g. `deploy/local/canal-ctl stop`), killing it after 5 minutes.
/// These scripts drive the local stack only.
pub fn script(path: &str, args: &[&str]) {
    let out = proc::output_within(
        path,
        Command::new(repo_root().join(path)).args(args),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{path} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Celery worker (`tests/workers/tasks.py`, one process, solo pool) consuming `queue`;
/// every task it runs is appended to `<dir>/tasks.jsonl` (returned), its log goes to
/// `<dir>/worker.log`. Killed when the guard drops.
pub fn celery_worker(queue: &str, dir: &std::path::Path) -> (proc::ChildGuard, std::path::PathBuf) {
    celery_worker_on(queue, dir, &amqp_url(), &[])
}

/// [`celery_worker`] on the broker at `broker_url` (Celery's `;`-separated failover list), with
/// more environment for `tests/workers/tasks.py`.
pub fn celery_worker_on(
    queue: &str,
    dir: &std::path::Path,
    broker_url: &str,
    env: &[(&str, String)],
) -> (proc::ChildGuard, std::path::PathBuf) {
    let out = dir.join("tasks.jsonl");
    let worker = proc::ChildGuard::spawn(
        "celery worker",
        Command::new(celery_bin())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args([
                "-A",
                "tasks",
                "worker",
                "-Q",
                queue,
                "-c",
                "1",
                "--pool",
                "solo",
                "--loglevel",
                "WARNING",
            ])
            .current_dir(repo_root().join("tests/workers"))
            .env("TASKS_OUT", &out)
            .env("CELERY_BROKER_URL", broker_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("worker.log")).expect("worker log file")),
    );
    (worker, out)
}

/// The JSON objects of a JSON-lines file written so far (none if it does not exist yet).
pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// (Re)creates `db`.`table` as `(id INT PRIMARY KEY, note VARCHAR(20))`, the end-to-end tests'
/// row table.
pub fn note_table(db: &str, table: &str) {
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {db}; DROP TABLE IF EXISTS {db}.{table}; \
         CREATE TABLE {db}.{table} (id INT PRIMARY KEY, note VARCHAR(20))"
    ));
}

/// Inserts rows `from..=to` (`note` = `n<id>`) into a [`note_table`], 1,000 per statement.
pub fn insert_notes(db: &str, table: &str, from: i64, to: i64) {
    let mut start = from;
    while start <= to {
        let end = (start + 999).min(to);
        let values: Vec<String> = (start..=end).map(|i| format!("({i}, 'n{i}')")).collect();
        mysql(&format!(
            "INSERT INTO {db}.{table} VALUES {}",
            values.join(",")
        ));
        start = end + 1;
    }
}
