//! The source side: the bench table on MariaDB (`mysql` client as the test user), its rows and
//! inserts, and a bare Canal client on the service's client id.

use crate::accounting::Busy;
use crate::env::{
    canal_host, canal_password, canal_port, canal_user, destination, mysql_client_args,
};
use canal_consumer::canal::{Session, SessionConfig};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

pub(crate) fn mysql(sql: &str) {
    let out = Command::new("mysql")
        .args(mysql_client_args())
        .args(["--batch", "-e", sql])
        .output()
        .expect("mysql client");
    if !out.status.success() {
        MYSQL_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set when a `mysql` command failed (also in another thread), so waits stop.
pub(crate) static MYSQL_FAILED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(crate) fn row(i: u64) -> String {
    format!(
        "({i}, {u}, 'user-{i}@example.com', 'name {i} 测试', {a}.{c:02}, 'paid', NOW(), {s}.5, 'a note for row {i}', {f})",
        u = i % 1000,
        a = i % 10000,
        c = i % 100,
        s = i % 97,
        f = i % 2
    )
}

/// A row whose `score` is the server's clock at the statement (seconds since the epoch).
pub(crate) fn stamped_row(i: u64) -> String {
    format!(
        "({i}, {u}, 'user-{i}@example.com', 'name {i} 测试', {a}.{c:02}, 'paid', NOW(), UNIX_TIMESTAMP(NOW(6)), 'a note for row {i}', {f})",
        u = i % 1000,
        a = i % 10000,
        c = i % 100,
        f = i % 2
    )
}

/// Insert rows `from..=to` in 1,000-row INSERTs through one client, as fast as MariaDB goes.
pub(crate) fn insert_bulk(from: u64, to: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut child = Command::new("mysql")
            .args(mysql_client_args())
            .arg("--batch")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut next = from;
        while next <= to {
            let end = (next + 999).min(to);
            let sql = format!(
                "INSERT INTO cc_bench.rows VALUES {};\n",
                (next..=end).map(row).collect::<Vec<_>>().join(",")
            );
            stdin.write_all(sql.as_bytes()).unwrap();
            next = end + 1;
        }
        drop(stdin);
        assert!(child.wait().unwrap().success());
    })
}

/// A throughput phase under way: its rows being inserted, and the machine's time (and the
/// clock) from its start.
pub(crate) struct Inserting {
    pub(crate) busy: Busy,
    pub(crate) inserter: std::thread::JoinHandle<()>,
}

impl Inserting {
    /// Start inserting `rows` rows from id `from`; `named` are the processes whose CPU the
    /// phase reports.
    pub(crate) fn start(named: &[(&'static str, u32)], from: u64, rows: u64) -> Inserting {
        Inserting {
            busy: Busy::start(named),
            inserter: insert_bulk(from, from + rows - 1),
        }
    }
}

pub(crate) fn create_table() {
    mysql(
        "CREATE DATABASE IF NOT EXISTS cc_bench; DROP TABLE IF EXISTS cc_bench.rows;
         CREATE TABLE cc_bench.rows (id BIGINT PRIMARY KEY, user_id INT, email VARCHAR(128),
           name VARCHAR(64), amount DECIMAL(12,2), status VARCHAR(16), created DATETIME,
           score DOUBLE, note TEXT, flag TINYINT) DEFAULT CHARSET=utf8mb4",
    )
}

/// The `[canal]` settings of the shipped example config (`config/canal-consumer.toml`), which
/// match the local Canal server (its credentials and its memory unit, `mem_unit`), with the
/// environment over it as the service has it (`CANAL_CONSUMER__CANAL__MEM_UNIT=1024` for a
/// Canal server run with its default unit). Loaded once per run.
pub(crate) fn local_canal() -> &'static canal_consumer::config::CanalConfig {
    static CANAL: std::sync::OnceLock<canal_consumer::config::CanalConfig> =
        std::sync::OnceLock::new();
    CANAL.get_or_init(|| {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/canal-consumer.toml");
        canal_consumer::config::load_from(
            Some(&file),
            std::path::Path::new("/nonexistent"),
            std::env::vars(),
            Default::default(),
        )
        .expect("config/canal-consumer.toml loads")
        .canal
    })
}

pub(crate) fn canal_session_config() -> SessionConfig {
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
        max_frame_bytes: 64 << 20,
    }
}

/// A bare Canal client on the service's client id, subscribed as the service will be.
pub(crate) async fn canal_session() -> Session {
    let mut s = Session::connect(&canal_session_config())
        .await
        .expect("canal (deploy/local/up)");
    s.subscribe("cc_bench\\.rows").await.unwrap();
    s.rollback(0).await.unwrap();
    s
}

pub(crate) async fn drain_canal() {
    let mut s = canal_session().await;
    loop {
        let b = s.get(1000, Duration::ZERO).await.unwrap();
        if b.is_empty() {
            break;
        }
        s.ack(b.batch_id).await.unwrap();
    }
}
