//! The watermark windows against a model table: a seeded simulation of DBLog's algorithm with a
//! writer that inserts, updates (also the key) and deletes while a backfill reads chunks, the
//! binlog cut into random batches, some of them abandoned (their publish failed: the stream
//! comes again from the last ack and the reads whose rows they carried are read again), reads
//! whose rows were lost. After each run, for every key, the last event a consumer saw must carry the row's final
//! state (a deleted key's last event removes it), and every row of the final table must have
//! been seen: the table's final state is the independent expectation.

use super::*;
use crate::canal::connection::BatchRef;
use crate::event::{Columns, Position};
use std::collections::BTreeMap;

fn columns() -> Arc<Columns> {
    Arc::new(Columns::new(vec!["id".into(), "v".into()]))
}

fn row(cols: &Arc<Columns>, id: i64, v: i64) -> Row {
    Row::from_values(cols.clone(), vec![Value::Int(id), Value::Int(v)])
}

fn event(t: EventType, db: &str, table: &str, data: Row, old: Option<Row>, n: u64) -> ChangeEvent {
    ChangeEvent {
        destination: "d".into(),
        database: db.into(),
        table: table.into(),
        event_type: t,
        data,
        old,
        changed: Default::default(),
        primary_keys: Default::default(),
        position: Position {
            log_file: "bin.000001".into(),
            offset: n,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: n as i64,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

fn wm_table() -> WatermarkTable {
    WatermarkTable {
        database: "cc".into(),
        table: "watermark".into(),
    }
}

fn wm_event(kind: &str, nonce: &str, n: u64) -> ChangeEvent {
    let cols = Arc::new(Columns::new(vec!["id".into(), "watermark".into()]));
    let data = Row::from_values(
        cols,
        vec![
            Value::Text("b1".into()),
            Value::Text(format!("{kind}:{nonce}")),
        ],
    );
    event(EventType::Update, "cc", "watermark", data, None, n)
}

fn ddl_event(n: u64) -> ChangeEvent {
    let mut e = event(
        EventType::Alter,
        "db",
        "t",
        Row::from_values(Arc::new(Columns::new(vec![])), vec![]),
        None,
        n,
    );
    e.is_ddl = true;
    e.sql = Some("ALTER TABLE t COMMENT 'x'".into());
    e
}

fn plan(nonce: &str, layout: u64) -> ChunkPlan {
    ChunkPlan {
        nonce: nonce.into(),
        backfill: "b1".into(),
        database: "db".into(),
        table: "t".into(),
        key_columns: vec!["id".into()],
        consumer: None,
        layout,
    }
}

/// What a consumer of table `db.t` saw last, per key: Some(v) for a row, None for a delete.
type Seen = BTreeMap<i64, Option<i64>>;

fn apply_seen(seen: &mut Seen, e: &ChangeEvent) {
    if e.database != "db" || e.table != "t" {
        return;
    }
    let id = |r: &Row| match r.get("id") {
        Some(Value::Int(i)) => *i,
        other => panic!("no id: {other:?}"),
    };
    let v = |r: &Row| match r.get("v") {
        Some(Value::Int(i)) => *i,
        other => panic!("no v: {other:?}"),
    };
    match e.event_type {
        EventType::Insert | EventType::Snapshot => {
            seen.insert(id(&e.data), Some(v(&e.data)));
        }
        EventType::Update => {
            if let Some(Value::Int(old_id)) = e.old.as_ref().and_then(|o| o.get("id")) {
                seen.insert(*old_id, None);
            }
            seen.insert(id(&e.data), Some(v(&e.data)));
        }
        EventType::Delete => {
            seen.insert(id(&e.data), None);
        }
        _ => {}
    }
}

/// One run: a table of `initial` rows, a writer and a backfill of chunk size `chunk`, the
/// binlog delivered in random batches with random redeliveries.
fn run(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cols = columns();
    let mut table: BTreeMap<i64, i64> = BTreeMap::new();
    let initial = rng.usize(0..40);
    let mut next_id = 0i64;
    for _ in 0..initial {
        next_id += rng.i64(1..4);
        table.insert(next_id, 0);
    }
    let chunk = rng.usize(1..8);
    // the backfill ends at the largest key when it started (later rows come live)
    let max_key = table.keys().last().copied().unwrap_or(i64::MIN);
    let mut log: Vec<ChangeEvent> = Vec::new();
    let mut n = 0u64;
    let mut windows = Windows::new(wm_table());
    // consumer side
    let mut seen = Seen::new();
    let mut delivered = 0usize; // log events handed to the windows (the stream's cursor)
    let mut acked = 0usize; // the cursor a redelivery restarts from
    let (mut epoch, mut batch_id) = (1u64, 0i64);
    // backfill side: keyset pagination over `id`
    let mut last_key: Option<i64> = None;
    let mut done = false;
    // the current read: (nonce, stage: 0 low written, 1 rows read, 2 high written)
    let mut read: Option<(String, u8)> = None;
    let mut pending_rows: HashMap<String, Vec<Row>> = HashMap::new();
    let mut reads = 0u32;
    // the table's layout as the backfill last read it: the windows' DDL count before the
    // read, and how much of the log the read saw
    let mut layout: Option<(u64, usize)> = None;
    // per read: where its layout was read, and where its (first) high watermark is in the log
    let mut layout_at: HashMap<String, usize> = HashMap::new();
    let mut high_at: HashMap<String, usize> = HashMap::new();
    let mut steps = 0;
    while !(done && delivered == log.len()) {
        steps += 1;
        assert!(steps < 20_000, "seed {seed}: no progress");
        match rng.u8(0..10) {
            // the writer
            0..=2 => {
                n += 1;
                if rng.u8(0..40) == 0 {
                    // a DDL that changes nothing the model sees
                    log.push(ddl_event(n));
                    continue;
                }
                match rng.u8(0..4) {
                    0 => {
                        next_id += rng.i64(1..3);
                        let v = rng.i64(1..1000);
                        table.insert(next_id, v);
                        log.push(event(
                            EventType::Insert,
                            "db",
                            "t",
                            row(&cols, next_id, v),
                            None,
                            n,
                        ));
                    }
                    1 if !table.is_empty() => {
                        let k = *table.keys().nth(rng.usize(0..table.len())).unwrap();
                        let v = rng.i64(1..1000);
                        table.insert(k, v);
                        let old = Row::from_values(
                            Arc::new(Columns::new(vec!["v".into()])),
                            vec![Value::Int(0)],
                        );
                        log.push(event(
                            EventType::Update,
                            "db",
                            "t",
                            row(&cols, k, v),
                            Some(old),
                            n,
                        ));
                    }
                    2 if !table.is_empty() => {
                        // the key changes (to an unused key, maybe inside a read chunk)
                        let k = *table.keys().nth(rng.usize(0..table.len())).unwrap();
                        let mut to = rng.i64(0..next_id + 5);
                        while table.contains_key(&to) {
                            to += 1;
                        }
                        next_id = next_id.max(to);
                        let v = table.remove(&k).unwrap();
                        table.insert(to, v);
                        let old = Row::from_values(
                            Arc::new(Columns::new(vec!["id".into()])),
                            vec![Value::Int(k)],
                        );
                        log.push(event(
                            EventType::Update,
                            "db",
                            "t",
                            row(&cols, to, v),
                            Some(old),
                            n,
                        ));
                    }
                    3 if !table.is_empty() => {
                        let k = *table.keys().nth(rng.usize(0..table.len())).unwrap();
                        let v = table.remove(&k).unwrap();
                        log.push(event(
                            EventType::Delete,
                            "db",
                            "t",
                            row(&cols, k, v),
                            None,
                            n,
                        ));
                    }
                    _ => {}
                }
            }
            // the backfill: one step of its current read
            3..=5 if !done => match read.clone() {
                None => {
                    reads += 1;
                    let nonce = format!("r{reads}");
                    if layout.is_none() || rng.u8(0..5) == 0 {
                        layout = Some((windows.ddl_seen("db", "t"), log.len()));
                    }
                    let (ddl_seen, seen_log) = layout.unwrap();
                    layout_at.insert(nonce.clone(), seen_log);
                    windows.expect(plan(&nonce, ddl_seen));
                    n += 1;
                    log.push(wm_event("low", &nonce, n));
                    read = Some((nonce, 0));
                }
                Some((nonce, 0)) => {
                    let rows: Vec<Row> = table
                        .range(last_key.map_or(i64::MIN, |k| k + 1)..)
                        .take_while(|(k, _)| **k <= max_key)
                        .take(chunk)
                        .map(|(k, v)| row(&cols, *k, *v))
                        .collect();
                    // sometimes the rows are lost (the service restarted between SELECT and hand-over)
                    if rng.u8(0..20) != 0 {
                        windows.rows(&nonce, rows.clone());
                    }
                    pending_rows.insert(nonce.clone(), rows);
                    read = Some((nonce, 1));
                }
                Some((nonce, _)) => {
                    n += 1;
                    high_at.entry(nonce.clone()).or_insert(log.len());
                    log.push(wm_event("high", &nonce, n));
                    read = Some((nonce, 2));
                }
            },
            // the stream: deliver a batch
            6..=9 if delivered < log.len() => {
                let size = rng.usize(1..=(log.len() - delivered).min(6));
                batch_id += 1;
                let b = BatchRef {
                    epoch,
                    id: batch_id,
                };
                let batch = &log[delivered..delivered + size];
                let scan = windows.route(b, batch);
                let events = scan.events.as_deref().unwrap_or(batch);
                // what a consumer saw, whether the batch is then acked or rolled back
                for e in events {
                    apply_seen(&mut seen, e);
                }
                // a read emitted saw the table's current layout: no DDL between its layout
                // read and its high watermark
                for (nonce, _, _) in &scan.emitted {
                    let (from, to) = (layout_at[nonce], high_at[nonce]);
                    assert!(
                        !log[from..to].iter().any(|e| e.is_ddl),
                        "seed {seed}: read {nonce} emitted over a DDL after its layout was read"
                    );
                }
                for (nonce, _) in scan.failed {
                    layout = None;
                    pending_rows.remove(&nonce);
                    if read.as_ref().is_some_and(|(r, _)| *r == nonce) {
                        read = None; // read the chunk again
                    }
                }
                // a publish fails now and then: the batch is abandoned and the stream comes
                // again from the last ack (a new epoch); else it is acked
                let acked_now = rng.u8(0..6) != 0;
                for (nonce, outcome) in windows.settled(b, acked_now) {
                    let rows = pending_rows.remove(&nonce).unwrap();
                    if read.as_ref().is_none_or(|(r, _)| *r != nonce) {
                        continue;
                    }
                    read = None;
                    if let Outcome::Failed(_) = outcome {
                        layout = None;
                    }
                    if let Outcome::Confirmed { .. } = outcome {
                        match rows.last() {
                            Some(r) if rows.len() == chunk => {
                                last_key = Some(match r.get("id") {
                                    Some(Value::Int(i)) => *i,
                                    _ => unreachable!(),
                                })
                            }
                            _ => done = true,
                        }
                    }
                }
                if acked_now {
                    delivered += size;
                } else {
                    epoch += 1;
                    delivered = acked;
                }
                acked = delivered;
            }
            _ => {}
        }
    }
    // every key the consumer knows of ends in the table's final state
    for (k, v) in &seen {
        assert_eq!(table.get(k).copied(), *v, "seed {seed}: key {k}");
    }
    // and every final row was seen
    for (k, v) in &table {
        assert_eq!(
            seen.get(k),
            Some(&Some(*v)),
            "seed {seed}: row {k} never arrived"
        );
    }
}

#[test]
fn every_key_ends_in_the_tables_final_state_across_seeds() {
    let seeds: u64 = std::env::var("SNAPSHOT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    for seed in 0..seeds {
        run(seed);
    }
}
