//! Backfills end to end against the real services (the `canal-consumer` binary, Canal,
//! MariaDB, RabbitMQ; `deploy/local/up`), counted at the broker. The service reads the source
//! as the `backfill` account of deploy/local/mariadb/users.sql, which has exactly the grants
//! the README documents.
//!
//! The expected values come from the table itself at the end: for every key, the last message
//! a consumer got must carry the row's final state, and a key that is gone must end with a
//! message that removes it.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::backfill::*;
use common::service::*;
use common::*;
use mysql_async::prelude::Queryable as _;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// 100,000 rows (fewer with `CC_TEST_BACKFILL_ROWS`) backfilled while a writer inserts,
/// updates (also the key) and deletes rows of the same table: every row that exists at the end
/// arrives, and for each key the last message carries the row's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_backfill_under_concurrent_writes_ends_in_the_tables_final_state() {
    let _canal = canal_lock().await;
    let rows: i64 = env_or("CC_TEST_BACKFILL_ROWS", "100000").parse().unwrap();
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.big; \
         CREATE TABLE {DB}.big (id BIGINT PRIMARY KEY, v BIGINT NOT NULL); \
         DROP TABLE IF EXISTS canal_consumer.wm_big;"
    ));
    // the existing rows never pass through the binlog: only the backfill can bring them
    mysql(&format!(
        "USE {DB}; SET SESSION sql_log_bin = 0; INSERT INTO {DB}.big SELECT seq, seq FROM seq_1_to_{rows};"
    ));
    let queue = queue("backfill-big");
    delete_queue(&queue).await;
    let consumer = state_consumer("big", "big", "${data.id}", "${old.id}", "changed('id')");
    let mut svc = ServiceProc::prepare(
        "backfill-big",
        &queue,
        &[("big.toml", &consumer)],
        &backfill_config("wm_big"),
    );
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    // the watermark algorithm under writes, in chunks of 2,000 all along: the writer below
    // never stops, so a backfill yielding to it would read 100 rows at a time (that is
    // `a_backfill_yields_to_live_changes_and_goes_full_speed_after_them`)
    svc.env.push((
        "CANAL_CONSUMER__BACKFILL__RATE_WHILE_LIVE".into(),
        "0".into(),
    ));
    svc.start().await;

    let pool = pool();
    let id = start_backfill(&svc, &format!("table={DB}.big&chunk=2000")).await;
    // the writer: inserts, updates, key changes and deletes all over the key range, for as
    // long as the backfill runs
    let mut next = rows + 1;
    let writer = Writer::start(&pool, 7, Duration::from_millis(1), move |rng| {
        let k = rng.i64(1..=rows);
        match rng.u8(0..4) {
            0 => {
                next += 1;
                format!("INSERT INTO big VALUES ({next}, {})", rng.i64(1..1_000_000))
            }
            1 => format!(
                "UPDATE big SET v = {} WHERE id = {k}",
                rng.i64(1..1_000_000)
            ),
            2 => {
                next += 1;
                format!("UPDATE IGNORE big SET id = {next} WHERE id = {k}")
            }
            _ => format!("DELETE FROM big WHERE id = {k}"),
        }
    });
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(600)).await;
    let ops = writer.stop().await;
    sentinel(&pool, "big", "-1").await;
    let got = consume_until(&queue, Duration::from_secs(300), |g| {
        g.last().is_some_and(is_sentinel)
    })
    .await;
    let mut c = pool.get_conn().await.unwrap();
    let table: Vec<(i64, i64)> = c.query("SELECT id, v FROM big WHERE id > 0").await.unwrap();
    let table: BTreeMap<String, i64> = table.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    drop(c);
    let seen = last_seen(&got, "big");
    assert_final_state(&seen, &table, "backfill under writes");
    let p = &done["progress"];
    assert!(p["rows_emitted"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(
        p["rows_read"].as_u64().unwrap(),
        p["rows_emitted"].as_u64().unwrap() + p["rows_dropped"].as_u64().unwrap(),
        "{done}"
    );
    // SNAPSHOT messages say where they come from
    let snap = got
        .iter()
        .find(|g| g.body["source"]["event_type"] == "SNAPSHOT")
        .expect("SNAPSHOT messages");
    assert_eq!(snap.body["source"]["snapshot"]["backfill"], id.as_str());
    eprintln!(
        "backfill of {rows} rows with {ops} concurrent writes: {} messages, {done}",
        got.len()
    );
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
    disconnect(pool).await;
}

/// Requests a backfill cannot serve are refused with what to do, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn requests_a_backfill_cannot_serve_are_refused_with_the_reason() {
    let _canal = canal_lock().await;
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.nokey, {DB}.keyed; \
         CREATE TABLE {DB}.nokey (v INT); CREATE TABLE {DB}.keyed (id INT PRIMARY KEY, v INT); \
         DROP TABLE IF EXISTS {DB}.fkey, {DB}.ekey; \
         CREATE TABLE {DB}.fkey (id FLOAT PRIMARY KEY, v INT); \
         CREATE TABLE {DB}.ekey (id ENUM('z','a') PRIMARY KEY, v INT); \
         DROP TABLE IF EXISTS canal_consumer.wm_refuse;"
    ));
    let queue = queue("backfill-refuse");
    delete_queue(&queue).await;
    let takes = state_consumer("takes", "nokey", "${data.v}", "${old.v}", "false");
    let keyed = state_consumer("keyed", "keyed", "${data.id}", "${old.id}", "changed('id')");
    let live_only = r#"
[consumers.live_only]
[[consumers.live_only.filters]]
database = "cc_bf"
table = "keyed"
events = ["INSERT"]
[[consumers.live_only.rules]]
name = "r"
plugin = "p"
payload = { id = "${data.id}" }
"#;
    let fkey = state_consumer("fkey", "fkey", "${data.id}", "${old.id}", "false");
    let ekey = state_consumer("ekey", "ekey", "${data.id}", "${old.id}", "false");
    // its filter lets SNAPSHOT events through, but no rule fires on them
    let filter_only = r#"
[consumers.filter_only]
[[consumers.filter_only.filters]]
database = "cc_bf"
table = "keyed"
events = ["INSERT", "SNAPSHOT"]
[[consumers.filter_only.rules]]
name = "r"
when = { events = ["INSERT"] }
plugin = "p"
payload = { id = "${data.id}" }
"#;
    let mut svc = ServiceProc::prepare(
        "backfill-refuse",
        &queue,
        &[
            ("a.toml", &takes),
            ("b.toml", &keyed),
            ("c.toml", live_only),
            ("d.toml", filter_only),
            ("f.toml", &fkey),
            ("e.toml", &ekey),
        ],
        &backfill_config("wm_refuse"),
    );
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    svc.start().await;
    let token = svc.token();
    let call = |q: String| {
        let admin = svc.admin.clone();
        let token = token.clone();
        async move {
            let r = canal_consumer::admin::client::request_with(
                &admin,
                "POST",
                &format!("/backfills?{q}"),
                Some(&token),
            )
            .await
            .unwrap();
            let why = serde_json::from_str::<Value>(&r.body).unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (r.status, why)
        }
    };
    let cases: Vec<(String, &str)> = vec![
        (format!("table={DB}.nokey"), "has no primary key"),
        (
            format!("table={DB}.missing&consumer=takes"),
            "takes no SNAPSHOT events of cc_bf.missing",
        ),
        (
            format!("table={DB}.keyed&consumer=live_only"),
            "consumer `live_only` takes no SNAPSHOT events of cc_bf.keyed",
        ),
        (
            format!("table={DB}.keyed&consumer=filter_only"),
            "consumer `filter_only` takes no SNAPSHOT events of cc_bf.keyed",
        ),
        (
            format!("table={DB}.keyed&consumer=nobody"),
            "no consumer named `nobody`",
        ),
        ("table=keyed".into(), "database.table"),
        (
            format!("table={DB}.keyed&where=no_such_column%3D1"),
            "refuses --where",
        ),
        (
            format!("table={DB}.keyed&where=1%3B%20DROP%20TABLE%20x"),
            "must not contain `;`",
        ),
        (
            format!("table={DB}.keyed&chunk=0"),
            "--chunk must be between",
        ),
        (
            format!("table={DB}.keyed&rate=-1"),
            "--rate must be between",
        ),
        (
            format!("table={DB}.keyed&rate=1e-300"),
            "--rate must be between",
        ),
        (
            format!("table={DB}.keyed&where=v%20LIKE%20%27a%5C%5C%27"),
            "must not contain a backslash",
        ),
        (
            format!("table={DB}.fkey&consumer=fkey"),
            "has a FLOAT/DOUBLE column `id`",
        ),
        (
            format!("table={DB}.ekey&consumer=ekey"),
            "has a ENUM column `id`",
        ),
    ];
    for (q, want) in cases {
        let (status, why) = call(q.clone()).await;
        assert_eq!(status, 400, "{q}: {why}");
        assert!(why.contains(want), "{q}: {why:?} should say {want:?}");
    }
    // without the token
    let r = canal_consumer::admin::client::request(&svc.admin, "GET", "/backfills")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    // nothing was stored
    let r =
        canal_consumer::admin::client::request_with(&svc.admin, "GET", "/backfills", Some(&token))
            .await
            .unwrap();
    assert_eq!(r.body.trim(), "[]", "{}", r.body);
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}

/// A composite key with a string part and a string key, backfilled at once; one of them
/// paused, resumed and its twin cancelled; a `where` that matches nothing is done at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn composite_and_string_keys_pause_resume_cancel_and_an_empty_where() {
    let _canal = canal_lock().await;
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.comp, {DB}.strk; \
         CREATE TABLE {DB}.comp (region VARCHAR(8), id INT, v INT NOT NULL, PRIMARY KEY (region, id)); \
         CREATE TABLE {DB}.strk (code VARCHAR(32) COLLATE utf8mb4_general_ci PRIMARY KEY, v INT NOT NULL); \
         DROP TABLE IF EXISTS canal_consumer.wm_keys;"
    ));
    mysql(&format!(
        "USE {DB}; SET SESSION sql_log_bin = 0; \
         INSERT INTO {DB}.comp SELECT ELT(1 + seq % 3, 'eu', 'us', 'Ásia'), seq, seq * 10 FROM seq_1_to_600; \
         INSERT INTO {DB}.strk SELECT CONCAT(ELT(1 + seq % 4, 'a', 'B', 'ä', 'x y'), '-', seq), seq FROM seq_1_to_500;"
    ));
    let queue = queue("backfill-keys");
    delete_queue(&queue).await;
    let comp = state_consumer(
        "comp",
        "comp",
        "${data.region}/${data.id}",
        "${old.region}/${old.id}",
        "changed('id') || changed('region')",
    );
    let strk = state_consumer(
        "strk",
        "strk",
        "${data.code}",
        "${old.code}",
        "changed('code')",
    );
    // takes SNAPSHOT events of comp too, but the comp backfill is for `comp` alone
    let other = state_consumer("other", "comp", "${data.id}", "${old.id}", "false");
    let mut svc = ServiceProc::prepare(
        "backfill-keys",
        &queue,
        &[
            ("comp.toml", &comp),
            ("strk.toml", &strk),
            ("other.toml", &other),
        ],
        &backfill_config("wm_keys"),
    );
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    svc.start().await;

    let empty = start_backfill(&svc, &format!("table={DB}.comp&where=v%20%3C%200")).await;
    let b = backfill(&svc, &empty).await;
    assert_eq!(b["state"], "done", "{b}");
    assert_eq!(b["progress"]["rows_read"], 0, "{b}");

    // two at once, slowed down so pause and cancel land mid-way
    let c = start_backfill(
        &svc,
        &format!("table={DB}.comp&chunk=20&rate=200&consumer=comp"),
    )
    .await;
    let s = start_backfill(&svc, &format!("table={DB}.strk&chunk=25&rate=200")).await;
    let twin = start_backfill(&svc, &format!("table={DB}.strk&chunk=5&rate=20")).await;
    assert_eq!(svc.post(&format!("/backfills/{twin}/cancel")).await, 200);
    // a cancelled backfill cannot be resumed
    assert_eq!(svc.post(&format!("/backfills/{twin}/resume")).await, 409);
    assert_eq!(svc.post(&format!("/backfills/{c}/pause")).await, 200);
    wait_backfill(&svc, &c, "paused", Duration::from_secs(10)).await;
    // the chunk in flight when it was paused still finishes
    let deadline = Instant::now() + Duration::from_secs(60);
    let paused = loop {
        let b = backfill(&svc, &c).await;
        if b["reading"] == false {
            break b;
        }
        assert!(Instant::now() < deadline, "chunk in flight forever: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let read = paused["progress"]["rows_read"].as_u64().unwrap();
    assert!(read < 600, "{paused}");
    // the status and the metrics show it as the record has it
    let status = wait_status(&svc, "backfills in status", |s| {
        s["backfills"].as_array().is_some_and(|a| {
            a.iter()
                .any(|b| b["id"] == c.as_str() && b["state"] == "paused")
        })
    })
    .await;
    assert!(
        status["backfills"].as_array().unwrap().len() >= 3,
        "{status}"
    );
    let (code, metrics) = svc.get("/metrics").await;
    assert_eq!(code, 200);
    let series = format!("backfill_rows_read{{backfill=\"{c}\",table=\"cc_bf.comp\"}} {read}");
    assert!(metrics.contains(&series), "{series} not in\n{metrics}");
    assert!(
        metrics.contains("backfills{state=\"cancelled\"} 1"),
        "{metrics}"
    );
    // paused means no more chunks: what it read does not move while the other one runs
    wait_backfill(&svc, &s, "done", Duration::from_secs(120)).await;
    let still = backfill(&svc, &c).await;
    assert_eq!(
        still["progress"]["rows_read"].as_u64().unwrap(),
        read,
        "{still}"
    );
    assert_eq!(svc.post(&format!("/backfills/{c}/resume")).await, 200);
    wait_backfill(&svc, &c, "done", Duration::from_secs(120)).await;
    let twin = backfill(&svc, &twin).await;
    assert_eq!(twin["state"], "cancelled", "{twin}");

    let pool = pool();
    sentinel(&pool, "comp", "'zz', -1").await;
    sentinel(&pool, "strk", "'zz-sentinel'").await;
    let got = consume_until(&queue, Duration::from_secs(120), |g| {
        g.last().is_some_and(is_sentinel) && g.iter().filter(|g| is_sentinel(g)).count() == 3
    })
    .await;
    let mut conn = pool.get_conn().await.unwrap();
    let comp_rows: Vec<(String, i64, i64)> = conn
        .query("SELECT region, id, v FROM comp WHERE id > 0")
        .await
        .unwrap();
    let comp_table: BTreeMap<String, i64> = comp_rows
        .into_iter()
        .map(|(r, id, v)| (format!("{r}/{id}"), v))
        .collect();
    assert_eq!(comp_table.len(), 600);
    assert_final_state(&last_seen(&got, "comp"), &comp_table, "composite key");
    let strk_rows: Vec<(String, i64)> = conn
        .query("SELECT code, v FROM strk WHERE v > 0")
        .await
        .unwrap();
    let strk_table: BTreeMap<String, i64> = strk_rows.into_iter().collect();
    drop(conn);
    assert_final_state(&last_seen(&got, "strk"), &strk_table, "string key");
    // each row once per backfill: the comp rows came once, the strk rows once from `s` (the
    // cancelled twin may have sent a few before it stopped; they carry their own ids)
    // --consumer: the other consumer of the table got none of its rows
    let leaked = got
        .iter()
        .filter(|g| g.body["consumer"] == "other" && g.body["source"]["event_type"] == "SNAPSHOT")
        .count();
    assert_eq!(
        leaked, 0,
        "SNAPSHOT rows of a --consumer backfill went to another consumer"
    );
    assert!(
        got.iter().any(|g| g.body["consumer"] == "other"),
        "the other consumer got its live rows"
    );
    let mut ids: HashMap<&str, u32> = HashMap::new();
    for g in &got {
        *ids.entry(g.message_id.as_str()).or_default() += 1;
    }
    assert!(ids.values().all(|n| *n == 1), "a message id came twice");
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
    disconnect(pool).await;
}

/// Live changes first: while they flow, a backfill reads chunks of at most
/// `backfill.chunk_while_live` rows at `backfill.rate_while_live`; once none came for a
/// second, its own chunk size again. Every key ends in the table's final state either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_backfill_yields_to_live_changes_and_goes_full_speed_after_them() {
    let _canal = canal_lock().await;
    let rows = 2000u64;
    keyed_table("yield", rows);
    let queue = queue("backfill-yield");
    let consumer = state_consumer("yield", "yield", "${data.id}", "${old.id}", "changed('id')");
    let mut svc = backfill_proc(
        "backfill-yield",
        &queue,
        &[("yield.toml", &consumer)],
        "wm_yield",
    )
    .await;
    // 50-row chunks at 200 rows/s while live changes flow
    yield_while_live(&mut svc, 200, 50);
    svc.start().await;
    // live changes flow before and all through the backfill: updates all over the table
    let pool = pool();
    let writer = Writer::start(&pool, 11, Duration::from_millis(20), move |rng| {
        format!(
            "UPDATE yield SET v = v + 1 WHERE id = {}",
            rng.u64(1..=rows)
        )
    });
    wait_status(&svc, "live changes routed", |s| {
        common::service::consumer(s, "yield")["events"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    let id = start_backfill(&svc, &format!("table={DB}.yield")).await;
    // status says so while it yields
    wait_view(
        &svc,
        &id,
        "yielding",
        Duration::from_secs(60),
        Duration::from_millis(20),
        |b| {
            assert_eq!(b["state"], "running", "never shown as yielding: {b}");
            b["yielding"] == true
        },
    )
    .await;
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(120)).await;
    assert_eq!(
        done["yielding"], false,
        "a backfill that is done yields no more: {done}"
    );
    let ops = writer.stop().await;
    let p = &done["progress"];
    assert_eq!(p["rows_read"].as_u64().unwrap(), rows, "{done}");
    // not one chunk of the default 5,000 rows: 50 at a time
    assert!(
        p["chunks"].as_u64().unwrap() >= rows / 50,
        "the backfill did not yield to the live changes: {done}"
    );
    // the writer's last change (and the sentinel) is through: the next backfill yields for at
    // most the 3 s after it, 600 rows at 200 rows/s (12 chunks), then reads its own size
    check_final_state(
        &queue,
        "yield",
        "yield",
        "backfill yielding to live changes",
    )
    .await;
    let again = start_backfill(&svc, &format!("table={DB}.yield")).await;
    let done = wait_backfill(&svc, &again, "done", Duration::from_secs(120)).await;
    let p = &done["progress"];
    assert_eq!(p["rows_read"].as_u64().unwrap(), rows + 1, "{done}"); // and the sentinel
    assert!(
        p["chunks"].as_u64().unwrap() < rows / 50,
        "the backfill still yielded with no live changes: {done}"
    );
    eprintln!("{ops} live changes during the first backfill");
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
    disconnect(pool).await;
}

/// kill -9 of the service mid-backfill: the restarted service resumes from the last confirmed
/// chunk; every row arrives, and rows sent twice carry the same message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_backfill_resumes_after_kill_9_with_the_same_ids() {
    let _canal = canal_lock().await;
    keyed_table("crash", 6000);
    let queue = queue("backfill-crash");
    let consumer = state_consumer("crash", "crash", "${data.id}", "${old.id}", "changed('id')");
    let mut svc = backfill_service(
        "backfill-crash",
        &queue,
        &[("crash.toml", &consumer)],
        "wm_crash",
    )
    .await;
    let id = start_backfill(&svc, &format!("table={DB}.crash&chunk=1000")).await;
    // after a confirmed chunk, kill it while it reads (or publishes) the next
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = backfill(&svc, &id).await;
        if b["progress"]["chunks"].as_u64().unwrap() >= 1 && b["reading"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress: {b}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.kill9();
    svc.start().await;
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(120)).await;
    assert_eq!(done["progress"]["rows_read"], 6000, "{done}");
    let got = check_final_state(&queue, "crash", "crash", "after kill -9").await;
    let again = assert_one_id_per_key(&got);
    eprintln!(
        "after kill -9: {} messages, {again} of them again",
        got.len()
    );
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}

/// Starts Canal again if the test ends (or panics) while it is down.
struct CanalBackUp;
impl Drop for CanalBackUp {
    fn drop(&mut self) {
        script("deploy/local/canal-ctl", &["start"]);
    }
}

/// The Canal server killed and started again mid-backfill: the backfill goes on (the chunk in
/// flight is read again), every row arrives, and a row sent twice keeps its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_canal_restart_mid_backfill_loses_nothing() {
    let _canal = canal_lock().await;
    keyed_table("cr", 4000);
    let queue = queue("backfill-canal");
    let consumer = state_consumer("cr", "cr", "${data.id}", "${old.id}", "changed('id')");
    let svc = backfill_service("backfill-canal", &queue, &[("cr.toml", &consumer)], "wm_cr").await;
    let id = start_backfill(&svc, &format!("table={DB}.cr&chunk=100&rate=1000")).await;
    wait_chunks(&svc, &id, 5).await;
    {
        let _back = CanalBackUp;
        script("deploy/local/canal-ctl", &["kill"]);
    }
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(180)).await;
    assert_eq!(done["progress"]["rows_read"], 4000, "{done}");
    let got = check_final_state(&queue, "cr", "cr", "after a Canal restart").await;
    let again = assert_one_id_per_key(&got);
    eprintln!(
        "canal restart: {} messages, {again} again, {done}",
        got.len()
    );
    let mut svc = svc;
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}

/// DDL on a table while it is backfilled (README "Backfill"): a new column is picked up from
/// the next chunk on and the backfill finishes with every row; a changed primary key or a
/// dropped table fails the backfill with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn ddl_during_a_backfill_has_a_clear_outcome() {
    let _canal = canal_lock().await;
    let tables = ["ddl_add", "ddl_key", "ddl_drop"];
    for t in tables {
        mysql(&format!(
            "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{t}; \
             CREATE TABLE {DB}.{t} (id INT PRIMARY KEY, v INT NOT NULL); \
             USE {DB}; SET SESSION sql_log_bin = 0; INSERT INTO {DB}.{t} SELECT seq, seq FROM seq_1_to_2000;"
        ));
    }
    mysql("DROP TABLE IF EXISTS canal_consumer.wm_ddl;");
    let queue = queue("backfill-ddl");
    delete_queue(&queue).await;
    let files: Vec<(String, String)> = tables
        .iter()
        .map(|t| {
            (
                format!("{t}.toml"),
                state_consumer(t, t, "${data.id}", "${old.id}", "changed('id')"),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut svc = ServiceProc::prepare("backfill-ddl", &queue, &files, &backfill_config("wm_ddl"));
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    svc.start().await;
    let mut ids = Vec::new();
    for t in tables {
        ids.push(start_backfill(&svc, &format!("table={DB}.{t}&chunk=50&rate=600")).await);
    }
    wait_chunks(&svc, &ids[0], 2).await;
    mysql(&format!(
        "ALTER TABLE {DB}.ddl_add ADD COLUMN note VARCHAR(8) NOT NULL DEFAULT 'new'; \
         ALTER TABLE {DB}.ddl_key DROP PRIMARY KEY, ADD PRIMARY KEY (id, v); \
         DROP TABLE {DB}.ddl_drop;"
    ));
    let added = wait_backfill(&svc, &ids[0], "done", Duration::from_secs(120)).await;
    assert_eq!(added["progress"]["rows_read"], 2000, "{added}");
    let key = wait_backfill(&svc, &ids[1], "failed", Duration::from_secs(60)).await;
    let why = key["progress"]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("the primary key of cc_bf.ddl_key changed from (id) to (id, v)"),
        "{key}"
    );
    let dropped = wait_backfill(&svc, &ids[2], "failed", Duration::from_secs(60)).await;
    let why = dropped["progress"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("no table cc_bf.ddl_drop"), "{dropped}");
    // every row of the table that took a new column arrived
    let pool = pool();
    let mut conn = pool.get_conn().await.unwrap();
    conn.query_drop("INSERT INTO ddl_add (id, v) VALUES (-1, -1)")
        .await
        .unwrap();
    drop(conn);
    let got = consume_until(&queue, Duration::from_secs(120), |g| {
        g.last().is_some_and(is_sentinel)
    })
    .await;
    let mut conn = pool.get_conn().await.unwrap();
    let rows: Vec<(i64, i64)> = conn
        .query("SELECT id, v FROM ddl_add WHERE id > 0")
        .await
        .unwrap();
    drop(conn);
    let table: BTreeMap<String, i64> = rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_final_state(
        &last_seen(&got, "ddl_add"),
        &table,
        "a column added mid-backfill",
    );
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
    disconnect(pool).await;
}

/// A bulk rule on SNAPSHOT events: the backfill's rows come as bulk messages of at most
/// `max_rows` rows (a bulk never spans a chunk, whose rows ride in one Canal batch), every row
/// exactly once, in key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_bulk_rule_gets_the_backfill_in_bulk_messages() {
    let _canal = canal_lock().await;
    keyed_table("bulk", 1000);
    let queue = queue("backfill-bulk");
    let consumer = format!(
        r#"
[consumers.bulk]
[[consumers.bulk.filters]]
database = "{DB}"
table = "bulk"
events = ["SNAPSHOT"]

[[consumers.bulk.rules]]
name = "rows"
plugin = "index"
payload = {{ key = "${{data.id}}", v = "${{data.v}}" }}
batch = {{ max_rows = 64 }}
"#
    );
    let mut svc = backfill_service(
        "backfill-bulk",
        &queue,
        &[("bulk.toml", &consumer)],
        "wm_bulk",
    )
    .await;
    let id = start_backfill(&svc, &format!("table={DB}.bulk&chunk=300")).await;
    wait_backfill(&svc, &id, "done", Duration::from_secs(120)).await;
    let got = consume_until(&queue, Duration::from_secs(60), |g| {
        g.iter()
            .map(|m| m.body["payload"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
            >= 1000
    })
    .await;
    let mut keys = Vec::new();
    for m in &got {
        let rows = m.body["payload"]
            .as_array()
            .expect("a bulk payload is a list");
        assert!(rows.len() <= 64, "{} rows in one message", rows.len());
        assert_eq!(m.body["bulk"]["rows"].as_u64(), Some(rows.len() as u64));
        assert_eq!(m.body["source"]["event_type"], "SNAPSHOT");
        keys.extend(rows.iter().map(|r| r["key"].as_i64().unwrap()));
    }
    assert_eq!(
        keys,
        (1..=1000).collect::<Vec<i64>>(),
        "every row once, in key order"
    );
    // chunks of 300, 300, 300 and 100 rows, each cut in bulks of at most 64
    let expected: usize = [300usize, 300, 300, 100]
        .iter()
        .map(|n| n.div_ceil(64))
        .sum();
    assert_eq!(got.len(), expected, "{} messages", got.len());
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}

/// While live changes flow, a backfill whose rows a bulk rule takes reads smaller pieces too,
/// each a whole number of its bulks (64 rows: 128 for `chunk_while_live` 100), never across
/// its chunks of 1,000 rows: its bulk messages are exactly those of whole chunks, computed
/// here from the table's keys, so a chunk read again in either mode keeps its messages' ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_yielding_bulk_backfill_reads_smaller_pieces_and_cuts_the_bulks_of_whole_chunks() {
    let _canal = canal_lock().await;
    let rows = 3000usize;
    keyed_table("bulkyield", rows as u64);
    // the live changes go to another table and consumer: no row of the backfill is dropped
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.bulklive; \
         CREATE TABLE {DB}.bulklive (id INT PRIMARY KEY, v INT NOT NULL); \
         INSERT INTO {DB}.bulklive VALUES (1, 0);"
    ));
    let queue = queue("backfill-bulk-yield");
    let consumers = format!(
        r#"
[consumers.bulk]
[[consumers.bulk.filters]]
database = "{DB}"
table = "bulkyield"
events = ["SNAPSHOT"]

[[consumers.bulk.rules]]
name = "rows"
plugin = "index"
payload = {{ key = "${{data.id}}" }}
batch = {{ max_rows = 64 }}

[consumers.live]
[[consumers.live.filters]]
database = "{DB}"
table = "bulklive"
events = ["UPDATE"]

[[consumers.live.rules]]
name = "touched"
plugin = "touch"
payload = {{ v = "${{data.v}}" }}
"#
    );
    let mut svc = backfill_proc(
        "backfill-bulk-yield",
        &queue,
        &[("bulk.toml", &consumers)],
        "wm_bulk_yield",
    )
    .await;
    yield_while_live(&mut svc, 2000, 100);
    svc.start().await;
    let pool = pool();
    let writer = Writer::start(&pool, 13, Duration::from_millis(20), |_| {
        "UPDATE bulklive SET v = v + 1 WHERE id = 1".to_string()
    });
    wait_status(&svc, "live changes routed", |s| {
        common::service::consumer(s, "live")["events"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    let id = start_backfill(&svc, &format!("table={DB}.bulkyield&chunk=1000")).await;
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(120)).await;
    let ops = writer.stop().await;
    let p = &done["progress"];
    assert_eq!(p["rows_read"].as_u64(), Some(rows as u64), "{done}");
    // 3 chunks of 1,000 rows read as 7 × 128 + 104 each: 24 reads
    assert!(
        p["chunks"].as_u64().unwrap() >= 20,
        "the bulk backfill did not read smaller pieces while live changes flowed: {done}"
    );
    let bulk_rows = |g: &[Got]| -> usize {
        g.iter()
            .filter(|m| m.body["bulk"].is_object())
            .map(|m| m.body["payload"].as_array().map_or(0, Vec::len))
            .sum()
    };
    let got = consume_until(&queue, Duration::from_secs(60), |g| bulk_rows(g) >= rows).await;
    let bulk_msgs: Vec<&Got> = got.iter().filter(|m| m.body["bulk"].is_object()).collect();
    let mut bulks: Vec<(i64, i64, usize)> = bulk_msgs
        .iter()
        .map(|m| {
            let keys: Vec<i64> = m.body["payload"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["key"].as_i64().unwrap())
                .collect();
            (keys[0], *keys.last().unwrap(), keys.len())
        })
        .collect();
    bulks.sort();
    // the expected cut, from the table's keys: chunks of 1,000 rows, each cut every 64 rows
    let keys: Vec<i64> = mysql(&format!("SELECT id FROM {DB}.bulkyield ORDER BY id"))
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let expected: Vec<(i64, i64, usize)> = keys
        .chunks(1000)
        .flat_map(|c| c.chunks(64))
        .map(|b| (b[0], *b.last().unwrap(), b.len()))
        .collect();
    assert_eq!(bulks, expected, "the bulks of whole chunks");
    let ids: std::collections::HashSet<&str> =
        bulk_msgs.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids.len(), expected.len(), "one id per bulk");
    eprintln!("{ops} live changes during the backfill; {}", p);
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
    disconnect(pool).await;
}

/// A backfill whose consumer is disabled waits (its rows would reach nobody) and says so; it
/// goes on once the consumer is enabled, and every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn a_backfill_for_a_disabled_consumer_waits_for_it() {
    let _canal = canal_lock().await;
    keyed_table("held", 300);
    let queue = queue("backfill-held");
    let consumer = state_consumer("held", "held", "${data.id}", "${old.id}", "false");
    let mut svc = backfill_service(
        "backfill-held",
        &queue,
        &[("held.toml", &consumer)],
        "wm_held",
    )
    .await;
    assert_eq!(svc.post("/consumers/held/disable").await, 200);
    let id = start_backfill(&svc, &format!("table={DB}.held&chunk=50&consumer=held")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let b = backfill(&svc, &id).await;
        if b["progress"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("every consumer it is for is disabled (held)"))
        {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "not waiting: {b}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["progress"]["rows_read"], 0, "{waiting}");
    assert_eq!(waiting["state"], "running", "{waiting}");
    assert_eq!(svc.post("/consumers/held/enable").await, 200);
    let done = wait_backfill(&svc, &id, "done", Duration::from_secs(60)).await;
    assert_eq!(done["progress"]["rows_emitted"], 300, "{done}");
    assert!(done["progress"]["error"].is_null(), "{done}");
    let got = check_final_state(&queue, "held", "held", "after the wait").await;
    assert_eq!(assert_one_id_per_key(&got), 0);
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}

/// The record's writers do not undo each other (against MariaDB's own JSON functions): an
/// operator's pause leaves the progress the runner stored after the operator read the record,
/// and the runner's later stores keep the `finished_at` a cancel wrote. Both went wrong before:
/// `act` wrote back the progress it had read, and the runner's stores wrote `finished_at: null`.
#[tokio::test]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn an_operators_stop_and_the_runners_progress_do_not_undo_each_other() {
    use canal_consumer::backfill::record::{Backfill, Progress, Spec, State};
    use canal_consumer::backfill::source::{ProgressWrite, Source};
    let source = Source::new(
        &backfill_url(),
        "backfill".into(),
        ("canal_consumer".into(), "wm_writers".into()),
    )
    .unwrap();
    mysql("DROP TABLE IF EXISTS canal_consumer.wm_writers");
    source.ensure_table().await.unwrap();
    let owner = "writers-test";
    let b = Backfill {
        id: "bf-writers".into(),
        state: State::Running,
        spec: Spec {
            database: DB.into(),
            table: "t".into(),
            consumer: None,
            condition: None,
            chunk: 10,
            rate: None,
            owner: owner.into(),
            key_columns: vec!["id".into()],
        },
        progress: Progress {
            started_at: 1,
            ..Progress::default()
        },
    };
    source.insert(&b).await.unwrap();
    // an operator reads the record (rows_read 0), the runner stores a chunk, the pause lands
    let read = source.get(owner, &b.id).await.unwrap();
    assert_eq!(read.progress.rows_read, 0);
    let stored = Progress {
        rows_read: 10,
        chunks: 1,
        started_at: 1,
        ..Progress::default()
    };
    source.save_progress(&b.id, &stored).await.unwrap();
    assert!(
        source
            .set_state(&b.id, read.state, State::Paused, ProgressWrite::Keep)
            .await
            .unwrap()
    );
    let paused = source.get(owner, &b.id).await.unwrap();
    assert_eq!(paused.state, State::Paused);
    assert_eq!(paused.progress, stored, "the pause moved progress back");
    // a stale state is refused
    assert!(
        !source
            .set_state(
                &b.id,
                State::Running,
                State::Cancelled,
                ProgressWrite::FinishedAt(7)
            )
            .await
            .unwrap()
    );
    // the cancel stamps finished_at; the runner's last store (its chunk in flight) keeps it
    assert!(
        source
            .set_state(
                &b.id,
                State::Paused,
                State::Cancelled,
                ProgressWrite::FinishedAt(1_700_000_000_123)
            )
            .await
            .unwrap()
    );
    let last = Progress {
        rows_read: 20,
        chunks: 2,
        started_at: 1,
        ..Progress::default()
    };
    source.save_progress(&b.id, &last).await.unwrap();
    let cancelled = source.get(owner, &b.id).await.unwrap();
    assert_eq!(cancelled.state, State::Cancelled);
    assert_eq!(
        cancelled.progress,
        Progress {
            finished_at: Some(1_700_000_000_123),
            ..last
        }
    );
    mysql("DROP TABLE canal_consumer.wm_writers");
    source.close().await;
}
