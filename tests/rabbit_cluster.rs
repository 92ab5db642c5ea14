//! The service against a three-node RabbitMQ cluster with a quorum queue: node failures while
//! rows flow, counted end to end by row and message id (MariaDB -> Canal -> canal-consumer ->
//! the quorum queue). Every scenario must lose no row, and a row delivered twice must carry the
//! same message id both times.
//!
//! Needs the local cluster of `deploy/local/rabbit-cluster-ctl` (started by `deploy/local/up`;
//! `CC_TEST_AMQP_CLUSTER_URLS` names its nodes), which the tests kill, freeze and restart: they
//! run one at a time (the Canal lock), and a guard restarts and thaws every node when a test
//! ends, pass or fail. The times to resume after each fault are printed as `measured:` lines.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::config::{DeadLetterStrategy, DeclareMode, QueueConfig, QueueType};
use canal_consumer::publisher::{PublishError, topology};
use common::service::*;
use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const DB: &str = "cc_it";
const CTL: &str = "deploy/local/rabbit-cluster-ctl";

/// The cluster's AMQP URLs, node 1 first (`CC_TEST_AMQP_CLUSTER_URLS`, comma-separated).
fn node_urls() -> Vec<String> {
    amqp_cluster_urls()
}

fn node_url(n: usize) -> String {
    node_urls()[n - 1].clone()
}

/// Runs the cluster script; panics with its output when it fails.
fn ctl(args: &[&str]) {
    script(CTL, args);
}

/// Restarts (and thaws) every node when dropped, so a failing test leaves a whole cluster.
struct Cluster;

impl Cluster {
    fn up() -> Cluster {
        ctl(&["start", "all"]);
        Cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in ["1", "2", "3"] {
            let _ = proc::output_within(
                CTL,
                std::process::Command::new(repo_root().join(CTL)).args(["thaw", n]),
                Duration::from_secs(30),
            );
        }
        let out = proc::output_within(
            CTL,
            std::process::Command::new(repo_root().join(CTL)).args(["start", "all"]),
            Duration::from_secs(300),
        );
        if !out.status.success() {
            eprintln!(
                "could not restore the cluster: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The queue settings every test uses: a quorum queue with at-least-once dead lettering.
fn quorum(queue: &str) -> QueueConfig {
    QueueConfig {
        name: queue.to_string(),
        declare: DeclareMode::Declare,
        durable: true,
        max_priority: None,
        queue_type: QueueType::Quorum,
        dead_letter_exchange: format!("{queue}.dlx"),
        dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
        delivery_limit: Some(5),
    }
}

/// The same settings for the service, as environment variables.
fn quorum_env(queue: &str, urls: &[String]) -> Vec<(String, String)> {
    [
        ("CANAL_CONSUMER__AMQP__URLS", urls.join(",")),
        ("CANAL_CONSUMER__AMQP__QUEUE__QUEUE_TYPE", "quorum".into()),
        ("CANAL_CONSUMER__AMQP__QUEUE__MAX_PRIORITY", "0".into()),
        (
            "CANAL_CONSUMER__AMQP__QUEUE__DEAD_LETTER_EXCHANGE",
            format!("{queue}.dlx"),
        ),
        (
            "CANAL_CONSUMER__AMQP__QUEUE__DEAD_LETTER_STRATEGY",
            "at-least-once".into(),
        ),
        ("CANAL_CONSUMER__AMQP__QUEUE__DELIVERY_LIMIT", "5".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cluster node {url} reachable (deploy/local/up): {e}"))
}

/// Deletes the queue, its dead-letter queue and exchange, then declares them as the service
/// does, through node `n` (a quorum queue's first leader is the node it is declared on).
async fn fresh_queue(queue: &str, n: usize) {
    let conn = connect(&node_url(n)).await;
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.to_string(), format!("{queue}.dead_letter")] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    ch.exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await
        .unwrap();
    let q = quorum(queue);
    topology::ensure_queue(&conn, &q).await.unwrap();
    topology::ensure_dead_letter_queue(&conn, &q).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    // a member on a node that was still booting (right after a restart) joins later: the
    // faults below assume all three members are up
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let line = queue_line(queue);
        let online = line.as_deref().and_then(|l| l.split(" online ").nth(1));
        if online.is_some_and(|o| o.matches("ccq").count() == 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quorum queue {queue} never had three members online: {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `queue NAME leader NODE members [..] online [..]` for `queue`, from `rabbit-cluster-ctl
/// leaders`.
fn queue_line(queue: &str) -> Option<String> {
    let out = proc::output_within(
        CTL,
        std::process::Command::new(repo_root().join(CTL)).arg("leaders"),
        Duration::from_secs(60),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(queue))
        .map(str::to_string)
}

/// The node that leads `queue` now (from `rabbit-cluster-ctl leaders`).
fn leader_of(queue: &str) -> String {
    let out = proc::output_within(
        CTL,
        std::process::Command::new(repo_root().join(CTL)).arg("leaders"),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&queue)).then(|| f.get(3).unwrap_or(&"?").to_string())
        })
        .unwrap_or_else(|| panic!("no quorum queue {queue} in:\n{text}"))
}

/// A consumer triggering `row_task` with `{id}` for inserts into cc_it.`table`.
fn row_consumer(name: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
[consumers.{name}]
{extra}
[[consumers.{name}.filters]]
database = "{DB}"
table = "{table}"
events = ["INSERT"]

[[consumers.{name}.rules]]
name = "row"
plugin = "row_task"
payload = {{ id = "${{data.id}}" }}
"#
    )
}

/// Message ids per row id, over every copy read.
#[derive(Default)]
struct Count {
    ids: BTreeMap<i64, BTreeSet<String>>,
    copies: usize,
}

impl Count {
    fn rows(&self) -> usize {
        self.ids.len()
    }
    fn has_all(&self, upto: i64) -> bool {
        (1..=upto).all(|i| self.ids.contains_key(&i))
    }
    /// 0 lost, and every copy of a row has the row's one id.
    fn assert_exactly(&self, upto: i64, what: &str) {
        let missing: Vec<i64> = (1..=upto).filter(|i| !self.ids.contains_key(i)).collect();
        assert!(missing.is_empty(), "{what}: rows lost: {missing:?}");
        for (row, ids) in &self.ids {
            assert_eq!(ids.len(), 1, "{what}: row {row} arrived with ids {ids:?}");
        }
        eprintln!(
            "measured: {what}: {} rows, {} messages ({} duplicates, each with its row's id)",
            self.rows(),
            self.copies,
            self.copies - self.rows()
        );
    }
}

/// Reads `queue` through the first node that answers until `done` holds (panics after
/// `timeout`); acks what it reads.
async fn read_until(queue: &str, timeout: Duration, done: impl Fn(&Count) -> bool) -> Count {
    let deadline = Instant::now() + timeout;
    let mut count = Count::default();
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "timed out reading {queue}: {} rows",
            count.rows()
        );
        for url in node_urls() {
            let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await
            else {
                continue;
            };
            let ch = conn.create_channel().await.unwrap();
            ch.basic_qos(500, Default::default()).await.unwrap();
            let Ok(mut consumer) = ch
                .basic_consume(
                    queue.into(),
                    "cluster-test-reader".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
            else {
                continue;
            };
            while !done(&count) {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, consumer.next()).await {
                    Ok(Some(Ok(d))) => {
                        let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                        let id = d
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_default();
                        let row = body["payload"]["id"]
                            .as_i64()
                            .or_else(|| body[1]["id"].as_i64());
                        if let Some(row) = row {
                            count.ids.entry(row).or_default().insert(id);
                            count.copies += 1;
                        }
                        d.ack(Default::default()).await.unwrap();
                    }
                    Ok(_) => continue 'outer,
                    Err(_) => panic!("timed out reading {queue}: {} rows", count.rows()),
                }
            }
            let _ = conn.close(200, "bye".into()).await;
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_status(
    svc: &ServiceProc,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn triggers(s: &Value) -> u64 {
    s["consumers"][0]["triggers"].as_u64().unwrap_or(0)
}

fn settled(s: &Value) -> bool {
    s["batches_in_flight"] == 0 && s["broker"]["unconfirmed"] == 0
}

/// Writes rows 1..=`n` and waits until the service confirmed and acked them all.
async fn first_rows(svc: &ServiceProc, table: &str, n: i64) -> Value {
    insert_notes(DB, table, 1, n);
    wait_status(
        svc,
        "the first rows confirmed",
        Duration::from_secs(60),
        |s| triggers(s) >= n as u64 && settled(s),
    )
    .await
}

/// Starts the service on a fresh table and quorum queue, with `urls` in that order.
async fn service(name: &str, table: &str, queue: &str, urls: &[String]) -> ServiceProc {
    note_table(DB, table);
    drop(Tap::clean(&format!("{DB}\\.{table}")).await);
    let mut svc = ServiceProc::prepare(
        name,
        queue,
        &[("c.toml", &row_consumer(name, table, ""))],
        "",
    );
    svc.env = quorum_env(queue, urls);
    svc.start().await;
    svc
}

/// Inserts rows `from..=to` in statements of `step` rows from a thread: load while a fault
/// happens.
fn writer(table: &str, from: i64, to: i64, step: i64) -> std::thread::JoinHandle<()> {
    let table = table.to_string();
    std::thread::spawn(move || {
        let mut i = from;
        while i <= to {
            let end = (i + step - 1).min(to);
            insert_notes(DB, &table, i, end);
            i = end + 1;
        }
    })
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn kill_9_of_the_connected_node_fails_over_and_loses_nothing() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_kill_connected");
    fresh_queue(queue, 1).await;
    let table = "qq_kill_connected";
    let urls = node_urls();
    let mut svc = service("qq-kill-connected", table, queue, &urls).await;
    let s = first_rows(&svc, table, 200).await;
    assert_eq!(s["broker"]["node"], 1, "{s:#}");

    let load = writer(table, 201, 1000, 20);
    let t0 = Instant::now();
    ctl(&["kill", "1"]);
    let s = wait_status(
        &svc,
        "a connection to another node",
        Duration::from_secs(60),
        |s| s["broker"]["state"] == "connected" && s["broker"]["node"] != 1,
    )
    .await;
    let reconnected = t0.elapsed();
    load.join().unwrap();
    let count = read_until(queue, Duration::from_secs(180), |c| c.has_all(1000)).await;
    let all = t0.elapsed();
    count.assert_exactly(1000, "kill -9 of the connected node");
    wait_status(&svc, "every batch acked", Duration::from_secs(60), settled).await;
    eprintln!(
        "measured: kill -9 of the connected node: publishing on node {} after {reconnected:?}, \
         all 1000 rows at the broker {all:?} after the kill",
        s["broker"]["node"]
    );
    let text = svc.logs();
    assert!(!text.contains("guest:guest@"), "a password reached the log");
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn kill_9_of_the_queue_leader_loses_nothing() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_kill_leader");
    // the leader on node 1, the service on node 2
    fresh_queue(queue, 1).await;
    assert!(
        leader_of(queue).starts_with("ccq1@"),
        "{}",
        leader_of(queue)
    );
    let table = "qq_kill_leader";
    let urls = vec![node_url(2), node_url(3), node_url(1)];
    let mut svc = service("qq-kill-leader", table, queue, &urls).await;
    first_rows(&svc, table, 200).await;
    let load = writer(table, 201, 1000, 20);
    let t0 = Instant::now();
    ctl(&["kill", "1"]);
    load.join().unwrap();
    let count = read_until(queue, Duration::from_secs(180), |c| c.has_all(1000)).await;
    let all = t0.elapsed();
    count.assert_exactly(1000, "kill -9 of the quorum queue's leader");
    let s = wait_status(&svc, "every batch acked", Duration::from_secs(60), settled).await;
    let leader = leader_of(queue);
    assert!(!leader.starts_with("ccq1@"), "new leader: {leader}");
    assert_eq!(
        s["broker"]["connects"], 1,
        "the connection to node 2 was kept: {s:#}"
    );
    eprintln!(
        "measured: kill -9 of the queue leader: new leader {leader}, all 1000 rows at the broker \
         {all:?} after the kill; the service stayed on {} (connects: {})",
        s["broker"]["broker"], s["broker"]["connects"]
    );
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn two_of_three_nodes_down_stalls_without_an_ack_until_a_majority_is_back() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_majority");
    fresh_queue(queue, 1).await;
    let table = "qq_majority";
    let urls = node_urls();
    let mut svc = service("qq-majority", table, queue, &urls).await;
    let before = first_rows(&svc, table, 100).await;
    assert!(settled(&before));

    ctl(&["kill", "2"]);
    ctl(&["kill", "3"]);
    insert_notes(DB, table, 101, 200);
    // not ready, saying why; and not one batch acked
    let deadline = Instant::now() + Duration::from_secs(60);
    let why = loop {
        let (code, body) = svc.get("/ready").await;
        if code != 200 && body.contains("broker") {
            break body;
        }
        assert!(Instant::now() < deadline, "/ready stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("measured: two of three nodes down: /ready says {why}");
    // the batch with the new rows waits unacked, and acks go in batch order: from now on not
    // one batch is acked (batches without triggers, other tables' rows, were acked before)
    let s = svc.status().await;
    let acked = s["canal"]["batches_acked"].as_u64().unwrap();
    assert!(s["batches_in_flight"].as_u64().unwrap() > 0, "{s:#}");
    // still nothing acked after a confirm timeout (5 s) and a retry
    let hold = Instant::now() + Duration::from_secs(8);
    while Instant::now() < hold {
        let s = svc.status().await;
        assert_eq!(
            s["canal"]["batches_acked"].as_u64().unwrap(),
            acked,
            "a batch was acked without a majority: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let t0 = Instant::now();
    ctl(&["start", "2"]);
    let started = t0.elapsed();
    let t1 = Instant::now();
    let count = read_until(queue, Duration::from_secs(180), |c| c.has_all(200)).await;
    let all = t1.elapsed();
    count.assert_exactly(200, "two of three nodes down, then a majority back");
    wait_status(
        &svc,
        "ready and acked again",
        Duration::from_secs(90),
        |s| settled(s) && s["canal"]["batches_acked"].as_u64().unwrap_or(0) > acked,
    )
    .await;
    let (code, body) = svc.get("/ready").await;
    assert_eq!(code, 200, "{body}");
    eprintln!(
        "measured: two of three nodes down: node 2 back in {started:?}, every row at the broker \
         {all:?} after that"
    );
    svc.terminate(Duration::from_secs(30));
}

/// The queue's leader and one more node down before the service's first publish on the third:
/// no leader can be elected, so publishes find none (they time out, or are nacked: on RabbitMQ
/// 3.x a channel whose first publish to a quorum queue met a dead leader nacks every later
/// publish for as long as it lives, which made `kill_9_of_the_connected_node...` fail now and
/// then). Nothing is lost, and once a majority is back every row arrives; after nacks, on a
/// publishing channel opened after the one that nacked.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn the_leader_and_another_node_down_before_the_first_publish_loses_nothing_once_a_majority_is_back()
 {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_no_leader");
    fresh_queue(queue, 1).await;
    assert!(
        leader_of(queue).starts_with("ccq1@"),
        "the queue is led by the node it was declared on"
    );
    let table = "qq_no_leader";
    let urls = [node_url(2), node_url(1), node_url(3)];
    let mut svc = service("qq-no-leader", table, queue, &urls).await;
    wait_status(&svc, "connected to node 2", Duration::from_secs(60), |s| {
        s["broker"]["state"] == "connected" && s["broker"]["node"] == 1
    })
    .await;

    ctl(&["kill", "1"]);
    ctl(&["kill", "3"]);
    insert_notes(DB, table, 1, 50);
    wait_status(
        &svc,
        "a publish nacked by node 2, or its confirm lost",
        Duration::from_secs(60),
        |s| {
            s["broker"]["nacked"].as_u64().unwrap_or(0)
                + s["broker"]["timeouts"].as_u64().unwrap_or(0)
                > 0
        },
    )
    .await;

    let t0 = Instant::now();
    ctl(&["start", "3"]);
    let count = read_until(queue, Duration::from_secs(180), |c| c.has_all(50)).await;
    let all = t0.elapsed();
    count.assert_exactly(
        50,
        "the leader and another node down before the first publish",
    );
    let s = wait_status(&svc, "every batch acked", Duration::from_secs(60), settled).await;
    // which of the two RabbitMQ takes varies from run to run; the counters are the process's,
    // so a channel that nacked was replaced by a renewal or went with its connection
    if s["broker"]["nacked"].as_u64().unwrap_or(0) > 0 {
        assert!(
            s["broker"]["renewed_channels"].as_u64().unwrap_or(0) > 0
                || s["broker"]["connects"].as_u64().unwrap_or(0) > 1,
            "rows arrived on the channel that nacked: {s:#}"
        );
    }
    eprintln!(
        "measured: no leader at the first publish: every row at the broker {all:?} after node 3 \
         was started ({} channels renewed, {} nacks, {} lost confirms)",
        s["broker"]["renewed_channels"], s["broker"]["nacked"], s["broker"]["timeouts"]
    );
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_frozen_node_past_the_heartbeat_fails_over_and_loses_nothing() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_frozen");
    // the leader on node 2; the service on node 1, which freezes
    fresh_queue(queue, 2).await;
    let table = "qq_frozen";
    let urls: Vec<String> = node_urls()
        .into_iter()
        .map(|u| format!("{u}?heartbeat=2"))
        .collect();
    let mut svc = service("qq-frozen", table, queue, &urls).await;
    first_rows(&svc, table, 100).await;
    let load = writer(table, 101, 600, 20);
    let t0 = Instant::now();
    ctl(&["freeze", "1"]);
    let s = wait_status(
        &svc,
        "a connection to another node",
        Duration::from_secs(60),
        |s| s["broker"]["state"] == "connected" && s["broker"]["node"] != 1,
    )
    .await;
    let moved = t0.elapsed();
    load.join().unwrap();
    // thawed well within the Erlang distribution's tick (60 s), so the cluster does not split
    ctl(&["thaw", "1"]);
    let count = read_until(queue, Duration::from_secs(180), |c| c.has_all(600)).await;
    let all = t0.elapsed();
    count.assert_exactly(600, "SIGSTOP of the connected node");
    wait_status(&svc, "every batch acked", Duration::from_secs(60), settled).await;
    eprintln!(
        "measured: SIGSTOP of the connected node (heartbeat 2 s): publishing on node {} after \
         {moved:?}, all 600 rows at the broker {all:?} after the freeze",
        s["broker"]["node"]
    );
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_rolling_restart_under_load_loses_nothing() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_rolling");
    fresh_queue(queue, 1).await;
    let table = "qq_rolling";
    let urls = node_urls();
    let mut svc = service("qq-rolling", table, queue, &urls).await;
    let n = 3000;
    let t0 = Instant::now();
    // rows keep coming, 10 per statement, while every node restarts in turn
    let load = writer(table, 1, n, 10);
    for node in ["1", "2", "3"] {
        ctl(&["restart", node]);
    }
    let restarts = t0.elapsed();
    load.join().unwrap();
    let count = read_until(queue, Duration::from_secs(240), |c| c.has_all(n)).await;
    count.assert_exactly(n, "rolling restart of all three nodes under load");
    let s = wait_status(&svc, "every batch acked", Duration::from_secs(90), settled).await;
    eprintln!(
        "measured: rolling restart: three restarts in {restarts:?}, all {n} rows at the broker \
         {:?} after the first; {} connections, {} rollbacks",
        t0.elapsed(),
        s["broker"]["connects"],
        s["canal"]["rollbacks"]
    );
    svc.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn the_quorum_queue_dead_letters_to_its_quorum_dead_letter_queue_and_mismatches_are_named() {
    // the others kill nodes: one test at a time
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_dlx");
    fresh_queue(queue, 3).await;
    let conn = connect(&node_url(1)).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for id in ["rejected-1", "over-limit-1"] {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{id}: {confirm:?}");
    }
    let get = |ch: lapin::Channel, q: String| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(m) = ch
                .basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                return m;
            }
            assert!(Instant::now() < deadline, "nothing in {q}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // a worker rejects the first: dead-lettered at once
    let m = get(ch.clone(), queue.clone()).await;
    assert_eq!(
        m.properties.message_id().as_ref().unwrap().as_str(),
        "rejected-1"
    );
    m.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // the second is requeued until the delivery limit (5) dead-letters it
    let mut deliveries = 0;
    loop {
        let q = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap();
        match q {
            Some(m) => {
                deliveries += 1;
                m.reject(BasicRejectOptions { requeue: true })
                    .await
                    .unwrap();
            }
            None if deliveries > 5 => break,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        assert!(
            deliveries <= 10,
            "the delivery limit never dead-lettered it"
        );
    }
    let dlq = format!("{queue}.dead_letter");
    let mut reasons = BTreeMap::new();
    for _ in 0..2 {
        let m = get(ch.clone(), dlq.clone()).await;
        let headers = m.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get("x-first-death-reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no x-first-death-reason: {other:?} in {headers:?}"),
        };
        reasons.insert(
            m.properties.message_id().as_ref().unwrap().to_string(),
            reason,
        );
        m.ack(Default::default()).await.unwrap();
    }
    assert_eq!(reasons["rejected-1"], "rejected", "{reasons:?}");
    assert_eq!(reasons["over-limit-1"], "delivery_limit", "{reasons:?}");
    let _ = conn.close(200, "bye".into()).await;
    let types = leader_of(&dlq);
    assert!(
        types.starts_with("ccq"),
        "the dead-letter queue is a quorum queue: {types}"
    );

    // what we declare differs from what exists: the argument and the key are named
    let conn = connect(&node_url(2)).await;
    let other = QueueConfig {
        delivery_limit: Some(3),
        ..quorum(queue)
    };
    match topology::ensure_queue(&conn, &other).await {
        Err(PublishError::Topology(text)) => {
            assert!(
                text.contains("x-delivery-limit") && text.contains("amqp.queue.delivery_limit"),
                "{text}"
            );
        }
        other => panic!("expected a topology error, got {other:?}"),
    }
    let classic = QueueConfig {
        queue_type: QueueType::Classic,
        dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
        delivery_limit: None,
        ..quorum(queue)
    };
    match topology::ensure_queue(&conn, &classic).await {
        // the broker names the first argument that differs (here x-dead-letter-strategy)
        Err(PublishError::Topology(text)) => {
            assert!(
                text.contains("inequivalent arg") && text.contains("set amqp.queue."),
                "{text}"
            );
        }
        other => panic!("expected a topology error, got {other:?}"),
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_celery_worker_runs_every_task_from_the_quorum_queue() {
    let _lock = canal_lock().await;
    let _cluster = Cluster::up();
    let queue = &common::queue("cc_qq_celery");
    fresh_queue(queue, 2).await;
    let table = "qq_celery";
    note_table(DB, table);
    drop(Tap::clean(&format!("{DB}\\.{table}")).await);
    let consumer_toml = row_consumer(
        "qq_celery",
        table,
        r#"format = { kind = "celery", task = "canal_consumer.plugin", mapping = "kwargs" }"#,
    );
    let mut svc = ServiceProc::prepare("qq-celery", queue, &[("c.toml", &consumer_toml)], "");
    svc.env = quorum_env(queue, &node_urls());
    svc.start().await;

    // the worker declares the queue with exactly our arguments (README "RabbitMQ cluster")
    let args = serde_json::json!({
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": format!("{queue}.dlx"),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 5,
    });
    let (mut worker, out) = celery_worker_on(
        queue,
        &svc.dir,
        &node_urls().join(";"),
        &[
            ("CC_QUEUE", queue.to_string()),
            ("CC_QUEUE_ARGUMENTS", args.to_string()),
        ],
    );
    let n = 50;
    insert_notes(DB, table, 1, n);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: BTreeSet<i64> = read_jsonl(&out)
            .iter()
            .filter_map(|r| r["kwargs"]["id"].as_i64())
            .collect();
        if rows.len() as i64 == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "celery ran {} of {n} rows; worker log:\n{}",
            rows.len(),
            std::fs::read_to_string(svc.dir.join("worker.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.kill();
    let log = std::fs::read_to_string(svc.dir.join("worker.log")).unwrap_or_default();
    assert!(!log.contains("PRECONDITION_FAILED"), "{log}");
    svc.terminate(Duration::from_secs(30));
}
