//! Shared helpers for tests against the real local services (`deploy/local/up`):
//! MariaDB on 127.0.0.1:3306, the Canal server on 127.0.0.1:11111 (destination `example`),
//! RabbitMQ on 127.0.0.1:5672.
//!
//! Canal serves one client per destination, so every test that talks to it takes
//! [`canal_lock`] first. Tests write to their own tables and ignore the rest of the stream.
#![allow(dead_code)]

pub mod service;

use canal_consumer::canal::{Session, SessionConfig};
use canal_consumer::event::ChangeEvent;
use std::process::Command;
use std::time::{Duration, Instant};

pub const CANAL_USER: &str = "canal";
pub const CANAL_PASSWORD: &str = "canal";

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
        .args([
            "-h127.0.0.1",
            "-P3306",
            "-utest",
            "-ptest",
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
        host: "127.0.0.1".into(),
        port: 11111,
        destination: "example".into(),
        client_id: "1001".into(),
        username: CANAL_USER.into(),
        password: CANAL_PASSWORD.into(),
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

    /// Connects, subscribes and rolls back (what every (re)connect does).
    pub async fn connect(filter: &str) -> Tap {
        let mut session = Session::connect(&session_config())
            .await
            .unwrap_or_else(|e| panic!("canal server reachable (run deploy/local/up): {e}"));
        session.subscribe(filter).await.expect("subscribe");
        session.rollback(0).await.expect("rollback");
        Tap {
            session,
            filter: filter.to_string(),
        }
    }

    /// Acks everything currently available.
    pub async fn drain(&mut self) {
        loop {
            let b = self
                .session
                .get(1000, Duration::from_millis(300))
                .await
                .expect("get");
            if b.is_empty() {
                return;
            }
            self.session.ack(b.batch_id).await.expect("ack");
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
        self.collect_matching(ack, timeout, |e| e.table == table && !e.is_ddl, done)
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
            canal_consumer::canal::decode::decode_entries("example", &b.entries, &mut decoded)
                .expect("decodes");
            events.extend(decoded.into_iter().filter(|e| keep(e)));
            if ack {
                self.session.ack(b.batch_id).await.expect("ack");
            }
        }
        (events, ids)
    }
}

/// Runs a project script (e.g. `deploy/local/canal-ctl stop`).
pub fn script(path: &str, args: &[&str]) {
    let status = Command::new(repo_root().join(path))
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(status.success(), "{path} {args:?} failed");
}
