//! `BENCH_BACKFILL=1`: the backfill phases of the pipeline bench (issue 21), instead of the
//! live ones. The table's rows are inserted with `sql_log_bin = 0`, so only a backfill brings
//! them; the service reads them as the `backfill` account through its own watermark table.
//!
//! - **source probe**: the service's own chunk reader ([`Source::read_chunk`], the backfill's
//!   chunk size, key order) reads the whole table with nothing else around it: how fast the
//!   source serves the SELECTs, the read path's limit.
//! - **broker probe**: as in the live bench ([`probe`]), with copies of a SNAPSHOT message the
//!   service made in a warm-up backfill of 1,000 rows; before and after the per-row phase, the
//!   limit is their mean.
//! - **per-row**: a backfill of the whole table (`BENCH_BACKFILL_ROWS`) for the `bench`
//!   consumer, one message per row. Rows/s from the backfill's own record (`started_at` at the
//!   request, `finished_at` once its last chunk's messages are all confirmed), and end to end
//!   (the request until the last row arrived at the queue's consumer); against the broker probe.
//! - **bulk**: the same for the `bulk` consumer, whose one rule has
//!   `batch = { max_rows = BENCH_BACKFILL_BULK, max_wait = "50ms" }`; the target is an
//!   absolute 100k rows/s.
//! - **live latency with and without a backfill**: the live bench's latency phase
//!   ([`latency`]) at each of `BENCH_BACKFILL_RATES` rows/s, first alone, then while a per-row
//!   backfill of the table runs, then while a bulk one runs (a new backfill is started whenever
//!   one finishes, and the last one is cancelled when the phase ends). The four phases run
//!   `BENCH_BACKFILL_ROUNDS` times (3; 1 with `BENCH_QUICK`), in an order rotated by one each
//!   round: a single stall of a few tens of ms moves one 10 s phase's p99 by more than the
//!   5 ms compared (a phase without a backfill measured 10 to 43 ms at 1,000 rows/s in one
//!   day's runs). The figure is the median p99 with minus the median p99 without, against the
//!   issue's 5 ms. Each phase writes live rows for a second before its
//!   clock starts (not counted), so the backfill's first chunks are under way and it has seen
//!   live changes flow: the figures are the steady state of a backfill yielding to a live
//!   stream (`backfill.rate_while_live`, `backfill.chunk_while_live`).
//!
//! `BENCH_BACKFILL_CHUNK` sets the backfills' `chunk` (the service's default, 5,000 rows,
//! without). `BENCH_PERF=<file>` records the service's stacks (`perf record`) during the
//! per-row phase. Results go to stdout and `target/bench-pipeline-backfill.json`.

use crate::Opts;
use crate::accounting::{
    Busy, Perf, canal_server_pid, cores, ha_cluster_running, service_and_canal_cpu, settle,
    stack_pids, take_peak_rss_kib, uptime_load,
};
use crate::broker::{QUEUE, amqp_url, queue_args};
use crate::latency::{latency, median, sink_arrivals};
use crate::probes::probe;
use crate::report::{busy_json, busy_text, latency_json, write_json};
use crate::service::{
    BackfillService, confirmed, empty_sink, service_dir, start_service, wait_ready, wait_rows,
};
use crate::source::{create_table, drain_canal, mysql};
use canal_consumer::admin::access::Token;
use canal_consumer::admin::client::{backfill_call, encode};
use canal_consumer::backfill::source::Source;
use futures::StreamExt;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Live rows get ids from here on; the backfills read only the keys below it.
const LIVE_BASE: u64 = 1_000_000_000;
const WATERMARK_TABLE: &str = "canal_consumer.cc_bench_wm";

fn below_live() -> String {
    format!("id < {LIVE_BASE}")
}

/// The service's backfill API, with its admin token.
#[derive(Clone)]
struct Backfills {
    admin: String,
    token: Token,
}

impl Backfills {
    async fn call(&self, verb: &str, path: &str) -> Value {
        backfill_call(&self.admin, Some(&self.token), verb, path)
            .await
            .unwrap_or_else(|e| panic!("{verb} {path}: {e}"))
    }

    /// Start a backfill of the bench table's rows below the live ones for `consumer`; its id.
    async fn start(&self, consumer: &str, limits: Limits, condition: &str) -> String {
        let mut q = format!(
            "/backfills?table=cc_bench.rows&consumer={consumer}&where={}",
            encode(condition)
        );
        if let Some(c) = limits.chunk {
            q.push_str(&format!("&chunk={c}"));
        }
        if let Some(r) = limits.rate {
            q.push_str(&format!("&rate={r}"));
        }
        let b = self.call("POST", &q).await;
        b["id"].as_str().unwrap().to_string()
    }

    async fn get(&self, id: &str) -> Value {
        self.call("GET", &format!("/backfills/{id}")).await
    }

    /// Wait until backfill `id` is done or cancelled and no chunk of it is in flight.
    async fn wait_final(&self, id: &str) -> Value {
        let by = Instant::now() + Duration::from_secs(900);
        loop {
            let b = self.get(id).await;
            let state = b["state"].as_str().unwrap_or("").to_string();
            assert!(state != "failed", "backfill {id} failed: {b}");
            if (state == "done" || state == "cancelled") && b["reading"] != true {
                return b;
            }
            assert!(Instant::now() < by, "backfill {id} not finished: {b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A backfill's `chunk` and `rate` (the service's defaults where `None`).
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    chunk: Option<u64>,
    rate: Option<u64>,
}

/// Seconds from a backfill record's `started_at` to its `finished_at`.
fn record_seconds(b: &Value) -> f64 {
    let p = &b["progress"];
    (p["finished_at"].as_i64().unwrap() - p["started_at"].as_i64().unwrap()) as f64 / 1000.0
}

/// What one throughput phase measured.
struct Phase {
    rows: u64,
    messages: u64,
    chunks: u64,
    /// From the backfill's record: request to the last chunk confirmed.
    record_s: f64,
    /// From the request until the last row arrived at the queue's consumer.
    arrival_s: f64,
    service_cpu: f64,
    /// The service's peak RSS during the phase, KiB.
    peak_rss_kib: u64,
    busy: (f64, Vec<(&'static str, f64)>),
}

impl Phase {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.record_s
    }

    fn arrival_rate(&self) -> f64 {
        self.rows as f64 / self.arrival_s
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rows": self.rows, "messages": self.messages, "chunks": self.chunks,
            "record_s": self.record_s, "rows_per_s": self.rate(),
            "arrival_s": self.arrival_s, "arrival_rows_per_s": self.arrival_rate(),
            "service_cpu_s": self.service_cpu,
            "service_cpu_s_per_10k_rows": self.service_cpu / self.rows as f64 * 10_000.0,
            "peak_rss_kib": self.peak_rss_kib,
            "machine_busy_cores": busy_json(&self.busy),
        })
    }
}

/// A backfill of all `rows` rows for `consumer`, timed (see [`Phase`]).
async fn throughput(
    bf: &Backfills,
    sink: &mut lapin::Consumer,
    named: &[(&'static str, u32)],
    consumer: &str,
    chunk: Option<u64>,
    rows: u64,
    bulk: bool,
) -> Phase {
    let pid = named
        .iter()
        .find(|(n, _)| *n == "service")
        .expect("the service")
        .1;
    // BENCH_PERF=<file>: sample the service's stacks (perf, cpu-clock) during the per-row
    // phase only
    let perf = if bulk { Perf::none() } else { Perf::start(pid) };
    take_peak_rss_kib(pid);
    let busy = Busy::start(named);
    let limits = Limits { chunk, rate: None };
    let id = bf.start(consumer, limits, &below_live()).await;
    // the sink first: no admin requests while rows flow
    let (arrived, messages) = wait_rows(sink, rows, bulk).await;
    let b = bf.wait_final(&id).await;
    perf.stop();
    let phase = Phase {
        rows,
        messages,
        chunks: b["progress"]["chunks"].as_u64().unwrap_or(0),
        record_s: record_seconds(&b),
        arrival_s: (arrived - busy.t0).as_secs_f64(),
        service_cpu: busy.seconds("service").unwrap(),
        peak_rss_kib: take_peak_rss_kib(pid),
        busy: busy.cores(),
    };
    assert_eq!(
        b["progress"]["rows_emitted"].as_u64(),
        Some(rows),
        "backfill {id}: {b}"
    );
    phase
}

/// The source's own rate: the service's chunk reader over the whole table, `chunk` rows per
/// SELECT, nothing published. Rows per second.
async fn source_probe(rows: u64, chunk: usize) -> f64 {
    let source = Source::new(
        &crate::env::backfill_url(),
        "bench".into(),
        ("canal_consumer".into(), "cc_bench_wm".into()),
    )
    .unwrap();
    let meta = source.table_meta("cc_bench", "rows").await.unwrap();
    let cond = below_live();
    let max = source
        .max_key(&meta, Some(&cond))
        .await
        .unwrap()
        .expect("rows in the bench table");
    let t0 = Instant::now();
    let (mut n, mut after) = (0u64, None);
    loop {
        let got = source
            .read_chunk(&meta, Some(&cond), after.as_deref(), &max, chunk)
            .await
            .unwrap();
        n += got.len() as u64;
        match got.last() {
            Some(r) if got.len() == chunk => {
                after = Some(canal_consumer::backfill::source::key_values(r, &meta.key))
            }
            _ => break,
        }
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(n, rows, "the source probe read {n} of {rows} rows");
    source.close().await;
    rate
}

/// Keeps a backfill of the table for `consumer` running until `stop` fires, then cancels it;
/// returns the backfills started and the rows they read.
async fn keep_backfilling(
    bf: Backfills,
    consumer: &'static str,
    limits: Limits,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (u32, u64) {
    let (mut started, mut rows) = (0u32, 0u64);
    loop {
        let id = bf.start(consumer, limits, &below_live()).await;
        started += 1;
        loop {
            tokio::select! {
                _ = &mut stop => {
                    // already finished if it just ended: the cancel is then refused
                    let _ = backfill_call(&bf.admin, Some(&bf.token), "POST", &format!("/backfills/{id}/cancel")).await;
                    let b = bf.wait_final(&id).await;
                    rows += b["progress"]["rows_read"].as_u64().unwrap_or(0);
                    return (started, rows);
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let b = bf.get(&id).await;
            if b["state"] == "done" {
                rows += b["progress"]["rows_read"].as_u64().unwrap_or(0);
                break;
            }
        }
    }
}

/// How a latency phase is named in the report.
fn phase_name(with: Option<(&str, Limits)>, chunk_rows: u64) -> String {
    match with {
        None => "no backfill".to_string(),
        Some((consumer, l)) => format!(
            "a {} backfill running (chunk {}{})",
            if consumer == "bulk" {
                "bulk"
            } else {
                "per-row"
            },
            l.chunk.unwrap_or(chunk_rows),
            l.rate
                .map(|r| format!(", rate {r} rows/s"))
                .unwrap_or_default()
        ),
    }
}

/// Wait until the service's confirmed count has not moved for a second: what a cancelled
/// backfill left in flight is through.
async fn wait_quiet(admin: &str) {
    let mut last = confirmed(admin).await;
    let by = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = confirmed(admin).await;
        if c == last || Instant::now() > by {
            return;
        }
        last = c;
    }
}

pub(crate) async fn run(o: &Opts, load_before: String) {
    let defaults = canal_consumer::config::Config::default();
    let window = defaults.amqp.max_unconfirmed.get();
    let chunk = o.backfill_chunk;
    let chunk_rows = chunk.unwrap_or(defaults.backfill.chunk.get() as u64);
    let rows = o.backfill_rows;
    assert!(rows >= 1000, "BENCH_BACKFILL_ROWS: at least 1000");

    // ---- the table: rows that never pass through the binlog
    create_table();
    mysql(&format!("DROP TABLE IF EXISTS {WATERMARK_TABLE}"));
    let t = Instant::now();
    mysql(&format!(
        "USE cc_bench; SET SESSION sql_log_bin = 0; \
         INSERT INTO cc_bench.rows SELECT seq, seq % 1000, CONCAT('user-', seq, '@example.com'), \
         CONCAT('name ', seq, ' 测试'), (seq % 10000) + 0.25, 'paid', NOW(), (seq % 97) + 0.5, \
         CONCAT('a note for row ', seq), seq % 2 FROM seq_1_to_{rows}"
    ));
    println!(
        "backfill bench: {rows} rows inserted without binlog in {:.1}s; chunk {chunk_rows}; load {load_before}",
        t.elapsed().as_secs_f64()
    );
    drain_canal().await;
    settle().await;
    let source_rate = source_probe(rows, chunk_rows as usize).await;
    println!(
        "source probe: the service's chunk reader alone, {chunk_rows}-row SELECTs in key order: {source_rate:.0} rows/s"
    );

    // ---- the service, with a per-row consumer (`bench`) and a bulk one (`bulk`)
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let (dir, admin) = service_dir();
    let mut service = start_service(
        &dir,
        &admin,
        o.max_priority,
        None,
        Some(&BackfillService {
            watermark_table: WATERMARK_TABLE.into(),
            bulk_max_rows: o.backfill_bulk,
        }),
    );
    let pid = service.0.id();
    wait_ready(&admin, &mut service, &dir).await;
    let token = Token::read(&dir.join("admin.token"))
        .unwrap()
        .expect("the service's admin token");
    let bf = Backfills {
        admin: admin.clone(),
        token,
    };
    let mut sink = crate::broker::no_ack_consumer(&ch, QUEUE, "bench-sink").await;

    // ---- warm-up: 1,000 rows; the probe publishes copies of the first SNAPSHOT message
    let warm = bf
        .start("bench", Limits { chunk, rate: None }, "id <= 1000")
        .await;
    let first = tokio::time::timeout(Duration::from_secs(60), sink.next())
        .await
        .expect("the warm-up backfill's first message")
        .unwrap()
        .unwrap();
    let sample = (first.data.clone(), first.properties.clone());
    wait_rows(&mut sink, 999, false).await;
    bf.wait_final(&warm).await;
    empty_sink(&mut sink).await;
    println!(
        "message: {} bytes body (a SNAPSHOT row), delivery_mode {:?}, priority {:?}",
        sample.0.len(),
        sample.1.delivery_mode(),
        sample.1.priority(),
    );

    let me = std::process::id();
    let stack = stack_pids();
    let mut named = vec![("bench", me), ("service", pid)];
    named.extend(stack.iter().copied());

    // ---- broker probe, per-row backfill, broker probe again
    settle().await;
    let probe_before = probe(
        &conn,
        queue_args(o.max_priority),
        &sample,
        o.rows,
        window,
        true,
    )
    .await;
    let per_row = throughput(&bf, &mut sink, &named, "bench", chunk, rows, false).await;
    empty_sink(&mut sink).await;
    let probe_after = probe(
        &conn,
        queue_args(o.max_priority),
        &sample,
        o.rows,
        window,
        true,
    )
    .await;
    let broker = (probe_before + probe_after) / 2.0;
    println!(
        "broker probe: {probe_before:.0} / {probe_after:.0} msg/s (mean {broker:.0}), window {window}"
    );
    println!(
        "per-row backfill: {rows} rows, {} messages, {} chunks; {:.2}s by its record = {:.0} rows/s = {:.1}% of the broker's rate \
         ({:.1}% of the source probe); until the last arrival {:.2}s = {:.0} rows/s; service CPU {:.2}s = {:.3}s per 10k rows; \
         peak RSS {:.1} MiB; machine busy {}",
        per_row.messages,
        per_row.chunks,
        per_row.record_s,
        per_row.rate(),
        per_row.rate() / broker * 100.0,
        per_row.rate() / source_rate * 100.0,
        per_row.arrival_s,
        per_row.arrival_rate(),
        per_row.service_cpu,
        per_row.service_cpu / rows as f64 * 10_000.0,
        per_row.peak_rss_kib as f64 / 1024.0,
        busy_text(&per_row.busy),
    );

    // ---- bulk backfill
    settle().await;
    let bulk = throughput(&bf, &mut sink, &named, "bulk", chunk, rows, true).await;
    empty_sink(&mut sink).await;
    println!(
        "bulk backfill (max_rows {}, max_wait 50ms): {rows} rows, {} messages, {} chunks; {:.2}s by its record = {:.0} rows/s \
         ({:.1}% of the source probe; target 100k); until the last arrival {:.2}s = {:.0} rows/s; service CPU {:.2}s = {:.3}s per 10k rows; \
         peak RSS {:.1} MiB; machine busy {}",
        o.backfill_bulk,
        bulk.messages,
        bulk.chunks,
        bulk.record_s,
        bulk.rate(),
        bulk.rate() / source_rate * 100.0,
        bulk.arrival_s,
        bulk.arrival_rate(),
        bulk.service_cpu,
        bulk.service_cpu / rows as f64 * 10_000.0,
        bulk.peak_rss_kib as f64 / 1024.0,
        busy_text(&bulk.busy),
    );

    // ---- live latency without a backfill, with a per-row one, with a bulk one
    let (reader, mut arrivals) = sink_arrivals(sink.clone());
    let service_and_canal: Vec<(&'static str, u32)> = std::iter::once(("service", pid))
        .chain(canal_server_pid().map(|c| ("Canal", c)))
        .collect();
    let mut id = LIVE_BASE;
    let mut lat_report = Vec::new();
    for &rate in &o.backfill_rates {
        let full = Limits { chunk, rate: None };
        let throttled = Limits {
            chunk: Some(o.backfill_throttle.0),
            rate: Some(o.backfill_throttle.1),
        };
        let variants: [(&str, Option<(&'static str, Limits)>); 4] = [
            ("without", None),
            ("with_per_row", Some(("bench", full))),
            ("with_bulk", Some(("bulk", full))),
            ("with_per_row_throttled", Some(("bench", throttled))),
        ];
        // each round runs the four phases, the order rotated by one per round, so no phase
        // always follows the same one; a single stall of a few tens of ms moves a 10 s
        // phase's p99 by more than the 5 ms compared, so the figures are medians over rounds
        let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let mut rounds: Vec<Vec<serde_json::Value>> = vec![Vec::new(); variants.len()];
        for round in 0..o.backfill_rounds {
            for k in 0..variants.len() {
                let v = (k + round) % variants.len();
                let with = variants[v].1;
                settle().await;
                let (tx, rx) = tokio::sync::oneshot::channel();
                // one task: the latency phase, and beside it the backfills kept running
                let measure = async {
                    // one second of live rows first, not counted: the backfill's first chunks
                    // are under way before the clock starts, and it has seen live changes flow
                    // (a chunk read before any did goes at full speed, see README "Backfill")
                    let _ = latency(&mut arrivals, id, rate, 1).await;
                    let busy = Busy::start(&service_and_canal);
                    let mut l = latency(&mut arrivals, id + rate, rate, o.seconds).await;
                    let (cpu, cpu_text) = service_and_canal_cpu(&busy);
                    l.cpu = Some(cpu);
                    let _ = tx.send(());
                    (l, cpu_text)
                };
                let keep = async {
                    match with {
                        Some((consumer, limits)) => {
                            Some(keep_backfilling(bf.clone(), consumer, limits, rx).await)
                        }
                        None => None,
                    }
                };
                let ((l, cpu_text), kept) = tokio::join!(measure, keep);
                id += rate * (o.seconds + 1);
                let mut extra = String::new();
                let mut j = latency_json(&l);
                if let Some((started, bf_rows)) = kept {
                    extra = format!(
                        "; the backfill read {bf_rows} rows ({started} backfill{})",
                        if started == 1 { "" } else { "s" },
                    );
                    j["backfill"] = serde_json::json!({"backfills": started, "rows_read": bf_rows});
                    wait_quiet(&admin).await;
                }
                println!(
                    "live latency at {rate} rows/s ({:.0} achieved) for {}s, round {}, {}: {} rows, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {cpu_text}{extra}",
                    l.achieved,
                    o.seconds,
                    round + 1,
                    phase_name(with, chunk_rows),
                    l.n,
                    l.p50,
                    l.p99,
                    l.max
                );
                p99s[v].push(l.p99);
                rounds[v].push(j);
            }
        }
        let mut row = serde_json::Map::new();
        let without = median(&p99s[0]);
        for (v, (key, with)) in variants.iter().enumerate() {
            let m = median(&p99s[v]);
            let mut j = serde_json::json!({"rounds": rounds[v], "p99_median_ms": m});
            if with.is_some() {
                j["p99_median_minus_without_ms"] = (m - without).into();
                println!(
                    "live latency at {rate} rows/s, {}: p99 median {m:.1} ms of {:.1?}, no backfill {without:.1} ms of {:.1?}: {:+.1} ms (target ≤ +5)",
                    phase_name(*with, chunk_rows),
                    p99s[v],
                    p99s[0],
                    m - without
                );
            }
            row.insert((*key).into(), j);
        }
        row.insert("rate".into(), rate.into());
        lat_report.push(serde_json::Value::Object(row));
    }
    reader.abort();
    let _ = reader.await;
    let rss = take_peak_rss_kib(pid)
        .max(per_row.peak_rss_kib)
        .max(bulk.peak_rss_kib);
    println!(
        "service peak RSS (whole run): {:.1} MiB",
        rss as f64 / 1024.0
    );
    drop(service);
    let load_after = uptime_load();
    println!("load average before/after: {load_before} / {load_after}");
    let report = serde_json::json!({
        "quick": o.quick,
        "rows": rows,
        "chunk": chunk_rows,
        "bulk_max_rows": o.backfill_bulk,
        "message_bytes": sample.0.len(),
        "window": window,
        "source_probe_rows_per_s": source_rate,
        "broker_probe_msg_per_s": [probe_before, probe_after],
        "broker_msg_per_s": broker,
        "per_row": per_row.json(),
        "per_row_ratio_to_broker": per_row.rate() / broker,
        "bulk": bulk.json(),
        "latency": lat_report,
        "peak_rss_kib": rss,
        "cores": cores(),
        "ha_cluster_running": ha_cluster_running(),
        "load": [load_before, load_after],
    });
    write_json("bench-pipeline-backfill.json", &report);
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
