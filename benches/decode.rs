//! Decode throughput: MESSAGES packet bytes -> ChangeEvents, for 10-column rows.
//!
//! Run: `cargo bench --bench decode`. Reports rows/s (criterion "elements") for two loops over
//! the same frame: `prost_only` (prost decoding packet, entries and row changes into its owned
//! structs, nothing else: the reference limit) and `messages_to_change_events` (our decoder,
//! every value typed and checked). `DECODE_ONCE=N` runs the second loop N times without
//! criterion, for callgrind.
// A benchmark stops at the first failed setup step; unwrap is that stop (lint policy:
// Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use canal_consumer::canal::decode::decode_entries;
use canal_consumer::canal::proto::entry::{Entry, EntryType, EventType, Header, RowChange};
use canal_consumer::canal::proto::packet::{Messages, Packet, PacketType};
use criterion::{Criterion, Throughput, criterion_group};
use prost::Message;

mod common;

const ROWS_PER_ENTRY: usize = 50;
const ENTRIES: usize = 20;

fn messages_packet() -> Bytes {
    let mut entries = Vec::new();
    for e in 0..ENTRIES {
        let change = RowChange {
            event_type: Some(EventType::Insert as i32),
            is_ddl: Some(false),
            row_datas: (0..ROWS_PER_ENTRY)
                .map(|r| common::row(e * ROWS_PER_ENTRY + r))
                .collect(),
            ..Default::default()
        };
        let entry = Entry {
            header: Some(Header {
                logfile_name: "mysql-bin.000001".into(),
                logfile_offset: 1000 + e as i64 * 4096,
                schema_name: "bench".into(),
                table_name: "orders".into(),
                execute_time: 1_700_000_000_000,
                event_type: Some(EventType::Insert as i32),
                ..Default::default()
            }),
            entry_type: Some(EntryType::RowData as i32),
            store_value: change.encode_to_vec().into(),
        };
        entries.push(Bytes::from(entry.encode_to_vec()));
    }
    let body = Messages {
        batch_id: 1,
        messages: entries,
    }
    .encode_to_vec();
    Packet {
        r#type: PacketType::Messages as i32,
        body: body.into(),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

fn bench_decode(c: &mut Criterion) {
    let frame = messages_packet();
    let rows = (ROWS_PER_ENTRY * ENTRIES) as u64;
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(rows));
    // The limit: prost alone decoding the same frame down to every column (owned strings, no
    // ChangeEvent). The ratio of the next figure to this one is what BENCHMARKS.md reports.
    group.bench_function("prost_only_10_columns", |b| {
        b.iter(|| {
            let packet = Packet::decode(frame.clone()).unwrap();
            let msgs = Messages::decode(packet.body).unwrap();
            let mut n = 0;
            for raw in &msgs.messages {
                let entry = Entry::decode(raw.clone()).unwrap();
                let change = RowChange::decode(entry.store_value).unwrap();
                n += change.row_datas.len();
            }
            assert_eq!(n, rows as usize);
            n
        })
    });
    group.bench_function("messages_to_change_events_10_columns", |b| {
        b.iter(|| {
            let packet = Packet::decode(frame.clone()).unwrap();
            let msgs = Messages::decode(packet.body).unwrap();
            let mut out = Vec::with_capacity(rows as usize);
            decode_entries("example", &msgs.messages, &mut out).unwrap();
            assert_eq!(out.len(), rows as usize);
            out
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode);

fn main() {
    // `DECODE_ONCE=N cargo bench --bench decode`: N decodes and nothing else (for callgrind:
    // `valgrind --tool=callgrind target/release/deps/decode-*` with DECODE_ONCE set)
    if let Some(n) = std::env::var("DECODE_ONCE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let frame = messages_packet();
        let what = std::env::var("DECODE_WHAT").unwrap_or_default();
        let mut total = 0;
        for _ in 0..n {
            let packet = Packet::decode(frame.clone()).unwrap();
            let msgs = Messages::decode(packet.body).unwrap();
            if what == "prost" {
                for raw in &msgs.messages {
                    let entry = Entry::decode(raw.clone()).unwrap();
                    total += RowChange::decode(entry.store_value)
                        .unwrap()
                        .row_datas
                        .len();
                }
            } else {
                let mut out = Vec::new();
                decode_entries("example", &msgs.messages, &mut out).unwrap();
                total += out.len();
            }
        }
        println!("decoded {total} rows");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
