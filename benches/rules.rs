//! Rule evaluation throughput: change events through N config-driven consumers × M rules each,
//! on 10-column UPDATE rows.
//!
//! `pipeline_rule_with_envelope` is the per-row path of the pipeline bench after decoding: its
//! one rule on decoded 10-column INSERTs, the trigger and its envelope body.
//!
//! Run: `cargo bench --bench rules`. Reports events/s (criterion "elements"): one element is
//! one event offered to every consumer, as the Manager would route it.
//!
//! Each consumer's rules are a mix: most have a CEL condition (`changed()`, `transition()`,
//! comparisons) or an event-type guard, every payload interpolates three fields (two typed, one
//! text). With M = 8, 5 rules of each consumer fire on the sample UPDATE, so 4×8 emits 20
//! triggers per event (ids, payload rendering and all).
// A benchmark stops at the first failed setup step; unwrap is that stop (lint policy:
// Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use canal_consumer::canal::decode::decode_entries;
use canal_consumer::canal::proto::entry::{
    Entry, EntryType, EventType as WireEventType, Header, RowChange,
};
use canal_consumer::consumer::{Consumer, ConsumerContext};
use canal_consumer::event::{ChangeEvent, EventType, Position, Row, Value};
use canal_consumer::publisher::envelope;
use canal_consumer::rules::{ConfigConsumer, parse_file};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use prost::Message;
use std::hint::black_box;
use std::path::Path;

const EVENTS: usize = 100;

fn consumer_toml(name: &str, rules: usize) -> String {
    let mut s = format!(
        "[consumers.{name}]\n[[consumers.{name}.filters]]\ndatabase = \"shop\"\ntable = \"orders\"\n"
    );
    for r in 0..rules {
        let condition = match r % 4 {
            0 => "",
            1 => "when = { condition = \"transition('status', 'pending', 'paid')\" }\n",
            2 => "when = { condition = \"changed('amount') && data.amount > 100.0\" }\n",
            _ => "when = { events = [\"INSERT\"] }\n",
        };
        let fires_rarely = if r % 4 == 0 && r > 0 {
            "when = { condition = \"data.user_id == 0\" }\n"
        } else {
            condition
        };
        s.push_str(&format!(
            "[[consumers.{name}.rules]]\nname = \"r{r}\"\nplugin = \"plugin_{r}\"\n{fires_rarely}\
             payload = {{ operation = \"op_{r}\", order_id = \"${{data.id}}\", user = \"${{data.user_id}}\", \
             note = \"order ${{data.id}} is ${{data.status}}\" }}\n"
        ));
    }
    s
}

fn consumers(n: usize, m: usize) -> Vec<ConfigConsumer> {
    (0..n)
        .map(|i| {
            let text = consumer_toml(&format!("c{i}"), m);
            let mut specs = parse_file(Path::new("bench.toml"), &text).expect("bench config");
            ConfigConsumer::new(specs.remove(0))
        })
        .collect()
}

fn event(i: usize) -> ChangeEvent {
    let mut data = Row::new();
    data.insert("id".into(), Value::Int(i as i64));
    data.insert("user_id".into(), Value::Int(424242));
    data.insert("status".into(), Value::Text("paid".into()));
    data.insert("amount".into(), Value::Float(1234.5));
    data.insert("currency".into(), Value::Text("EUR".into()));
    data.insert("email".into(), Value::Text("zhang.san@example.com".into()));
    data.insert("note".into(), Value::Null);
    data.insert(
        "created_at".into(),
        Value::Text("2026-11-23 20:00:00".into()),
    );
    data.insert("flags".into(), Value::UInt(3));
    data.insert("payload".into(), Value::Bytes(vec![1, 2, 3, 4]));
    let mut old = Row::new();
    old.insert("status".into(), Value::Text("pending".into()));
    old.insert("amount".into(), Value::Float(99.0));
    ChangeEvent {
        destination: "example".into(),
        database: "shop".into(),
        table: "orders".into(),
        event_type: EventType::Update,
        data,
        old: Some(old),
        changed: ["status", "amount"].into(),
        primary_keys: ["id"].into(),
        position: Position {
            log_file: "mysql-bin.000001".into(),
            offset: 4 + i as u64 * 100,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: 1_700_000_000_000,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

fn bench_rules(c: &mut Criterion) {
    let events: Vec<ChangeEvent> = (0..EVENTS).map(event).collect();
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for (n, m) in [(1, 1), (4, 8)] {
        let mut cs = consumers(n, m);
        let mut ctxs: Vec<ConsumerContext> = cs
            .iter()
            .map(|c| ConsumerContext::new(c.name(), Default::default(), Default::default()))
            .collect();
        group.bench_function(
            BenchmarkId::new("consumers_x_rules", format!("{n}x{m}")),
            |b| {
                b.iter(|| {
                    let mut fired = 0;
                    for (c, ctx) in cs.iter_mut().zip(ctxs.iter_mut()) {
                        for e in &events {
                            if c.wants(e) {
                                ctx.begin_event(e);
                                c.process_event(e, ctx).expect("bench rules never fail");
                            }
                        }
                        fired += ctx.take_triggers().len();
                    }
                    black_box(fired)
                })
            },
        );
    }
    group.finish();
}

/// The pipeline bench's rule (benches/pipeline/service.rs) on the pipeline bench's INSERTs.
const PIPELINE_RULE: &str = r#"
[consumers.bench]
[[consumers.bench.filters]]
database = "cc_bench"
table = "rows"
events = ["INSERT"]
[[consumers.bench.rules]]
name = "row"
plugin = "bench_task"
payload = { id = "${data.id}", user_id = "${data.user_id}", email = "${data.email}", amount = "${data.amount}" }
"#;

/// `n` decoded 10-column INSERT rows of `cc_bench.rows`, as the connection hands them over.
fn pipeline_events(n: usize) -> Vec<ChangeEvent> {
    let rows = (0..n).map(common::row).collect();
    let change = RowChange {
        event_type: Some(WireEventType::Insert as i32),
        is_ddl: Some(false),
        row_datas: rows,
        ..Default::default()
    };
    let entry = Entry {
        header: Some(Header {
            logfile_name: "mysql-bin.000001".into(),
            logfile_offset: 1000,
            schema_name: "cc_bench".into(),
            table_name: "rows".into(),
            execute_time: 1_700_000_000_000,
            server_id: 1,
            event_type: Some(WireEventType::Insert as i32),
            ..Default::default()
        }),
        entry_type: Some(EntryType::RowData as i32),
        store_value: change.encode_to_vec().into(),
    }
    .encode_to_vec();
    let mut out = Vec::new();
    decode_entries("example", &[entry], &mut out).unwrap();
    out
}

/// The per-row work after decoding: the rule, the trigger (id and all), its envelope body.
fn run_pipeline_rule(
    c: &mut ConfigConsumer,
    ctx: &mut ConsumerContext,
    events: &[ChangeEvent],
) -> usize {
    let now = chrono::Utc::now();
    let mut bytes = 0;
    for e in events {
        if c.wants(e) {
            ctx.begin_event(e);
            c.process_event(e, ctx).expect("bench rules never fail");
        }
    }
    for t in ctx.take_triggers() {
        bytes += envelope::encode(&t, now).unwrap().len();
    }
    bytes
}

fn bench_pipeline_rule(c: &mut Criterion) {
    let events = pipeline_events(EVENTS * 10);
    let mut consumer = ConfigConsumer::new(
        parse_file(Path::new("bench.toml"), PIPELINE_RULE)
            .unwrap()
            .remove(0),
    );
    let mut ctx = ConsumerContext::new(consumer.name(), Default::default(), Default::default());
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("pipeline_rule_with_envelope", |b| {
        b.iter(|| black_box(run_pipeline_rule(&mut consumer, &mut ctx, &events)))
    });
    group.finish();
}

criterion_group!(benches, bench_rules, bench_pipeline_rule);

fn main() {
    // `RULES_ONCE=N`: N passes of the pipeline rule over 1,000 rows and nothing else, for
    // callgrind (instructions per row = total / (N * 1000), minus the setup run with N=0)
    if let Some(n) = std::env::var("RULES_ONCE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let events = pipeline_events(EVENTS * 10);
        let mut consumer = ConfigConsumer::new(
            parse_file(Path::new("bench.toml"), PIPELINE_RULE)
                .unwrap()
                .remove(0),
        );
        let mut ctx = ConsumerContext::new(consumer.name(), Default::default(), Default::default());
        let mut bytes = 0;
        for _ in 0..n {
            bytes += run_pipeline_rule(&mut consumer, &mut ctx, &events);
        }
        println!("{bytes} envelope bytes");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
