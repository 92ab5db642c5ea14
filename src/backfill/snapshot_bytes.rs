//! A SNAPSHOT message's bytes, pinned end to end (test only). It lives on the backfill side
//! because it starts from the SELECT's text ([`super::source::typed`]) and goes through the
//! Manager's windows, the rules and the envelope: `backfill` may use `manager`, not the other
//! way round.

use super::source::typed;
use crate::canal::connection::BatchRef;
use crate::event::{Columns, EventType, Row};
use crate::manager::snapshot::tests::{plan, wm_event, wm_table};
use crate::manager::snapshot::{ChunkPlan, Windows};
use std::sync::Arc;

/// A SNAPSHOT message's bytes, pinned end to end: the SELECT's text values typed by the
/// columns' declared types ([`typed`]), the SNAPSHOT event the windows
/// emit at the high watermark, a per-row rule's payload, the trigger (its `snap-v1` id) and
/// its envelope. A change to any of them that changes a byte fails here.
#[test]
fn a_snapshot_message_keeps_its_bytes() {
    use crate::canal::decode::DeclaredType;
    use crate::consumer::{Consumer, ConsumerContext};
    use mysql_async::Value as Sql;
    let declared = [
        ("id", "bigint(20)"),
        ("user_id", "int(11)"),
        ("email", "varchar(128)"),
        ("name", "varchar(64)"),
        ("amount", "decimal(12,2)"),
        ("status", "enum('new','paid')"),
        ("created_at", "datetime(3)"),
        ("score", "double"),
        ("note", "text"),
        ("flags", "tinyint(3) unsigned"),
        ("raw", "varbinary(8)"),
        ("doc", "json"),
    ];
    let cols = Arc::new(Columns::new(
        declared.iter().map(|(n, _)| Arc::<str>::from(*n)).collect(),
    ));
    let types: Vec<DeclaredType> = declared
        .iter()
        .map(|(_, t)| DeclaredType::parse(t))
        .collect();
    let text = |s: &str| Sql::Bytes(s.as_bytes().to_vec());
    let values = typed(
        vec![
            text("42"),
            text("424242"),
            text("zhang.san@example.com"),
            text("张三 \"Zhang\" 🚀"),
            text("1234.50"),
            text("paid"),
            text("2026-11-23 12:34:56.789"),
            text("98.25"),
            Sql::NULL,
            text("7"),
            Sql::Bytes(vec![0, 0xff, b'a']),
            text(r#"{"a": [1, 2.5, "x"]}"#),
        ],
        &types,
    );
    let mut windows = Windows::new(wm_table());
    windows.expect(ChunkPlan {
        table: "rows".into(),
        ..plan("n1", 0)
    });
    assert!(windows.rows("n1", vec![Row::from_values(cols, values)]));
    let batch = [wm_event("low", "n1", 7), wm_event("high", "n1", 9)];
    let scan = windows.route(BatchRef::new(1, 1), &batch);
    let events = scan
        .events
        .expect("the SNAPSHOT row after the high watermark");
    let snapshot = &events[2];
    assert_eq!(snapshot.event_type, EventType::Snapshot);

    let spec = crate::rules::parse_file(
        std::path::Path::new("golden.toml"),
        r#"
[consumers.golden]
[[consumers.golden.filters]]
database = "db"
table = "rows"
events = ["SNAPSHOT"]
[[consumers.golden.rules]]
name = "row"
plugin = "golden_task"
payload = { id = "${data.id}", email = "${data.email}", name = "${data.name}", amount = "${data.amount}", row = "${data}" }
"#,
    )
    .expect("the golden rule")
    .remove(0);
    let mut consumer = crate::rules::ConfigConsumer::new(spec);
    let mut ctx = ConsumerContext::new(consumer.name(), Default::default(), Default::default());
    assert!(consumer.wants(snapshot));
    ctx.begin_event(snapshot);
    consumer.process_event(snapshot, &mut ctx).unwrap();
    let triggers = ctx.take_triggers();
    assert_eq!(triggers.len(), 1);
    let at = chrono::DateTime::from_timestamp_millis(1_700_000_001_456).unwrap();
    let body = crate::publisher::envelope::encode(&triggers[0], at).unwrap();
    assert_eq!(String::from_utf8(body).unwrap(), GOLDEN_SNAPSHOT);
}

const GOLDEN_SNAPSHOT: &str = r#"{"version":1,"id":"e93ce813-e0d1-53d4-a1de-a0f276c6b18f","plugin":"golden_task","payload":{"amount":"1234.50","email":"zhang.san@example.com","id":42,"name":"张三 \"Zhang\" 🚀","row":{"amount":"1234.50","created_at":"2026-11-23 12:34:56.789","doc":{"a":[1,2.5,"x"]},"email":"zhang.san@example.com","flags":7,"id":42,"name":"张三 \"Zhang\" 🚀","note":null,"raw":{"base64":"AP9h"},"score":98.25,"status":"paid","user_id":424242}},"priority":"normal","consumer":"golden","rule":"row","source":{"destination":"d","database":"db","table":"rows","event_type":"SNAPSHOT","position":{"log_file":"bin.000001","offset":9,"row_index":0,"server_id":1,"gtid":null},"executed_at":9,"snapshot":{"backfill":"b1","key":"[42]"}},"published_at":"2023-11-14T22:13:21.456Z"}"#;
