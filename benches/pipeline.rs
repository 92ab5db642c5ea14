//! End-to-end benchmark against the real services (`deploy/local/up` first):
//! MariaDB insert -> Canal -> canal-consumer (release build) -> confirmed publish on RabbitMQ.
//!
//! Run: `cargo bench --bench pipeline` (env: `BENCH_ROWS`, default 50000; `BENCH_RATE`,
//! default 200 rows/s; `BENCH_SECONDS`, default 15). It reports:
//! - throughput: rows/s from the first INSERT to the last broker confirm (read from the
//!   service's status), with rows inserted as fast as MariaDB takes them;
//! - latency: p50/p99 from commit to arrival at a queue consumer (which comes after the
//!   broker accepted and confirmed it), one autocommit INSERT at a time at a fixed rate;
//! - peak RSS of the service process (VmHWM).
//!
//! Results go to stdout and `target/bench-pipeline.json`.
// A benchmark stops at the first failed setup step; unwrap is that stop (lint policy:
// Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::canal::{Session, SessionConfig};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const QUEUE: &str = "cc_bench";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mysql(sql: &str) {
    let out = Command::new("mysql")
        .args(["-h127.0.0.1", "-utest", "-ptest", "--batch", "-e", sql])
        .output()
        .expect("mysql client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn row(i: u64) -> String {
    format!(
        "({i}, {u}, 'user-{i}@example.com', 'name {i} 测试', {a}.{c:02}, 'paid', NOW(), {s}.5, 'a note for row {i}', {f})",
        u = i % 1000,
        a = i % 10000,
        c = i % 100,
        s = i % 97,
        f = i % 2
    )
}

async fn status(addr: &str) -> serde_json::Value {
    canal_consumer::admin::client::fetch_status(addr)
        .await
        .unwrap_or(serde_json::Value::Null)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn drain_canal() {
    let cfg = SessionConfig {
        host: "127.0.0.1".into(),
        port: 11111,
        destination: "example".into(),
        client_id: "1001".into(),
        username: "canal".into(),
        password: "canal".into(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(600),
        max_frame_bytes: 64 << 20,
    };
    let mut s = Session::connect(&cfg)
        .await
        .expect("canal (deploy/local/up)");
    s.subscribe("cc_bench\\.rows").await.unwrap();
    s.rollback(0).await.unwrap();
    loop {
        let b = s.get(1000, Duration::from_millis(300)).await.unwrap();
        if b.is_empty() {
            break;
        }
        s.ack(b.batch_id).await.unwrap();
    }
}

fn start_service(dir: &std::path::Path, admin: &str) -> Child {
    std::fs::create_dir_all(dir.join("consumers")).unwrap();
    std::fs::write(
        dir.join("consumers/bench.toml"),
        r#"
[consumers.bench]
[[consumers.bench.filters]]
database = "cc_bench"
table = "rows"
events = ["INSERT"]
[[consumers.bench.rules]]
name = "row"
plugin = "bench_task"
payload = { id = "${data.id}", user_id = "${data.user_id}", email = "${data.email}", amount = "${data.amount}" }
"#,
    )
    .unwrap();
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[canal]
username = "canal"
password = "canal"
[amqp]
url = "{AMQP}"
[amqp.queue]
name = "{QUEUE}"
[consumers]
dir = "{consumers}"
state_file = "{state}"
[admin]
bind = "{admin}"
[log]
level = "warn"
"#,
            consumers = dir.join("consumers").display(),
            state = dir.join("state.json").display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
        .args(["start", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("service.log")).unwrap())
        .spawn()
        .expect("canal-consumer")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --all-targets` lists benches; nothing to list here
    }
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("pipeline bench: run with `cargo bench --bench pipeline`; skipping");
        return;
    }
    let rows = env_num("BENCH_ROWS", 50_000);
    let rate = env_num("BENCH_RATE", 200);
    let seconds = env_num("BENCH_SECONDS", 15);

    mysql(
        "CREATE DATABASE IF NOT EXISTS cc_bench; DROP TABLE IF EXISTS cc_bench.rows;
         CREATE TABLE cc_bench.rows (id BIGINT PRIMARY KEY, user_id INT, email VARCHAR(128),
           name VARCHAR(64), amount DECIMAL(12,2), status VARCHAR(16), created DATETIME,
           score DOUBLE, note TEXT, flag TINYINT) DEFAULT CHARSET=utf8mb4",
    );
    drain_canal().await;
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;

    let dir = std::env::temp_dir().join("cc-bench-pipeline");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let mut service = start_service(&dir, &admin);
    let ready_by = Instant::now() + Duration::from_secs(60);
    while canal_consumer::admin::client::request(&admin, "GET", "/ready")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            Instant::now() < ready_by,
            "service not ready; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // keep the queue short: a consumer drops everything during the throughput phase
    let mut sink = ch
        .basic_consume(
            QUEUE.into(),
            "bench-sink".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // ---- throughput
    let t0 = Instant::now();
    let chunk = 1000;
    let mut next = 1;
    let mut inserted_at = None;
    {
        let mut sql = String::new();
        while next <= rows {
            let end = (next + chunk - 1).min(rows);
            sql.push_str("INSERT INTO cc_bench.rows VALUES ");
            sql.push_str(&(next..=end).map(row).collect::<Vec<_>>().join(","));
            sql.push_str(";\n");
            next = end + 1;
        }
        let mut child = Command::new("mysql")
            .args(["-h127.0.0.1", "-utest", "-ptest", "--batch"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        child.wait().unwrap();
        inserted_at.get_or_insert(t0.elapsed());
    }
    let mut drained = 0u64;
    let confirmed_by = Instant::now() + Duration::from_secs(600);
    let elapsed = loop {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(1), sink.next()).await
        {
            drained += 1;
        }
        let s = status(&admin).await;
        let confirmed = s["broker"]["confirmed"].as_u64().unwrap_or(0);
        if confirmed >= rows {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < confirmed_by,
            "only {confirmed} of {rows} confirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let throughput = rows as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {rows} rows in {:.2}s = {throughput:.0} rows/s (inserts took {:.2}s)",
        elapsed.as_secs_f64(),
        inserted_at.unwrap().as_secs_f64()
    );
    // empty the queue before measuring latency
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(500), sink.next()).await
    {
        drained += 1;
    }
    let _ = drained;

    // ---- latency at a fixed rate
    let total = rate * seconds;
    let mut sent: Vec<Option<Instant>> = vec![None; total as usize + 1];
    let mut got: Vec<Option<Instant>> = vec![None; total as usize + 1];
    let mut writer = Command::new("mysql")
        .args(["-h127.0.0.1", "-utest", "-ptest", "--batch", "--unbuffered"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let base = rows + 1;
    let mut i = 0u64;
    let mut received = 0u64;
    let deadline = start + Duration::from_secs(seconds + 60);
    while received < total && Instant::now() < deadline {
        let due = start + period * i as u32;
        if i < total && Instant::now() >= due {
            let id = base + i;
            writeln!(stdin, "INSERT INTO cc_bench.rows VALUES {};", row(id)).unwrap();
            stdin.flush().unwrap();
            sent[i as usize] = Some(Instant::now());
            i += 1;
            continue;
        }
        let wait = if i < total {
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(50)
        };
        if let Ok(Some(Ok(d))) = tokio::time::timeout(wait, sink.next()).await {
            let now = Instant::now();
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
            if let Some(id) = body["payload"]["id"].as_u64()
                && id >= base
                && got[(id - base) as usize].is_none()
            {
                got[(id - base) as usize] = Some(now);
                received += 1;
            }
        }
    }
    drop(stdin);
    let _ = writer.wait();
    let mut lat: Vec<f64> = sent
        .iter()
        .zip(&got)
        .filter_map(|(s, g)| Some(g.as_ref()?.duration_since(*s.as_ref()?).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    println!(
        "latency at {rate} rows/s for {seconds}s: {} rows, p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
        lat.len(),
        lat.last().copied().unwrap_or(f64::NAN)
    );

    let rss = peak_rss_kib(service.id());
    println!("service peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    let _ = Command::new("kill").arg(service.id().to_string()).status();
    let _ = service.wait();
    let report = serde_json::json!({
        "rows": rows, "elapsed_s": elapsed.as_secs_f64(), "rows_per_s": throughput,
        "latency_rate": rate, "latency_rows": lat.len(), "p50_ms": p50, "p99_ms": p99,
        "peak_rss_kib": rss,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pipeline.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap());
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
}
