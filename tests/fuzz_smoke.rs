//! A short, seeded fuzz run of the byte-facing code on every `cargo test` (the long runs use
//! libFuzzer: see `fuzz/README.md`). Inputs are valid Canal packets (rows of many column types,
//! transaction boundaries, DDL) and mutations of them: bit flips, truncation, splices, length
//! fields rewritten, plus pure noise. Every target must return without panicking, and the frame
//! codec must never buffer more than one capped frame (checked inside `canal::fuzz::frames`).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::canal::fuzz;
use canal_consumer::canal::proto::entry::{
    Column, Entry, EntryType, EventType, Header, RowChange, RowData, TransactionEnd,
};
use canal_consumer::canal::proto::packet::{Messages, Packet, PacketType};
use prost::Message;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// A column as Canal sends it: `sql_type` is the java.sql.Types code Canal gives that type.
fn col(name: &str, mysql_type: &str, sql_type: i32, value: Option<&str>) -> Column {
    Column {
        name: name.into(),
        sql_type,
        mysql_type: mysql_type.into(),
        is_null: Some(value.is_none()),
        value: value.unwrap_or_default().into(),
        updated: true,
        is_key: name == "id",
        ..Default::default()
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let row = RowData {
        before_columns: vec![col("id", "int(11)", 4, Some("1"))],
        after_columns: vec![
            col("id", "int(11)", 4, Some("1")),
            col("u", "bigint(20) unsigned", -5, Some("18446744073709551615")),
            col("d", "decimal(65,30)", 3, Some("1.5")),
            col("b", "varbinary(4)", 2004, Some("\u{ff}\u{0}")),
            col("e", "enum('a','b')", 4, Some("b")),
            col("s", "set('x','y')", -7, Some("x,y")),
            col("j", "json", 12, Some("{\"k\":[1,2]}")),
            col("t", "datetime(6)", 93, Some("2024-01-02 03:04:05.000006")),
            col("n", "varchar(8)", 12, None),
        ],
        props: vec![],
    };
    let change = RowChange {
        event_type: Some(EventType::Update as i32),
        is_ddl: Some(false),
        row_datas: vec![row],
        ..Default::default()
    };
    let header = |t: Option<EventType>| Header {
        logfile_name: "mysql-bin.000001".into(),
        logfile_offset: 4,
        schema_name: "db".into(),
        table_name: "t".into(),
        event_type: t.map(|t| t as i32),
        ..Default::default()
    };
    let entries: Vec<Vec<u8>> = vec![
        Entry {
            header: Some(header(Some(EventType::Update))),
            entry_type: Some(EntryType::RowData as i32),
            store_value: change.encode_to_vec().into(),
        }
        .encode_to_vec(),
        Entry {
            header: Some(header(None)),
            entry_type: Some(EntryType::TransactionEnd as i32),
            store_value: TransactionEnd::default().encode_to_vec().into(),
        }
        .encode_to_vec(),
    ];
    let messages = Messages {
        batch_id: 7,
        messages: entries.iter().map(|e| e.clone().into()).collect(),
    }
    .encode_to_vec();
    let packet = Packet {
        r#type: PacketType::Messages as i32,
        body: messages.clone().into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = (packet.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&packet);
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let mut out = entries;
    out.extend([messages, packet, frame, two]);
    out
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.truncate(rng.below(v.len() + 1)),
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, extra);
            }
            4 if v.len() >= 4 => {
                // a frame header announcing something else
                let n = rng.next() as u32;
                v[..4].copy_from_slice(&n.to_be_bytes());
            }
            _ => {
                let i = rng.below(v.len() + 1);
                let j = rng.below(v.len() + 1);
                let (a, b) = (i.min(j), i.max(j));
                let dup = v[a..b].to_vec();
                v.extend(dup);
            }
        }
    }
    v
}

#[test]
fn byte_facing_code_survives_mutated_and_random_input() {
    let iterations: usize = std::env::var("FUZZ_SMOKE_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let corpus = corpus();
    // the valid inputs decode
    let mut events = Vec::new();
    canal_consumer::canal::decode::decode_entries("t", &corpus[..2], &mut events).unwrap();
    assert_eq!(events.len(), 1);
    let mut rng = Rng(0x5eed);
    for i in 0..iterations {
        let input = if i % 10 == 0 {
            (0..rng.below(256)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, seed)
        };
        fuzz::frames(&input);
        fuzz::packet(&input);
        fuzz::messages(&input);
        fuzz::entry(&input);
    }
}
