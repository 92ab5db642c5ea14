//! Bulk rules inside the consumer actor, without Canal or a broker: a recording sink stands in
//! for the publisher. A part's bulk messages go out with the part (so its batch is acked only
//! after them; a redelivered part regenerates the same ids); a failed part sends none; in park
//! modes the bulks go out (`ParkFailures`) or exactly the refused bulk is parked, as one dead
//! letter per row (`ParkIds`). End to end with the real services: `bulk_real.rs`.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use actix::prelude::*;
use canal_consumer::canal::connection::BatchRef;
use canal_consumer::consumer::actor::{ConsumerActor, ProcessBatch};
use canal_consumer::event::{ChangeEvent, EventType, Position, Row, Value};
use canal_consumer::manager::core::Mode;
use canal_consumer::publisher::RecordingSink;
use canal_consumer::rules::{ConfigConsumer, parse_file};
use canal_consumer::trigger::{Route, Trigger};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONSUMER: &str = r#"
[consumers.bulk]
[[consumers.bulk.filters]]
database = "db"
table = "t"
[[consumers.bulk.rules]]
name = "rows"
plugin = "p"
payload = { id = "${data.id}", x = "${data.x}" }
batch = { max_rows = 2 }
"#;

fn event(id: i64, with_x: bool) -> ChangeEvent {
    let mut data = Row::new();
    data.insert("id".into(), Value::Int(id));
    if with_x {
        data.insert("x".into(), Value::Int(id * 10));
    }
    ChangeEvent {
        destination: "example".into(),
        database: "db".into(),
        table: "t".into(),
        event_type: EventType::Insert,
        data,
        old: None,
        changed: Default::default(),
        primary_keys: ["id"].into(),
        position: Position {
            log_file: "mysql-bin.000001".into(),
            offset: 100 * id as u64,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: 1_700_000_000_000 + id,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

struct Harness {
    actor: Addr<ConsumerActor>,
    recorded: Arc<Mutex<Vec<Trigger>>>,
}

fn harness() -> Harness {
    harness_with(CONSUMER)
}

fn harness_with(config: &'static str) -> Harness {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let sink = RecordingSink {
        recorded: recorded.clone(),
    }
    .start();
    let factory = Box::new(|| {
        let spec = parse_file(Path::new("bulk.toml"), config)
            .unwrap()
            .remove(0);
        Box::new(ConfigConsumer::new(spec)) as Box<dyn canal_consumer::consumer::Consumer>
    });
    let actor = ConsumerActor::new(
        factory,
        sink.recipient(),
        Route::default(),
        Default::default(),
    )
    .start_supervised();
    Harness { actor, recorded }
}

/// Processes `events` as one part in `mode`; returns what was published for it.
async fn part(h: &Harness, id: i64, events: &[ChangeEvent], mode: Mode) -> Vec<Trigger> {
    part_parking(h, id, events, mode, BTreeMap::new()).await
}

/// [`part`] with rows to dead-letter unprocessed (`ProcessBatch::park`).
async fn part_parking(
    h: &Harness,
    id: i64,
    events: &[ChangeEvent],
    mode: Mode,
    park: BTreeMap<usize, String>,
) -> Vec<Trigger> {
    h.recorded.lock().unwrap().clear();
    let processed = h
        .actor
        .send(ProcessBatch {
            batch: BatchRef::new(1, id),
            mode,
            events: Arc::new(events.to_vec()),
            indices: Arc::new((0..events.len()).collect()),
            park: Arc::new(park),
        })
        .await
        .unwrap()
        .unwrap();
    processed.confirmed.await.unwrap().unwrap();
    h.recorded.lock().unwrap().clone()
}

#[actix_rt::test]
async fn bulks_go_out_with_their_part_and_never_across_parts() {
    let h = harness();
    let first = part(
        &h,
        1,
        &[event(1, true), event(2, true), event(3, true)],
        Mode::Normal,
    )
    .await;
    let payloads: Vec<_> = first.iter().map(|t| t.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            json!([{"id": 1, "x": 10}, {"id": 2, "x": 20}]),
            json!([{"id": 3, "x": 30}])
        ]
    );
    // the next part starts a new bulk: row 3 is not held for it
    let second = part(&h, 2, &[event(4, true)], Mode::Normal).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].payload, json!([{"id": 4, "x": 40}]));
    // the same part again (a redelivery) gives the same messages, ids included
    let again = part(
        &h,
        3,
        &[event(1, true), event(2, true), event(3, true)],
        Mode::Normal,
    )
    .await;
    assert_eq!(
        again
            .iter()
            .map(|t| (&t.id, &t.payload))
            .collect::<Vec<_>>(),
        first
            .iter()
            .map(|t| (&t.id, &t.payload))
            .collect::<Vec<_>>()
    );
}

#[actix_rt::test]
async fn park_modes_send_the_bulks_or_park_exactly_the_refused_one() {
    let h = harness();
    let events = [
        event(1, true),
        event(2, false),
        event(3, true),
        event(4, true),
    ];
    // row 2 fails its rule (no `x`): the default policy reports it alone; the rest are bulked
    let normal = part(&h, 1, &events, Mode::Normal).await;
    let plugins: Vec<&str> = normal.iter().map(|t| t.plugin.as_str()).collect();
    assert_eq!(plugins, vec!["error_handler", "p", "p"]);
    assert_eq!(
        normal[1].payload,
        json!([{"id": 1, "x": 10}, {"id": 3, "x": 30}])
    );
    assert_eq!(normal[2].payload, json!([{"id": 4, "x": 40}]));
    // ParkFailures: the same bulks, same ids
    let park_failures = part(
        &h,
        2,
        &events,
        Mode::ParkFailures {
            reason: "test".into(),
        },
    )
    .await;
    assert_eq!(
        park_failures.iter().map(|t| &t.id).collect::<Vec<_>>(),
        normal.iter().map(|t| &t.id).collect::<Vec<_>>()
    );
    // ParkIds: the broker refused the first bulk: only it is parked, with its original
    let refused = normal[1].id.clone();
    let parked = part(
        &h,
        3,
        &events,
        Mode::ParkIds {
            ids: vec![refused.clone()],
            reason: "unroutable".into(),
        },
    )
    .await;
    // as its rows: one dead letter per row, each with the bulk's id and its own payload
    assert_eq!(parked.len(), 2, "{parked:#?}");
    for (p, id) in parked.iter().zip([1, 3]) {
        assert_eq!(p.plugin, "dead_letter:p");
        assert_eq!(p.payload["original_id"], json!(refused));
        assert_eq!(p.payload["event"]["data"]["id"], id);
        assert_eq!(
            p.payload["original"]["payload"],
            json!({"id": id, "x": id * 10})
        );
    }
}

#[actix_rt::test]
async fn a_failed_part_sends_no_bulk_and_its_retry_sends_all_of_it() {
    let stop = CONSUMER.replace(
        "[consumers.bulk]\n",
        "[consumers.bulk]\non_error = \"stop\"\n",
    );
    let h = harness_with(Box::leak(stop.into_boxed_str()));
    let events = [event(1, true), event(2, false), event(3, true)];
    let failed = h
        .actor
        .send(ProcessBatch {
            batch: BatchRef::new(1, 1),
            mode: Mode::Normal,
            events: Arc::new(events.to_vec()),
            indices: Arc::new((0..events.len()).collect()),
            park: Default::default(),
        })
        .await
        .unwrap();
    assert!(failed.is_err());
    assert!(
        h.recorded.lock().unwrap().is_empty(),
        "row 1 was held, never sent"
    );
    // the redelivered part, now without the bad row, after the restart's backoff
    let fixed = [event(1, true), event(3, true)];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let sent = loop {
        let r = h
            .actor
            .send(ProcessBatch {
                batch: BatchRef::new(2, 2),
                mode: Mode::Normal,
                events: Arc::new(fixed.to_vec()),
                indices: Arc::new((0..fixed.len()).collect()),
                park: Default::default(),
            })
            .await
            .unwrap();
        if let Ok(p) = r {
            p.confirmed.await.unwrap().unwrap();
            break h.recorded.lock().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "never restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].payload,
        json!([{"id": 1, "x": 10}, {"id": 3, "x": 30}])
    );
}

/// Rows the Manager marks to park (lossy text with `canal.on_lossy_text = "park"`) become dead
/// letters with their reason instead of running their rules, in a normal run and in a park
/// run; the other rows trigger as usual. A ParkIds re-run (some triggers of the normal run
/// were refused) does not park them a second time: their dead letters went out with the
/// normal run.
#[actix_rt::test]
async fn rows_marked_to_park_become_dead_letters_once() {
    let h = harness();
    let events = [event(1, true), event(2, true), event(3, true)];
    let park = || BTreeMap::from([(1, "lossy text: column(s) x".to_string())]);
    let normal = part_parking(&h, 1, &events, Mode::Normal, park()).await;
    let plugins: Vec<&str> = normal.iter().map(|t| t.plugin.as_str()).collect();
    assert_eq!(plugins, vec!["dead_letter", "p"], "{normal:#?}");
    assert_eq!(normal[0].payload["event"]["data"]["id"], 2);
    assert_eq!(normal[0].payload["error"], "lossy text: column(s) x");
    assert_eq!(
        normal[1].payload,
        json!([{"id": 1, "x": 10}, {"id": 3, "x": 30}]),
        "row 2 is in no bulk"
    );
    let failures = part_parking(
        &h,
        2,
        &events,
        Mode::ParkFailures {
            reason: "test".into(),
        },
        park(),
    )
    .await;
    assert_eq!(
        failures.iter().map(|t| &t.id).collect::<Vec<_>>(),
        normal.iter().map(|t| &t.id).collect::<Vec<_>>()
    );
    let rerun = part_parking(
        &h,
        3,
        &events,
        Mode::ParkIds {
            ids: vec![normal[1].id.clone()],
            reason: "unroutable".into(),
        },
        park(),
    )
    .await;
    assert_eq!(
        rerun.len(),
        2,
        "the refused bulk's two rows only: {rerun:#?}"
    );
    assert!(
        rerun
            .iter()
            .all(|t| t.payload["original_id"] == json!(normal[1].id)),
        "{rerun:#?}"
    );
}
