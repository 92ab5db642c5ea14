//! The Canal client against the real Canal server fed by real MariaDB (start them with
//! `deploy/local/up`; the `CC_TEST_*` variables in `tests/common` point elsewhere).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::canal::connection::{AckBatch, CanalConnection, CanalEvent, Shutdown};
use canal_consumer::canal::{CanalError, Session};
use canal_consumer::config::{CanalConfig, Secret};
use canal_consumer::event::{ChangeEvent, EventType, Value};
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

const DB: &str = "cc_it";

fn setup_table(table: &str, ddl: &str) {
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{table}; CREATE TABLE {DB}.{table} {ddl}"
    ));
}

fn filter(table: &str) -> String {
    format!("{DB}\\.{table}")
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn every_common_type_arrives_with_the_value_written() {
    let _lock = canal_lock().await;
    let table = "all_types";
    setup_table(
        table,
        "(id INT PRIMARY KEY,
          ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
          mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
          bi BIGINT, biu BIGINT UNSIGNED,
          de DECIMAL(20,6), f FLOAT, d DOUBLE,
          c CHAR(10), vc VARCHAR(100), t TEXT,
          bl BLOB, bn BINARY(4), vb VARBINARY(16),
          dt DATE, dtt DATETIME(6), ts TIMESTAMP(3) NULL, tm TIME(3), y YEAR,
          e ENUM('small','medium','large'), s SET('a','b','c','d'),
          j JSON, b BIT(10), n VARCHAR(10) NULL, es VARCHAR(10)
         ) DEFAULT CHARSET=utf8mb4",
    );
    let mut tap = Tap::clean(&filter(table)).await;
    mysql(&format!(
        "INSERT INTO {DB}.{table} VALUES (1,
          -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
          -9223372036854775808, 18446744073709551615,
          '-12345678901234.123456', 1.5, -2.25e-10,
          '汉字', '中文 emoji 🚀 ok', 'line1\\nline2 \"quoted\" \\'single\\'',
          X'00FF80FE41', X'00010203', X'DEADBEEF00',
          '2024-02-29', '2024-02-29 23:59:58.123456', '2024-03-01 12:00:00.500', '123:45:06.789', 2024,
          'large', 'a,c', '{{\"k\": [1, 2, {{\"x\": null}}], \"s\": \"中\"}}', b'1010101010', NULL, '');
         UPDATE {DB}.{table} SET vc = 'changed ✓', e = 'small', n = 'now set' WHERE id = 1;
         DELETE FROM {DB}.{table} WHERE id = 1;"
    ));
    let (events, _) = tap
        .collect(table, true, Duration::from_secs(60), |ev| ev.len() >= 3)
        .await;
    assert_eq!(
        events.iter().map(|e| e.event_type).collect::<Vec<_>>(),
        [EventType::Insert, EventType::Update, EventType::Delete]
    );
    let ins = &events[0];
    let expect: Vec<(&str, Value)> = vec![
        ("id", Value::Int(1)),
        ("ti", Value::Int(-128)),
        ("tiu", Value::Int(255)),
        ("si", Value::Int(-32768)),
        ("siu", Value::Int(65535)),
        ("mi", Value::Int(-8388608)),
        ("miu", Value::Int(16777215)),
        ("i", Value::Int(-2147483648)),
        ("iu", Value::Int(4294967295)),
        ("bi", Value::Int(i64::MIN)),
        ("biu", Value::UInt(u64::MAX)),
        ("de", text("-12345678901234.123456")),
        ("f", Value::Float(1.5)),
        ("d", Value::Float(-2.25e-10)),
        ("c", text("汉字")),
        ("vc", text("中文 emoji 🚀 ok")),
        ("t", text("line1\nline2 \"quoted\" 'single'")),
        ("bl", Value::Bytes(vec![0x00, 0xff, 0x80, 0xfe, 0x41])),
        ("bn", Value::Bytes(vec![0, 1, 2, 3])),
        ("vb", Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef, 0x00])),
        ("dt", text("2024-02-29")),
        ("dtt", text("2024-02-29 23:59:58.123456")),
        ("ts", text("2024-03-01 12:00:00.500")),
        ("tm", text("123:45:06.789")),
        ("y", Value::Int(2024)),
        ("e", text("large")),
        ("s", text("a,c")),
        ("b", Value::UInt(0b1010101010)),
        ("n", Value::Null),
        ("es", text("")),
    ];
    for (col, want) in &expect {
        assert_eq!(
            ins.data.get(col),
            Some(want),
            "column {col}: {:?}",
            ins.data.get(col)
        );
    }
    // MariaDB stores JSON as LONGTEXT (the text as written); MySQL's JSON type is parsed.
    let j = ins.data.get("j").expect("json column");
    let parsed = match j {
        Value::Text(s) => serde_json::from_str::<serde_json::Value>(s).unwrap(),
        Value::Json(v) => v.clone(),
        other => panic!("json column came as {other:?}"),
    };
    assert_eq!(
        parsed,
        serde_json::json!({"k": [1, 2, {"x": null}], "s": "中"})
    );
    assert_eq!(ins.primary_keys, ["id"]);
    assert!(ins.old.is_none());
    assert_eq!(&*ins.database, DB);
    assert!(ins.position.log_file.contains("bin"), "{}", ins.position);
    assert!(ins.executed_at > 1_600_000_000_000);

    let upd = &events[1];
    assert_eq!(upd.data["vc"], text("changed ✓"));
    assert_eq!(upd.data["e"], text("small"));
    assert_eq!(upd.data["n"], text("now set"));
    assert_eq!(
        upd.data["bl"],
        Value::Bytes(vec![0x00, 0xff, 0x80, 0xfe, 0x41])
    );
    let changed: BTreeSet<&str> = upd.changed.iter().collect();
    assert_eq!(changed, BTreeSet::from(["vc", "e", "n"]));
    let old = upd.old.as_ref().expect("old values");
    assert_eq!(old.len(), 3, "{old:?}");
    assert_eq!(old["vc"], text("中文 emoji 🚀 ok"));
    assert_eq!(old["e"], text("large"));
    assert_eq!(old["n"], Value::Null);

    let del = &events[2];
    assert_eq!(del.data["id"], Value::Int(1));
    assert_eq!(del.data["vc"], text("changed ✓"));
    assert!(del.old.is_none());
    assert!(upd.position.offset > ins.position.offset);
    assert!(del.position.offset > upd.position.offset);
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_multi_row_transaction_arrives_whole_and_in_order() {
    let _lock = canal_lock().await;
    let table = "txn";
    setup_table(table, "(id INT PRIMARY KEY, v VARCHAR(20))");
    let mut tap = Tap::clean(&filter(table)).await;
    let mut sql = format!("BEGIN; INSERT INTO {DB}.{table} VALUES ");
    sql += &(1..=200)
        .map(|i| format!("({i}, 'bulk-{i}')"))
        .collect::<Vec<_>>()
        .join(",");
    sql += ";";
    for i in 201..=250 {
        sql += &format!("INSERT INTO {DB}.{table} VALUES ({i}, 'single-{i}');");
    }
    sql += &format!("UPDATE {DB}.{table} SET v = 'updated' WHERE id <= 10; COMMIT;");
    mysql(&sql);
    let (events, _) = tap
        .collect(table, true, Duration::from_secs(60), |ev| ev.len() >= 260)
        .await;
    assert_eq!(events.len(), 260);
    let inserted: Vec<i64> = events[..250]
        .iter()
        .map(|e| {
            assert_eq!(e.event_type, EventType::Insert);
            match e.data["id"] {
                Value::Int(i) => i,
                ref v => panic!("{v:?}"),
            }
        })
        .collect();
    assert_eq!(inserted, (1..=250).collect::<Vec<_>>());
    assert!(
        events[250..]
            .iter()
            .all(|e| e.event_type == EventType::Update)
    );
    // rows of one binlog event share an offset and are numbered within it
    assert_eq!(events[0].position.offset, events[199].position.offset);
    assert_eq!(events[199].position.row_index, 199);
    let positions: BTreeSet<String> = events.iter().map(|e| e.position.to_string()).collect();
    assert_eq!(positions.len(), 260, "positions are unique");
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn ddl_arrives_as_a_ddl_event() {
    let _lock = canal_lock().await;
    let table = "ddl_t";
    setup_table(table, "(id INT PRIMARY KEY)");
    let mut tap = Tap::clean(&filter(table)).await;
    mysql(&format!(
        "ALTER TABLE {DB}.{table} ADD COLUMN extra VARCHAR(8); INSERT INTO {DB}.{table} VALUES (1, 'x')"
    ));
    let (events, _) = tap
        .collect_matching(
            true,
            Duration::from_secs(60),
            |e| &*e.table == table,
            |ev| ev.iter().any(|e| e.event_type == EventType::Insert),
        )
        .await;
    let ddl = events
        .iter()
        .find(|e| e.event_type == EventType::Alter)
        .expect("an ALTER event");
    assert!(ddl.is_ddl);
    assert!(ddl.data.is_empty());
    assert!(
        ddl.sql
            .as_deref()
            .unwrap_or("")
            .to_ascii_uppercase()
            .contains("ADD COLUMN"),
        "{:?}",
        ddl.sql
    );
    // the new column is known right after the DDL
    let ins = events
        .iter()
        .find(|e| e.event_type == EventType::Insert)
        .unwrap();
    assert_eq!(ins.data["extra"], text("x"));
}

fn ids(events: &[ChangeEvent]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|e| match e.data.get("id") {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        })
        .collect()
}

/// A fresh `table` whose rows 1-3 a clean tap has fetched and not acked: the tap, the table's
/// filter, the rows' events and the ids of the batches they came in.
async fn three_rows_fetched(table: &str) -> (Tap, String, Vec<ChangeEvent>, Vec<i64>) {
    setup_table(table, "(id INT PRIMARY KEY)");
    let f = filter(table);
    let mut tap = Tap::clean(&f).await;
    mysql(&format!("INSERT INTO {DB}.{table} VALUES (1),(2),(3)"));
    let (first, batches) = tap
        .collect(table, false, Duration::from_secs(60), |ev| ev.len() >= 3)
        .await;
    assert_eq!(ids(&first), [1, 2, 3]);
    (tap, f, first, batches)
}

/// A new session (subscribe, roll back) gets rows 1-3 of `table` again and acks them.
async fn rows_1_to_3_come_again_and_are_acked(f: &str, table: &str) {
    let mut tap = Tap::connect(f).await;
    let (again, _) = tap
        .collect(table, true, Duration::from_secs(60), |ev| ev.len() >= 3)
        .await;
    assert_eq!(ids(&again), [1, 2, 3]);
    // Acks get no reply: a GET answered on the same session proves the server has handled
    // them (it reads a session's packets in order). Without it the next session's rollback
    // can overtake the acks still queued for this one, and rows 1-3 come again. (What this
    // GET may fetch is unacked, so it comes again too: at most transaction boundaries.)
    tap.session
        .get(1000, Duration::from_millis(50))
        .await
        .expect("get");
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn unacked_batches_are_redelivered_and_acked_ones_are_not() {
    let _lock = canal_lock().await;
    let table = "redeliver";
    let (mut tap, f, first, _) = three_rows_fetched(table).await;

    // explicit rollback in the same session: delivered again
    tap.session.rollback(0).await.unwrap();
    let (again, _) = tap
        .collect(table, false, Duration::from_secs(60), |ev| ev.len() >= 3)
        .await;
    assert_eq!(ids(&again), [1, 2, 3]);
    assert_eq!(again[0].position, first[0].position);

    // the client dies without acking: a new connection gets them again, and acks them
    drop(tap);
    rows_1_to_3_come_again_and_are_acked(&f, table).await;

    // acked: a new connection does not see them, only what comes next
    let mut tap = Tap::connect(&f).await;
    mysql(&format!("INSERT INTO {DB}.{table} VALUES (4)"));
    let (next, _) = tap
        .collect(table, true, Duration::from_secs(60), |ev| !ev.is_empty())
        .await;
    assert_eq!(ids(&next), [4]);
}

/// What HA relies on when an active replica is frozen between its lease check and its ack
/// write, a window `ha_real`'s SIGSTOP test cannot aim at: by the time the stale acks reach
/// Canal, the replica that took over (same client identity) has subscribed, rolled back and
/// fetched the same rows again. Canal never reuses a batch id while it runs and refuses an ack
/// for one it no longer holds (`CanalServerWithEmbedded.ack`: "batchId ... is not exist"), so
/// the stale acks ack nothing of the successor's: its rows are still there.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_stale_ack_from_a_replaced_session_acks_nothing_of_its_successor() {
    let _lock = canal_lock().await;
    let table = "stale_ack";
    let (mut old, f, _, old_batches) = three_rows_fetched(table).await;

    // the successor takes over: subscribe and roll back, and the rows come again
    let mut new = Tap::connect(&f).await;
    let (again, new_batches) = new
        .collect(table, false, Duration::from_secs(60), |ev| ev.len() >= 3)
        .await;
    assert_eq!(ids(&again), [1, 2, 3]);
    assert!(
        new_batches.iter().all(|b| !old_batches.contains(b)),
        "batch ids reused: {old_batches:?} then {new_batches:?}"
    );

    // the frozen replica wakes and writes its acks; Canal handles a session's packets in
    // order, so the answer to a GET behind them says what became of them
    for b in &old_batches {
        old.session.ack(*b).await.expect("ack written");
    }
    match old.session.get(1, Duration::from_millis(50)).await {
        Err(e) => assert!(e.to_string().contains("is not exist"), "{e}"),
        Ok(b) => panic!(
            "Canal took the stale acks (then answered batch {})",
            b.batch_id
        ),
    }

    // nothing of the successor's was acked: the rows are still unacked for the next session
    drop(old);
    drop(new);
    rows_1_to_3_come_again_and_are_acked(&f, table).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_wrong_password_is_a_clear_error_naming_the_destination() {
    let _lock = canal_lock().await;
    let mut cfg = session_config();
    cfg.password = "definitely-wrong".into();
    let err = match Session::connect(&cfg).await {
        Err(e) => e,
        Ok(_) => panic!("the server must refuse a wrong password"),
    };
    assert!(matches!(err, CanalError::Auth { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("destination '{}'", destination())),
        "{text}"
    );
    assert!(text.contains("auth failed"), "{text}");
}

/// The `[canal]` settings for the real server, with `mem_unit`.
fn real_canal(mem_unit: u32) -> CanalConfig {
    CanalConfig {
        host: canal_host(),
        port: std::num::NonZeroU16::new(canal_port()).expect("a port"),
        destination: destination(),
        username: canal_user(),
        password: Secret::new(canal_password()),
        mem_unit,
        ..Default::default()
    }
}

/// A connection actor for `table` whose batches a [`Collector`] acks; its events arrive on the
/// returned receiver.
fn collect_from(
    cfg: CanalConfig,
    table: &str,
) -> (
    actix::Addr<CanalConnection>,
    tokio::sync::mpsc::UnboundedReceiver<ChangeEvent>,
) {
    use actix::Actor;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = Collector { tx, conn: None }.start();
    let conn = CanalConnection::new(
        cfg.connection(filter(table), false),
        collector.clone().recipient(),
    )
    .start();
    collector.do_send(Attach(conn.clone()));
    (conn, rx)
}

/// Collects events from the connection actor, acking every batch.
struct Collector {
    tx: tokio::sync::mpsc::UnboundedSender<ChangeEvent>,
    conn: Option<actix::Addr<CanalConnection>>,
}

impl actix::Actor for Collector {
    type Context = actix::Context<Self>;
}

#[derive(actix::Message)]
#[rtype(result = "()")]
struct Attach(actix::Addr<CanalConnection>);

impl actix::Handler<Attach> for Collector {
    type Result = ();
    fn handle(&mut self, msg: Attach, _: &mut Self::Context) {
        self.conn = Some(msg.0);
    }
}

impl actix::Handler<CanalEvent> for Collector {
    type Result = ();
    fn handle(&mut self, msg: CanalEvent, _: &mut Self::Context) {
        if let CanalEvent::Batch(b) = msg {
            for e in b.events.iter() {
                let _ = self.tx.send(e.clone());
            }
            if let Some(c) = &self.conn {
                c.do_send(AckBatch(b.batch));
            }
        }
    }
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn every_row_arrives_across_a_canal_server_restart() {
    let _lock = canal_lock().await;
    let table = "restart";
    setup_table(table, "(id INT PRIMARY KEY)");
    drop(Tap::clean(&filter(table)).await);

    let cfg = CanalConfig {
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        ..real_canal(canal_mem_unit())
    };
    let (conn, mut rx) = collect_from(cfg, table);

    let mut seen = BTreeSet::new();

    let insert = |from: i64, to: i64| {
        let values: Vec<String> = (from..=to).map(|i| format!("({i})")).collect();
        mysql(&format!(
            "INSERT INTO {DB}.{table} VALUES {}",
            values.join(",")
        ));
    };
    for chunk in 0..5 {
        insert(chunk * 20 + 1, chunk * 20 + 20);
    }
    wait_for(table, 100, &mut rx, &mut seen).await;

    script("deploy/local/canal-ctl", &["stop"]);
    for chunk in 5..10 {
        insert(chunk * 20 + 1, chunk * 20 + 20); // written while Canal is down
    }
    script("deploy/local/canal-ctl", &["start"]);
    for chunk in 10..15 {
        insert(chunk * 20 + 1, chunk * 20 + 20);
    }
    wait_for(table, 300, &mut rx, &mut seen).await;
    let status = conn
        .send(canal_consumer::canal::connection::GetConnectionStatus)
        .await
        .unwrap();
    assert!(status.reconnects >= 1, "{status:?}");
    conn.send(Shutdown { rollback: false }).await.unwrap();
}

async fn wait_for(
    table: &str,
    upto: i64,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<ChangeEvent>,
    seen: &mut BTreeSet<i64>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !(1..=upto).all(|i| seen.contains(&i)) {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("missing rows up to {upto}: have {}", seen.len()))
            .expect("collector alive");
        if &*e.table == table
            && let Some(Value::Int(i)) = e.data.get("id")
        {
            seen.insert(*i);
        }
    }
}

/// Runs `canal-consumer tail` against the Canal server (killed if it runs over 2 minutes).
fn tail(filter: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = common::proc::output_within(
        "canal-consumer tail",
        std::process::Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
            .args(["tail", "--filter", filter, "--limit", "2"])
            .args(extra)
            .current_dir(repo_root())
            .env("CANAL_HOST", canal_host())
            .env("CANAL_PORT", canal_port().to_string())
            .env("CANAL_DESTINATION", destination())
            .env(
                "CANAL_CONSUMER__CANAL__MEM_UNIT",
                canal_mem_unit().to_string(),
            )
            .env("CANAL_CONSUMER__CANAL__USERNAME", canal_user())
            .env("CANAL_CONSUMER__CANAL__PASSWORD", canal_password()),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn tail_prints_json_lines_and_rolls_back_unless_told_to_ack() {
    let _lock = canal_lock().await;
    let table = "tailed";
    setup_table(table, "(id INT PRIMARY KEY, v BLOB)");
    let f = filter(table);
    let mut tap = Tap::clean(&f).await;
    // A fence: once this marker row is received and acked, everything before it (our own
    // CREATE TABLE included, which would count toward --limit) is gone from the stream.
    mysql(&format!("INSERT INTO {DB}.{table} VALUES (0, NULL)"));
    tap.collect(table, true, Duration::from_secs(60), |ev| !ev.is_empty())
        .await;
    drop(tap);
    mysql(&format!(
        "INSERT INTO {DB}.{table} VALUES (1, X'00FF'); INSERT INTO {DB}.{table} VALUES (2, NULL)"
    ));
    let rows = |events: &[serde_json::Value]| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e["event_type"] == "INSERT")
            .map(|e| e["data"]["id"].as_i64().unwrap())
            .collect()
    };
    // without --ack: printed, then rolled back, so a second tail sees the same rows
    let first = tail(&f, &[]);
    assert_eq!(rows(&first), [1, 2], "{first:?}");
    assert_eq!(first[0]["data"]["v"], serde_json::json!({"base64": "AP8="}));
    assert!(first[1]["data"]["v"].is_null());
    let again = tail(&f, &["--ack"]);
    assert_eq!(rows(&again), [1, 2]);
    // acked: gone from Canal; only what comes next is seen
    mysql(&format!(
        "INSERT INTO {DB}.{table} VALUES (3, NULL), (4, NULL)"
    ));
    let after = tail(&f, &[]);
    assert_eq!(rows(&after), [3, 4]);
}

/// The quiet-table fetch: a long poll for one unit (what the connection sends after a GET
/// found nothing) is answered by a lone one-row transaction, not by the poll's timeout. Canal
/// ends such a poll once one `memunit` of changes exists; the local Canal's unit (128 bytes,
/// `deploy/local/canal/conf/canal.properties`) is smaller than the smallest transaction, so the
/// wait here (10 minutes) is never what delivers the row. With Canal's default 1 KiB unit this
/// row alone would not end the poll and the test would time out.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_lone_row_ends_a_long_poll_for_one_unit() {
    let _lock = canal_lock().await;
    let table = "lone_row";
    setup_table(table, "(id INT PRIMARY KEY)");
    let mut tap = Tap::clean(&filter(table)).await;
    let long_poll = Duration::from_secs(600);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for round in 1..=3 {
        let mut rows = Vec::new();
        let mut polls = 0;
        while rows.is_empty() {
            polls += 1;
            // the GET is written on the first poll of `get`, before the INSERT runs
            let (got, ()) = tokio::join!(
                tokio::time::timeout_at(deadline, tap.session.get(1, long_poll)),
                async {
                    if polls == 1 {
                        tokio::task::yield_now().await;
                        mysql(&format!("INSERT INTO {DB}.{table} VALUES ({round})"));
                    }
                }
            );
            let b = got
                .unwrap_or_else(|_| {
                    panic!("round {round}: the lone row did not end the long poll within 60 s")
                })
                .expect("get");
            let mut decoded = Vec::new();
            canal_consumer::canal::decode::decode_entries(&destination(), &b.entries, &mut decoded)
                .expect("decodes");
            rows.extend(
                decoded
                    .into_iter()
                    .filter(|e| &*e.table == table && !e.is_ddl),
            );
            if !b.is_empty() {
                tap.session.ack(b.batch_id).await.expect("ack");
            }
        }
        assert_eq!(ids(&rows), [round as i64], "round {round}");
        tap.drain().await;
    }
}

/// The connection's `config_warning` as it stands, then the connection shut down.
async fn config_warning_at_shutdown(conn: actix::Addr<CanalConnection>) -> Option<String> {
    let status = conn
        .send(canal_consumer::canal::connection::GetConnectionStatus)
        .await
        .unwrap();
    conn.send(Shutdown { rollback: false }).await.unwrap();
    status.config_warning
}

/// `canal.mem_unit` must be the server's memunit: one that is smaller is seen in the first
/// long-poll answer (Canal took more than one of our units before its last entry) and named in
/// the connection's status; the right one never is.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_memory_unit_smaller_than_the_servers_is_named_in_status() {
    let _lock = canal_lock().await;
    let table = "unit_check";
    setup_table(table, "(id INT PRIMARY KEY)");
    drop(Tap::clean(&filter(table)).await);
    let mut next = 1;
    let mut seen = BTreeSet::new();
    for (mem_unit, mismatched) in [(canal_mem_unit(), false), (1, true)] {
        let (conn, mut rx) = collect_from(real_canal(mem_unit), table);
        // lone rows, each written once the previous one arrived: each is a long poll's answer
        for _ in 0..3 {
            mysql(&format!("INSERT INTO {DB}.{table} VALUES ({next})"));
            wait_for(table, next, &mut rx, &mut seen).await;
            next += 1;
        }
        match (&config_warning_at_shutdown(conn).await, mismatched) {
            (None, false) => {}
            (Some(w), true) => assert!(
                w.contains("canal.mem_unit is 1 bytes")
                    && w.contains("canal.instance.memory.buffer.memunit is larger"),
                "{w}"
            ),
            (w, _) => panic!("mem_unit {mem_unit}: config_warning {w:?}"),
        }
    }
}

/// The other way round: a `canal.mem_unit` larger than the server's memunit (the service's
/// default 1024 against this Canal's 128) makes every GET that many times smaller than
/// `canal.batch_size` means, and nothing else shows it. A backlog read through such a
/// connection gets it named in the connection's status; the right unit never does.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_memory_unit_larger_than_the_servers_is_named_once_a_backlog_shows_it() {
    let _lock = canal_lock().await;
    let table = "unit_small";
    setup_table(table, "(id INT PRIMARY KEY, pad VARCHAR(300) NOT NULL)");
    drop(Tap::clean(&filter(table)).await);
    let mut next = 1;
    let mut seen = BTreeSet::new();
    for (mem_unit, mismatched) in [(canal_mem_unit(), false), (8 * canal_mem_unit(), true)] {
        // a backlog before the connection starts: 300 transactions of 5 rows of many sizes
        let mut sql = format!("USE {DB};");
        for _ in 0..300 {
            sql.push_str(&format!(
                "INSERT INTO {table} SELECT {next} + seq, REPEAT('x', ({next} + seq) * 37 % 300) \
                 FROM seq_0_to_4;"
            ));
            next += 5;
        }
        mysql(&sql);
        let (conn, mut rx) = collect_from(real_canal(mem_unit), table);
        wait_for(table, i64::from(next) - 1, &mut rx, &mut seen).await;
        match (&config_warning_at_shutdown(conn).await, mismatched) {
            (None, false) => {}
            (Some(w), true) => {
                assert!(
                    w.contains(&format!("canal.mem_unit is {mem_unit} bytes"))
                        && w.contains("canal.instance.memory.buffer.memunit is smaller"),
                    "{w}"
                );
                // the unit it names is the server's
                let named = w
                    .split_once(" in a row at ")
                    .and_then(|(_, rest)| rest.split_once(" bytes per unit"))
                    .map(|(unit, _)| unit)
                    .unwrap_or_else(|| panic!("no unit in {w}"));
                let (lo, hi) = named.split_once(" to ").unwrap_or((named, named));
                let (lo, hi): (u32, u32) = (lo.parse().unwrap(), hi.parse().unwrap());
                assert!(lo <= canal_mem_unit() && canal_mem_unit() <= hi, "{w}");
            }
            (w, _) => panic!("mem_unit {mem_unit}: config_warning {w:?}"),
        }
    }
}
