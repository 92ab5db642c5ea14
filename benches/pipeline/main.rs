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
//! `BENCH_BACKFILL=1` runs the backfill phases instead (issue 21; [`backfill`]): per-row
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
//!
//! The services are those of the tests: the `CC_TEST_*` variables (MariaDB, Canal, the broker,
//! the cluster, the backfill account; [`env`], the tests' own `tests/common/env.rs`), the local
//! stack of `deploy/local/up` by default. The local processes whose CPU is split out are found
//! by `deploy/local`'s pid files, and the HA Canal cluster by its local ports.
//!
//! The modules: [`broker`] (the queue and the broker, single node or cluster), [`source`]
//! (MariaDB inserts, a bare Canal client), [`probes`] (the limits), [`service`] (the measured
//! process and the waits on it), [`latency`], [`accounting`] (/proc), [`report`] and
//! [`backfill`] (the `BENCH_BACKFILL` phases); this file has the knobs and the order of the
//! phases.
// A benchmark stops at the first failed setup step; unwrap is that stop (lint policy:
// Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod accounting;
mod backfill;
mod broker;
#[path = "../../tests/common/env.rs"]
mod env;
mod latency;
mod probes;
mod report;
mod service;
mod source;

use crate::accounting::{
    Busy, Perf, canal_server_pid, cores, ha_cluster_running, proc_status_kib,
    service_and_canal_cpu, settle, stack_pids, uptime_load,
};
use crate::broker::{QUEUE, amqp_url, cluster, normal_priority, queue_args};
use crate::latency::{canal_arrivals, latency, median, sink_arrivals};
use crate::probes::{canal_probe, perftest, probe};
use crate::report::{busy_json, busy_text, latency_json, write_json};
use crate::service::{
    empty_sink, service_dir, start_service, wait_all_confirmed, wait_confirmed, wait_queued,
    wait_ready, wait_rows,
};
use crate::source::{Inserting, MYSQL_FAILED, create_table, drain_canal, mysql, row};
use futures::StreamExt;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use std::time::{Duration, Instant};

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
    /// `BENCH_BACKFILL_ROUNDS`: how many times each backfill latency phase runs (in rotated
    /// order); the figures are the medians of their p99s.
    backfill_rounds: usize,
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
            backfill_rounds: env_num("BENCH_BACKFILL_ROUNDS", if quick { 1 } else { 3 }).max(1)
                as usize,
            backfill_throttle: {
                let v = rates_env("BENCH_BACKFILL_THROTTLE", "100,1000");
                assert!(v.len() == 2, "BENCH_BACKFILL_THROTTLE: <chunk>,<rows/s>");
                (v[0], v[1])
            },
        }
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
    let mut sink = crate::broker::no_ack_consumer(&ch, QUEUE, "bench-sink").await;

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
    let perf = Perf::start(pid);
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
    perf.stop();
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
        write_json("bench-pipeline-bulk.json", &report);
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
        "latency": lats.iter().map(latency_json).collect::<Vec<_>>(),
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
    write_json("bench-pipeline.json", &report);
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
