//! End-to-end benchmark against the real services (`deploy/local/up` first):
//! MariaDB insert -> Canal -> canal-consumer (release build) -> confirmed publish on RabbitMQ.
//!
//! Run it under the stack lock: `flock -o /tmp/cc-stack.lock cargo bench --bench pipeline`
//! (a few minutes), or `BENCH_QUICK=1` for the small-N mode CI runs (under a minute after the
//! build). Every speed figure is printed beside a limit measured in the same run:
//!
//! - **broker probe**: this process publishes messages of the same size, properties and
//!   durability as the service's (a copy of one it published) with publisher confirms, the
//!   same window (`amqp.max_unconfirmed`), to a fresh queue of the same type and arguments, as
//!   fast as the broker confirms them (each publish is handed to lapin without waiting for its
//!   write, as the service does). Run before and after the service's throughput phase; the
//!   limit is their mean.
//! - **Canal probe**: before the service starts, the same rows inserted the same way are read
//!   by a bare client on the service's client id (GET without waiting, decode, ack, nothing
//!   published): the source's own rate, and at the latency rates the source's own latency
//!   (fetching as the service does: long poll for the smallest batch after an empty GET).
//! - **ceiling**: after the service has stopped, the Canal probe and the broker probe run at
//!   once (new rows, the same number of messages): what the machine does when the source and a
//!   bare publisher share it with nothing in between, the most any service could reach here.
//! - **machine busy**: `/proc/stat` over the first broker probe, the throughput phases and the
//!   ceiling, split into this process, the service, the broker, the Canal server, MariaDB (the
//!   local services by their pid files) and the rest: on a small machine the phases compete for
//!   the same cores, and this shows how.
//! - **throughput**: `BENCH_ROWS` rows (10 columns) in 1,000-row INSERTs as fast as MariaDB
//!   takes them; time from the first INSERT until every trigger's message has arrived at the
//!   queue's consumer and the service's `/status` counts them all confirmed (`/status` is read
//!   only then, so the measurement adds no admin requests while rows flow); the ratio to the
//!   probes; CPU seconds of the service process per 10k rows (utime + stime from
//!   `/proc/<pid>/stat`).
//! - **throughput, queue piling up**: the same with no consumer on the service's queue, against
//!   the broker probe to a queue without consumer (before and after): how issue 11 measured the
//!   broker's rate. The broker then writes every message to disk and its queue process is the
//!   limit; drained, it skips the disk and the machine's cores are.
//! - **latency** at fixed rates (`BENCH_RATES`, default 5, 200 and 1,000 rows/s; 5 rows/s shows
//!   the quiet-table case, where Canal's MEMSIZE mode makes a long poll wait): single-row
//!   autocommit INSERTs whose `score` column is the server's `UNIX_TIMESTAMP(NOW(6))`; latency is
//!   the arrival time at a queue consumer minus that stamp (statement start, so it includes the
//!   commit itself; same host clock).
//! - **idle CPU**: the service's CPU seconds per minute with nothing to do.
//! - **memory**: the service's RSS through one `BENCH_BIG_TX`-row transaction (default 500,000)
//!   and its peak (`VmHWM`) over the whole run.
//! - **priority probes** (full mode): the probe again against queues with no `x-max-priority`
//!   and with 3, 5 and 10 levels.
//!
//! `BENCH_PERF=<file>` records the service's stacks with `perf` during the throughput phase.
//! `BENCH_BULK=<max_rows>` gives the bench rule `batch = { max_rows, max_wait = "50ms" }` and
//! runs only the probes and the throughput phase, timed until every row has arrived at the
//! queue's consumer (`target/bench-pipeline-bulk.json`).
//!
//! `BENCH_BACKFILL=1` runs the backfill phases instead (issue 21; `pipeline/backfill.rs`): per-row
//! and bulk backfill throughput against the broker probe, and the live latency phase without
//! and with a backfill running (`target/bench-pipeline-backfill.json`; knobs
//! `BENCH_BACKFILL_ROWS`, `BENCH_BACKFILL_CHUNK`, `BENCH_BACKFILL_BULK`, `BENCH_BACKFILL_RATES`,
//! `BENCH_BACKFILL_THROTTLE`).
//!
//! Knobs: `BENCH_QUICK`, `BENCH_ROWS`, `BENCH_RATES`, `BENCH_SECONDS`, `BENCH_IDLE_SECONDS`,
//! `BENCH_BIG_TX`, `BENCH_MAX_PRIORITY` (`none` or a number: the bench queue's
//! `amqp.queue.max_priority`), `BENCH_PRIORITY_PROBES` (0/1), `BENCH_BULK`. The service
//! inherits the environment, so its settings can be tried with `CANAL_CONSUMER__…` variables.
//! Results go to stdout and `target/bench-pipeline.json`. The HA Canal cluster of
//! `deploy/local/up` parses the same binlog: the bench says so when it runs; stop it for figures
//! (`deploy/local/canal-ha-ctl all stop`).
// A benchmark stops at the first failed setup step; unwrap is that stop (lint policy:
// Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::canal::window::took_all;
use canal_consumer::canal::{Session, SessionConfig};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::VecDeque;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `BENCH_CLUSTER=1`: the three-node cluster of `deploy/local/rabbit-cluster-ctl` and a quorum
/// queue (README "RabbitMQ cluster" topology) instead of the single node and a classic queue;
/// the run ends after the throughput phase with RabbitMQ PerfTest's confirmed-publish rate to
/// the same kind of queue (`deploy/local/perftest`).
fn cluster() -> bool {
    std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1")
}

/// The cluster's node URLs (`CC_TEST_AMQP_CLUSTER_URLS`, comma-separated).
fn cluster_urls() -> Vec<String> {
    std::env::var("CC_TEST_AMQP_CLUSTER_URLS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            "amqp://guest:guest@127.0.0.1:5781/%2f,amqp://guest:guest@127.0.0.1:5782/%2f,amqp://guest:guest@127.0.0.1:5783/%2f".into()
        })
        .split(',')
        .map(|u| u.trim().to_string())
        .collect()
}

/// The broker the bench itself talks to: the single node, or the cluster's first node.
fn amqp_url() -> String {
    if cluster() {
        cluster_urls()[0].clone()
    } else {
        AMQP.to_string()
    }
}

/// The quorum queue settings of the cluster mode, for the service and the probes alike.
fn quorum_queue() -> canal_consumer::config::QueueConfig {
    canal_consumer::config::QueueConfig {
        name: QUEUE.into(),
        max_priority: None,
        queue_type: canal_consumer::config::QueueType::Quorum,
        dead_letter_exchange: format!("{QUEUE}.dlx"),
        dead_letter_strategy: canal_consumer::config::DeadLetterStrategy::AtLeastOnce,
        delivery_limit: Some(5),
        ..Default::default()
    }
}

/// RabbitMQ PerfTest (from Maven Central, `deploy/local/perftest/fetch`): one producer with
/// `window` unconfirmed, persistent `size`-byte messages to a fresh quorum queue drained by one
/// consumer, for `seconds`. Its average confirmed-publish rate, msg/s.
fn perftest(url: &str, size: usize, window: usize, seconds: u64) -> f64 {
    let fetch =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/perftest/fetch");
    let out = Command::new(&fetch)
        .output()
        .expect("deploy/local/perftest/fetch");
    assert!(
        out.status.success(),
        "fetching PerfTest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{lib}/*"))
        .arg("com.rabbitmq.perf.PerfTest")
        .args([
            "--uri",
            url,
            "--queue",
            "cc_bench_perftest",
            "--quorum-queue",
        ])
        .args([
            "--flag",
            "persistent",
            "--producers",
            "1",
            "--consumers",
            "1",
        ])
        .args([
            "--confirm",
            &window.to_string(),
            "--size",
            &size.to_string(),
        ])
        .args(["--time", &seconds.to_string(), "--auto-delete", "false"])
        .output()
        .expect("java (PerfTest)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter_map(|l| l.split("sending rate avg:").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .next_back()
        .unwrap_or_else(|| {
            panic!(
                "no rate in PerfTest's output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[path = "pipeline/backfill.rs"]
mod backfill;

const QUEUE: &str = "cc_bench";
/// `canal.source_url` of a service with backfills: the `backfill` account of
/// deploy/local/mariadb/users.sql (the grants the README documents).
const BACKFILL_SOURCE: &str = "mysql://backfill:backfill@127.0.0.1:3306";
const PROBE_QUEUE: &str = "cc_bench_probe";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Opts {
    quick: bool,
    rows: u64,
    rates: Vec<u64>,
    seconds: u64,
    idle_seconds: u64,
    big_tx: u64,
    max_priority: Option<u8>,
    priority_probes: bool,
    /// `BENCH_BULK=<max_rows>`: the bench rule batches rows into bulk messages; only the probes
    /// and the throughput phase run.
    bulk: Option<u64>,
    /// `BENCH_BACKFILL=1`: only the backfill phases run ([`backfill`]).
    backfill: bool,
    /// `BENCH_BACKFILL_ROWS`: rows in the table the backfills read.
    backfill_rows: u64,
    /// `BENCH_BACKFILL_CHUNK`: `chunk` of the backfills (the service's default without).
    backfill_chunk: Option<u64>,
    /// `BENCH_BACKFILL_BULK`: `max_rows` of the bulk consumer's rule.
    backfill_bulk: u64,
    /// `BENCH_BACKFILL_RATES`: live rows/s of the latency phases with and without a backfill.
    backfill_rates: Vec<u64>,
    /// `BENCH_BACKFILL_THROTTLE=<chunk>,<rate>`: the throttled per-row backfill of the latency
    /// phases.
    backfill_throttle: (u64, u64),
}

fn rates_env(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: rows/s, comma separated"))
        })
        .collect()
}

impl Opts {
    fn from_env() -> Opts {
        let quick = env_num("BENCH_QUICK", 0) != 0;
        let defaults = canal_consumer::config::Config::default();
        let max_priority = match std::env::var("BENCH_MAX_PRIORITY") {
            Ok(v) if v == "none" || v == "0" => None,
            Ok(v) => Some(v.parse().expect("BENCH_MAX_PRIORITY: `none` or 1..=255")),
            Err(_) => defaults.amqp.queue.max_priority,
        };
        Opts {
            quick,
            rows: env_num("BENCH_ROWS", if quick { 5_000 } else { 50_000 }),
            rates: rates_env("BENCH_RATES", "5,200,1000"),
            seconds: env_num("BENCH_SECONDS", if quick { 3 } else { 10 }),
            idle_seconds: env_num("BENCH_IDLE_SECONDS", if quick { 5 } else { 20 }),
            big_tx: env_num("BENCH_BIG_TX", if quick { 20_000 } else { 500_000 }),
            max_priority,
            priority_probes: env_num("BENCH_PRIORITY_PROBES", if quick { 0 } else { 1 }) != 0,
            bulk: std::env::var("BENCH_BULK").ok().map(|v| {
                v.parse()
                    .expect("BENCH_BULK: rows per bulk message (max_rows)")
            }),
            backfill: env_num("BENCH_BACKFILL", 0) != 0,
            backfill_rows: env_num("BENCH_BACKFILL_ROWS", if quick { 50_000 } else { 500_000 }),
            backfill_chunk: std::env::var("BENCH_BACKFILL_CHUNK").ok().map(|v| {
                v.parse()
                    .expect("BENCH_BACKFILL_CHUNK: rows per chunk (1..=100000)")
            }),
            backfill_bulk: env_num("BENCH_BACKFILL_BULK", 500),
            backfill_rates: rates_env("BENCH_BACKFILL_RATES", "200,1000"),
            backfill_throttle: {
                let v = rates_env("BENCH_BACKFILL_THROTTLE", "100,1000");
                assert!(v.len() == 2, "BENCH_BACKFILL_THROTTLE: <chunk>,<rows/s>");
                (v[0], v[1])
            },
        }
    }
}

fn mysql(sql: &str) {
    let out = Command::new("mysql")
        .args(["-h127.0.0.1", "-utest", "-ptest", "--batch", "-e", sql])
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
static MYSQL_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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

/// A row whose `score` is the server's clock at the statement (seconds since the epoch).
fn stamped_row(i: u64) -> String {
    format!(
        "({i}, {u}, 'user-{i}@example.com', 'name {i} 测试', {a}.{c:02}, 'paid', NOW(), UNIX_TIMESTAMP(NOW(6)), 'a note for row {i}', {f})",
        u = i % 1000,
        a = i % 10000,
        c = i % 100,
        f = i % 2
    )
}

async fn status(addr: &str) -> serde_json::Value {
    canal_consumer::admin::client::fetch_status(addr)
        .await
        .unwrap_or(serde_json::Value::Null)
}

async fn confirmed(addr: &str) -> u64 {
    status(addr).await["broker"]["confirmed"]
        .as_u64()
        .unwrap_or(0)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system, all threads) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name (which may hold spaces) start at state (field 3)
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The machine's busy CPU time so far, seconds summed over all cores (`/proc/stat`): how much of
/// the machine a phase used, every process included (broker, Canal, MariaDB, this bench).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    // user nice system idle iowait irq softirq steal
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / clk_tck()
}

/// Wait (at most 60 s) until the machine has been nearly idle for a second: what an earlier
/// phase left behind (MariaDB flushing a big transaction, Canal catching up) must not count
/// against the next measurement.
async fn settle() {
    let by = Instant::now() + Duration::from_secs(60);
    while Instant::now() < by {
        let b0 = machine_busy_seconds();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if machine_busy_seconds() - b0 < 0.3 {
            return;
        }
    }
    println!("note: the machine did not settle within 60 s (more than 0.3 cores busy)");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `[canal]` settings of the shipped example config (`config/canal-consumer.toml`), which
/// match the local Canal server (its credentials and its memory unit, `mem_unit`), with the
/// environment over it as the service has it (`CANAL_CONSUMER__CANAL__MEM_UNIT=1024` for a
/// Canal server run with its default unit). Loaded once per run.
fn local_canal() -> &'static canal_consumer::config::CanalConfig {
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

fn canal_session_config() -> SessionConfig {
    SessionConfig {
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
    }
}

/// A bare Canal client on the service's client id, subscribed as the service will be.
async fn canal_session() -> Session {
    let mut s = Session::connect(&canal_session_config())
        .await
        .expect("canal (deploy/local/up)");
    s.subscribe("cc_bench\\.rows").await.unwrap();
    s.rollback(0).await.unwrap();
    s
}

async fn drain_canal() {
    let mut s = canal_session().await;
    loop {
        let b = s.get(1000, Duration::ZERO).await.unwrap();
        if b.is_empty() {
            break;
        }
        s.ack(b.batch_id).await.unwrap();
    }
}

/// The source's own limit: `n` rows inserted as in the throughput phase, read by a bare client
/// (GET without waiting, the service's fetch size, ack, rows counted with the service's decoder;
/// nothing published). Rows/s from the first INSERT until the last row has arrived. Run before
/// the service starts, on its client id, so the service never sees these rows.
async fn canal_probe(from: u64, n: u64) -> f64 {
    let mut s = canal_session().await;
    let fetch = local_canal().fetch_units();
    let mut decoder = canal_consumer::canal::decode::Decoder::new("example");
    let mut events = Vec::new();
    let t0 = Instant::now();
    let inserter = insert_bulk(from, from + n - 1);
    let mut rows = 0u64;
    let by = t0 + Duration::from_secs(300);
    while rows < n {
        assert!(Instant::now() < by, "canal probe: only {rows} of {n} rows");
        let b = s.get(fetch, Duration::ZERO).await.unwrap();
        if b.is_empty() {
            continue;
        }
        events.clear();
        decoder.decode_entries(&b.entries, &mut events).unwrap();
        rows += events.len() as u64;
        s.ack(b.batch_id).await.unwrap();
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    inserter.join().unwrap();
    rate
}

/// The service process; killed when dropped, so a failed bench leaves nothing running.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// What a service with backfills gets besides the bench consumer (`BENCH_BACKFILL`).
struct BackfillService {
    /// `database.table` of its watermark table.
    watermark_table: String,
    /// `max_rows` of the bulk consumer's rule.
    bulk_max_rows: u64,
}

/// The service's consumer files and config in `dir`, and the process started on them. With
/// `backfill`, the `bench` consumer takes SNAPSHOT rows too, a `bulk` consumer takes only
/// SNAPSHOT rows (one bulk rule), and the service reads the source as the `backfill` account.
fn start_service(
    dir: &std::path::Path,
    admin: &str,
    max_priority: Option<u8>,
    bulk: Option<u64>,
    backfill: Option<&BackfillService>,
) -> Service {
    std::fs::create_dir_all(dir.join("consumers")).unwrap();
    let batch = bulk
        .map(|n| format!("batch = {{ max_rows = {n}, max_wait = \"50ms\" }}\n"))
        .unwrap_or_default();
    let events = if backfill.is_some() {
        r#"["INSERT", "SNAPSHOT"]"#
    } else {
        r#"["INSERT"]"#
    };
    let (source_url, backfill_section) = match backfill {
        Some(b) => {
            std::fs::write(
                dir.join("consumers/bulk.toml"),
                format!(
                    r#"
[consumers.bulk]
[[consumers.bulk.filters]]
database = "cc_bench"
table = "rows"
events = ["SNAPSHOT"]
[[consumers.bulk.rules]]
name = "rows"
plugin = "bench_task"
payload = {{ id = "${{data.id}}", user_id = "${{data.user_id}}", email = "${{data.email}}", amount = "${{data.amount}}", score = "${{data.score}}" }}
batch = {{ max_rows = {}, max_wait = "50ms" }}
"#,
                    b.bulk_max_rows
                ),
            )
            .unwrap();
            (
                format!("source_url = \"{BACKFILL_SOURCE}\"\n"),
                format!("[backfill]\nwatermark_table = \"{}\"\n", b.watermark_table),
            )
        }
        None => (String::new(), String::new()),
    };
    std::fs::write(
        dir.join("consumers/bench.toml"),
        format!(
            r#"
[consumers.bench]
[[consumers.bench.filters]]
database = "cc_bench"
table = "rows"
events = {events}
[[consumers.bench.rules]]
name = "row"
plugin = "bench_task"
payload = {{ id = "${{data.id}}", user_id = "${{data.user_id}}", email = "${{data.email}}", amount = "${{data.amount}}", score = "${{data.score}}" }}
{batch}"#
        ),
    )
    .unwrap();
    let config = dir.join("bench.toml");
    // the queue's priority levels, and the message priorities within them
    let urls = if cluster() {
        format!("urls = {:?}", cluster_urls())
    } else {
        String::new()
    };
    let queue_priority = match max_priority {
        _ if cluster() => format!(
            "queue_type = \"quorum\"\nmax_priority = 0\ndead_letter_exchange = \"{QUEUE}.dlx\"\n\
             dead_letter_strategy = \"at-least-once\"\ndelivery_limit = 5\n"
        ),
        Some(p) => format!(
            "max_priority = {p}\n[amqp.priorities]\nhigh = {}\nnormal = {}\nlow = 1\n",
            p.min(9),
            normal_priority(p),
        ),
        None => "max_priority = 0\n".into(),
    };
    std::fs::write(
        &config,
        format!(
            r#"
[canal]
username = "canal"
password = "canal"
mem_unit = {mem_unit}
{source_url}
[consumers]
dir = "{consumers}"
state_file = "{state}"
[admin]
bind = "{admin}"
[log]
level = "warn"
[amqp]
url = "{amqp}"
{urls}
[amqp.queue]
name = "{QUEUE}"
{queue_priority}
{backfill_section}
"#,
            amqp = amqp_url(),
            consumers = dir.join("consumers").display(),
            state = dir.join("state.json").display(),
            mem_unit = local_canal().mem_unit,
        ),
    )
    .unwrap();
    Service(
        Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
            .args(["start", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("service.log")).unwrap())
            .spawn()
            .expect("canal-consumer"),
    )
}

/// The throughput phase's end on the sink: wait until `n` rows have arrived at the queue's
/// consumer (one per message, or with `bulk` each message's `bulk.rows`); returns the arrival
/// time of the last and the messages seen. Reading the sink rather than polling `/status` adds
/// no admin requests to the service's CPU while rows flow.
async fn wait_rows(sink: &mut lapin::Consumer, n: u64, bulk: bool) -> (Instant, u64) {
    let (mut rows, mut messages) = (0u64, 0u64);
    // one deadline for the phase rather than a timer per message, like the probe's drain: the
    // sink's CPU shares the machine with the service
    let all = async {
        while rows < n {
            let d = sink.next().await.unwrap().unwrap();
            rows += if bulk {
                let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                body["bulk"]["rows"].as_u64().unwrap_or(1)
            } else {
                1
            };
            messages += 1;
        }
    };
    if tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .is_err()
    {
        panic!("only {rows} of {n} rows arrived within 600 s");
    }
    (Instant::now(), messages)
}

/// Wait until `queue` holds `n` messages: a passive declare every 10 ms, which the broker
/// answers from the queue's counters, so the service is not asked while rows flow.
async fn wait_queued(conn: &Connection, queue: &str, n: u64) {
    let ch = conn.create_channel().await.unwrap();
    let by = Instant::now() + Duration::from_secs(600);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if u64::from(q.message_count()) >= n {
            break;
        }
        assert!(
            Instant::now() < by,
            "only {} of {n} messages queued within 600 s",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = ch.close(200, "done".into()).await;
}

/// The HA Canal cluster of `deploy/local/up` parses the same binlog as the standalone server:
/// its CPU is in every figure while it runs.
fn ha_cluster_running() -> bool {
    ["127.0.0.1:11121", "127.0.0.1:11122"].iter().any(|a| {
        std::net::TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_millis(200))
            .is_ok()
    })
}

/// The `normal` message priority the bench uses in a queue with `levels` priorities.
fn normal_priority(levels: u8) -> u8 {
    levels.div_ceil(2).min(5)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Insert rows `from..=to` in 1,000-row INSERTs through one client, as fast as MariaDB goes.
fn insert_bulk(from: u64, to: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut child = Command::new("mysql")
            .args(["-h127.0.0.1", "-utest", "-ptest", "--batch"])
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
struct Inserting {
    busy: Busy,
    inserter: std::thread::JoinHandle<()>,
}

impl Inserting {
    /// Start inserting `rows` rows from id `from`; `named` are the processes whose CPU the
    /// phase reports.
    fn start(named: &[(&'static str, u32)], from: u64, rows: u64) -> Inserting {
        Inserting {
            busy: Busy::start(named),
            inserter: insert_bulk(from, from + rows - 1),
        }
    }
}

/// Wait until the service has confirmed `n` triggers, emptying the sink meanwhile.
async fn wait_confirmed(
    admin: &str,
    n: u64,
    sink: &mut lapin::Consumer,
    mut sample: impl FnMut(),
) -> Instant {
    let by = Instant::now() + Duration::from_secs(900);
    loop {
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::ZERO, sink.next()).await {}
        let c = confirmed(admin).await;
        if c >= n {
            return Instant::now();
        }
        assert!(Instant::now() < by, "only {c} of {n} confirmed");
        sample();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until the service's `/status` counts `total` messages confirmed.
async fn wait_all_confirmed(admin: &str, total: u64) -> Instant {
    let by = Instant::now() + Duration::from_secs(60);
    loop {
        let c = confirmed(admin).await;
        if c >= total {
            return Instant::now();
        }
        assert!(Instant::now() < by, "only {c} of {total} confirmed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn empty_sink(sink: &mut lapin::Consumer) {
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(300), sink.next()).await
    {
    }
}

fn queue_args(max_priority: Option<u8>) -> FieldTable {
    if cluster() {
        return canal_consumer::publisher::topology::declare_arguments(&quorum_queue());
    }
    let mut q = canal_consumer::config::Config::default().amqp.queue;
    q.max_priority = max_priority;
    canal_consumer::publisher::topology::declare_arguments(&q)
}

/// The broker's own confirmed-publish rate: `n` copies of `sample` (same body, same properties)
/// to a fresh durable queue with `args`, at most `window` unconfirmed, a consumer draining it
/// as the bench's sink drains the service's queue. Messages per second.
async fn probe(
    conn: &Connection,
    args: FieldTable,
    sample: &(Vec<u8>, BasicProperties),
    n: u64,
    window: usize,
    drain: bool,
) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(PROBE_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    ch.queue_declare(
        PROBE_QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let drain_ch = conn.create_channel().await.unwrap();
    let mut sink = drain_ch
        .basic_consume(
            PROBE_QUEUE.into(),
            "bench-probe-sink".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    if !drain {
        // no consumer: the messages pile up in the queue, as when the workers fall behind
        let _ = drain_ch
            .basic_cancel("bench-probe-sink".into(), Default::default())
            .await;
    }
    let drainer = tokio::spawn(async move { while let Some(Ok(_)) = sink.next().await {} });
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    publish_confirmed(&ch, sample, n, window).await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    drainer.abort();
    let _ = drain_ch.close(200, "done".into()).await;
    let _ = ch
        .queue_delete(PROBE_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch.close(200, "done".into()).await;
    rate
}

/// Publish `n` copies with confirms, at most `window` unconfirmed, as fast as the broker takes
/// them. Each publish is polled once when it is made (lapin then queues its frames) and not
/// awaited until its confirm is the oldest one left, so the probe never waits for lapin's I/O
/// thread to write one message before it makes the next: what it measures is the broker.
async fn publish_confirmed(
    ch: &Channel,
    sample: &(Vec<u8>, BasicProperties),
    n: u64,
    window: usize,
) {
    type Confirmed =
        std::pin::Pin<Box<futures::future::MaybeDone<futures::future::BoxFuture<'static, bool>>>>;
    let mut pending: VecDeque<Confirmed> = VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() >= window {
            let mut c = pending.pop_front().unwrap();
            c.as_mut().await;
            assert!(c.as_mut().take_output().unwrap(), "probe message nacked");
        }
        let props = sample
            .1
            .clone()
            .with_message_id(format!("probe-{i}").into());
        let (ch, body) = (ch.clone(), sample.0.clone());
        let publish = async move {
            ch.basic_publish(
                "".into(),
                PROBE_QUEUE.into(),
                // as the service publishes: mandatory, so the broker checks the route
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .is_ack()
        };
        let mut c = Box::pin(futures::future::maybe_done(publish.boxed()));
        let _ = futures::poll!(c.as_mut());
        pending.push_back(c);
    }
    for mut c in pending {
        c.as_mut().await;
        assert!(c.as_mut().take_output().unwrap(), "probe message nacked");
    }
}

struct Latency {
    rate: u64,
    achieved: f64,
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// CPU seconds of the service and of the local Canal server over the phase.
    cpu: Option<(f64, Option<f64>)>,
}

/// A live process's pid from its pid file.
fn pid_from_file(path: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}/stat"))
        .exists()
        .then_some(pid)
}

/// The local Canal server's pid (`deploy/local`'s pid file), if it runs: its CPU is part of
/// what a fetch strategy costs.
fn canal_server_pid() -> Option<u32> {
    let state = std::env::var("CANAL_CONSUMER_STATE").unwrap_or("/var/tmp/canal-consumer".into());
    pid_from_file(&format!("{state}/canal/bin/canal.pid"))
}

/// The local services by the pid files `deploy/local` manages them by (`lib.sh`): the broker's
/// Erlang VM, the Canal server's JVM, MariaDB. Those that do not run (or run elsewhere) are left
/// out; their CPU then stays in "other".
fn stack_pids() -> Vec<(&'static str, u32)> {
    [
        ("broker", pid_from_file("/var/run/rabbitmq/pid")),
        ("Canal", canal_server_pid()),
        ("MariaDB", pid_from_file("/run/mysqld/mysqld.pid")),
    ]
    .into_iter()
    .filter_map(|(name, pid)| Some((name, pid?)))
    .collect()
}

/// Where the machine's time went over a phase: the machine's busy cores, and of them each
/// named process's (this bench, the service, the local services), the rest as "other".
struct Busy {
    t0: Instant,
    machine: f64,
    procs: Vec<(&'static str, u32, f64)>,
}

impl Busy {
    fn start(named: &[(&'static str, u32)]) -> Busy {
        Busy {
            t0: Instant::now(),
            machine: machine_busy_seconds(),
            procs: named
                .iter()
                .map(|&(n, pid)| (n, pid, cpu_seconds(pid)))
                .collect(),
        }
    }

    /// CPU seconds the process named `name` has used since `start`, if it was named.
    fn seconds(&self, name: &str) -> Option<f64> {
        self.procs
            .iter()
            .find(|p| p.0 == name)
            .map(|&(_, pid, c0)| cpu_seconds(pid) - c0)
    }

    /// Cores busy since `start`: the machine's, and each named process's, with "other" last.
    fn cores(&self) -> (f64, Vec<(&'static str, f64)>) {
        let secs = self.t0.elapsed().as_secs_f64();
        let machine = (machine_busy_seconds() - self.machine) / secs;
        let mut split: Vec<(&'static str, f64)> = self
            .procs
            .iter()
            .map(|&(n, pid, c0)| (n, (cpu_seconds(pid) - c0) / secs))
            .collect();
        let named: f64 = split.iter().map(|(_, c)| c).sum();
        split.push(("other", machine - named));
        (machine, split)
    }
}

/// "1.85 = bench 0.74 + broker 1.02 + ..." for a phase's [`Busy::cores`].
fn busy_text((machine, split): &(f64, Vec<(&'static str, f64)>)) -> String {
    let parts: Vec<String> = split.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    format!("{machine:.2} = {}", parts.join(" + "))
}

fn busy_json((machine, split): &(f64, Vec<(&'static str, f64)>)) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("machine".into(), (*machine).into());
    for (n, c) in split {
        m.insert((*n).into(), (*c).into());
    }
    serde_json::Value::Object(m)
}

/// CPU seconds of the service and of the local Canal server (if it runs here) since `busy`
/// started (it names them "service" and "Canal"), and as text: "service CPU 0.12s, Canal
/// server CPU 0.30s".
fn service_and_canal_cpu(busy: &Busy) -> ((f64, Option<f64>), String) {
    let d = (
        busy.seconds("service").unwrap_or(0.0),
        busy.seconds("Canal"),
    );
    let text = match d.1 {
        Some(c) => format!("service CPU {:.2}s, Canal server CPU {c:.2}s", d.0),
        None => format!("service CPU {:.2}s", d.0),
    };
    (d, text)
}

/// One stamped row seen by a reader: its id, its statement stamp and the arrival time (seconds
/// since the epoch, same host clock).
type Arrival = (u64, f64, f64);

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Reads the service's messages from the queue consumer and reports each stamped row.
fn sink_arrivals(
    mut sink: lapin::Consumer,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Arrival>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(d)) = sink.next().await {
            let now = now_s();
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
            let id = body["payload"]["id"]
                .as_u64()
                .or_else(|| body["payload"]["id"].as_str().and_then(|s| s.parse().ok()));
            let score = &body["payload"]["score"];
            let stamp = score
                .as_f64()
                .or_else(|| score.as_str().and_then(|s| s.parse().ok()));
            if let (Some(id), Some(stamp)) = (id, stamp)
                && tx.send((id, stamp, now)).is_err()
            {
                return;
            }
        }
    });
    (task, rx)
}

/// Canal alone, for the latency limit: a bare client that fetches as the service does (the full
/// batch size without waiting while rows come; after an empty GET the smallest batch, waiting up
/// to the service's `canal.fetch_wait`), acks each batch and reports each stamped row.
fn canal_arrivals() -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Arrival>,
) {
    use canal_consumer::event::Value;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let defaults = local_canal();
        let mut s = canal_session().await;
        let mut decoder = canal_consumer::canal::decode::Decoder::new("example");
        let mut events = Vec::new();
        let mut idle = false;
        loop {
            let (asked, wait) = if idle {
                (1, defaults.fetch_wait)
            } else {
                (defaults.fetch_units(), Duration::ZERO)
            };
            let b = s.get(asked, wait).await.unwrap();
            // as the service: long-poll after an empty or a short answer
            idle = b.is_empty()
                || took_all(
                    b.asked,
                    defaults.mem_unit,
                    b.entries.iter().map(|e| e.len()),
                );
            if b.is_empty() {
                continue;
            }
            let now = now_s();
            events.clear();
            decoder.decode_entries(&b.entries, &mut events).unwrap();
            s.ack(b.batch_id).await.unwrap();
            for e in &events {
                let id = match e.get("id") {
                    Some(Value::Int(i)) => *i as u64,
                    Some(Value::UInt(i)) => *i,
                    _ => continue,
                };
                let stamp = match e.get("score") {
                    Some(Value::Float(f)) => *f,
                    Some(Value::Text(t)) => t.parse().unwrap_or(f64::NAN),
                    _ => continue,
                };
                if tx.send((id, stamp, now)).is_err() {
                    return;
                }
            }
        }
    });
    (task, rx)
}

/// One autocommit INSERT per period for `seconds`; latency per row from its server stamp to its
/// arrival at the reader behind `arrivals`.
async fn latency(
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<Arrival>,
    base: u64,
    rate: u64,
    seconds: u64,
) -> Latency {
    let total = rate * seconds;
    let mut writer = Command::new("mysql")
        .args(["-h127.0.0.1", "-utest", "-ptest", "--batch", "--unbuffered"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut lat = Vec::with_capacity(total as usize);
    let mut seen = vec![false; total as usize];
    let mut i = 0u64;
    let deadline = start + Duration::from_secs(seconds + 60);
    while (lat.len() as u64) < total && Instant::now() < deadline {
        let due = start + period.mul_f64(i as f64);
        if i < total && Instant::now() >= due {
            writeln!(
                stdin,
                "INSERT INTO cc_bench.rows VALUES {};",
                stamped_row(base + i)
            )
            .unwrap();
            stdin.flush().unwrap();
            i += 1;
            continue;
        }
        let wait = if i < total {
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(50)
        };
        if let Ok(Some((id, stamp, now))) = tokio::time::timeout(wait, arrivals.recv()).await
            && id >= base
            && id < base + total
            && !seen[(id - base) as usize]
        {
            seen[(id - base) as usize] = true;
            lat.push((now - stamp) * 1000.0);
        }
    }
    let achieved = i as f64 / start.elapsed().as_secs_f64().max(1e-9);
    drop(stdin);
    let _ = writer.wait();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Latency {
        rate,
        achieved: achieved.min(rate as f64),
        n: lat.len(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        cpu: None,
    }
}

fn uptime_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn create_table() {
    mysql(
        "CREATE DATABASE IF NOT EXISTS cc_bench; DROP TABLE IF EXISTS cc_bench.rows;
         CREATE TABLE cc_bench.rows (id BIGINT PRIMARY KEY, user_id INT, email VARCHAR(128),
           name VARCHAR(64), amount DECIMAL(12,2), status VARCHAR(16), created DATETIME,
           score DOUBLE, note TEXT, flag TINYINT) DEFAULT CHARSET=utf8mb4",
    )
}

/// The service's directory (fresh) and a free admin address.
fn service_dir() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("cc-bench-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let admin = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    (dir, admin)
}

/// Wait (at most 60 s) until the service answers `/ready` with 200.
async fn wait_ready(admin: &str, service: &mut Service, dir: &std::path::Path) {
    let ready_by = Instant::now() + Duration::from_secs(60);
    while canal_consumer::admin::client::request(admin, "GET", "/ready")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            Instant::now() < ready_by && service.0.try_wait().unwrap().is_none(),
            "service not ready; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let o = Opts::from_env();
    let defaults = canal_consumer::config::Config::default();
    let window = defaults.amqp.max_unconfirmed.get();
    let load_before = uptime_load();
    if ha_cluster_running() {
        println!(
            "note: the HA Canal cluster (127.0.0.1:11121/11122) is running and parses the same binlog; \
             its CPU is in every figure (deploy/local/canal-ha-ctl all stop, for figures)"
        );
    }

    if o.backfill {
        backfill::run(&o, load_before).await;
        return;
    }
    create_table();
    drain_canal().await;
    // ---- the source's limit: Canal's delivery of the same rows to a bare client
    let canal_rate = canal_probe(1, o.rows).await;
    // ... and its latency at the bench's rates
    let mut canal_lats = Vec::new();
    let (reader, mut arrivals) = canal_arrivals();
    let mut base = o.rows + 1;
    for &rate in &o.rates {
        canal_lats.push(latency(&mut arrivals, base, rate, o.seconds).await);
        base += rate * o.seconds;
    }
    reader.abort();
    let _ = reader.await;
    create_table();
    drain_canal().await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;

    let (dir, admin) = service_dir();
    let mut service = start_service(&dir, &admin, o.max_priority, o.bulk, None);
    let pid = service.0.id();
    wait_ready(&admin, &mut service, &dir).await;
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

    // ---- one row first: the probe publishes copies of the message the service made of it
    let mut id = 1u64;
    mysql(&format!("INSERT INTO cc_bench.rows VALUES {}", row(id)));
    id += 1;
    let first = tokio::time::timeout(Duration::from_secs(30), sink.next())
        .await
        .expect("the first row's message")
        .unwrap()
        .unwrap();
    let sample = (first.data.clone(), first.properties.clone());
    let mut done = 1u64;
    println!(
        "message: {} bytes body, delivery_mode {:?}, priority {:?}; queue x-max-priority {}; load {load_before}",
        sample.0.len(),
        sample.1.delivery_mode(),
        sample.1.priority(),
        if cluster() {
            "none (quorum)".to_string()
        } else {
            o.max_priority
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none".into())
        }
    );

    // ---- broker probe, the service's throughput, broker probe again
    let probe_args = || queue_args(o.max_priority);
    let me = std::process::id();
    let stack = stack_pids();
    let named = |service: Option<u32>| {
        let mut v = vec![("bench", me)];
        v.extend(service.map(|p| ("service", p)));
        v.extend(stack.iter().copied());
        v
    };
    let busy = Busy::start(&named(None));
    let probe_before = probe(&conn, probe_args(), &sample, o.rows, window, true).await;
    let probe_busy = busy.cores();
    // BENCH_PERF=<file>: sample the service's stacks (perf, cpu-clock) during this phase only
    let perf = std::env::var("BENCH_PERF").ok().map(|out| {
        Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "499",
                "--call-graph",
                "dwarf,32768",
                "-o",
            ])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf (BENCH_PERF)")
    });
    let run = Inserting::start(&named(Some(pid)), id, o.rows);
    id += o.rows;
    done += o.rows;
    let (arrived, bulk_messages) = wait_rows(&mut sink, o.rows, o.bulk.is_some()).await;
    // per row, the phase ends when the broker has confirmed them all, as the probe's does
    let finished = if o.bulk.is_some() {
        arrived
    } else {
        wait_all_confirmed(&admin, done).await
    };
    let elapsed = finished - run.busy.t0;
    let cpu_tp = run.busy.seconds("service").unwrap();
    let tp_busy = run.busy.cores();
    if let Some(mut perf) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    run.inserter.join().unwrap();
    empty_sink(&mut sink).await;
    let probe_after = probe(&conn, probe_args(), &sample, o.rows, window, true).await;
    let broker = (probe_before + probe_after) / 2.0;
    let throughput = o.rows as f64 / elapsed.as_secs_f64();
    let cpu_per_10k = cpu_tp / o.rows as f64 * 10_000.0;
    println!(
        "broker probe: {probe_before:.0} / {probe_after:.0} msg/s (mean {broker:.0}), window {window}"
    );
    println!(
        "machine busy, cores of {}: first broker probe {} (bench: publisher and drain); \
         throughput phase {} (bench: queue consumer and inserts; other: the mysql client, the kernel's own threads)",
        cores(),
        busy_text(&probe_busy),
        busy_text(&tp_busy),
    );
    println!(
        "canal probe: {canal_rate:.0} rows/s (a bare client: GET without waiting, decode, ack; nothing published)"
    );
    println!(
        "throughput: {} rows in {:.2}s = {throughput:.0} rows/s = {:.1}% of the broker's rate, {:.1}% of Canal's; service CPU {cpu_tp:.2}s = {cpu_per_10k:.3}s per 10k rows",
        o.rows,
        elapsed.as_secs_f64(),
        throughput / broker * 100.0,
        throughput / canal_rate * 100.0
    );
    if cluster() {
        // cluster mode ends here: the service and the bare lapin probe against PerfTest's
        // confirmed-publish rate to a quorum queue, in the same run
        let pt = perftest(&amqp_url(), sample.0.len(), window, 15);
        println!(
            "cluster (3 nodes, quorum queue, at-least-once dead lettering){}: PerfTest {pt:.0} msg/s \
             ({} bytes, confirm window {window}, persistent, 1 consumer); service {throughput:.0} \
             rows/s = {:.1}% of PerfTest; broker probe (lapin) {broker:.0} msg/s = {:.1}% of PerfTest",
            o.bulk
                .map(|n| format!(", bulk max_rows {n} ({bulk_messages} messages)"))
                .unwrap_or_default(),
            sample.0.len(),
            throughput / pt * 100.0,
            broker / pt * 100.0
        );
        drop(service);
        let _ = ch
            .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .queue_delete("cc_bench_perftest".into(), QueueDeleteOptions::default())
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if let Some(max_rows) = o.bulk {
        // bulk mode ends here: the later phases count messages, one per row
        println!(
            "bulk (max_rows {max_rows}, max_wait 50ms): {bulk_messages} messages for {} rows; time until the last row arrived at the queue consumer",
            o.rows
        );
        let report = serde_json::json!({
            "bulk_max_rows": max_rows, "bulk_messages": bulk_messages,
            "rows": o.rows, "elapsed_s": elapsed.as_secs_f64(), "rows_per_s": throughput,
            "broker_msg_per_s": broker, "canal_probe_rows_per_s": canal_rate,
            "cpu_s_per_10k_rows": cpu_per_10k,
            "machine_busy_cores": {"broker_probe": busy_json(&probe_busy),
            "throughput": busy_json(&tp_busy), "cores": cores()},
            "load": [load_before, uptime_load()],
        });
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench-pipeline-bulk.json");
        let _ = std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap());
        drop(service);
        let _ = ch
            .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    // ---- latency at fixed rates
    let mut lats = Vec::new();
    let (reader, mut arrivals) = sink_arrivals(sink.clone());
    let service_and_canal: Vec<(&'static str, u32)> = std::iter::once(("service", pid))
        .chain(canal_server_pid().map(|c| ("Canal", c)))
        .collect();
    for &rate in &o.rates {
        let busy = Busy::start(&service_and_canal);
        let mut l = latency(&mut arrivals, id, rate, o.seconds).await;
        let (cpu, cpu_text) = service_and_canal_cpu(&busy);
        l.cpu = Some(cpu);
        id += rate * o.seconds;
        done += rate * o.seconds;
        println!(
            "latency at {rate} rows/s ({:.0} achieved) for {}s: {} rows, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {cpu_text}",
            l.achieved, o.seconds, l.n, l.p50, l.p99, l.max
        );
        lats.push(l);
    }
    reader.abort();
    let _ = reader.await;
    for l in &canal_lats {
        println!(
            "canal latency at {} rows/s ({:.0} achieved), a bare client fetching as the service does: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.rate, l.achieved, l.p50, l.p99, l.max
        );
    }
    wait_confirmed(&admin, done, &mut sink, || {}).await;
    empty_sink(&mut sink).await;

    // ---- idle
    let busy = Busy::start(&service_and_canal);
    tokio::time::sleep(Duration::from_secs(o.idle_seconds)).await;
    let ((idle_cpu, idle_canal), _) = service_and_canal_cpu(&busy);
    let per_min = 60.0 / o.idle_seconds as f64;
    let idle_per_min = idle_cpu * per_min;
    let idle_canal_per_min = idle_canal.map(|c| c * per_min);
    println!(
        "idle: {idle_per_min:.3} CPU s per minute (over {}s){}",
        o.idle_seconds,
        idle_canal_per_min
            .map(|c| format!("; Canal server {c:.3} CPU s per minute"))
            .unwrap_or_default()
    );

    // ---- one big transaction: RSS before, during (sampled) and after
    let (mut rss_big_max, rss_big_before) = (0u64, proc_status_kib(pid, "VmRSS:"));
    let mut big_elapsed = Duration::ZERO;
    if o.big_tx > 0 {
        let t = Instant::now();
        let (a, z) = (id, id + o.big_tx - 1);
        let sql = format!(
            "INSERT INTO cc_bench.rows SELECT seq, seq % 1000, CONCAT('user-', seq, '@example.com'), \
             CONCAT('name ', seq, ' 测试'), (seq % 10000) + 0.25, 'paid', NOW(), (seq % 97) + 0.5, \
             CONCAT('a note for row ', seq), seq % 2 FROM cc_bench.seq_{a}_to_{z}"
        );
        let bulk = std::thread::spawn(move || mysql(&sql));
        id += o.big_tx;
        done += o.big_tx;
        wait_confirmed(&admin, done, &mut sink, || {
            rss_big_max = rss_big_max.max(proc_status_kib(pid, "VmRSS:"));
            // a failed INSERT panics its thread: stop waiting for rows that never come
            assert!(
                !MYSQL_FAILED.load(std::sync::atomic::Ordering::SeqCst),
                "the big INSERT failed (see above)"
            );
        })
        .await;
        bulk.join().unwrap();
        big_elapsed = t.elapsed();
        empty_sink(&mut sink).await;
    }
    let rss_big_after = proc_status_kib(pid, "VmRSS:");
    if o.big_tx > 0 {
        println!(
            "{}-row transaction in {:.1}s ({:.0} rows/s): RSS {:.1} MiB before, {:.1} MiB max during, {:.1} MiB after",
            o.big_tx,
            big_elapsed.as_secs_f64(),
            o.big_tx as f64 / big_elapsed.as_secs_f64(),
            rss_big_before as f64 / 1024.0,
            rss_big_max as f64 / 1024.0,
            rss_big_after as f64 / 1024.0
        );
    }
    // ---- throughput with the queue piling up (no consumer), as issue 11 measured the broker's
    // rate (15.7–16k msg/s there): the broker then writes every message to disk and its queue
    // process, not the 2 cores, is the limit. Last of the service's phases, because it disturbs
    // the others: a piled-up queue leaves the broker work after it is gone (its messages on
    // disk), and each step here starts on a settled machine.
    let piling = {
        settle().await;
        let pile_before = probe(&conn, probe_args(), &sample, o.rows, window, false).await;
        ch.basic_cancel("bench-sink".into(), Default::default())
            .await
            .unwrap();
        settle().await;
        let run = Inserting::start(&named(Some(pid)), id, o.rows);
        id += o.rows;
        done += o.rows;
        wait_queued(&conn, QUEUE, o.rows).await;
        let elapsed = wait_all_confirmed(&admin, done).await - run.busy.t0;
        let cpu = run.busy.seconds("service").unwrap();
        let pile_busy = run.busy.cores();
        run.inserter.join().unwrap();
        ch.queue_purge(QUEUE.into(), Default::default())
            .await
            .unwrap();
        settle().await;
        let pile_after = probe(&conn, probe_args(), &sample, o.rows, window, false).await;
        let broker = (pile_before + pile_after) / 2.0;
        let rate = o.rows as f64 / elapsed.as_secs_f64();
        println!(
            "throughput, queue piling up (no consumer, as issue 11 measured the broker): {} rows in {:.2}s = {rate:.0} rows/s \
             = {:.1}% of the broker's rate (probe to a queue without consumer: {pile_before:.0} / {pile_after:.0} msg/s, mean {broker:.0}); \
             service CPU {cpu:.2}s = {:.3}s per 10k rows; machine busy {}",
            o.rows,
            elapsed.as_secs_f64(),
            rate / broker * 100.0,
            cpu / o.rows as f64 * 10_000.0,
            busy_text(&pile_busy),
        );
        serde_json::json!({
            "broker_probe_msg_per_s": [pile_before, pile_after], "broker_msg_per_s": broker,
            "elapsed_s": elapsed.as_secs_f64(), "rows_per_s": rate, "ratio_to_broker": rate / broker,
            "cpu_s_per_10k_rows": cpu / o.rows as f64 * 10_000.0,
            "machine_busy_cores": busy_json(&pile_busy),
        })
    };
    let rss = proc_status_kib(pid, "VmHWM:");
    println!("service peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    drop(service);

    // ---- the machine's ceiling: the source and a bare publisher at once, nothing in between
    drain_canal().await;
    settle().await;
    let t = Instant::now();
    let busy = Busy::start(&named(None));
    let (ceiling_canal, ceiling_broker) = tokio::join!(
        canal_probe(id, o.rows),
        probe(&conn, probe_args(), &sample, o.rows, window, true)
    );
    let ceiling = o.rows as f64 / t.elapsed().as_secs_f64();
    let ceiling_busy = busy.cores();
    println!(
        "ceiling: the Canal probe and the broker probe at once, {} rows and {} messages: {ceiling:.0}/s until both finished \
         (Canal {ceiling_canal:.0} rows/s, broker {ceiling_broker:.0} msg/s); the service reached {:.1}% of it; \
         machine busy {} (bench: Canal client, publisher and drain)",
        o.rows,
        o.rows,
        throughput / ceiling * 100.0,
        busy_text(&ceiling_busy)
    );

    // ---- what x-max-priority costs the broker: rounds of the four queue kinds, interleaved
    let mut prio = Vec::new();
    if o.priority_probes {
        let levels = [None, Some(3u8), Some(5), Some(10)];
        let n = (o.rows / 4).max(1000);
        // drained by a consumer (as in the throughput phase), and piling up without one
        for drain in [true, false] {
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
            // four rounds, each starting with another kind, so no kind always runs first
            for round in 0..levels.len() {
                for k in (0..levels.len()).map(|i| (i + round) % levels.len()) {
                    let l = &levels[k];
                    let props = match l {
                        Some(l) => sample.1.clone().with_priority(normal_priority(*l)),
                        None => sample.1.clone(),
                    };
                    let args = queue_args(*l);
                    let r = probe(&conn, args, &(sample.0.clone(), props), n, window, drain).await;
                    rates[k].push(r);
                }
            }
            let median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v[v.len() / 2]
            };
            let none = median(&rates[0]);
            let how = if drain { "drained" } else { "piling up" };
            for (k, l) in levels.iter().enumerate() {
                let name = l.map(|l| l.to_string()).unwrap_or_else(|| "none".into());
                let m = median(&rates[k]);
                println!(
                    "broker probe ({how}), x-max-priority {name}: median {m:.0} msg/s of {:?} = {:.1}% of the rate without",
                    rates[k].iter().map(|r| r.round()).collect::<Vec<_>>(),
                    m / none * 100.0
                );
                prio.push(serde_json::json!({"max_priority": name, "drained": drain, "msg_per_s": m, "runs": rates[k], "ratio_to_none": m / none}));
            }
        }
    }
    let load_after = uptime_load();
    println!("load average before/after: {load_before} / {load_after}");

    let report = serde_json::json!({
        "quick": o.quick,
        "max_priority": o.max_priority,
        "message_bytes": sample.0.len(),
        "window": window,
        "broker_probe_msg_per_s": [probe_before, probe_after],
        "broker_msg_per_s": broker,
        "rows": o.rows, "elapsed_s": elapsed.as_secs_f64(), "rows_per_s": throughput,
        "ratio_to_broker": throughput / broker,
        "piling_up": piling,
        "canal_probe_rows_per_s": canal_rate,
        "machine_busy_cores": {"broker_probe": busy_json(&probe_busy),
            "throughput": busy_json(&tp_busy), "cores": cores()},
        "ratio_to_canal": throughput / canal_rate,
        "cpu_s_per_10k_rows": cpu_per_10k,
        "latency": lats.iter().map(|l| serde_json::json!({
            "rate": l.rate, "achieved": l.achieved, "rows": l.n,
            "p50_ms": l.p50, "p99_ms": l.p99, "max_ms": l.max,
            "service_cpu_s": l.cpu.map(|c| c.0), "canal_server_cpu_s": l.cpu.and_then(|c| c.1),
        })).collect::<Vec<_>>(),
        "canal_latency": canal_lats.iter().map(|l| serde_json::json!({
            "rate": l.rate, "achieved": l.achieved, "rows": l.n,
            "p50_ms": l.p50, "p99_ms": l.p99, "max_ms": l.max,
        })).collect::<Vec<_>>(),
        "idle_cpu_s_per_min": idle_per_min,
        "idle_canal_server_cpu_s_per_min": idle_canal_per_min,
        "big_tx_rows": o.big_tx,
        "big_tx_rss_kib": {"before": rss_big_before, "max": rss_big_max, "after": rss_big_after},
        "peak_rss_kib": rss,
        "ceiling_per_s": ceiling, "ceiling_canal_rows_per_s": ceiling_canal,
        "ceiling_broker_msg_per_s": ceiling_broker, "ratio_to_ceiling": throughput / ceiling,
        "ceiling_machine_busy_cores": busy_json(&ceiling_busy),
        "priority_probes": prio,
        "load": [load_before, load_after],
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pipeline.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap());
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
