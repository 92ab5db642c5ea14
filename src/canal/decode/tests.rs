//! Byte-level decoding of every column type, entry kinds, and layout errors.

use super::*;
use crate::canal::proto::entry::{Header, Pair, RowChange, RowData, TransactionEnd};

/// A column with the SQL type Canal gives a value of its declared type.
fn col(name: &str, mysql_type: &str, value: Option<&str>) -> Column {
    let base = base_type(mysql_type).to_ascii_lowercase();
    Column {
        index: 0,
        sql_type: expected_sql_types(&base).map_or(12, |t| t[0]),
        name: name.into(),
        is_key: name == "id",
        updated: true,
        is_null: Some(value.is_none()),
        props: vec![],
        value: value.unwrap_or_default().into(),
        length: 0,
        mysql_type: mysql_type.into(),
    }
}

#[test]
fn restores_types() {
    assert_eq!(
        column_value(&col("a", "int(11)", Some("-3"))),
        Value::Int(-3)
    );
    assert_eq!(
        column_value(&col(
            "a",
            "bigint(20) unsigned",
            Some("18446744073709551615")
        )),
        Value::UInt(u64::MAX)
    );
    assert_eq!(
        column_value(&col("a", "decimal(10,2)", Some("1.50"))),
        Value::Text("1.50".into())
    );
    assert_eq!(
        column_value(&col("a", "double", Some("1.0E-5"))),
        Value::Float(1e-5)
    );
    assert_eq!(
        column_value(&col("a", "blob", Some("\u{0}\u{ff}\u{80}a"))),
        Value::Bytes(vec![0, 0xff, 0x80, b'a'])
    );
    assert_eq!(column_value(&col("a", "varchar(8)", None)), Value::Null);
    assert_eq!(
        column_value(&col("a", "varchar(8)", Some(""))),
        Value::Text(String::new())
    );
    assert_eq!(
        column_value(&col("a", "enum('s','m''x','l')", Some("2"))),
        Value::Text("m'x".into())
    );
    assert_eq!(
        column_value(&col("a", "set('a','b','c')", Some("5"))),
        Value::Text("a,c".into())
    );
    assert_eq!(
        column_value(&col("a", "bit(8)", Some("255"))),
        Value::UInt(255)
    );
    assert_eq!(
        column_value(&col("a", "year(4)", Some("2024"))),
        Value::Int(2024)
    );
    assert_eq!(
        column_value(&col("a", "json", Some("{\"k\": [1]}"))),
        Value::Json(serde_json::json!({"k": [1]}))
    );
}

/// `set('m0','m1',...)` with `n` members.
fn set_type(n: usize) -> String {
    let labels: Vec<String> = (0..n).map(|i| format!("'m{i}'")).collect();
    format!("set({})", labels.join(","))
}

#[test]
fn set_masks_use_all_64_members_and_no_more() {
    // 64 members: the top bit is the 64th label
    let top = (1u64 << 63).to_string();
    assert_eq!(
        column_value(&col("a", &set_type(64), Some(&top))),
        Value::Text("m63".into())
    );
    assert_eq!(
        column_value(&col("a", &set_type(64), Some("3"))),
        Value::Text("m0,m1".into())
    );
    // A declared type with more members than a SET can have (a corrupt or hostile table
    // meta) must neither overflow the shift nor invent labels: the mask is kept as sent.
    for n in [65, 70, 200] {
        for mask in ["1", "5", &top, "18446744073709551615"] {
            assert_eq!(
                column_value(&col("a", &set_type(n), Some(mask))),
                Value::Text(mask.to_string()),
                "set of {n} members, mask {mask}"
            );
        }
    }
}

fn header(event_type: Option<WireEventType>) -> Header {
    Header {
        logfile_name: "mysql-bin.000002".into(),
        logfile_offset: 1234,
        schema_name: "db".into(),
        table_name: "t".into(),
        execute_time: 1_700_000_000_000,
        event_type: event_type.map(|e| e as i32),
        ..Default::default()
    }
}

fn encode_entry(entry_type: EntryType, header: Header, value: Vec<u8>) -> Vec<u8> {
    Entry {
        header: Some(header),
        entry_type: Some(entry_type as i32),
        store_value: value.into(),
    }
    .encode_to_vec()
}

#[test]
fn update_rows_carry_old_values_of_changed_columns_only() {
    let mut id = col("id", "int(11)", Some("7"));
    id.updated = false;
    let mut name_before = col("name", "varchar(8)", Some("old"));
    name_before.updated = false;
    let mut id_before = id.clone();
    id_before.updated = false;
    let change = RowChange {
        event_type: Some(WireEventType::Update as i32),
        is_ddl: Some(false),
        row_datas: vec![RowData {
            before_columns: vec![id_before, name_before],
            after_columns: vec![id, col("name", "varchar(8)", Some("new"))],
            props: vec![],
        }],
        ..Default::default()
    };
    let entries = vec![
        encode_entry(
            EntryType::RowData,
            header(Some(WireEventType::Update)),
            change.encode_to_vec(),
        ),
        encode_entry(
            EntryType::TransactionEnd,
            header(None),
            TransactionEnd {
                transaction_id: "9".into(),
                props: vec![Pair::default()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    let mut out = Vec::new();
    let stats = decode_entries("example", &entries, &mut out).unwrap();
    assert_eq!(stats.transaction_boundaries, 1);
    assert_eq!(out.len(), 1);
    let e = &out[0];
    assert_eq!(e.event_type, EventType::Update);
    assert_eq!(e.data["name"], Value::Text("new".into()));
    assert_eq!(e.changed.to_vec(), vec!["name".to_string()]);
    assert_eq!(e.old.as_ref().unwrap().len(), 1);
    assert_eq!(e.old_value("name"), Some(&Value::Text("old".into())));
    assert_eq!(e.primary_keys.to_vec(), vec!["id".to_string()]);
    assert_eq!(e.position.offset, 1234);
}

#[test]
fn annotate_rows_query_entries_are_skipped_but_ddl_queries_are_kept() {
    let annotate = RowChange {
        event_type: Some(WireEventType::Query as i32),
        is_ddl: Some(false),
        sql: "INSERT INTO t VALUES (1)".into(),
        ..Default::default()
    };
    let create_db = RowChange {
        event_type: Some(WireEventType::Query as i32),
        is_ddl: Some(true),
        sql: "CREATE DATABASE x".into(),
        ..Default::default()
    };
    let entries = vec![
        encode_entry(
            EntryType::RowData,
            header(Some(WireEventType::Query)),
            annotate.encode_to_vec(),
        ),
        encode_entry(
            EntryType::RowData,
            header(Some(WireEventType::Query)),
            create_db.encode_to_vec(),
        ),
    ];
    let mut out = Vec::new();
    let stats = decode_entries("example", &entries, &mut out).unwrap();
    assert_eq!(stats.skipped, 1);
    assert_eq!(out.len(), 1);
    assert!(out[0].is_ddl);
    assert_eq!(out[0].event_type, EventType::Query);
    assert_eq!(out[0].sql.as_deref(), Some("CREATE DATABASE x"));
}

#[test]
fn text_shipped_as_bytes_stays_text() {
    // "中" as UTF-8 bytes, one ISO-8859-1 char each, as Canal ships a `json` BLOB
    let mut j = col("j", "json", Some("{\"s\": \"\u{e4}\u{b8}\u{ad}\"}"));
    j.sql_type = SQL_BLOB;
    assert_eq!(column_value(&j), Value::Text("{\"s\": \"中\"}".into()));
    assert_eq!(column_mismatch(&j), None);
    // `TEXT(1000)` from a DDL Canal parsed: same treatment
    let mut t = col("t", "text(1000)", Some("caf\u{c3}\u{a9}"));
    t.sql_type = SQL_BLOB;
    assert_eq!(column_value(&t), Value::Text("café".into()));
    assert_eq!(column_mismatch(&t), None);
    // DECIMAL keeps its declared scale
    let dec = |t: &str, v: &str| column_value(&col("d", t, Some(v)));
    assert_eq!(dec("decimal(10,2)", "0.0"), Value::Text("0.00".into()));
    assert_eq!(dec("numeric(10,2)", "-5.0"), Value::Text("-5.00".into()));
    assert_eq!(
        dec("decimal(20,11)", "1.500000000"),
        Value::Text("1.50000000000".into())
    );
    assert_eq!(
        dec("decimal(10,2) unsigned", "3"),
        Value::Text("3.00".into())
    );
    assert_eq!(dec("decimal(10,0)", "7"), Value::Text("7".into()));
    assert_eq!(dec("decimal", "7"), Value::Text("7".into()));
    assert_eq!(dec("decimal(5,2)", "1.25"), Value::Text("1.25".into()));
    // synonyms kept by Canal's DDL-parsed meta
    assert_eq!(
        column_value(&col("b", "boolean", Some("-1"))),
        Value::Int(-1)
    );
    assert_eq!(
        column_value(&col("s", "serial", Some("18446744073709551615"))),
        Value::UInt(u64::MAX)
    );
    assert_eq!(
        column_value(&col("r", "real", Some("0.5"))),
        Value::Float(0.5)
    );
    let mut lv = col("lv", "long varbinary", Some("\u{ff}"));
    lv.sql_type = SQL_BLOB;
    assert_eq!(column_value(&lv), Value::Bytes(vec![0xff]));
    let mut lt = col("lt", "long varchar", Some("\u{c3}\u{bc}"));
    lt.sql_type = SQL_BLOB;
    assert_eq!(column_value(&lt), Value::Text("ü".into()));
    // a real BLOB keeps its bytes
    let mut b = col("b", "blob", Some("caf\u{c3}\u{a9}"));
    b.sql_type = SQL_BLOB;
    assert_eq!(column_value(&b), Value::Bytes(b"caf\xc3\xa9".to_vec()));
}

#[test]
fn binary_n_gets_its_trailing_zeros_back() {
    assert_eq!(
        column_value(&col("a", "binary(16)", Some("\u{ab}"))),
        Value::Bytes([vec![0xab], vec![0; 15]].concat())
    );
    assert_eq!(
        column_value(&col("a", "BINARY(4)", Some(""))),
        Value::Bytes(vec![0; 4])
    );
    assert_eq!(
        column_value(&col("a", "binary", Some(""))),
        Value::Bytes(vec![0])
    );
    // VARBINARY keeps what was written
    assert_eq!(
        column_value(&col("a", "varbinary(16)", Some("\u{ab}\u{0}"))),
        Value::Bytes(vec![0xab, 0])
    );
}

#[test]
fn a_value_that_cannot_belong_to_its_column_is_an_error_naming_table_and_position() {
    // after `MODIFY COLUMN n INT AFTER id` decoded with the new structure: the VARCHAR value
    // of old column 2 is named `n` (declared int)
    let mut shifted = col("n", "int(11)", Some("v1"));
    shifted.sql_type = 12;
    shifted.index = 1;
    let change = RowChange {
        event_type: Some(WireEventType::Insert as i32),
        is_ddl: Some(false),
        row_datas: vec![RowData {
            before_columns: vec![],
            after_columns: vec![col("id", "int(11)", Some("1")), shifted],
            props: vec![],
        }],
        ..Default::default()
    };
    let entry = encode_entry(
        EntryType::RowData,
        header(Some(WireEventType::Insert)),
        change.encode_to_vec(),
    );
    let mut out = Vec::new();
    let err = decode_entries("example", &[entry], &mut out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("db.t at mysql-bin.000002:1234 row 0"), "{err}");
    assert!(
        err.contains("column `n` (position 1) is declared int(11)"),
        "{err}"
    );
    assert!(out.is_empty());
    // NULL carries no type to compare; every declared type accepts its own Canal SQL type
    let mut null = col("n", "int(11)", None);
    null.sql_type = 12;
    assert_eq!(column_mismatch(&null), None);
    for t in [
        "int(10) unsigned",
        "varchar(3)",
        "longtext",
        "binary(2)",
        "set('a')",
        "year",
    ] {
        assert_eq!(column_mismatch(&col("x", t, Some("1"))), None, "{t}");
    }
}

#[test]
fn garbage_entries_are_errors_not_panics() {
    let mut out = Vec::new();
    let err = decode_entries("example", &[vec![0xff, 0xff, 0xff]], &mut out).unwrap_err();
    assert!(
        err.to_string().starts_with("entry 0: malformed Entry"),
        "{err}"
    );
    // a row entry without any event type
    let entry = encode_entry(
        EntryType::RowData,
        header(None),
        RowChange::default().encode_to_vec(),
    );
    let err = decode_entries("example", &[entry], &mut out).unwrap_err();
    assert!(err.to_string().contains("no event type"), "{err}");
}

#[test]
fn the_wire_reader_finds_an_entrys_type_without_decoding_it() {
    use crate::canal::proto::entry::{Entry, EntryType};
    use prost::Message as _;
    let header = Header {
        schema_name: "db".into(),
        table_name: "t".into(),
        ..Default::default()
    };
    for t in [
        EntryType::TransactionBegin,
        EntryType::RowData,
        EntryType::TransactionEnd,
    ] {
        let entry = Entry {
            header: Some(header.clone()),
            entry_type: Some(t as i32),
            store_value: vec![1, 2, 3].into(),
        };
        assert_eq!(wire::entry_type(&entry.encode_to_vec()), Some(t as u64));
    }
    let untyped = Entry {
        header: Some(header),
        entry_type: None,
        store_value: Default::default(),
    };
    assert_eq!(wire::entry_type(&untyped.encode_to_vec()), None);
    assert_eq!(wire::entry_type(&[0x0a, 0x05, 1]), None, "cut short");
}
