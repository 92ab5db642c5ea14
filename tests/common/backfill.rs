//! Backfill helpers shared by the real-service tests (`backfill_real`, `ha_real`): a service
//! whose backfills read the source as deploy/local's `backfill` account, a consumer that turns
//! every change and SNAPSHOT into "row"/"gone" messages, and the comparison of what a consumer
//! saw last per key with the table's final state.
#![allow(dead_code)]

use super::service::*;
use super::*;
use mysql_async::prelude::Queryable as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const DB: &str = "cc_bf";

pub use super::env::backfill_url;

/// A connection pool as the test user (ALL privileges).
pub fn pool() -> mysql_async::Pool {
    mysql_async::Pool::new(
        format!(
            "mysql://{}:{}@{}:{}/{DB}",
            mysql_user(),
            mysql_password(),
            mysql_host(),
            mysql_port()
        )
        .as_str(),
    )
}

/// Closes `pool` (every connection taken from it must be dropped first, or this waits).
pub async fn disconnect(pool: mysql_async::Pool) {
    tokio::time::timeout(Duration::from_secs(10), pool.disconnect())
        .await
        .expect("a connection of the pool was still held")
        .unwrap();
}

/// `extra` config for a service whose backfills use watermark table `wm`.
pub fn backfill_config(wm: &str) -> String {
    format!(
        r#"
[backfill]
watermark_table = "canal_consumer.{wm}"
chunk_timeout = "30s"
"#
    )
}

/// A consumer of every change and SNAPSHOT of `DB.table`: `row {{key, v}}` for rows that exist,
/// `gone {{key}}` for keys that stop existing. `key` is the template of the key.
pub fn state_consumer(
    name: &str,
    table: &str,
    key: &str,
    old_key: &str,
    key_changed: &str,
) -> String {
    format!(
        r#"
[consumers.{name}]
[[consumers.{name}.filters]]
database = "{DB}"
table = "{table}"
events = ["INSERT", "UPDATE", "DELETE", "SNAPSHOT"]

[[consumers.{name}.rules]]
name = "row"
when = {{ events = ["INSERT", "UPDATE", "SNAPSHOT"] }}
plugin = "row"
payload = {{ key = "{key}", v = "${{data.v}}" }}

[[consumers.{name}.rules]]
name = "moved"
when = {{ events = ["UPDATE"], condition = "{key_changed}" }}
plugin = "gone"
payload = {{ key = "{old_key}" }}

[[consumers.{name}.rules]]
name = "deleted"
when = {{ events = ["DELETE"] }}
plugin = "gone"
payload = {{ key = "{key}" }}
"#
    )
}

/// Starts a backfill through the admin API; returns its id.
pub async fn start_backfill(svc: &ServiceProc, query: &str) -> String {
    let token = svc.token();
    let r = canal_consumer::admin::client::request_with(
        &svc.admin,
        "POST",
        &format!("/backfills?{query}"),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.body, svc.logs());
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["id"].as_str().unwrap().to_string()
}

pub async fn backfill(svc: &ServiceProc, id: &str) -> Value {
    let r = canal_consumer::admin::client::request_with(
        &svc.admin,
        "GET",
        &format!("/backfills/{id}"),
        Some(&svc.token()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

/// Polls backfill `id` every `every` until `ok` holds for its view, which it returns; fails
/// (with the view and the service's log) after `timeout`, saying it was waiting for `what`.
pub async fn wait_view(
    svc: &ServiceProc,
    id: &str,
    what: &str,
    timeout: Duration,
    every: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let b = backfill(svc, id).await;
        if ok(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "backfill {id}: {what} not in time: {b}\n{}",
            svc.logs()
        );
        tokio::time::sleep(every).await;
    }
}

pub async fn wait_backfill(svc: &ServiceProc, id: &str, state: &str, timeout: Duration) -> Value {
    let what = format!("state {state}");
    wait_view(svc, id, &what, timeout, Duration::from_millis(200), |b| {
        b["state"] == state
    })
    .await
}

/// What a consumer saw last per key, in arrival order: Some(v) for a row, None for gone.
pub fn last_seen(got: &[Got], consumer: &str) -> BTreeMap<String, Option<i64>> {
    let mut seen = BTreeMap::new();
    for g in got {
        if g.body["consumer"].as_str() != Some(consumer) {
            continue;
        }
        let key = match &g.body["payload"]["key"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match g.body["plugin"].as_str() {
            Some("row") => {
                seen.insert(key, g.body["payload"]["v"].as_i64());
            }
            Some("gone") => {
                seen.insert(key, None);
            }
            _ => {}
        }
    }
    seen
}

/// Compares what the consumer saw with the table's final state.
pub fn assert_final_state(
    seen: &BTreeMap<String, Option<i64>>,
    table: &BTreeMap<String, i64>,
    what: &str,
) {
    let mut wrong = Vec::new();
    for (k, v) in table {
        if seen.get(k) != Some(&Some(*v)) {
            wrong.push(format!(
                "row {k}: table has v={v}, last message {:?}",
                seen.get(k)
            ));
        }
    }
    for (k, v) in seen {
        // the sentinel (v = -1) is not part of the tables' rows
        if v.is_some() && *v != Some(-1) && !table.contains_key(k) {
            wrong.push(format!("row {k} is gone, last message says v={v:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} keys wrong, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
}

/// A sentinel change after everything else; its message arrives after every earlier one.
pub async fn sentinel(pool: &mysql_async::Pool, table: &str, key_sql: &str) {
    let mut c = pool.get_conn().await.unwrap();
    c.query_drop(format!("INSERT INTO {table} VALUES ({key_sql}, -1)"))
        .await
        .unwrap();
}

pub fn is_sentinel(g: &Got) -> bool {
    g.body["plugin"] == "row" && g.body["payload"]["v"] == -1
}

/// A writer on a connection of its own: the statement `next` makes, one after another with
/// `pause` between, until [`Writer::stop`]. Returns how many it ran.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl Writer {
    pub fn start(
        pool: &mysql_async::Pool,
        seed: u64,
        pause: Duration,
        mut next: impl FnMut(&mut fastrand::Rng) -> String + Send + 'static,
    ) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pool, flag) = (pool.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut c = pool.get_conn().await.unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut ops = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                c.query_drop(next(&mut rng)).await.unwrap();
                ops += 1;
                tokio::time::sleep(pause).await;
            }
            ops
        });
        Writer { stop, task }
    }

    /// Stop after the statement under way; how many ran.
    pub async fn stop(self) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// While live changes flow, `svc`'s backfills read at most `rate` rows/s in reads of at most
/// `chunk` rows; live changes flow while one came within 3 s (a Canal that stalls for less
/// does not end them).
pub fn yield_while_live(svc: &mut ServiceProc, rate: u32, chunk: usize) {
    for (k, v) in [
        ("RATE_WHILE_LIVE", rate.to_string()),
        ("CHUNK_WHILE_LIVE", chunk.to_string()),
        ("LIVE_WINDOW", "3s".to_string()),
    ] {
        svc.env.push((format!("CANAL_CONSUMER__BACKFILL__{k}"), v));
    }
}

/// Waits until backfill `id` has confirmed at least `chunks` chunks.
pub async fn wait_chunks(svc: &ServiceProc, id: &str, chunks: u64) {
    let what = format!("{chunks} chunks confirmed");
    wait_view(
        svc,
        id,
        &what,
        Duration::from_secs(60),
        Duration::from_millis(20),
        |b| b["progress"]["chunks"].as_u64().unwrap() >= chunks,
    )
    .await;
}

/// `DB.table (id INT PRIMARY KEY, v INT)` holding rows 1..=rows with v = id, written without
/// the binlog: only a backfill can bring them.
pub fn keyed_table(table: &str, rows: u64) {
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{table}; \
         CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, v INT NOT NULL); \
         USE {DB}; SET SESSION sql_log_bin = 0; \
         INSERT INTO {DB}.{table} SELECT seq, seq FROM seq_1_to_{rows};"
    ));
}

/// A service (not started) on a fresh `queue`, whose backfills read the source as the
/// `backfill` account and keep their records in a fresh watermark table `canal_consumer.wm`.
pub async fn backfill_proc(
    name: &str,
    queue: &str,
    consumers: &[(&str, &str)],
    wm: &str,
) -> ServiceProc {
    mysql(&format!("DROP TABLE IF EXISTS canal_consumer.{wm};"));
    delete_queue(queue).await;
    let mut svc = ServiceProc::prepare(name, queue, consumers, &backfill_config(wm));
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    svc
}

/// [`backfill_proc`], started.
pub async fn backfill_service(
    name: &str,
    queue: &str,
    consumers: &[(&str, &str)],
    wm: &str,
) -> ServiceProc {
    let mut svc = backfill_proc(name, queue, consumers, wm).await;
    svc.start().await;
    svc
}

/// Writes a sentinel row (key -1) to `DB.table`, reads `queue` up to its message, and checks
/// that `consumer` saw every key of the table in its final state. Returns the messages.
pub async fn check_final_state(queue: &str, table: &str, consumer: &str, what: &str) -> Vec<Got> {
    let pool = pool();
    sentinel(&pool, table, "-1").await;
    let got = consume_until(queue, Duration::from_secs(120), |g| {
        g.last().is_some_and(is_sentinel)
    })
    .await;
    let mut conn = pool.get_conn().await.unwrap();
    let rows: Vec<(i64, i64)> = conn
        .query(format!("SELECT id, v FROM {table} WHERE id > 0"))
        .await
        .unwrap();
    drop(conn);
    disconnect(pool).await;
    let state: BTreeMap<String, i64> = rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_final_state(&last_seen(&got, consumer), &state, what);
    got
}

/// Every key's "row" messages carry one message id (a row sent again keeps its id); returns
/// how many messages were repeats.
pub fn assert_one_id_per_key(got: &[Got]) -> usize {
    let mut ids_of: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let rows: Vec<&Got> = got.iter().filter(|g| g.body["plugin"] == "row").collect();
    for g in &rows {
        ids_of
            .entry(g.body["payload"]["key"].to_string())
            .or_default()
            .insert(g.message_id.clone());
    }
    let twice: Vec<&String> = ids_of
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        twice.is_empty(),
        "rows that arrived under two ids: {twice:?}"
    );
    rows.len() - ids_of.len()
}
