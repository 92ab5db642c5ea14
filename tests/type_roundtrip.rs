//! Every MariaDB column type, with edge values, written through the real binlog and Canal
//! server, compared with MariaDB's own rendering of the stored value (never with values our
//! code computes). How each type is represented: docs/types.md.
//!
//! Against the local stack (`deploy/local/up`); run under `flock /tmp/cc-stack.lock`.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::event::{ChangeEvent, EventType, Value};
use common::*;
use std::time::Duration;

const DB: &str = "cc_types";

/// How a delivered value is compared with MariaDB's rendering.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `CAST(col AS CHAR)`, parsed as an integer; we deliver `Int`/`UInt`.
    Int,
    /// `CAST(col + 0 AS CHAR)` (BIT as a number); we deliver `UInt`.
    Bit,
    /// `CAST(col AS DOUBLE)` parsed; compared after rounding both to f32 (a FLOAT column).
    Float32,
    /// `col` parsed as f64; compared exactly.
    Float64,
    /// `HEX(CONVERT(col USING utf8mb4))`: the characters, as UTF-8; we deliver `Text`.
    Text,
    /// `HEX(col)`: the stored bytes; we deliver `Bytes`.
    Bytes,
    /// YEAR: `CAST(col AS CHAR)` as a number; we deliver `Int`.
    Year,
}

/// (column, declaration, kind, the value of each row as SQL; `None` = NULL)
type Col = (&'static str, &'static str, Kind, [Option<&'static str>; 4]);

#[rustfmt::skip]
fn columns() -> Vec<Col> {
    use Kind::*;
    vec![
        ("ti", "TINYINT", Int, [Some("-128"), Some("127"), Some("0"), None]),
        ("tiu", "TINYINT UNSIGNED", Int, [Some("0"), Some("255"), Some("1"), None]),
        ("si", "SMALLINT", Int, [Some("-32768"), Some("32767"), Some("0"), None]),
        ("siu", "SMALLINT UNSIGNED", Int, [Some("0"), Some("65535"), Some("1"), None]),
        ("mi", "MEDIUMINT", Int, [Some("-8388608"), Some("8388607"), Some("0"), None]),
        ("miu", "MEDIUMINT UNSIGNED", Int, [Some("0"), Some("16777215"), Some("1"), None]),
        ("i", "INT", Int, [Some("-2147483648"), Some("2147483647"), Some("0"), None]),
        ("iu", "INT UNSIGNED", Int, [Some("0"), Some("4294967295"), Some("1"), None]),
        ("bi", "BIGINT", Int, [Some("-9223372036854775808"), Some("9223372036854775807"), Some("0"), None]),
        ("biu", "BIGINT UNSIGNED", Int, [Some("0"), Some("18446744073709551615"), Some("9223372036854775808"), None]),
        ("bo", "BOOLEAN", Int, [Some("0"), Some("1"), Some("-1"), None]),
        ("de", "DECIMAL(65,30)", Text, [
            Some("-99999999999999999999999999999999999.999999999999999999999999999999"),
            Some("99999999999999999999999999999999999.999999999999999999999999999999"),
            Some("0.000000000000000000000000000001"),
            None,
        ]),
        ("d11", "DECIMAL(20,11)", Text, [Some("1.5"), Some("-123456789.00000000001"), Some("0"), None]),
        ("d2", "DECIMAL(10,2)", Text, [Some("-7"), Some("12345678.5"), Some("0.01"), None]),
        ("deu", "DECIMAL(10,0) UNSIGNED", Text, [Some("0"), Some("9999999999"), Some("1"), None]),
        ("f", "FLOAT", Float32, [Some("-3.40282e38"), Some("3.40282e38"), Some("1.17549e-38"), None]),
        ("d", "DOUBLE", Float64, [
            Some("-1.7976931348623157e308"),
            Some("1.7976931348623157e308"),
            Some("2.2250738585072014e-308"),
            None,
        ]),
        ("b1", "BIT(1)", Bit, [Some("b'0'"), Some("b'1'"), Some("b'1'"), None]),
        ("b8", "BIT(8)", Bit, [Some("b'0'"), Some("b'11111111'"), Some("b'10000000'"), None]),
        ("b33", "BIT(33)", Bit, [Some("0"), Some("8589934591"), Some("4294967296"), None]),
        ("b64", "BIT(64)", Bit, [Some("0"), Some("18446744073709551615"), Some("9223372036854775808"), None]),
        ("dt", "DATE", Text, [Some("'0000-00-00'"), Some("'9999-12-31'"), Some("'1000-01-01'"), None]),
        ("dtm", "DATETIME", Text, [Some("'0000-00-00 00:00:00'"), Some("'9999-12-31 23:59:59'"), Some("'2024-02-29 12:00:00'"), None]),
        ("dtm6", "DATETIME(6)", Text, [Some("'0000-00-00 00:00:00.000000'"), Some("'9999-12-31 23:59:59.999999'"), Some("'2024-02-29 12:00:00.000001'"), None]),
        ("ts", "TIMESTAMP NULL", Text, [Some("'0000-00-00 00:00:00'"), Some("'2038-01-19 03:14:07'"), Some("'1970-01-01 00:00:01'"), None]),
        ("ts3", "TIMESTAMP(3) NULL", Text, [Some("'0000-00-00 00:00:00.000'"), Some("'2038-01-19 03:14:07.999'"), Some("'2001-02-03 04:05:06.5'"), None]),
        ("tm", "TIME", Text, [Some("'-838:59:59'"), Some("'838:59:59'"), Some("'00:00:00'"), None]),
        ("tm6", "TIME(6)", Text, [Some("'-838:59:59.000000'"), Some("'838:59:59.000000'"), Some("'-00:00:00.5'"), None]),
        ("tm2", "TIME(2)", Text, [Some("'-01:02:03.04'"), Some("'12:34:56.78'"), Some("'-00:00:00.01'"), None]),
        ("y", "YEAR", Year, [Some("0"), Some("2155"), Some("1901"), None]),
        ("e", "ENUM('a','b''q','ü')", Text, [Some("''"), Some("'ü'"), Some("'b''q'"), None]),
        ("s", "SET('x','y','z')", Text, [Some("''"), Some("'x,y,z'"), Some("'y'"), None]),
        ("j", "JSON", Text, [Some("'{}'"), Some("'{\"k\": [1, 2.5, null, \"ü\"]}'"), Some("'\"\"'"), None]),
        ("g", "GEOMETRY", Bytes, [
            Some("ST_GeomFromText('POINT(1 2)')"),
            Some("ST_GeomFromText('POLYGON((0 0,1 0,1 1,0 0))')"),
            Some("ST_GeomFromText('LINESTRING(0 0,-1.5 2e10)')"),
            None,
        ]),
        ("bn", "BINARY(4)", Bytes, [Some("X''"), Some("X'FFFFFFFF'"), Some("X'AB'"), None]),
        ("vb", "VARBINARY(8)", Bytes, [Some("X''"), Some("X'00FF00'"), Some("X'00'"), None]),
        ("bl", "BLOB", Bytes, [Some("X''"), Some("X'00FF80'"), Some("X'0000'"), None]),
        ("c", "CHAR(4)", Text, [Some("''"), Some("'abcd'"), Some("'a'"), None]),
        ("vc", "VARCHAR(32)", Text, [Some("''"), Some("' \\t\\n\\\\ '"), Some("'NULL'"), None]),
        ("tx", "TEXT", Text, [Some("''"), Some("'line1\\nline2'"), Some("' '"), None]),
        ("tx1k", "TEXT(1000)", Text, [Some("''"), Some("'ü 汉字 😀'"), Some("'a'"), None]),
        ("mtx", "MEDIUMTEXT", Text, [Some("''"), Some("'ü'"), Some("'a'"), None]),
        ("u8", "VARCHAR(16) CHARACTER SET utf8mb4", Text, [Some("''"), Some("'😀 汉字 ü'"), Some("'\\0'"), None]),
        ("u8b", "VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", Text, [Some("''"), Some("'Ä😀'"), Some("'a'"), None]),
        ("u3", "VARCHAR(16) CHARACTER SET utf8mb3", Text, [Some("''"), Some("'€ 汉 ß'"), Some("'a'"), None]),
        ("u3b", "TEXT CHARACTER SET utf8mb3 COLLATE utf8mb3_bin", Text, [Some("''"), Some("'é'"), Some("'a'"), None]),
        ("asc", "VARCHAR(16) CHARACTER SET ascii", Text, [Some("''"), Some("'~!@#'"), Some("'a'"), None]),
        // synonyms: Canal's table-meta history keeps the DDL's spelling
        ("rl", "REAL", Float64, [Some("-1.5"), Some("1e300"), Some("0"), None]),
        ("nm", "NUMERIC(10,2)", Text, [Some("-12345678.90"), Some("99999999.99"), Some("0"), None]),
        ("i8", "INT8", Int, [Some("-9223372036854775808"), Some("9223372036854775807"), Some("0"), None]),
        // not `LONG VARBINARY` / `LONG VARCHAR`: Canal's DDL parser rejects that spelling, and
        // its table-meta history then goes wrong for *other* tables after a Canal restart
        // (see docs/types.md); the decoder still maps them (unit tests in src/canal/decode.rs)
    ]
}

/// Charsets whose non-ASCII text stock Canal carries only when it ships text as raw bytes
/// (`canal.instance.connectionCharset=ISO-8859-1`, the local stack's destination `raw`), with
/// the service decoding each column with its own charset: see docs/types.md.
#[rustfmt::skip]
fn non_utf8_columns() -> Vec<Col> {
    use Kind::*;
    vec![
        ("l1", "VARCHAR(16) CHARACTER SET latin1", Text, [Some("''"), Some("'café ÿ ß'"), Some("'Ångström ± €'"), None]),
        ("l1b", "TEXT CHARACTER SET latin1 COLLATE latin1_bin", Text, [Some("''"), Some("'café'"), Some("'a'"), None]),
        ("l1c", "CHAR(8) CHARACTER SET latin1", Text, [Some("''"), Some("'Ñandú'"), Some("'a'"), None]),
        ("l1e", "ENUM('é','ü') CHARACTER SET latin1", Text, [Some("'é'"), Some("'ü'"), Some("'é'"), None]),
        ("l2", "VARCHAR(16) CHARACTER SET latin2", Text, [Some("''"), Some("'Łódź'"), Some("'a'"), None]),
        ("gb", "VARCHAR(16) CHARACTER SET gbk", Text, [Some("''"), Some("'汉字'"), Some("'a'"), None]),
        ("gbt", "MEDIUMTEXT CHARACTER SET gbk", Text, [Some("''"), Some("'中文 ü'"), Some("'a'"), None]),
        ("b5", "VARCHAR(16) CHARACTER SET big5", Text, [Some("''"), Some("'漢字'"), Some("'a'"), None]),
        ("cy", "VARCHAR(16) CHARACTER SET cp1251", Text, [Some("''"), Some("'Привет'"), Some("'a'"), None]),
        ("sj", "VARCHAR(16) CHARACTER SET sjis", Text, [Some("''"), Some("'日本語'"), Some("'a'"), None]),
        ("kr", "VARCHAR(16) CHARACTER SET euckr", Text, [Some("''"), Some("'한국어'"), Some("'a'"), None]),
        ("w16", "VARCHAR(16) CHARACTER SET utf16", Text, [Some("''"), Some("'a汉😀'"), Some("'a'"), None]),
        ("w32", "VARCHAR(16) CHARACTER SET utf32", Text, [Some("''"), Some("'😀 ü'"), Some("'a'"), None]),
    ]
}

/// MariaDB's rendering of `col` for `kind`, as one SQL expression.
fn rendering(col: &str, kind: Kind) -> String {
    match kind {
        Kind::Int | Kind::Year => format!("CAST({col} AS CHAR)"),
        Kind::Bit => format!("CAST({col} + 0 AS CHAR)"),
        Kind::Float32 => format!("CAST({col} AS DOUBLE)"),
        Kind::Float64 => col.to_string(),
        Kind::Text => format!("HEX(CONVERT({col} USING utf8mb4))"),
        Kind::Bytes => format!("HEX({col})"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Compares one delivered value with MariaDB's rendering (`NULL` when the value is NULL).
fn check(col: &str, kind: Kind, got: &Value, want: &str) -> Result<(), String> {
    let fail = || {
        Err(format!(
            "column {col}: delivered {got:?}, MariaDB has {want}"
        ))
    };
    if want == "NULL" {
        return if *got == Value::Null { Ok(()) } else { fail() };
    }
    let ok = match (kind, got) {
        (Kind::Int | Kind::Year, Value::Int(v)) => want.parse::<i128>() == Ok(*v as i128),
        (Kind::Int | Kind::Year | Kind::Bit, Value::UInt(v)) => {
            want.parse::<i128>() == Ok(*v as i128)
        }
        (Kind::Float32, Value::Float(v)) => want.parse::<f64>().map(|w| w as f32) == Ok(*v as f32),
        (Kind::Float64, Value::Float(v)) => want.parse::<f64>() == Ok(*v),
        (Kind::Text, Value::Text(s)) => hex(s.as_bytes()) == want,
        (Kind::Bytes, Value::Bytes(b)) => hex(b) == want,
        _ => false,
    };
    if ok { Ok(()) } else { fail() }
}

/// Creates `table` (dropping an older one) with an `id` key and `cols`, in `charset`.
fn create_table(table: &str, charset: &str, cols: &[Col]) {
    let decl: Vec<String> = cols.iter().map(|(n, d, ..)| format!("`{n}` {d}")).collect();
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{table};
         CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, {}) DEFAULT CHARSET {charset}",
        decl.join(", ")
    ));
}

/// Writes the four rows of `cols` (ids 0..4) in one session.
fn insert_rows(table: &str, cols: &[Col]) {
    let names: Vec<String> = cols.iter().map(|c| format!("`{}`", c.0)).collect();
    let mut sql = String::from(
        "SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'; SET SESSION time_zone = '+00:00';",
    );
    for row in 0..4 {
        let values: Vec<&str> = cols.iter().map(|c| c.3[row].unwrap_or("NULL")).collect();
        sql.push_str(&format!(
            "INSERT INTO {DB}.{table} (id, {}) VALUES ({row}, {});",
            names.join(", "),
            values.join(", ")
        ));
    }
    mysql(&sql);
}

/// Creates a table of `cols`, subscribes, inserts the four rows and checks every delivered
/// value against MariaDB's rendering of the stored one. Returns the mismatches.
async fn round_trip(table: &str, charset: &str, cols: &[Col]) -> Vec<String> {
    // this checkout's Canal configuration (table-meta history on): restarts Canal only if
    // another one is running
    script("deploy/local/canal-ctl", &["start"]);
    create_table(table, charset, cols);
    let mut tap = Tap::clean(&format!("{DB}\\.{table}")).await;
    insert_rows(table, cols);
    let (events, _) = tap
        .collect(table, true, Duration::from_secs(60), |ev| ev.len() >= 4)
        .await;
    compare(table, cols, &events, false)
}

/// Every delivered value of `events` (rows of `table`) against MariaDB's rendering of the
/// stored one; the mismatches. `via_json`: the events were read back from `tail`'s JSON lines,
/// where a BIT value (UInt) reads back as Int (JSON has one kind of number).
fn compare(table: &str, cols: &[Col], events: &[ChangeEvent], via_json: bool) -> Vec<String> {
    let exprs: Vec<String> = cols
        .iter()
        .map(|(n, _, k, _)| rendering(&format!("`{n}`"), *k))
        .collect();
    let mut mismatches = Vec::new();
    for e in events {
        let id = match e.data.get("id") {
            Some(Value::Int(id)) => *id,
            other => panic!("id is {other:?}"),
        };
        let row = mysql(&format!(
            "SET SESSION time_zone = '+00:00'; SELECT {} FROM {DB}.{table} WHERE id = {id}",
            exprs.join(", ")
        ));
        let wants: Vec<&str> = row.trim_end_matches('\n').split('\t').collect();
        assert_eq!(wants.len(), cols.len(), "{row:?}");
        for ((name, _, kind, _), want) in cols.iter().zip(wants) {
            let got = e
                .data
                .get(name)
                .unwrap_or_else(|| panic!("row {id}: no column {name}"));
            let got = match (kind, got) {
                (Kind::Bit, Value::Int(i)) if via_json && *i >= 0 => &Value::UInt(*i as u64),
                _ => got,
            };
            if let Err(m) = check(name, *kind, got, want) {
                mismatches.push(format!("row {id}: {m}"));
            }
        }
    }
    mismatches
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn every_column_type_arrives_as_mariadb_renders_it() {
    let _lock = canal_lock().await;
    let mismatches = round_trip("all_types", "utf8mb4", &columns()).await;
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// The local stack's destination that ships text as raw bytes (`connectionCharset` ISO-8859-1;
/// deploy/local/canal/conf/raw), `CC_TEST_CANAL_RAW_DESTINATION` elsewhere.
fn raw_destination() -> String {
    env_or("CC_TEST_CANAL_RAW_DESTINATION", "raw")
}

/// The source database for column charsets, as the service's `canal.source_url`.
fn source_url() -> String {
    env_or(
        "CC_TEST_SOURCE_URL",
        &format!("mysql://canal:canal@{}:{}", mysql_host(), mysql_port()),
    )
}

/// `canal-consumer tail --ack` on the raw-text destination with
/// `canal.connection_charset = "ISO-8859-1"`, printing to a file; [`RawTail::inserts`] reads
/// the rows of one table (named `raw_...`).
struct RawTail {
    table: String,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
    child: proc::ChildGuard,
}

impl RawTail {
    fn start(table: &str) -> RawTail {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tail.jsonl");
        let child = proc::ChildGuard::spawn(
            "canal-consumer tail (raw text)",
            std::process::Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
                .args(["tail", "--ack", "--client-id", "1101"])
                // one filter for every raw-text test and run: a new filter only applies to
                // what Canal parses after the subscription, so rows written just before it
                // would be dropped under the previous test's filter
                .args(["--filter", &format!("{DB}\\.raw_.*")])
                .current_dir(repo_root())
                .env("CANAL_HOST", canal_host())
                .env("CANAL_PORT", canal_port().to_string())
                .env("CANAL_DESTINATION", raw_destination())
                .env(
                    "CANAL_CONSUMER__CANAL__MEM_UNIT",
                    canal_mem_unit().to_string(),
                )
                .env("CANAL_CONSUMER__CANAL__USERNAME", canal_user())
                .env("CANAL_CONSUMER__CANAL__PASSWORD", canal_password())
                .env("CANAL_CONSUMER__CANAL__CONNECTION_CHARSET", "ISO-8859-1")
                .env("CANAL_CONSUMER__CANAL__SOURCE_URL", source_url())
                .stdin(std::process::Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::process::Stdio::inherit()),
        );
        RawTail {
            table: table.to_string(),
            out,
            _dir: dir,
            child,
        }
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits (90 s at most) until `n` INSERTs of the table are printed; returns them.
    async fn inserts(&mut self, n: usize) -> Vec<ChangeEvent> {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let events: Vec<ChangeEvent> = self
                .printed()
                .lines()
                .filter_map(|l| serde_json::from_str::<ChangeEvent>(l).ok())
                .filter(|e| *e.table == *self.table && e.event_type == EventType::Insert)
                .collect();
            if events.len() >= n {
                return events;
            }
            assert!(
                self.child.try_wait().is_none(),
                "tail exited early; it printed:\n{}",
                self.printed()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} rows after 90 s; tail printed:\n{}",
                events.len(),
                self.printed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Raw text mode follows DDL: a column added later, and a column whose charset an ALTER
/// changes, are decoded with the charsets in force after the DDL; the rows before it keep theirs.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn raw_text_charsets_follow_ddl() {
    let _lock = canal_lock().await;
    script("deploy/local/canal-ctl", &["start"]);
    let table = format!("raw_ddl_{}", std::process::id());
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.{table};
         CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, v VARCHAR(16) CHARACTER SET latin1)"
    ));
    let mut tail = RawTail::start(&table);
    // the first row is seen (and the table's charsets looked up) before the ALTERs
    mysql(&format!("INSERT INTO {DB}.{table} VALUES (1, 'café')"));
    tail.inserts(1).await;
    mysql(&format!(
        "ALTER TABLE {DB}.{table} MODIFY v VARCHAR(16) CHARACTER SET gbk;
         INSERT INTO {DB}.{table} VALUES (2, '汉字');
         ALTER TABLE {DB}.{table} ADD COLUMN w TEXT CHARACTER SET cp1251;
         INSERT INTO {DB}.{table} VALUES (3, '中文', 'Привет')"
    ));
    let events = tail.inserts(3).await;
    let got: Vec<(i64, Option<&Value>, Option<&Value>)> = events
        .iter()
        .map(|e| {
            let Some(Value::Int(id)) = e.data.get("id") else {
                panic!("{e:?}")
            };
            (*id, e.data.get("v"), e.data.get("w"))
        })
        .collect();
    let t = |s: &str| Value::Text(s.into());
    // expected: what was written (MariaDB's rendering of it is checked by the test above)
    assert_eq!(
        got,
        [
            (1, Some(&t("café")), None),
            (2, Some(&t("汉字")), None),
            (3, Some(&t("中文")), Some(&t("Привет"))),
        ]
    );
}

/// Every charset MariaDB offers for a text column (and, in the same table, every other type)
/// through a destination that ships text as raw bytes, read by `canal-consumer tail` with
/// `canal.connection_charset = "ISO-8859-1"`: each value as MariaDB renders it.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn every_charset_arrives_as_written_through_a_raw_text_destination() {
    let _lock = canal_lock().await;
    script("deploy/local/canal-ctl", &["start"]);
    let mut cols = columns();
    cols.extend(non_utf8_columns());
    // a table of its own per run: the subscription then sees nothing of earlier runs
    let table = format!("raw_{}", std::process::id());
    create_table(&table, "utf8mb4", &cols);
    let mut tail = RawTail::start(&table);
    insert_rows(&table, &cols);
    let events = tail.inserts(4).await;
    drop(tail);
    let mismatches = compare(&table, &cols, &events, true);
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// A backfill reads every column type to the same value a binlog change of the same row
/// decodes to: the SNAPSHOT row of each of the four rows equals its INSERT event's row (which
/// the test above checks against MariaDB's own rendering; checked here again).
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test]
async fn every_column_type_reads_through_a_backfill_as_through_the_binlog() {
    let _lock = canal_lock().await;
    let cols = columns();
    script("deploy/local/canal-ctl", &["start"]);
    create_table("snap_types", "utf8mb4", &cols);
    let mut tap = Tap::clean(&format!("{DB}\\.snap_types")).await;
    insert_rows("snap_types", &cols);
    let (events, _) = tap
        .collect("snap_types", true, Duration::from_secs(60), |ev| {
            ev.len() >= 4
        })
        .await;
    let mismatches = compare("snap_types", &cols, &events, false);
    assert!(mismatches.is_empty(), "live: {}", mismatches.join("\n"));
    let source = canal_consumer::backfill::source::Source::new(
        &common::backfill::backfill_url(),
        "backfill".into(),
        ("canal_consumer".into(), "unused".into()),
    )
    .unwrap();
    let meta = source.table_meta(DB, "snap_types").await.unwrap();
    let max = source.max_key(&meta, None).await.unwrap().unwrap();
    let rows = source
        .read_chunk(&meta, None, None, &max, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    let mut wrong = Vec::new();
    for e in &events {
        let id = e.data.get("id").cloned();
        let snap = rows
            .iter()
            .find(|r| r.get("id").cloned() == id)
            .unwrap_or_else(|| panic!("row {id:?} not read"));
        for (name, live) in e.data.iter() {
            let read = snap.get(name);
            if read != Some(live) {
                wrong.push(format!(
                    "row {id:?} column {name}: binlog {live:?}, backfill {read:?}"
                ));
            }
        }
        assert_eq!(snap.len(), e.data.len(), "row {id:?}: columns differ");
    }
    source.close().await;
    assert!(
        wrong.is_empty(),
        "{} differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
