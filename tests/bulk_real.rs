//! Bulk rules end to end: the real `canal-consumer` binary, real Canal fed by real MariaDB,
//! real RabbitMQ (and a real Celery worker): every row inserted arrives exactly once across the
//! list payloads, each message says which rows it covers and carries the id derived from them.
//! Start the services with `deploy/local/up`; run under the stack lock.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::trigger::{SourceRef, bulk_message_id};
use common::service::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const DB: &str = "cc_bulk";

fn bulk_consumer(name: &str, table: &str, max_rows: usize, extra: &str) -> String {
    format!(
        r#"
[consumers.{name}]
{extra}
[[consumers.{name}.filters]]
database = "{DB}"
table = "{table}"
events = ["INSERT"]

[[consumers.{name}.rules]]
name = "bulk"
plugin = "bulk_task"
payload = {{ id = "${{data.id}}", note = "${{data.note}}" }}
batch = {{ max_rows = {max_rows}, max_wait = "50ms" }}
"#
    )
}

/// How often each id appears across the messages' list payloads.
fn row_counts(got: &[Got]) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for g in got {
        for p in g.body["payload"].as_array().into_iter().flatten() {
            *out.entry(p["id"].as_i64().unwrap()).or_default() += 1;
        }
    }
    out
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_bulk_rule_delivers_every_row_exactly_once_in_list_payloads() {
    let _lock = canal_lock().await;
    let name = "rows";
    note_table(DB, name);
    drop(Tap::clean(&format!("{DB}\\.{name}")).await);
    let queue = &common::queue("cc_e2e_bulk");
    delete_queue(queue).await;
    let max_rows = 100;
    let mut svc = ServiceProc::prepare(
        "bulk",
        queue,
        &[("bulk.toml", &bulk_consumer("bulk_rows", name, max_rows, ""))],
        "",
    );
    svc.start().await;
    let n = 2_500;
    insert_notes(DB, name, 1, n);
    let got = consume_until(queue, Duration::from_secs(120), |got| {
        row_counts(got).len() as i64 == n
    })
    .await;
    // nothing more arrives: the rows came once
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(queue_depth(queue).await, 0);
    let counts = row_counts(&got);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert!(counts.values().all(|&c| c == 1), "a row came twice");
    // fewer messages than rows, none over max_rows, each describing the rows it holds
    assert!(got.len() >= (n as usize).div_ceil(max_rows) && got.len() < n as usize / 10);
    for g in &got {
        let b = &g.body;
        let rows = b["payload"].as_array().unwrap();
        assert!(!rows.is_empty() && rows.len() <= max_rows, "{b}");
        assert_eq!(b["bulk"]["rows"].as_u64(), Some(rows.len() as u64), "{b}");
        assert_eq!(b["plugin"], "bulk_task");
        // ids inside one message are in binlog (here: id) order
        let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // the id is the documented bulk id of the covered range
        let first: SourceRef = serde_json::from_value(b["source"].clone()).unwrap();
        let mut last = first.clone();
        last.position = serde_json::from_value(b["bulk"]["last_position"].clone()).unwrap();
        last.executed_at = b["bulk"]["last_executed_at"].as_i64().unwrap();
        let id = bulk_message_id(
            &first,
            &last,
            rows.len() as u32,
            "bulk_rows",
            "bulk",
            "bulk_task",
        );
        assert_eq!(g.message_id, id);
        assert_eq!(b["id"], Value::String(id));
    }
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_real_celery_worker_gets_each_bulk_as_a_list_argument() {
    let _lock = canal_lock().await;
    let name = "celery_rows";
    note_table(DB, name);
    drop(Tap::clean(&format!("{DB}\\.{name}")).await);
    let queue = &common::queue("cc_e2e_bulk_celery");
    delete_queue(queue).await;
    let consumer = bulk_consumer(
        "bulk_celery",
        name,
        50,
        r#"format = { kind = "celery", task = "canal_consumer.plugin", mapping = "args" }"#,
    );
    let mut svc = ServiceProc::prepare("bulk-celery", queue, &[("c.toml", &consumer)], "");
    svc.start().await;
    let (mut worker, out) = celery_worker(queue, &svc.dir);
    let n = 300;
    insert_notes(DB, name, 1, n);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let runs: Vec<Value> = loop {
        let runs: Vec<Value> = read_jsonl(&out);
        let rows: usize = runs
            .iter()
            .map(|r| r["args"][1].as_array().map_or(0, Vec::len))
            .sum();
        if rows as i64 >= n {
            break runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "celery ran {rows} of {n} rows; worker log:\n{}",
            std::fs::read_to_string(svc.dir.join("worker.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    worker.kill();
    // task(plugin, [row payloads]): every row once, in lists of at most 50
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for run in &runs {
        assert_eq!(run["args"][0], "bulk_task", "{run}");
        let rows = run["args"][1].as_array().unwrap();
        assert!(!rows.is_empty() && rows.len() <= 50, "{run}");
        for r in rows {
            *counts.entry(r["id"].as_i64().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert!(counts.values().all(|&c| c == 1), "a row ran twice");
    svc.terminate(Duration::from_secs(30));
}

/// The bulk ids each row was carried under, in arrival order of its copies.
fn ids_by_row(got: &[Got]) -> BTreeMap<i64, Vec<String>> {
    let mut out: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for g in got {
        for p in g.body["payload"].as_array().into_iter().flatten() {
            out.entry(p["id"].as_i64().unwrap())
                .or_default()
                .push(g.message_id.clone());
        }
    }
    out
}

/// Guarantee 2 for bulk rules: rows Canal sends again keep their bulks and bulk ids even when
/// Canal cuts them into other batches. The service publishes ten 6-row transactions as they
/// are committed (each waited for at the queue: many small batches), while a proxy holds the
/// broker's confirms, so nothing is acked to Canal; it is killed (-9) and started again on the
/// same state directory; Canal sends all 60 rows again, now in one or two large batches. Each
/// row's second copy must come in a bulk with its first copy's id.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn bulks_sent_again_after_a_kill_keep_their_ids_though_canal_cuts_them_otherwise() {
    let _lock = canal_lock().await;
    let name = "recut";
    note_table(DB, name);
    drop(Tap::clean(&format!("{DB}\\.{name}")).await);
    let queue = &common::queue("cc_e2e_bulk_recut");
    delete_queue(queue).await;
    let proxy = common::hold::HoldProxy::start();
    let mut svc = ServiceProc::prepare(
        "bulk-recut",
        queue,
        &[("bulk.toml", &bulk_consumer("bulk_recut", name, 4, ""))],
        "",
    );
    svc.env
        .push(("CANAL_CONSUMER__AMQP__URL".into(), proxy.url(60)));
    // the held confirms must not time out (a rollback would send the rows again in this run)
    svc.env.push((
        "CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT".into(),
        "120s".into(),
    ));
    svc.start().await;
    let arrivals = Arrivals::start(queue).await;
    proxy.hold_replies();
    let (txs, rows) = (10i64, 6i64);
    for t in 0..txs {
        insert_notes(DB, name, t * rows + 1, (t + 1) * rows);
        let want = ((t + 1) * rows) as usize;
        arrivals
            .wait(
                &format!("the first {want} rows"),
                Duration::from_secs(60),
                |got| ids_by_row(got).len() == want,
            )
            .await;
    }
    let first = svc.status().await;
    let first_batches = first["canal"]["batches_received"].as_u64().unwrap();
    assert!(
        first_batches >= txs as u64,
        "one batch or more per transaction: {first:#}"
    );
    // (a batch with no rows of ours, such as the table's DDL, is acked at once)
    assert!(
        first["canal"]["acked_position"].is_null(),
        "no row may be acked: {first:#}"
    );
    svc.kill9();
    proxy.release_replies();
    // again, on the same state directory; the broker directly
    svc.env.clear();
    svc.start().await;
    let n = (txs * rows) as usize;
    arrivals
        .wait("every row a second time", Duration::from_secs(60), |got| {
            let by_row = ids_by_row(got);
            by_row.len() == n && by_row.values().all(|ids| ids.len() >= 2)
        })
        .await;
    let second = wait_status(&svc, "every batch acked", |s| {
        s["canal"]["inflight_batches"] == 0 && s["canal"]["batches_acked"].as_u64() > Some(0)
    })
    .await;
    // Canal did cut the rows otherwise: fewer, larger batches than the first time
    let second_batches = second["canal"]["batches_received"].as_u64().unwrap();
    assert!(
        second_batches < first_batches,
        "the second run got {second_batches} batches, the first {first_batches}: Canal cut them the same way, which proves nothing"
    );
    let got = arrivals.finish().await;
    for (row, ids) in ids_by_row(&got) {
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "row {row} came under bulk ids {ids:?}"
        );
    }
    svc.terminate(Duration::from_secs(30));
}
