//! The 10-column row the benches share: the shape of the pipeline bench's `cc_bench.rows`
//! (benches/pipeline/source.rs) as Canal sends it, so decode and rules are measured on the same rows.

use canal_consumer::canal::proto::entry::{Column, RowData};

pub fn column(index: i32, name: &str, mysql_type: &str, sql_type: i32, value: &str) -> Column {
    Column {
        index,
        sql_type,
        name: name.into(),
        is_key: index == 0,
        updated: true,
        is_null: Some(false),
        value: value.into(),
        mysql_type: mysql_type.into(),
        ..Default::default()
    }
}

/// Row `i` (its `id`), every column set.
pub fn row(i: usize) -> RowData {
    let id = i.to_string();
    RowData {
        after_columns: vec![
            column(0, "id", "bigint(20)", -5, &id),
            column(1, "user_id", "int(11)", 4, "424242"),
            column(2, "name", "varchar(64)", 12, "张三 Zhang San 🚀"),
            column(3, "email", "varchar(128)", 12, "zhang.san@example.com"),
            column(4, "amount", "decimal(12,2)", 3, "1234.50"),
            column(5, "score", "double", 8, "98.25"),
            column(6, "status", "enum('new','paid','shipped')", 4, "2"),
            column(
                7,
                "created_at",
                "datetime(3)",
                93,
                "2026-11-23 12:34:56.789",
            ),
            column(
                8,
                "note",
                "text",
                2005,
                "a moderately long note about this row",
            ),
            column(9, "flags", "tinyint(3) unsigned", -6, "7"),
        ],
        ..Default::default()
    }
}
