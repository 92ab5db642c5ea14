//! Every row a consumer wants arrives, exactly as written: table patterns as Canal
//! subscriptions, BINARY padding, DDL made while Canal was down, large BLOBs. Against the real
//! Canal server and MariaDB of `deploy/local/up` (run under `flock /tmp/cc-stack.lock`).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::consumer::filter::{NameMatch, TableFilter, canal_filter};
use canal_consumer::event::{ChangeEvent, Value};
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

/// The tables seen among row events, as `db.table`.
fn tables(events: &[ChangeEvent]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| format!("{}.{}", e.database, e.table))
        .collect()
}

/// One database per pattern form, so one form cannot hide another's failure: every table is
/// created, one row inserted into each (matching ones and not), then a marker row into the
/// last matching table. The subscription is the union of the filters, as the service sends it.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn every_table_a_pattern_matches_is_delivered_by_canal() {
    let _lock = canal_lock().await;
    // (database, table_pattern, tables it matches, tables it does not)
    let forms: &[(&str, &str, &[&str], &[&str])] = &[
        ("cc_f_alt", "t_a|t_b", &["t_a", "t_b"], &["t_c"]),
        ("cc_f_rep", "x{1,2}", &["x", "xx"], &["xxx"]),
        ("cc_f_uni", r"\p{L}+", &["café", "straße", "abc"], &["t1"]),
        ("cc_f_anc", "^t$", &["t"], &["tt"]),
        (
            "cc_f_grp",
            "(o|p)_[0-9]{2,3}",
            &["o_12", "p_123"],
            &["o_1", "p_1234"],
        ),
    ];
    let mut sql = String::new();
    for (db, _, yes, no) in forms {
        sql.push_str(&format!(
            "DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db} DEFAULT CHARSET utf8mb4;"
        ));
        for t in yes.iter().chain(no.iter()) {
            sql.push_str(&format!("CREATE TABLE {db}.`{t}` (id INT PRIMARY KEY);"));
        }
    }
    mysql(&sql);
    let filters: Vec<TableFilter> = forms
        .iter()
        .map(|(db, pattern, yes, no)| {
            let f = TableFilter {
                database: NameMatch::exact(db),
                table: NameMatch::pattern(pattern).expect("pattern loads"),
                event_types: Default::default(),
            };
            // our own matcher agrees with the table lists
            for t in *yes {
                assert!(f.table.matches(t), "{pattern} should match {t}");
            }
            for t in *no {
                assert!(!f.table.matches(t), "{pattern} should not match {t}");
            }
            f
        })
        .collect();
    let subscription = canal_filter(&filters);
    let mut tap = Tap::clean(&subscription).await;

    let mut sql = String::new();
    for (db, _, yes, no) in forms {
        for t in no.iter().chain(yes.iter()) {
            sql.push_str(&format!("INSERT INTO {db}.`{t}` VALUES (1);"));
        }
    }
    // binlog order: once the marker arrives, every earlier row Canal lets through has too
    sql.push_str("INSERT INTO cc_f_grp.`p_123` VALUES (2);");
    mysql(&sql);
    let dbs: BTreeSet<&str> = forms.iter().map(|f| f.0).collect();
    let (events, _) = tap
        .collect_matching(
            true,
            Duration::from_secs(60),
            |e| !e.is_ddl && dbs.contains(&*e.database),
            |ev| {
                ev.iter()
                    .any(|e| &*e.table == "p_123" && e.data.get("id") == Some(&Value::Int(2)))
            },
        )
        .await;
    let got = tables(&events);
    for (db, pattern, yes, no) in forms {
        for t in *yes {
            assert!(
                got.contains(&format!("{db}.{t}")),
                "pattern {pattern:?} (sent as {subscription:?}): row of {db}.{t} not delivered; got {got:?}"
            );
        }
        for t in *no {
            // Canal may deliver more than we match (never less); these forms are exact
            assert!(
                !got.contains(&format!("{db}.{t}")),
                "pattern {pattern:?}: {db}.{t} delivered although it does not match"
            );
        }
    }
}

const DB: &str = "cc_fid";

/// The DDL-while-Canal-was-down test has a database of its own: Canal's table-meta history
/// snapshots a whole database as one DDL script, and one table its parser rejects (the
/// non-ASCII names of the pattern test, say) spoils the snapshot of every table beside it.
const DDL_DB: &str = "cc_fid_ddl";

fn setup_table(table: &str, ddl: &str) {
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{table}; CREATE TABLE {DB}.{table} {ddl}"
    ));
}

/// Makes sure Canal runs with this checkout's configuration (table-meta history, heap):
/// `canal-ctl start` restarts a server started with another one, else does nothing.
fn canal_with_our_config() {
    script("deploy/local/canal-ctl", &["start"]);
}

/// Starts Canal again if the test ends (or panics) while it is stopped.
struct CanalBackUp;
impl Drop for CanalBackUp {
    fn drop(&mut self) {
        script("deploy/local/canal-ctl", &["start"]);
    }
}

/// Collects until the row with `id = last` of `table` has arrived.
async fn collect_until_id(tap: &mut Tap, table: &str, last: i64) -> Vec<ChangeEvent> {
    let (events, _) = tap
        .collect(table, true, Duration::from_secs(120), |ev| {
            ev.iter()
                .any(|e| e.data.get("id") == Some(&Value::Int(last)))
        })
        .await;
    events
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn binary_n_arrives_padded_as_mariadb_returns_it() {
    let _lock = canal_lock().await;
    let table = "bin_pad";
    setup_table(
        table,
        "(id INT PRIMARY KEY, b16 BINARY(16), b1 BINARY, vb VARBINARY(16))",
    );
    let mut tap = Tap::clean(&format!("{DB}\\.{table}")).await;
    mysql(&format!(
        "INSERT INTO {DB}.{table} VALUES (1, X'AB', X'00', X'AB00'), (2, X'', '', '')"
    ));
    let events = collect_until_id(&mut tap, table, 2).await;
    for id in [1, 2] {
        let e = events
            .iter()
            .find(|e| e.data["id"] == Value::Int(id))
            .unwrap();
        for col in ["b16", "b1", "vb"] {
            let want = mysql(&format!(
                "SELECT HEX({col}) FROM {DB}.{table} WHERE id = {id}"
            ));
            let Value::Bytes(got) = &e.data[col] else {
                panic!("{col} is {:?}", e.data[col]);
            };
            assert_eq!(hex(got), want.trim(), "row {id} column {col}");
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// The issue's case: rows written before an ALTER that Canal only reads after it (Canal was
/// down) must keep their values under their own names.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn rows_written_before_a_ddl_made_while_canal_was_down_keep_their_names() {
    let _lock = canal_lock().await;
    let table = "ddl_down";
    // A fresh table-meta history: Canal's history (its H2 database) goes wrong after long use
    // here (DDL its parser rejects, large binlogs), and then decodes this table with a stale
    // structure after the restart below, which our shifted-row check refuses. What this test
    // checks is that a healthy history keeps names right, so it starts from one
    // (`canal-ctl reset` also forgets the saved cursors, which no test relies on).
    script("deploy/local/canal-ctl", &["reset"]);
    canal_with_our_config();
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DDL_DB}; DROP TABLE IF EXISTS {DDL_DB}.{table}; \
         CREATE TABLE {DDL_DB}.{table} (id INT PRIMARY KEY, v VARCHAR(10), n INT) DEFAULT CHARSET utf8mb4"
    ));
    let mut tap = Tap::clean(&format!("{DDL_DB}\\.{table}")).await;
    // Canal has read the CREATE once this marker row arrives
    mysql(&format!("INSERT INTO {DDL_DB}.{table} VALUES (0, 'v0', 0)"));
    collect_until_id(&mut tap, table, 0).await;
    drop(tap);

    let _up = CanalBackUp;
    script("deploy/local/canal-ctl", &["stop"]);
    let rows = |from: i64, to: i64, cols: &str| {
        let values: Vec<String> = (from..=to)
            .map(|i| {
                if cols == "id, v, n" {
                    format!("({i}, 'v{i}', {i})")
                } else {
                    format!("({i}, {i}, 'v{i}')")
                }
            })
            .collect();
        format!(
            "INSERT INTO {DDL_DB}.{table} ({cols}) VALUES {};",
            values.join(",")
        )
    };
    mysql(&format!(
        "{} ALTER TABLE {DDL_DB}.{table} MODIFY COLUMN n INT AFTER id; {}",
        rows(1, 100, "id, v, n"),
        rows(101, 200, "id, n, v")
    ));
    script("deploy/local/canal-ctl", &["start"]);

    let mut tap = Tap::connect(&format!("{DDL_DB}\\.{table}")).await;
    let events = collect_until_id(&mut tap, table, 200).await;
    let mut seen = BTreeSet::new();
    for e in &events {
        let Value::Int(id) = e.data["id"] else {
            panic!("id is {:?}", e.data["id"])
        };
        if id == 0 {
            continue;
        }
        assert_eq!(e.data["n"], Value::Int(id), "row {id}: {:?}", e.data);
        assert_eq!(e.data["v"], Value::Text(format!("v{id}")), "row {id}");
        let names: Vec<&str> = e.data.keys().collect();
        let want = if id <= 100 {
            ["id", "v", "n"]
        } else {
            ["id", "n", "v"]
        };
        assert_eq!(names, want, "row {id}: column order as written");
        seen.insert(id);
    }
    assert_eq!(seen.len(), 200, "every row arrives once");
}

/// A 20 MiB BLOB with the default frame cap and the local Canal heap: the UPDATE that writes
/// it, an UPDATE of another column (the row twice in one entry), the DELETE and a backlog of
/// four more such rows arrive byte-exact.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn a_20_mib_blob_passes_with_the_default_settings() {
    let _lock = canal_lock().await;
    let table = "big_blob";
    canal_with_our_config();
    setup_table(table, "(id INT PRIMARY KEY, tag INT, b LONGBLOB)");
    let mut tap = Tap::clean(&format!("{DB}\\.{table}")).await;
    // All 256 byte values repeated, so most bytes are >= 0x80 (two UTF-8 bytes each on Canal's
    // wire): the worst case for the frame size. Built by MariaDB and hashed by MariaDB.
    let size = 20 * 1024 * 1024;
    let value = format!(
        "LEFT(REPEAT((SELECT UNHEX(GROUP_CONCAT(LPAD(HEX(255 - seq), 2, '0') ORDER BY seq SEPARATOR '')) \
         FROM {DB}.seq_0_to_255), {reps}), {size})",
        reps = size / 256
    );
    // ... and a backlog: four more such rows written before the first is fetched
    mysql(&format!(
        "INSERT INTO {DB}.{table} VALUES (1, 0, X'00');
         UPDATE {DB}.{table} SET b = {value} WHERE id = 1;
         UPDATE {DB}.{table} SET tag = 1 WHERE id = 1;
         DELETE FROM {DB}.{table} WHERE id = 1;
         INSERT INTO {DB}.{table} VALUES (2, 0, {value});
         INSERT INTO {DB}.{table} VALUES (3, 0, {value});
         INSERT INTO {DB}.{table} VALUES (4, 0, {value});
         INSERT INTO {DB}.{table} VALUES (5, 0, {value});"
    ));
    let want = mysql(&format!("SELECT LENGTH({value}), SHA1({value})"));
    let (want_len, want_sha1) = want.trim().split_once('\t').expect("two columns");
    assert_eq!(want_len, size.to_string());
    let (events, _) = tap
        .collect(table, true, Duration::from_secs(300), |ev| ev.len() >= 8)
        .await;
    assert_eq!(events.len(), 8);
    for (i, e) in events.iter().enumerate().skip(1) {
        let Value::Bytes(b) = &e.data["b"] else {
            panic!("event {i}: b is not bytes")
        };
        assert_eq!(b.len(), size, "event {i}");
        assert_eq!(sha1_hex(b), want_sha1, "event {i}");
    }
    // the UPDATE of `tag` carried the 20 MiB row twice (before and after image)
    assert_eq!(events[2].changed, ["tag"]);
}

fn sha1_hex(b: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}
