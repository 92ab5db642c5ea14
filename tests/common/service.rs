//! Runs the real `canal-consumer` binary against the real servers (see the `CC_TEST_*`
//! settings in `common`), with a config of the test's own (its own queue, admin port, state
//! file and consumer definitions), and reads what it publishes from RabbitMQ. The service
//! process is held by a [`ChildGuard`]: it dies with the test, pass or fail.
#![allow(dead_code)]

use super::proc::ChildGuard;
use super::{
    amqp_url, canal_host, canal_mem_unit, canal_password, canal_port, canal_user, destination,
};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct ServiceProc {
    pub child: Option<ChildGuard>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub admin: String,
    pub queue: String,
    /// Extra environment for the process (e.g. `CANAL_CONSUMER__CANAL__ZK_SERVERS`).
    pub env: Vec<(String, String)>,
}

/// Writes a config for the service into `dir` and returns its path.
pub fn write_config(dir: &Path, queue: &str, admin: &str, extra: &str) -> PathBuf {
    let consumers = dir.join("consumers");
    std::fs::create_dir_all(&consumers).unwrap();
    let text = format!(
        r#"
[canal]
host = "{canal_host}"
port = {canal_port}
destination = "{destination}"
username = "{canal_user}"
password = "{canal_password}"
mem_unit = {canal_mem_unit}
reconnect_min = "100ms"
reconnect_max = "1s"

[amqp]
url = "{amqp_url}"
confirm_timeout = "5s"
reconnect_min = "200ms"
reconnect_max = "2s"

[amqp.queue]
name = "{queue}"
max_priority = 10

[consumers]
dir = "{consumers}"
state_file = "{state}"
restart_min = "50ms"

[admin]
bind = "{admin}"

[log]
level = "info,canal_consumer=debug"
file = "{log}"

[shutdown]
deadline = "20s"
{extra}
"#,
        canal_host = canal_host(),
        canal_port = canal_port(),
        destination = destination(),
        canal_user = canal_user(),
        canal_password = canal_password(),
        canal_mem_unit = canal_mem_unit(),
        amqp_url = amqp_url(),
        consumers = consumers.display(),
        state = dir.join("state/consumers.json").display(),
        log = dir.join("app.log").display(),
    );
    let path = dir.join("canal-consumer.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl ServiceProc {
    /// Prepares a directory with a config and the given consumer files (name, TOML).
    pub fn prepare(
        name: &str,
        queue: &str,
        consumers: &[(&str, &str)],
        extra: &str,
    ) -> ServiceProc {
        let dir = std::env::temp_dir().join(format!("cc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let admin = format!("127.0.0.1:{}", free_port());
        let config = write_config(&dir, queue, &admin, extra);
        for (file, text) in consumers {
            std::fs::write(dir.join("consumers").join(file), text).unwrap();
        }
        ServiceProc {
            child: None,
            dir,
            config,
            admin,
            queue: queue.to_string(),
            env: Vec::new(),
        }
    }

    /// Starts the binary and waits until `/ready` answers 200.
    pub async fn start(&mut self) {
        assert!(self.child.is_none());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.log"))
            .unwrap();
        let child = ChildGuard::spawn(
            "canal-consumer start",
            Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
                .arg("start")
                .arg("--config")
                .arg(&self.config)
                .env_remove("RUST_LOG")
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::null())
                .stderr(out),
        );
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60)).await;
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) =
                canal_consumer::admin::client::request(&self.admin, "GET", "/ready").await
                && r.status == 200
            {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()
            {
                panic!("canal-consumer exited early ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "canal-consumer not ready in time:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub async fn status(&self) -> Value {
        canal_consumer::admin::client::fetch_status(&self.admin)
            .await
            .expect("status")
    }

    /// The admin token the service generated beside its state file.
    pub fn token(&self) -> canal_consumer::admin::access::Token {
        let path = self.dir.join("state").join("admin.token");
        canal_consumer::admin::access::Token::read(&path)
            .expect("readable token file")
            .expect("the service wrote its token file")
    }

    /// A POST with the admin token.
    pub async fn post(&self, path: &str) -> u16 {
        canal_consumer::admin::client::request_with(&self.admin, "POST", path, Some(&self.token()))
            .await
            .expect("admin request")
            .status
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = canal_consumer::admin::client::request(&self.admin, "GET", path)
            .await
            .expect("admin request");
        (r.status, r.body)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL and panic after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        c.signal("TERM");
        match c.wait_timeout(timeout) {
            Some(status) => (status, started.elapsed()),
            None => {
                c.kill();
                panic!("canal-consumer did not exit within {timeout:?} after SIGTERM");
            }
        }
    }
}

/// A lapin connection for reading what the service published.
pub async fn amqp() -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable (deploy/local/up)");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

pub async fn delete_queue(queue: &str) {
    let (conn, ch) = amqp().await;
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// Messages ready in `queue` now (a passive declare; the queue must exist).
pub async fn queue_depth(queue: &str) -> u32 {
    let (conn, ch) = amqp().await;
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"));
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

pub async fn purge_queue(queue: &str) {
    let (conn, ch) = amqp().await;
    let _ = ch
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// A message as the tests look at it.
#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: String,
    pub priority: Option<u8>,
    pub body: Value,
}

/// Consumes `queue` until `done(messages so far)` holds, or panics after `timeout`.
pub async fn consume_until(
    queue: &str,
    timeout: Duration,
    done: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let (conn, ch) = amqp().await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "test-reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) {
        let next = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("timed out on {queue} with {} messages", got.len()));
        let d = next.expect("consumer open").expect("delivery");
        got.push(Got {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            priority: *d.properties.priority(),
            body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
        });
    }
    let _ = conn.close(200, "bye".into()).await;
    got
}

/// Polls the service's `/status` until `ok` holds; fails (with the status and the service's
/// log) after 90 s.
pub async fn wait_status(svc: &ServiceProc, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = svc.status().await;
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}: {s:#}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Consumer `name` in a status document.
pub fn consumer<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["consumers"]
        .as_array()
        .expect("consumers in status")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no consumer {name} in {status:#}"))
}

/// A reader that takes every message of a queue as it arrives, in the queue's order, in the
/// background, for tests that must act while messages come in (and see the order they came
/// in). Stops reading when dropped.
pub struct Arrivals {
    got: std::sync::Arc<std::sync::Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
    conn: Connection,
}

impl Arrivals {
    /// Starts reading `queue` (it must exist).
    pub async fn start(queue: &str) -> Arrivals {
        let (conn, ch) = amqp().await;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "test-arrivals".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = std::sync::Arc::clone(&got);
        let task = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                into.lock().unwrap().push(Got {
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    priority: *d.properties.priority(),
                    body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                });
            }
        });
        Arrivals { got, task, conn }
    }

    /// The messages so far, in arrival order.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `done(messages so far)` holds; panics after `within`.
    pub async fn wait(&self, what: &str, within: Duration, done: impl Fn(&[Got]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if done(&self.got.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what} within {within:?}: {} messages",
                self.got.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops reading and returns everything, in arrival order.
    pub async fn finish(self) -> Vec<Got> {
        self.task.abort();
        let _ = self.conn.close(200, "bye".into()).await;
        self.got()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.task.abort();
    }
}
