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

/// The service's `canal.source_url` for backfills (`CC_TEST_BACKFILL_URL`).
pub fn backfill_url() -> String {
    env_or(
        "CC_TEST_BACKFILL_URL",
        &format!(
            "mysql://backfill:backfill@{}:{}",
            mysql_host(),
            mysql_port()
        ),
    )
}

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

pub async fn wait_backfill(svc: &ServiceProc, id: &str, state: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let b = backfill(svc, id).await;
        if b["state"] == state {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "backfill {id} not {state} in time: {b}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// Waits until backfill `id` has confirmed at least `chunks` chunks.
pub async fn wait_chunks(svc: &ServiceProc, id: &str, chunks: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = backfill(svc, id).await;
        if b["progress"]["chunks"].as_u64().unwrap() >= chunks {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no progress: {b}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
