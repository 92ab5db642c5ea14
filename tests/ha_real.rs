//! ZooKeeper mode end to end: the real `canal-consumer` binary (one or two replicas) against
//! the real ZooKeeper and the two-server Canal cluster of `deploy/local/up`
//! (`deploy/local/zk-ctl`, `deploy/local/canal-ha-ctl`: servers on 127.0.0.1:11121 and :11122,
//! destination `example`, cursors in ZooKeeper), real MariaDB and real RabbitMQ. Each test
//! writes rows to a table of its own and counts them on a queue of its own: every row must
//! arrive; a row may arrive twice only with its original message id, and the first copies
//! arrive in binlog order (README guarantee 5, also across a failover).
//!
//! The tests kill, freeze and restart the cluster's processes, so they run one at a time
//! (`canal_lock`), and a guard starts whatever a test stopped again when it ends. The replicas
//! use a 3 s ZooKeeper session timeout; the Canal servers 5 s (canal-ha-ctl's default).
//! `measured:` lines (run with `--nocapture`) give the failover times the README quotes.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::event::{EventType, Position};
use canal_consumer::trigger::{SourceRef, message_id};
use common::service::*;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use zookeeper_client as zk;

const DB: &str = "cc_it";
const SESSION: &str = "3s";
const ROOT: &str = "/otter/canal";
const DEST: &str = "example";
const CLIENT_ID: &str = "1001";

fn zk_servers() -> String {
    env_or("CC_TEST_ZK_SERVERS", "127.0.0.1:2181")
}

fn client_node() -> String {
    format!("{ROOT}/destinations/{DEST}/{CLIENT_ID}/running")
}

async fn zk_client() -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(5))
        .connect(&zk_servers())
        .await
        .unwrap_or_else(|e| panic!("zookeeper at {} (deploy/local/up): {e}", zk_servers()))
}

/// The data of a node, None when it does not exist.
async fn node(path: &str) -> Option<Vec<u8>> {
    let c = zk_client().await;
    match c.get_data(path).await {
        Ok((d, _)) => Some(d),
        Err(zk::Error::NoNode) => None,
        Err(e) => panic!("reading {path}: {e}"),
    }
}

fn address_of(data: &[u8]) -> String {
    let v: Value = serde_json::from_slice(data).unwrap();
    v["address"].as_str().unwrap().to_string()
}

/// The Canal server running the destination (`127.0.0.1:1112N`), waiting until one does.
async fn running_canal() -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(d) = node(&format!("{ROOT}/destinations/{DEST}/running")).await {
            return address_of(&d);
        }
        assert!(Instant::now() < deadline, "no canal server runs {DEST}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Server number (1 or 2) of a cluster address.
fn server_no(addr: &str) -> &'static str {
    match addr.rsplit(':').next() {
        Some("11121") => "1",
        Some("11122") => "2",
        _ => panic!("{addr} is not a server of the local canal cluster"),
    }
}

/// Waits until no client holds the destination (a replica of an earlier test that was killed
/// keeps its node until its session times out), then brings the replicas' cursor to the end
/// of the binlog as of now ([`catch_up`]).
async fn wait_destination_ready() {
    let deadline = Instant::now() + Duration::from_secs(60);
    while node(&client_node()).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "{} still held by an earlier client",
            client_node()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    catch_up().await;
}

/// Acks, as the replicas' client id, everything the cluster's destination has up to a marker
/// row written now. The cursor moves only while replicas run, so whatever other tests and the
/// bench wrote since the last HA test is still ahead of it (after a few bench runs, millions of
/// rows for Canal to parse): a replica started on that backlog would spend the test's time
/// limits wading through it. A bare session to the running Canal server does it first, with a
/// limit sized for such a backlog.
async fn catch_up() {
    let marker = "ha_catch_up";
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; \
         CREATE TABLE IF NOT EXISTS {DB}.{marker} (id BIGINT PRIMARY KEY AUTO_INCREMENT)"
    ));
    let addr = running_canal().await;
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut cfg = session_config();
    cfg.host = host.into();
    cfg.port = port.parse().expect("a port");
    cfg.destination = DEST.into();
    cfg.client_id = CLIENT_ID.into();
    let mut session = canal_consumer::canal::Session::connect(&cfg)
        .await
        .unwrap_or_else(|e| panic!("the cluster's canal server {addr}: {e}"));
    let filter = format!("{DB}\\.{marker}");
    session.subscribe(&filter).await.expect("subscribe");
    session.rollback(0).await.expect("rollback");
    // only now: Canal filters rows when it parses them, so a marker parsed under the filter
    // of the replicas before would come as an empty transaction
    let id: i64 = mysql(&format!(
        "INSERT INTO {DB}.{marker} VALUES (); SELECT LAST_INSERT_ID()"
    ))
    .trim()
    .parse()
    .expect("the marker row's id");
    let mut tap = Tap { session, filter };
    tap.collect_matching(
        true,
        Duration::from_secs(600),
        |e| &*e.table == marker,
        |ev| {
            ev.iter()
                .any(|e| matches!(e.data.get("id"), Some(canal_consumer::event::Value::Int(i)) if *i == id))
        },
    )
    .await;
    // acks get no reply: a GET answered behind them shows Canal handled them
    tap.session
        .get(1, Duration::from_millis(50))
        .await
        .expect("get");
}

/// Starts the cluster's processes again when a test ends (pass or fail): ZooKeeper and both
/// Canal servers.
struct ClusterGuard;

impl ClusterGuard {
    fn new() -> ClusterGuard {
        script("deploy/local/zk-ctl", &["start"]);
        script("deploy/local/canal-ha-ctl", &["all", "start"]);
        ClusterGuard
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        script("deploy/local/zk-ctl", &["start"]);
        script("deploy/local/canal-ha-ctl", &["all", "start"]);
    }
}

fn consumer_toml(name: &str, table: &str) -> String {
    format!(
        r#"
[consumers.{name}]
[[consumers.{name}.filters]]
database = "{DB}"
table = "{table}"
events = ["INSERT"]

[[consumers.{name}.rules]]
name = "row"
plugin = "row_task"
payload = {{ id = "${{data.id}}", destination = "${{destination}}", server_id = "${{position.server_id}}", executed_at = "${{executed_at}}", log_file = "${{position.log_file}}", offset = "${{position.offset}}", row_index = "${{position.row_index}}" }}
"#
    )
}

/// A replica in ZooKeeper mode (its own directory, state file and admin port).
fn replica(name: &str, queue: &str, consumer: &str, table: &str) -> ServiceProc {
    let mut svc = ServiceProc::prepare(
        name,
        queue,
        &[("c.toml", &consumer_toml(consumer, table))],
        "",
    );
    svc.env = vec![
        ("CANAL_CONSUMER__CANAL__ZK_SERVERS".into(), zk_servers()),
        (
            "CANAL_CONSUMER__CANAL__ZK_SESSION_TIMEOUT".into(),
            SESSION.into(),
        ),
        ("CANAL_CONSUMER__CANAL__CLIENT_ID".into(), CLIENT_ID.into()),
    ];
    svc
}

/// Inserts rows 1..=chunks*per in `chunks` statements, `pause` apart, on a thread.
fn writer(
    table: &'static str,
    chunks: i64,
    per: i64,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for c in 0..chunks {
            insert_notes(DB, table, c * per + 1, c * per + per);
            std::thread::sleep(pause);
        }
    })
}

fn ids_by_row(got: &[Got]) -> BTreeMap<i64, BTreeSet<String>> {
    let mut out: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for g in got {
        if let Some(id) = g.body["payload"]["id"].as_i64() {
            out.entry(id).or_default().insert(g.message_id.clone());
        }
    }
    out
}

/// Every row 1..=n arrived, duplicates only with the id the row's position gives.
fn check_rows(got: &[Got], n: i64, consumer: &str) {
    let rows = ids_by_row(got);
    assert_eq!(rows.len() as i64, n, "rows that arrived");
    for (row, ids) in &rows {
        assert_eq!(
            ids.len(),
            1,
            "row {row}: duplicates must share one id: {ids:?}"
        );
    }
    for g in got {
        let p = &g.body["payload"];
        let source = SourceRef {
            destination: p["destination"].as_str().unwrap().into(),
            database: "".into(),
            table: "".into(),
            event_type: EventType::Insert,
            position: Position {
                log_file: p["log_file"].as_str().unwrap().into(),
                offset: p["offset"].as_u64().unwrap(),
                row_index: p["row_index"].as_u64().unwrap() as u32,
                server_id: p["server_id"].as_u64().unwrap(),
                gtid: None,
            },
            executed_at: p["executed_at"].as_i64().unwrap(),
            snapshot: None,
        };
        assert_eq!(
            g.message_id,
            message_id(&source, consumer, Some("row"), "row_task", 0),
            "message id of {p}"
        );
    }
}

/// Guarantee 5 (README), on what a queue received, in arrival order: a message for a row before
/// one already received is a copy, with the same id, of a message already received; so the
/// first copies arrive in binlog order. The writer inserts ids in ascending order, one
/// statement at a time, so binlog order is id order (and the first copies' positions must say
/// so). Returns how many messages came after one of a later row (all of them copies).
fn first_copies_in_binlog_order(got: &[Got]) -> usize {
    let (late, wrong) = order_of_first_copies(got);
    assert!(
        wrong.is_empty(),
        "first copies out of binlog order ({} of {} messages): {wrong:#?}",
        wrong.len(),
        got.len()
    );
    late
}

/// What [`first_copies_in_binlog_order`] asserts: the late messages, and what breaks the rule.
fn order_of_first_copies(got: &[Got]) -> (usize, Vec<String>) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut newest: Option<(i64, (String, u64, u64))> = None;
    let mut late = 0;
    let mut wrong = Vec::new();
    for (i, g) in got.iter().enumerate() {
        let p = &g.body["payload"];
        let row = p["id"].as_i64().unwrap();
        let at = (
            p["log_file"].as_str().unwrap().to_string(),
            p["offset"].as_u64().unwrap(),
            p["row_index"].as_u64().unwrap(),
        );
        let first = seen.insert(g.message_id.as_str());
        match &newest {
            Some((n, _)) if row < *n => {
                late += 1;
                if first {
                    wrong.push(format!(
                        "message {i}: the first copy of row {row} arrived after row {n}"
                    ));
                }
            }
            Some((n, newest_at)) if row > *n && at <= *newest_at => wrong.push(format!(
                "message {i}: row {row} at {at:?} is not after row {n} at {newest_at:?} in the binlog"
            )),
            _ => {}
        }
        if newest.as_ref().is_none_or(|(n, _)| row > *n) {
            newest = Some((row, at));
        }
    }
    (late, wrong)
}

/// The order check itself, on made-up arrivals (no services needed): copies may come late, a
/// first copy may not.
#[test]
fn the_order_check_tells_a_late_copy_from_a_late_first_copy() {
    let msg = |row: i64| Got {
        message_id: format!("id-{row}"),
        priority: None,
        body: serde_json::json!({"payload": {
            "id": row, "log_file": "mysql-bin.000001", "offset": 100 * row as u64, "row_index": 0
        }}),
    };
    // a previous replica's copies of rows 2 and 3 after its successor's row 4: fine
    let ok: Vec<Got> = [1, 2, 3, 2, 3, 4, 2, 3, 5].into_iter().map(msg).collect();
    assert_eq!(order_of_first_copies(&ok), (3, vec![]));
    // the first copy of row 3 after row 4: not fine
    let late_first: Vec<Got> = [1, 2, 4, 3, 5].into_iter().map(msg).collect();
    let (_, wrong) = order_of_first_copies(&late_first);
    assert_eq!(
        wrong,
        ["message 3: the first copy of row 3 arrived after row 4"]
    );
    // a later row at an earlier binlog position: not fine either
    let mut bad_position: Vec<Got> = [1, 2].into_iter().map(msg).collect();
    bad_position[1].body["payload"]["offset"] = 50.into();
    let (_, wrong) = order_of_first_copies(&bad_position);
    assert_eq!(
        wrong.len(),
        1,
        "binlog positions out of order passed: {wrong:?}"
    );
}

async fn wait_status(
    svc: &ServiceProc,
    what: &str,
    within: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = canal_consumer::admin::client::fetch_status(&svc.admin).await
            && ok(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never showed {what} within {within:?}:\n{}",
            svc.dir.display(),
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn role(s: &Value) -> &str {
    s["canal"]["ha"]["role"].as_str().unwrap_or("-")
}

fn working(s: &Value) -> bool {
    role(s) == "active" && s["canal"]["state"] == "connected"
}

fn standby(s: &Value) -> bool {
    role(s) == "standby" && s["canal"]["state"] == "standby"
}

fn triggers(s: &Value) -> u64 {
    s["consumers"][0]["triggers"].as_u64().unwrap_or(0)
}

/// Lines of the service's log file that say an ack was written, with their timestamps.
fn ack_writes(svc: &ServiceProc) -> Vec<(chrono::DateTime<chrono::Utc>, String)> {
    let text = std::fs::read_to_string(svc.dir.join("app.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("writing canal ack"))
        .filter_map(|l| {
            let ts = l.split_whitespace().next()?;
            let t = chrono::DateTime::parse_from_rfc3339(ts).ok()?;
            Some((t.with_timezone(&chrono::Utc), l.to_string()))
        })
        .collect()
}

/// The distinct `status` screens (their canal, replica and error lines) seen while waiting.
#[derive(Default)]
struct Seen(std::cell::RefCell<Vec<String>>);

impl Seen {
    fn record(&self, s: &Value) {
        let line = canal_consumer::admin::render::render_status(
            &serde_json::from_value(s.clone()).unwrap(),
            0,
        )
        .lines()
        .filter(|l| {
            l.starts_with("canal ") || l.starts_with("replica ") || l.contains("last error")
        })
        .map(|l| l.split("  lag").next().unwrap_or(l).trim().to_string())
        .collect::<Vec<_>>()
        .join(" | ");
        let mut seen = self.0.borrow_mut();
        if seen.last() != Some(&line) {
            seen.push(line);
        }
    }

    fn print(&self, during: &str) {
        for line in self.0.borrow().iter() {
            eprintln!("status during {during}: {line}");
        }
    }
}

fn conflicts(s: &Value) -> u64 {
    s["canal"]["conflicts"].as_u64().unwrap_or(0)
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_second_replica_or_a_java_client_holding_the_destination_means_standby() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    wait_destination_ready().await;
    let table = "ha_standby";
    note_table(DB, table);
    let queue = &common::queue("cc_ha_standby");
    delete_queue(queue).await;

    // a client running node as Canal's Java client writes it: we must stand by
    let java = zk_client().await;
    let parent = format!("{ROOT}/destinations/{DEST}/{CLIENT_ID}");
    let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    java.mkdir(&parent, &dir).await.unwrap();
    let eph = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    java.create(
        &client_node(),
        br#"{"active":true,"address":"10.9.9.9","clientId":1001}"#,
        &eph,
    )
    .await
    .unwrap();
    let mut a = replica("ha-sb-a", queue, "sb", table);
    a.start().await; // ready: a standby with a zookeeper session is ready
    let s = wait_status(&a, "standby", Duration::from_secs(20), standby).await;
    assert_eq!(s["canal"]["ha"]["holder"], "10.9.9.9", "{s:#}");
    let (code, body) = a.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("\nha_active 0\n"), "{body}");
    // the Java client goes away: this replica takes over and works
    let t0 = Instant::now();
    java.delete(&client_node(), None).await.unwrap();
    drop(java);
    wait_status(&a, "active and connected", Duration::from_secs(20), working).await;
    eprintln!(
        "measured: a freed client running node to the standby connected and subscribed: {:?}",
        t0.elapsed()
    );
    let held = node(&client_node()).await.expect("our node");
    let v: Value = serde_json::from_slice(&held).unwrap();
    assert_eq!(v["active"], true);
    assert_eq!(v["clientId"], 1001);

    // a second replica started now is standby, never a second active
    let mut b = replica("ha-sb-b", queue, "sb", table);
    b.start().await;
    let sb = wait_status(&b, "standby", Duration::from_secs(20), standby).await;
    assert_eq!(sb["canal"]["ha"]["holder"], v["address"], "{sb:#}");
    let (_, body) = b.get("/metrics").await;
    assert!(body.contains("\nha_active 0\n"), "{body}");
    let (_, body) = a.get("/metrics").await;
    assert!(body.contains("\nha_active 1\n"), "{body}");
    // and rows flow through the active one only
    let w = writer(table, 5, 20, Duration::from_millis(50));
    w.join().unwrap();
    let got = consume_until(queue, Duration::from_secs(60), |g| {
        ids_by_row(g).len() == 100
    })
    .await;
    check_rows(&got, 100, "sb");
    first_copies_in_binlog_order(&got);
    let sb = b.status().await;
    assert!(standby(&sb), "{sb:#}");
    assert_eq!(triggers(&sb), 0, "the standby fetched nothing: {sb:#}");
    assert_eq!(sb["canal"]["batches_received"], 0, "{sb:#}");
    // a clean stop of the active hands the destination over (deletes its node) instead of
    // leaving it until its session expires
    let t0 = Instant::now();
    a.terminate(Duration::from_secs(30));
    wait_status(
        &b,
        "active after the clean stop",
        Duration::from_secs(20),
        working,
    )
    .await;
    eprintln!(
        "measured: active replica SIGTERM to the standby connected to canal: {:?}",
        t0.elapsed()
    );
    let log = std::fs::read_to_string(a.dir.join("app.log")).unwrap();
    assert!(
        log.contains("released the client running node"),
        "the stopped replica did not release its node:\n{}",
        a.logs()
    );
    b.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn kill_9_of_the_running_canal_server_mid_stream_the_service_follows_and_loses_nothing() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    wait_destination_ready().await;
    let table = "ha_canal_kill";
    note_table(DB, table);
    let queue = &common::queue("cc_ha_canal_kill");
    delete_queue(queue).await;
    let mut a = replica("ha-ck", queue, "ck", table);
    a.start().await;
    let s = wait_status(&a, "active", Duration::from_secs(20), working).await;
    let first = running_canal().await;
    assert_eq!(s["canal"]["server"], first.as_str(), "{s:#}");

    let (chunks, per) = (40, 10);
    let n = chunks * per;
    let w = writer(table, chunks, per, Duration::from_millis(100));
    wait_status(&a, "some triggers", Duration::from_secs(30), |s| {
        triggers(s) > 50
    })
    .await;
    let t0 = Instant::now();
    script("deploy/local/canal-ha-ctl", &[server_no(&first), "kill"]);
    // what an operator sees meanwhile (README "Running two replicas")
    let seen = Seen::default();
    let s = wait_status(&a, "the other canal server", Duration::from_secs(60), |s| {
        seen.record(s);
        working(s) && s["canal"]["server"] != first.as_str()
    })
    .await;
    seen.print("the canal failover");
    eprintln!(
        "measured: canal server kill -9 to the service connected to the standby canal server: {:?} ({} -> {})",
        t0.elapsed(),
        first,
        s["canal"]["server"]
    );
    w.join().unwrap();
    let got = consume_until(queue, Duration::from_secs(120), |g| {
        ids_by_row(g).len() as i64 == n
    })
    .await;
    check_rows(&got, n, "ck");
    first_copies_in_binlog_order(&got);
    a.terminate(Duration::from_secs(30));
}

/// Two replicas on a fresh table and queue: `a` active, `b` standby, and rows being written
/// (`n` in all, 40 chunks of 10, one chunk every 100 ms); returns once `a` has sent some.
struct Loaded {
    queue: String,
    a: ServiceProc,
    b: ServiceProc,
    n: i64,
    writer: std::thread::JoinHandle<()>,
}

async fn active_standby_under_load(tag: &str, table: &'static str) -> Loaded {
    wait_destination_ready().await;
    note_table(DB, table);
    let queue = common::queue(&format!("cc_{table}"));
    delete_queue(&queue).await;
    let mut a = replica(&format!("ha-{tag}-a"), &queue, tag, table);
    a.start().await;
    wait_status(&a, "active", Duration::from_secs(20), working).await;
    let mut b = replica(&format!("ha-{tag}-b"), &queue, tag, table);
    b.start().await;
    wait_status(&b, "standby", Duration::from_secs(20), standby).await;
    let (chunks, per) = (40, 10);
    let writer = writer(table, chunks, per, Duration::from_millis(100));
    wait_status(&a, "some triggers", Duration::from_secs(30), |s| {
        triggers(s) > 50
    })
    .await;
    Loaded {
        queue,
        a,
        b,
        n: chunks * per,
        writer,
    }
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn kill_9_of_the_active_replica_mid_stream_the_standby_takes_over() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    let Loaded {
        queue,
        mut a,
        mut b,
        n,
        writer: w,
    } = active_standby_under_load("rk", "ha_replica_kill").await;
    let queue = &queue;
    let t0 = Instant::now();
    a.kill9();
    let seen = Seen::default();
    wait_status(&b, "active", Duration::from_secs(30), |s| {
        seen.record(s);
        working(s)
    })
    .await;
    seen.print("the replica failover (the standby)");
    eprintln!(
        "measured: active replica kill -9 to the standby connected to canal: {:?} (session timeout {SESSION})",
        t0.elapsed()
    );
    w.join().unwrap();
    let got = consume_until(queue, Duration::from_secs(120), |g| {
        ids_by_row(g).len() as i64 == n
    })
    .await;
    check_rows(&got, n, "rk");
    first_copies_in_binlog_order(&got);
    assert_eq!(conflicts(&b.status().await), 0);
    b.terminate(Duration::from_secs(30));
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_frozen_active_replica_never_acks_after_waking() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    let Loaded {
        queue,
        mut a,
        mut b,
        n,
        writer: w,
    } = active_standby_under_load("ss", "ha_sigstop").await;
    let queue = &queue;
    a.child.as_ref().unwrap().signal("STOP");
    let stopped = Instant::now();
    // the standby takes over once the frozen replica's session expires
    wait_status(&b, "active", Duration::from_secs(30), working).await;
    eprintln!(
        "measured: active replica SIGSTOP to the standby connected to canal: {:?}",
        stopped.elapsed()
    );
    // frozen well past the session timeout (and past the standby's takeover)
    let past = Duration::from_secs(5);
    if stopped.elapsed() < past {
        tokio::time::sleep(past - stopped.elapsed()).await;
    }
    let woke = chrono::Utc::now();
    a.child.as_ref().unwrap().signal("CONT");
    let s = wait_status(&a, "standby after waking", Duration::from_secs(30), standby).await;
    assert_eq!(role(&s), "standby", "{s:#}");
    w.join().unwrap();
    let got = consume_until(queue, Duration::from_secs(120), |g| {
        ids_by_row(g).len() as i64 == n
    })
    .await;
    check_rows(&got, n, "ss");
    first_copies_in_binlog_order(&got);
    // the woken replica wrote no ack (and so acked no batch a second time)
    let late: Vec<_> = ack_writes(&a)
        .into_iter()
        .filter(|(t, _)| *t >= woke)
        .map(|(_, l)| l)
        .collect();
    assert!(late.is_empty(), "acks written after waking: {late:#?}");
    assert!(
        !ack_writes(&a).is_empty(),
        "the check needs ack lines from before the freeze (log level debug)"
    );
    let sa = a.status().await;
    let sb = b.status().await;
    assert_eq!(conflicts(&sa) + conflicts(&sb), 0, "{sa:#}\n{sb:#}");
    assert!(working(&sb), "{sb:#}");
    b.terminate(Duration::from_secs(30));
    a.terminate(Duration::from_secs(30));
}

/// Order across a replica failover (README guarantee 5 and "Running two replicas"), with the
/// interleaving forced: the active replica publishes through a proxy that holds what it
/// writes, so its publishes stay on their way (as in a socket buffer or on a slow path) while
/// it is frozen; the standby takes over and delivers every row; only then do the held
/// publishes reach the broker, after the standby's messages of later rows. They must all be
/// copies of messages already received: the first copies stay in binlog order.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn publishes_of_a_frozen_replica_landing_after_its_successors_are_copies() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    wait_destination_ready().await;
    let table = "ha_order";
    note_table(DB, table);
    let queue = &common::queue("cc_ha_order");
    delete_queue(queue).await;
    let proxy = common::hold::HoldProxy::start();
    let mut a = replica("ha-or-a", queue, "or", table);
    // heartbeats far apart: the broker must not close the held connection
    a.env
        .push(("CANAL_CONSUMER__AMQP__URL".into(), proxy.url(60)));
    a.start().await;
    wait_status(&a, "active", Duration::from_secs(20), working).await;
    let mut b = replica("ha-or-b", queue, "or", table);
    b.start().await;
    wait_status(&b, "standby", Duration::from_secs(20), standby).await;
    let arrivals = Arrivals::start(queue).await;
    let (chunks, per) = (40, 10);
    let w = writer(table, chunks, per, Duration::from_millis(100));
    wait_status(&a, "some triggers", Duration::from_secs(30), |s| {
        triggers(s) > 50
    })
    .await;

    // hold what the active replica writes to the broker; once some publishes are held (no
    // confirm comes back for them, so their rows are not acked), freeze it
    proxy.hold();
    let held_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.held() < 5 {
        assert!(
            Instant::now() < deadline,
            "the active replica published nothing more"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.child.as_ref().unwrap().signal("STOP");
    wait_status(&b, "active", Duration::from_secs(30), working).await;
    w.join().unwrap();
    let rows: i64 = mysql(&format!("SELECT COUNT(*) FROM {DB}.{table}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(rows, chunks * per);
    // the standby delivers every row: it starts at Canal's acked cursor, before the held rows
    arrivals
        .wait("every row", Duration::from_secs(120), |g| {
            ids_by_row(g).len() as i64 == rows
        })
        .await;
    let before = arrivals.got().len();
    // and the held publishes outlive the frozen replica's confirm_timeout (5 s in the tests'
    // config): on waking it may count them as failed (timed out), which is no exception to
    // the order (the broker took them, in order)
    let past = Duration::from_secs(6);
    if held_at.elapsed() < past {
        tokio::time::sleep(past - held_at.elapsed()).await;
    }

    // the held publishes reach the broker now, while the replica that wrote them is still
    // frozen; then it wakes, finds its lease gone and stands by
    let held = proxy.held();
    proxy.release();
    a.child.as_ref().unwrap().signal("CONT");
    wait_status(&a, "standby after waking", Duration::from_secs(30), standby).await;
    // everything both published has arrived: the frozen replica's part counted on the wire
    let deadline = Instant::now() + Duration::from_secs(60);
    let (sa, sb) = loop {
        let (sa, sb) = (a.status().await, b.status().await);
        let published_b = sb["broker"]["published"].as_u64().unwrap();
        let got = arrivals.got().len() as u64;
        if got == proxy.published() + published_b
            && sa["broker"]["published"].as_u64() == Some(proxy.published())
        {
            break (sa, sb);
        }
        assert!(
            Instant::now() < deadline,
            "{got} messages arrived; published: {} by the frozen replica (on the wire: {}), {published_b} by its successor",
            sa["broker"]["published"],
            proxy.published()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let got = arrivals.finish().await;
    check_rows(&got, rows, "or");
    // the statement's exception (a message the broker refused while it took later ones)
    // did not arise
    for s in [&sa, &sb] {
        assert_eq!(s["broker"]["nacked"], 0, "{s:#}");
        assert_eq!(s["broker"]["returned"], 0, "{s:#}");
    }
    assert_eq!(conflicts(&sa) + conflicts(&sb), 0, "{sa:#}\n{sb:#}");
    let late = first_copies_in_binlog_order(&got);
    // the interleaving happened: after every row had arrived, the held publishes came
    assert!(held >= 5);
    assert!(
        got.len() - before >= held as usize && late >= held as usize,
        "{held} publishes were held, {} messages came after every row had, {late} after a later row",
        got.len() - before
    );
    eprintln!(
        "measured: {held} publishes of the frozen replica held and released after its successor delivered every row; \
         {} messages for {rows} rows, {late} of them after a message of a later row (all copies); \
         frozen replica: {} published, {} timed out, {} late confirms",
        got.len(),
        sa["broker"]["published"],
        sa["broker"]["timeouts"],
        sa["broker"]["late_confirms"],
    );
    b.terminate(Duration::from_secs(30));
    a.terminate(Duration::from_secs(30));
    drop(proxy);
    delete_queue(queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_zookeeper_restart_with_two_replicas_loses_nothing_and_leaves_one_active() {
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    let Loaded {
        queue,
        mut a,
        mut b,
        n,
        writer: w,
    } = active_standby_under_load("zr", "ha_zk_restart").await;
    let queue = &queue;
    script("deploy/local/zk-ctl", &["restart"]);
    w.join().unwrap();
    let got = consume_until(queue, Duration::from_secs(180), |g| {
        ids_by_row(g).len() as i64 == n
    })
    .await;
    check_rows(&got, n, "zr");
    first_copies_in_binlog_order(&got);
    // exactly one active afterwards, the other standby
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sa, sb) = (a.status().await, b.status().await);
        let actives = [&sa, &sb].iter().filter(|s| working(s)).count();
        let standbys = [&sa, &sb].iter().filter(|s| standby(s)).count();
        if actives == 1 && standbys == 1 {
            assert_eq!(conflicts(&sa) + conflicts(&sb), 0, "{sa:#}\n{sb:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not one active and one standby after the restart:\n{sa:#}\n{sb:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.terminate(Duration::from_secs(30));
    a.terminate(Duration::from_secs(30));
}

/// A backfill started on the active replica, which is killed mid-way: the standby takes over
/// and finishes it from the last confirmed chunk (the record and its progress live in the
/// source's watermark table, which both replicas read); every row arrives, a row sent twice
/// keeps its id, and the standby never read a chunk while it was standby.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_backfill_survives_the_active_replica_and_finishes_on_the_standby() {
    use common::backfill::{self as bf, DB as BF_DB};
    let _lock = canal_lock().await;
    let _cluster = ClusterGuard::new();
    wait_destination_ready().await;
    bf::keyed_table("ha_bf", 5000);
    let queue = common::queue("cc_ha_bf");
    let consumer = bf::state_consumer("habf", "ha_bf", "${data.id}", "${old.id}", "changed('id')");
    let mut a = bf::backfill_proc("ha-bf-a", &queue, &[("c.toml", &consumer)], "wm_ha").await;
    a.env.extend([
        ("CANAL_CONSUMER__CANAL__ZK_SERVERS".into(), zk_servers()),
        (
            "CANAL_CONSUMER__CANAL__ZK_SESSION_TIMEOUT".into(),
            SESSION.into(),
        ),
        ("CANAL_CONSUMER__CANAL__CLIENT_ID".into(), CLIENT_ID.into()),
    ]);
    a.start().await;
    wait_status(&a, "active", Duration::from_secs(20), working).await;
    let mut b = ServiceProc::prepare(
        "ha-bf-b",
        &queue,
        &[("c.toml", &consumer)],
        &bf::backfill_config("wm_ha"),
    );
    b.env = a.env.clone();
    b.start().await;
    wait_status(&b, "standby", Duration::from_secs(20), standby).await;
    let id = bf::start_backfill(&a, &format!("table={BF_DB}.ha_bf&chunk=100&rate=1000")).await;
    bf::wait_chunks(&a, &id, 5).await;
    // the standby sees the record but does not read it
    let on_b = bf::backfill(&b, &id).await;
    assert_eq!(on_b["state"], "running", "{on_b}");
    assert_eq!(on_b["reading"], false, "{on_b}");
    a.kill9();
    wait_status(&b, "active", Duration::from_secs(30), working).await;
    let done = bf::wait_backfill(&b, &id, "done", Duration::from_secs(120)).await;
    assert_eq!(done["progress"]["rows_read"], 5000, "{done}");
    let got = bf::check_final_state(&queue, "ha_bf", "habf", "after a replica failover").await;
    let again = bf::assert_one_id_per_key(&got);
    eprintln!(
        "measured: backfill across a replica failover: {} messages, {again} of them again",
        got.len()
    );
    b.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}
